"""The variance-preserving noise process, its posterior, and the samplers.

Notation follows Salimans et al., "Multistep Distillation of Diffusion Models via Moment Matching"
(NeurIPS 2024), Sec. 2.1: `z_t = alpha_t x + sigma_t eps` with `alpha_t^2 + sigma_t^2 = 1`, t in [0, 1].
Everything is written in log-SNR `lambda_t = log(alpha_t^2 / sigma_t^2)` because that is where the
formulas stay finite.

Shapes: `x`, `z` are `(*batch, *data)`; times are scalars or `(*batch,)` and are right-padded with
singleton axes to broadcast against the data (see `bcast`). A denoiser is an unbatched callable
`denoiser(z, t) -> x_hat` (the Equinox convention); the samplers `vmap` it over the leading axis.
"""

import math
from typing import Callable

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# Input checks. They run on concrete values only: inside `jit` the values are tracers and the
# checks are skipped (everything below is jittable), so call the public functions eagerly once
# if you want the errors.


def _concrete(x):
    return not isinstance(x, jax.core.Tracer)


def check_times(t, s=None):
    """Raise `ValueError` if `t` (or `s`) is outside [0, 1] or `s > t`, where values are concrete."""
    for name, v in (("t", t), ("s", s)):
        if v is not None and _concrete(v):
            a = np.asarray(v, dtype=np.float64)
            if not np.all((a >= 0.0) & (a <= 1.0)):
                raise ValueError(f"{name} must lie in [0, 1]; got {name} = {a[(a < 0) | (a > 1) | np.isnan(a)][:5]}")
    if s is not None and _concrete(t) and _concrete(s):
        ta, sa = np.broadcast_arrays(np.asarray(t), np.asarray(s))
        if np.any(sa > ta):
            raise ValueError(f"need 0 <= s <= t <= 1; got s = {sa[sa > ta][:5]} > t = {ta[sa > ta][:5]}")


def check_num_steps(num_steps):
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")


def bcast(t, x):
    """Right-pad time `t` (scalar or `(*batch,)`) with singleton axes so it broadcasts against `x`."""
    t = jnp.asarray(t)
    return jnp.reshape(t, t.shape + (1,) * (jnp.ndim(x) - t.ndim))


# ----------------------------------------------------------------------------------------------
# Schedule (paper Sec. 2.1 and 3.3; Hoogeboom et al. 2023 for the shift).


class Schedule(eqx.Module):
    """Cosine VP schedule in log-SNR, optionally shifted: `lambda(t) = -2 log tan(pi t / 2) + shift`.

    `Schedule()` is the cosine schedule. `Schedule.for_resolution(res, base=64)` gives the shifted
    schedule of simple diffusion, `shift = 2 log(base / res)`. Log-SNR is clipped to
    `[logsnr_min, logsnr_max]`, so `logsnr`, `alpha_sigma` and their derivatives are finite on all
    of [0, 1]; at t = 1, `alpha <= 2e-6` (float32 resolution of t near 1 sets that, with any shift).
    """

    shift: float = eqx.field(default=0.0, static=True)
    logsnr_min: float = eqx.field(default=-30.0, static=True)
    logsnr_max: float = eqx.field(default=30.0, static=True)

    @classmethod
    def for_resolution(cls, res: int, base: int = 64, **kw):
        return cls(shift=2.0 * math.log(base / res), **kw)

    def logsnr(self, t):
        # tan(pi/2 - x) = 1 / tan(x): evaluate near t = 1 through 1 - t, so float32 never takes the
        # log of tan(pi/2), which is negative or infinite in float32.
        t = jnp.clip(jnp.asarray(t, jnp.float32), 1e-7, 1.0 - 1e-7)
        half = 0.5 * jnp.pi
        lam = jnp.where(t < 0.5, -2.0 * jnp.log(jnp.tan(half * t)), 2.0 * jnp.log(jnp.tan(half * (1.0 - t))))
        return jnp.clip(lam + self.shift, self.logsnr_min, self.logsnr_max)

    def alpha_sigma(self, t):
        lam = self.logsnr(t)
        return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

    def time(self, logsnr):
        """Inverse of `logsnr` on the unclipped range."""
        return 2.0 / jnp.pi * jnp.arctan(jnp.exp(-(jnp.asarray(logsnr) - self.shift) / 2))

    def from_grid(self, u, grid_shift):
        """The time t of this schedule with the log-SNR that time u has under the cosine schedule shifted by
        `grid_shift`: `tan(pi t / 2) = tan(pi u / 2) exp((shift - grid_shift) / 2)`, so u = 1 gives t = 1 and u = 0
        gives t = 0. A sampler's grid uniform in u is uniform in t when `grid_shift == shift`."""
        half, c = 0.5 * jnp.pi * jnp.asarray(u, jnp.float32), math.exp((self.shift - grid_shift) / 2)
        return jnp.clip(jnp.arctan2(jnp.sin(half) * c, jnp.cos(half)) / (0.5 * jnp.pi), 0.0, 1.0)

    def to_grid(self, t, grid_shift):
        """Inverse of `from_grid`: the grid time u of this schedule's time t."""
        return Schedule(shift=grid_shift).from_grid(t, self.shift)


