"""The teacher contract, adapters that present a user's network under it, and a check of it.

The contract: a teacher is an `eqx.Module` called on ONE example, `denoiser(z, t) -> x_hat` (or `denoiser(z, t,
label)` for a conditional one), that predicts the clean data x on the data's own scale from `z = alpha_t x +
sigma_t eps`, with t the VP time in [0, 1] of `sampling.Schedule` (alpha, sigma = `schedule.alpha_sigma(t)`). The
algorithms `vmap` and `jit` it. Every floating-point array in it is a parameter; the adapters add none.
"""

from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from sampling import Schedule, diffuse


def _call(net, z, time, label):
    return net(z, time) if label is None else net(z, time, label)


def _same(t):
    return t


def _frozen(a):
    """An array as nested tuples: hashable, so it can be a static field and is no parameter."""
    a = np.asarray(a, np.float32)
    return a.item() if a.ndim == 0 else tuple(_frozen(row) for row in a)


class SameLogSNR(eqx.Module):
    """Our time t -> the time tau of a net's own VP schedule with the same log-SNR (a `time_fn` below).

    alpha and sigma of a VP schedule depend on log-SNR alone, so z passes unchanged and only the net's time input
    moves. Solves `their_logsnr(tau) = schedule.logsnr(t)` by bisection on `[lo, hi]` (`their_logsnr` decreasing;
    beyond their range tau stops at `lo` or `hi`). Jittable; not differentiable in t.

    **Arguments:**
    - `their_logsnr`: the net's log-SNR of its own time, e.g. `Schedule(shift=2.0).logsnr`, or for a discrete DDPM
      schedule of T steps `lambda i: jnp.interp(i, jnp.arange(T), jnp.log(abar / (1 - abar)))`, `hi=T - 1`.
    - `schedule`: ours. `lo`, `hi`: the net's time range.
    """

    their_logsnr: Callable
    schedule: Schedule = Schedule()
    lo: float = eqx.field(static=True, default=0.0)
    hi: float = eqx.field(static=True, default=1.0)

    def __call__(self, t):
        target = self.schedule.logsnr(t)

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            later = self.their_logsnr(mid) > target  # mid is less noisy than t: tau lies after it
            return jnp.where(later, mid, lo), jnp.where(later, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 40, halve, (jnp.full_like(target, self.lo), jnp.full_like(target, self.hi)))
        return 0.5 * (lo + hi)


class FromX(eqx.Module):
    """An x-prediction net with a time input of its own: `net(z, time_fn(t)[, label])`.

    **Arguments:**
    - `net`: `net(z, tau[, label]) -> x_hat`.
    - `time_fn`: our t -> the net's time tau, e.g. `SameLogSNR(Schedule(shift=2.0).logsnr)` for a net trained on
      another VP schedule (the FromEps and FromV below take one too; default: the same t).
    """

    net: Callable
    time_fn: Callable = _same

    def __call__(self, z, t, label=None):
        return _call(self.net, z, self.time_fn(t), label)


class FromEps(eqx.Module):
    """An eps-prediction net as a teacher: `x_hat = (z - sigma eps) / alpha` wherever `alpha >= alpha_min`.

    Safe at t = 1, where alpha = 3e-7: there the plain conversion multiplies errors in eps by sigma / alpha = 3e6,
    and eps holds x only in a term alpha / sigma of its size. So below `alpha_min` the deviation from the data mean,
    `(z - alpha mean - sigma eps) / alpha`, is scaled by `(alpha / alpha_min)^2`: it fades to the exact limit
    `E[x | z_1] = E[x]`, and no error in eps is amplified more than `1 / alpha_min` times. The price, where
    `alpha < alpha_min` only (t > 0.994 on the cosine schedule): for data of covariance S, x_hat misses up to
    `0.39 alpha_min |S| |z - alpha mean| / sigma^2` of its deviation from the mean (|S|: largest eigenvalue).

    **Arguments:**
    - `net`: `net(z, tau[, label]) -> eps`. `schedule`: ours. `time_fn`: as in `FromX`.
    - `mean`: the data mean E[x], a float or an array shaped like z (x_hat at t = 1, which eps cannot tell).
    - `alpha_min`: where the fade starts (0: the plain conversion).
    """

    net: Callable
    schedule: Schedule = Schedule()
    time_fn: Callable = _same
    mean: float = eqx.field(static=True, default=0.0, converter=_frozen)
    alpha_min: float = eqx.field(static=True, default=0.01)

    def __call__(self, z, t, label=None):
        alpha, sigma = self.schedule.alpha_sigma(t)
        eps, mean = _call(self.net, z, self.time_fn(t), label), jnp.asarray(self.mean)
        return mean + alpha * (z - alpha * mean - sigma * eps) / jnp.maximum(alpha, self.alpha_min) ** 2