# ----------------------------------------------------------------------------------------------
# Forward process and posterior (Eq. 1-2).


def diffuse(schedule: Schedule, x, t, noise):
    """Forward diffusion `z_t = alpha_t x + sigma_t noise` (a draw from q(z_t | x))."""
    alpha, sigma = schedule.alpha_sigma(bcast(t, x))
    return alpha * x + sigma * noise


def posterior(schedule: Schedule, z_t, x, t, s):
    """Mean and std of q(z_s | z_t, x) for 0 <= s <= t <= 1 (Eq. 1-2), in a form finite at s = t.

    With `r = 1 - exp(lambda_t - lambda_s)` (computed as `-expm1`):
        mean = (alpha_t sigma_s^2 / (alpha_s sigma_t^2)) z_t + alpha_s r x,   var = sigma_s^2 r.
    The paper's `(1/sigma_s^2 + alpha_{t|s}^2/sigma_{t|s}^2)^-1` divides by `sigma_{t|s}^2 = 0` at
    s = t, which Algorithm 2 hits whenever `s + delta` is clipped to 1; this form gives `z_t` there.

    **Arguments:**
    - `z_t`, `x`: `(*batch, *data)`.
    - `t`, `s`: scalars or `(*batch,)`, `s <= t`.

    **Returns:** `(mean, std)`, `mean` shaped like `z_t`, `std` broadcastable to it.
    """
    check_times(t, s)
    lt, ls = schedule.logsnr(bcast(t, z_t)), schedule.logsnr(bcast(s, z_t))
    alpha_s, sigma_s = schedule.alpha_sigma(bcast(s, z_t))
    _, sigma_t = schedule.alpha_sigma(bcast(t, z_t))
    r = -jnp.expm1(jnp.minimum(lt - ls, 0.0))  # in [0, 1]; the min guards rounding when s = t
    # alpha_t sigma_s^2 / (alpha_s sigma_t^2) = exp((lt - ls) / 2) sigma_s / sigma_t
    coef_z = jnp.exp(0.5 * jnp.minimum(lt - ls, 0.0)) * sigma_s / sigma_t
    mean = coef_z * z_t + alpha_s * r * x
    std = sigma_s * jnp.sqrt(r)
    return mean, std


# ----------------------------------------------------------------------------------------------
# Samplers (Algorithm 1 and its deterministic and marginal variants).


def ancestral_step(schedule, z_t, x_hat, t, s, key):
    """z_s ~ q(z_s | z_t, x_hat): Algorithm 1's update."""
    mean, std = posterior(schedule, z_t, x_hat, t, s)
    return mean + std * jr.normal(key, z_t.shape, z_t.dtype)


def ddim_step(schedule, z_t, x_hat, t, s, key):
    """DDIM (Song et al. 2021): keep the implied noise, `z_s = alpha_s x_hat + sigma_s eps_hat`."""
    del key
    alpha_t, sigma_t = schedule.alpha_sigma(bcast(t, z_t))
    alpha_s, sigma_s = schedule.alpha_sigma(bcast(s, z_t))
    eps_hat = (z_t - alpha_t * x_hat) / sigma_t
    return alpha_s * x_hat + sigma_s * eps_hat


def marginal_step(schedule, z_t, x_hat, t, s, key):
    """Re-noise with fresh noise, z_s ~ q(z_s | x_hat) (DMD2's multi-step generator; paper Sec. 5.2)."""
    del t
    return diffuse(schedule, x_hat, s, jr.normal(key, z_t.shape, z_t.dtype))


STEPS = {"ancestral": ancestral_step, "ddim": ddim_step, "marginal": marginal_step}