class FromV(eqx.Module):
    """A v-prediction net (`v = alpha eps - sigma x`) as a teacher: `x_hat = alpha z - sigma v`.

    Safe everywhere: both coefficients lie in [0, 1], so an error in v moves x_hat by no more (at t = 1, x = -v).

    **Arguments:**
    - `net`: `net(z, tau[, label]) -> v`. `schedule`: ours. `time_fn`: as in `FromX`.
    """

    net: Callable
    schedule: Schedule = Schedule()
    time_fn: Callable = _same

    def __call__(self, z, t, label=None):
        alpha, sigma = self.schedule.alpha_sigma(t)
        return alpha * z - sigma * _call(self.net, z, self.time_fn(t), label)


class FromEDM(eqx.Module):
    """An EDM denoiser `D(y, s) -> x_hat` of `y = x + s n` (variance exploding) as a teacher.

    `z = alpha (x + (sigma / alpha) n)`, so `s = sigma / alpha = exp(-logsnr / 2)`, `y = z / alpha = z sqrt(1 + s^2)`.
    Safe at t = 1: s = 3e6 and y are finite in float32, and EDM's preconditioning (input times 1 / sqrt(s^2 +
    sigma_data^2), skip connection fading to 0) keeps D finite. An EDM net knows s up to its `sigma_max` (80) only:
    when set, noisier z are presented at `sigma_max` (`y = z sqrt(1 + sigma_max^2)`), as EDM's own sampler starts
    from pure noise of std `sigma_max`; x_hat then moves by at most `|S z| / sigma_max`.

    **Arguments:**
    - `net`: `net(y, s[, label]) -> x_hat`. `schedule`: ours.
    - `sigma_max`: None, or the largest s the net is called with.
    """

    net: Callable
    schedule: Schedule = Schedule()
    sigma_max: Optional[float] = eqx.field(static=True, default=None)

    def __call__(self, z, t, label=None):
        s = jnp.exp(-0.5 * self.schedule.logsnr(t))
        if self.sigma_max is not None:
            s = jnp.minimum(s, self.sigma_max)
        return _call(self.net, z * jnp.sqrt(1.0 + s**2), s, label)


def check_teacher(denoiser, example, schedule: Schedule = Schedule(), label=None):
    """Raise `ValueError` naming what keeps `denoiser` from being a teacher; return None if nothing does.

    Calls it on `example` noised to t = 0.5, then to t = 0, 0.5, 1 under `jax.jit(jax.vmap(...))` as the algorithms
    do. Checks: an `eqx.Module` with `__call__`; the label handling asked for; output shaped like z; finite outputs;
    at t = 1 none over 100 (1 + max |example|) (the x-prediction there is E[x]).

    **Arguments:**
    - `denoiser`: the teacher. `schedule`: the one the distillation will use.
    - `example`: ONE data example, without a batch axis (e.g. `(D,)` or `(H, W, C)`).
    - `label`: None for `denoiser(z, t)`, or one class label for a conditional `denoiser(z, t, label)`.
    """
    name = type(denoiser).__name__
    if not isinstance(denoiser, eqx.Module):
        raise ValueError(f"a teacher must be an eqx.Module (its arrays are the parameters); got {name}")
    if not callable(denoiser):
        raise ValueError(f"the teacher {name} is not callable: define __call__(self, z, t[, label])")
    example = jnp.asarray(example, jnp.float32)
    hint = (f"the teacher is called on one example z shaped like `example` {example.shape} and a scalar t (the "
            f"algorithms vmap it); if the first axis of `example` is a batch, pass example[0]")
    times = jnp.array([0.0, 0.5, 1.0])
    zs = diffuse(schedule, jnp.stack([example] * 3), times, jr.normal(jr.key(0), (3,) + example.shape))
    call = lambda z, t: _call(denoiser, z, t, label)
    try:
        out = call(zs[1], times[1])
    except Exception as e:
        said = f"denoiser(z, t{'' if label is None else ', label'}) raised {type(e).__name__}: {str(e)[:300]}"
        if isinstance(e, TypeError) and "positional argument" in str(e):  # the number of arguments is wrong
            hint = "a conditional teacher needs `label=`" if label is None else "it takes no label: pass label=None"
        raise ValueError(f"{said}; {hint}") from e
    if jnp.shape(out) != example.shape:
        raise ValueError(f"the teacher returned shape {jnp.shape(out)} for z of shape {example.shape}; {hint}")
    try:
        outs = jax.jit(jax.vmap(call))(zs, times)
    except Exception as e:
        raise ValueError(f"the teacher fails under jax.jit(jax.vmap(...)) as the algorithms call it (no Python `if` "
                         f"or float() on z or t): {type(e).__name__}: {str(e)[:300]}") from e
    for t, o in zip(times.tolist(), outs):
        if not jnp.all(jnp.isfinite(o)):
            raise ValueError(f"the teacher's output is not finite at t = {t:g} ({int((~jnp.isfinite(o)).sum())} of "
                             f"{o.size} entries); an eps-, v- or EDM net needs an adapter (FromEps, FromV, FromEDM)")
    big, limit = float(jnp.abs(outs[2]).max()), 100.0 * (1.0 + float(jnp.abs(example).max()))
    if big > limit:
        raise ValueError(f"the teacher's output at t = 1 reaches {big:.4g} > 100 (1 + max |example|) = {limit:.4g}: "
                         f"the x-prediction there is E[x]; (z - sigma eps) / alpha does this, use FromEps")