def sd_logsnr(timesteps, num_train=1000, beta_start=0.00085, beta_end=0.012):
    """log-SNR of DDPM timesteps (0..999) of Stable Diffusion's scaled-linear schedule (numpy, float64)."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train) ** 2
    abar = np.cumprod(1.0 - betas)[np.asarray(timesteps)]
    return np.log(abar / (1.0 - abar))


def dmd2_official_times(schedule: "Schedule", num_steps: int, data_var: float = 1.0):
    """DMD2's official k-step grid moved onto `schedule`: the DDPM timesteps `999, 999 - 1000 // k, ...`
    (k = 4: 999 / 749 / 499 / 249, `sd_unified_model.py`'s `denoising_step_list` on SDXL's scaled-linear
    schedule) at the same log-SNR relative to the data, `lambda(t) = lambda_SD(T) - log(data_var)` (SD's latents
    have about unit variance). The first step is pure noise, t = 1. Returns a tuple of k Python floats.

    For ring8 (variance 2 per coordinate) and k = 4: t = 1, 0.89, 0.74, 0.49, against the uniform grid's
    1, 0.75, 0.5, 0.25: the later steps start noisier, so they can still move mass between modes.
    """
    check_num_steps(num_steps)
    steps = np.arange(999, 0, -(1000 // num_steps))[:num_steps]
    lam = sd_logsnr(steps) - np.log(data_var)
    t = np.asarray(schedule.time(jnp.asarray(lam, jnp.float32)), np.float64)
    t[0] = 1.0
    return tuple(round(float(x), 4) for x in t)


def grid_times(schedule: "Schedule", num_steps: int, grid_shift: float):
    """The k input times of a sampler uniform in the grid time u of the cosine schedule shifted by `grid_shift`
    (`Schedule.from_grid` of u = 1, (k-1)/k, ..., 1/k), as Python floats; the first is 1 (pure noise).

    With the schedule's own shift this is the uniform grid. An 8x8 image's schedule is shifted by
    2 log(64 / 8) = 4.16, so its uniform 8-step grid jumps from pure noise to sigma = 0.63 in one step and
    spends the other seven below it; `grid_shift = 0` spaces the steps as the unshifted cosine schedule does.
    """
    check_num_steps(num_steps)
    u = 1.0 - np.arange(num_steps) / num_steps
    t = np.asarray(schedule.from_grid(u, grid_shift), np.float64)
    t[0] = 1.0
    return tuple(float(x) for x in t)


def check_step_times(times, num_steps):
    """Raise `ValueError` unless `times` is `(num_steps,)`, strictly decreasing, in (0, 1] (concrete values only)."""
    a = np.asarray(times, np.float64) if _concrete(times) else None
    if np.shape(times) != (num_steps,):
        raise ValueError(f"need {num_steps} step times (one per step); got step times of shape {np.shape(times)}")
    if a is not None and not (np.all(a > 0) and np.all(a <= 1) and np.all(np.diff(a) < 0)):
        raise ValueError(f"step times must be strictly decreasing in (0, 1]; got {a.tolist()}")


def step_grid(num_steps: int, times=None):
    """`(time_of, next_of)`: step i's input time and the time its output is re-noised to (0 after the last step).
    `times` None: the uniform grid t = 1 - i/k; else the checked `(num_steps,)` decreasing input times. Both take
    an int or an int array."""
    if times is None:
        times = 1.0 - np.arange(num_steps) / num_steps
    check_step_times(times, num_steps)
    times = jnp.asarray(times, jnp.float32)
    nexts = jnp.append(times[1:], 0.0)
    return (lambda i: times[i]), (lambda i: nexts[i])


def sample(denoiser: Denoiser, schedule: Schedule, key, shape, num_steps: int, step: str = "ancestral", label=None,
           times=None):
    """Sample on the uniform grid t = 1, (k-1)/k, ..., 1/k (or on `times`) as one `lax.scan` (Algorithm 1).

    **Arguments:**
    - `denoiser`: unbatched `denoiser(z, t) -> x_hat`; it is `vmap`ped over the leading axis.
    - `key`: PRNG key; step i uses `fold_in(key, i)`, the initial noise `fold_in(key, num_steps)`.
    - `shape`: batch shape of the samples, e.g. `(n, d)` or `(n, h, w, c)`.
    - `num_steps`: k >= 1, a Python int.
    - `step`: `"ancestral"` (posterior re-noising), `"ddim"` or `"marginal"`.
    - `label`: None, or `(n,)` classes for a conditional `denoiser(z, t, label)`.
    - `times`: None (the uniform grid), or the `(num_steps,)` decreasing input times of the steps; the step
      after the last goes to t = 0 (e.g. a DMD2 generator's own grid, `dmd2.DMD2Config.times`).

    **Returns:** the last `x_hat`, shaped `shape`.
    """
    check_num_steps(num_steps)
    time_of, next_of = step_grid(num_steps, times)
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose one of {sorted(STEPS)}")
    step_fn = STEPS[step]
    if label is None:
        batched = jax.vmap(denoiser, in_axes=(0, None))
    else:
        batched = lambda z, t: jax.vmap(denoiser, in_axes=(0, None, 0))(z, t, label)
    z1 = jr.normal(jr.fold_in(key, num_steps), shape)

    def body(carry, i):  # carries the latest x_hat rather than stacking all k of them
        z_t, _ = carry
        t, s = time_of(i), next_of(i)
        x_hat = batched(z_t, t)
        return (step_fn(schedule, z_t, x_hat, t, s, jr.fold_in(key, i)), x_hat), None

    out = jax.eval_shape(batched, z1, time_of(0))
    (_, x_hat), _ = jax.lax.scan(body, (z1, jnp.zeros(out.shape, out.dtype)), jnp.arange(num_steps))
    return x_hat


def ancestral_sample(denoiser: Denoiser, schedule: Schedule, key, shape, num_steps: int, label=None):
    """Algorithm 1: `x_hat = g(z_t, t)`, `z_s ~ q(z_s | z_t, x_hat)`; returns the last `x_hat`."""
    return sample(denoiser, schedule, key, shape, num_steps, "ancestral", label)


def ddim_sample(denoiser: Denoiser, schedule: Schedule, key, shape, num_steps: int, label=None):
    """Deterministic DDIM sampler on Algorithm 1's grid (the key only draws z_1)."""
    return sample(denoiser, schedule, key, shape, num_steps, "ddim", label)


# ----------------------------------------------------------------------------------------------
# Time distributions and loss weights (Sec. 3.3).

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def edm_sigma(u, smin=SIGMA_MIN, smax=SIGMA_MAX, rho=RHO):
    """EDM's test-time noise levels (Karras et al. 2022, Eq. 5) as a continuous map of u in [0, 1]."""
    return (smax ** (1 / rho) + u * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def edm_time(schedule: Schedule, key, shape, smin=SIGMA_MIN, smax=SIGMA_MAX, rho=RHO):
    """Draw s ~ p(s): EDM's test-time schedule mapped to VP time through `lambda = -2 log sigma_edm`.

    The schedule's shift moves log-SNR, so `schedule.logsnr(s) = -2 log sigma_edm + shift`.
    """
    sigma = edm_sigma(jr.uniform(key, shape), smin, smax, rho)
    return schedule.time(-2.0 * jnp.log(sigma) + schedule.shift)


def edm_train_time(schedule: Schedule, key, shape, p_mean=-1.2, p_std=1.2):
    """EDM's training distribution, log sigma ~ N(p_mean, p_std^2), mapped to VP time (for teachers)."""
    log_sigma = p_mean + p_std * jr.normal(key, shape)
    return jnp.clip(schedule.time(-2.0 * log_sigma + schedule.shift), 0.0, 1.0)


def karras_grid_time(schedule: Schedule, key, shape, lo=0.02, hi=0.98, levels=1000):
    """DMD2's noise levels: a uniform index in [lo, hi] of a `levels`-point Karras grid (sigma 0.002..80, rho 7)."""
    idx = jr.randint(key, shape, int(lo * levels), int(hi * levels) + 1)
    sigma = edm_sigma(1.0 - idx / (levels - 1))  # index 0 = sigma_min, as in DMD2's code
    return schedule.time(-2.0 * jnp.log(sigma) + schedule.shift)


def edm_weight(schedule: Schedule, t, sigma_data=0.5):
    """EDM's weight for an x-prediction loss, `(sigma^2 + sigma_data^2) / (sigma sigma_data)^2`.

    `sigma = exp(-lambda_t / 2)` is the EDM noise level of VP time t.
    """
    sigma2 = jnp.exp(-schedule.logsnr(t))
    return (sigma2 + sigma_data**2) / (sigma2 * sigma_data**2)


def flat_weight(schedule: Schedule, t):
    """w(s) = 1, recommended by Sec. 3.3 for k = 1, 2."""
    return jnp.ones_like(jnp.asarray(t, jnp.float32))


def dmd_weight(x, x_teacher):
    """DMD's adaptive weight `1 / mean|x - x_teacher|` per example (stop-gradient), Yin et al. 2023.

    `x`, `x_teacher`: `(B, *data)`; returns `(B,)`.
    """
    err = einops.reduce(jnp.abs(x - x_teacher), "b ... -> b", "mean")
    return jax.lax.stop_gradient(1.0 / jnp.maximum(err, 1e-6))
