"""The distillation objectives as pure, jittable functions.

Moment matching: Salimans et al., "Multistep Distillation of Diffusion Models via Moment Matching",
NeurIPS 2024 (equation and algorithm numbers are theirs). DMD2: Yin et al., "Improved Distribution
Matching Distillation for Fast Image Synthesis", NeurIPS 2024 (details from the official code).

Conventions:
- Models are unbatched denoisers `model(z, t[, label]) -> x_hat`; `apply` vmaps them.
- Batches: `x`, `z` are `(B, *data)`, times `(B,)`, labels `(B,)` int or None.
- `||a||^2` and `a^T b` are averaged over the data dimensions (as EDM does); that rescales every loss by
  the constant 1/D and leaves every identity below (Eq. 6 = 8 = 9 up to documented factors) intact.
- `sg` is `jax.lax.stop_gradient`. Gradients reach only what the docstring says they reach.
"""

from typing import Any, NamedTuple, Optional

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from sampling import Schedule, bcast, diffuse, dmd_weight, edm_time, edm_weight, flat_weight, posterior

sg = jax.lax.stop_gradient
WEIGHTINGS = ("edm", "flat", "dmd")
ZS_SAMPLING = ("posterior", "marginal")


# ----------------------------------------------------------------------------------------------
# What a parameter is.


class Frozen(eqx.Module):
    """Arrays that belong to a model but are not its parameters: no optimiser, weight decay, gradient, Jacobian
    or preconditioner ever touches them.

    Wrap any part of a model that must stay as it is: a whole submodule (`Frozen(net)`, called like `net`) or a
    buffer of your own teacher, e.g. fixed Fourier frequencies (`self.freqs = Frozen(freqs)` in `__init__`, read
    as `self.freqs.get()`). `params(model)` leaves a `Frozen` out, and everything that takes parameters goes
    through it: `mmd.init_player` and `mmd.apply_grads` hand only `params` to the optimiser (so AdamW's weight
    decay cannot shrink a frozen array), and Algorithm 3's moments, preconditioner and data term are trees shaped
    like `params(teacher)`. Values read through `get` or `__call__` are under stop-gradient. Without the wrapper,
    every floating-point array of a model is a parameter.
    """

    tree: Any  # a module, an array or any pytree

    def get(self):
        """The wrapped tree, its arrays under stop-gradient."""
        arrays, rest = eqx.partition(self.tree, eqx.is_inexact_array)
        return eqx.combine(sg(arrays), rest)

    def __call__(self, *args, **kwargs):
        return self.get()(*args, **kwargs)


def frozen(tree):
    """`tree` wrapped in `Frozen` (a `Frozen` is returned as it is)."""
    return tree if isinstance(tree, Frozen) else Frozen(tree)


def partition(model):
    """`(params(model), the rest)`; `eqx.combine` of the two is `model` again."""
    return eqx.partition(model, eqx.is_inexact_array, is_leaf=lambda x: isinstance(x, Frozen))


def params(model):
    """The parameters of `model`: its floating-point arrays outside every `Frozen`, None in place of the rest.

    Also filters a gradient tree of `model` (`eqx.filter_grad`) down to the parameters' gradients.
    """
    return partition(model)[0]


# ----------------------------------------------------------------------------------------------
# Batched calls and reductions.


def apply(model, z, t, label=None):
    """Evaluate an unbatched denoiser on a batch: `(B, *data), (B,) -> (B, *data)`."""
    if label is None:
        return jax.vmap(model)(z, t)
    return jax.vmap(model)(z, t, label)


def features(model, z, t, label=None):
    """Batched bottleneck features `model.features(z, t[, label])` (read by DMD2's discriminator)."""
    if label is None:
        return jax.vmap(model.features)(z, t)
    return jax.vmap(model.features)(z, t, label)


def sqnorm(a):
    """`||a||^2 / D` per example: `(B, *data) -> (B,)`."""
    return einops.reduce(a**2, "b ... -> b", "mean")


def inner(a, b):
    """`a^T b / D` per example: `(B, *data) -> (B,)`."""
    return einops.reduce(a * b, "b ... -> b", "mean")


class EDMWeight(eqx.Module):
    """EDM's w(s) for data of scale `sigma_data` (`sampling.edm_weight`), as a weighting callable; `"edm"` is
    `EDMWeight(0.5)`, EDM's scale of images in [-1, 1]. `mmd.MMConfig.sigma_data` hands it to the MM losses."""

    sigma_data: float = eqx.field(static=True)

    def __call__(self, schedule: Schedule, s, x, x_teacher):
        return edm_weight(schedule, s, self.sigma_data)


def loss_weight(weighting, schedule: Schedule, s, x, x_teacher):
    """w(s) of Sec. 3.3: `"edm"`, `"flat"`, `"dmd"` (1 / mean|x - x_teacher|, stop-gradient), or a callable
    `(schedule, s, x, x_teacher) -> (B,)` such as `EDMWeight(sigma_data)`."""
    if callable(weighting):
        return weighting(schedule, s, x, x_teacher)
    if weighting == "edm":
        return edm_weight(schedule, s)
    if weighting == "flat":
        return flat_weight(schedule, s)
    if weighting == "dmd":
        return dmd_weight(x, x_teacher)
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS} or pass a callable")


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance of the teacher (Sec. 3.3).


class GuidedTeacher(eqx.Module):
    """A teacher with classifier-free guidance and prediction clipping, differentiated straight-through.

    Value: `x_c + scale (x_c - x_u)` (scale 0 is the unguided prediction; DMD2's "guidance 1.75" is
    scale 0.75 here), clipped to `[-clip, clip]` if `clip` is set. Gradient (in x and in parameters,
    so also inside Algorithm 3's JVP): that of the unmodified conditional teacher `x_c`, the
    straight-through approximation of Sec. 3.3. `model(z, t, None)` must be the unconditional (null class).
    """

    model: eqx.Module
    scale: float = eqx.field(static=True, default=0.0)
    clip: Optional[float] = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.scale < 0:
            raise ValueError(f"guidance scale must be >= 0; got {self.scale}")

    def __call__(self, z, t, label=None):
        plain = self.model(z, t) if label is None else self.model(z, t, label)
        guided = plain
        if self.scale != 0.0:
            guided = plain + self.scale * (plain - self.model(z, t, None))
        if self.clip is not None:
            guided = jnp.clip(guided, -self.clip, self.clip)
        return plain + sg(guided - plain)

    def features(self, z, t, label=None):
        return self.model.features(z, t) if label is None else self.model.features(z, t, label)


class StraightThrough(eqx.Module):
    """Values of `value` (e.g. a closed-form denoiser), gradients and parameter JVPs of `model` (a network).

    Algorithm 3 with the exact teacher (`--teacher exact`): the moments are taken in the parameter space
    of the network regressed onto the closed form, while the residual `x~ - g(z_s)` uses the exact
    denoiser. The closed form's own parameters (a mixture's weights, means, covariances) give only a few
    dozen moments, too few to pin down a generator, and the students diverged with them. So `value` is
    `Frozen`: the parameters, the preconditioner and nu are `model`'s alone.
    """

    model: eqx.Module
    value: Frozen = eqx.field(converter=frozen)

    def __call__(self, z, t, label=None):
        plain = self.model(z, t) if label is None else self.model(z, t, label)
        exact = self.value(z, t) if label is None else self.value(z, t, label)
        return plain + sg(exact - plain)


class Rebased(eqx.Module):
    """`model(z) + sg(base(z) - anchor(z))`: values of `base` while `model` equals `anchor`, and a trainable
    offset from there (gradients and parameters are `model`'s).

    With the exact teacher (`--teacher exact`), Algorithm 2's auxiliary model and DMD2's fake score must
    start *as the teacher* (Algorithm 2, Require; DMD2 initialises its fake score from the real one), so that
    the generator's first gradient, `g_phi - g_theta`, is zero. Started as the network regressed onto the
    closed form, they would start with that regression's error in them. `anchor` is a copy of the starting
    network; it and `base` are `Frozen`, so no optimiser (nor weight decay) moves them, and the invariant holds
    for good. The GAN head reads `model`'s features.
    """

    model: eqx.Module
    base: Frozen = eqx.field(converter=frozen)
    anchor: Frozen = eqx.field(converter=frozen)

    def __call__(self, z, t, label=None):
        call = lambda m: m(z, t) if label is None else m(z, t, label)
        return call(self.model) + sg(call(self.base) - call(self.anchor))

    def features(self, z, t, label=None):
        return self.model.features(z, t) if label is None else self.model.features(z, t, label)


# ----------------------------------------------------------------------------------------------
# Teacher / fake score: the ordinary diffusion loss (Sec. 2.1).


def diffusion_loss(model, schedule: Schedule, x, t, noise, weighting="edm", label=None):
    """`E w(t) ||x - g(z_t)||^2` with `z_t = alpha_t x + sigma_t noise`; trains teachers and DMD2's fake score."""
    z = diffuse(schedule, x, t, noise)
    pred = apply(model, z, t, label)
    w = loss_weight(weighting, schedule, t, x, sg(pred))
    return jnp.mean(w * sqnorm(x - pred))


def regression_loss(model, target, schedule: Schedule, x, t, noise, weighting="edm", label=None):
    """`E w(t) ||target(z_t) - g(z_t)||^2`: fit a network to another denoiser (e.g. an exact teacher)."""
    z = diffuse(schedule, x, t, noise)
    want, pred = sg(apply(target, z, t, label)), apply(model, z, t, label)
    return jnp.mean(loss_weight(weighting, schedule, t, want, sg(pred)) * sqnorm(want - pred))


# ----------------------------------------------------------------------------------------------
# Moment matching, Algorithm 2 (alternating).


class Noised(NamedTuple):
    """One minibatch of Algorithm 2/3 lines 1-3: noisy data `z_t` and times `t >= s`."""

    z_t: jax.Array  # (B, *data)
    t: jax.Array  # (B,)
    s: jax.Array  # (B,)
    key: jax.Array  # noise for z_s
    label: Optional[jax.Array] = None  # (B,) or None


def sample_times(schedule: Schedule, key, batch: int, k: int, grid: bool = False, grid_shift=None):
    """Algorithm 2, lines 1-2: `s ~ p(s)` (EDM test-time schedule), `t = min(s + delta, 1)`, delta ~ U[0, 1/k].

    `grid=True`: t is instead the first point of the sampler's grid {1/k, ..., 1} at or above s, so the
    student is trained only at the times it is sampled at (delta = t - s still lies in [0, 1/k]).
    `grid_shift`: the same rules in the grid time u of a sampler on `sampling.grid_times(schedule, k,
    grid_shift)` (`Schedule.to_grid` / `from_grid`), so delta is uniform on [0, 1/k] in u; None: u = t.
    """
    ks, kd = jr.split(key)
    s = edm_time(schedule, ks, (batch,))
    u = s if grid_shift is None else schedule.to_grid(s, grid_shift)
    if grid:
        u_t = jnp.clip(jnp.ceil(u * k - 1e-4) / k, 1.0 / k, 1.0)
    else:
        u_t = jnp.minimum(u + jr.uniform(kd, (batch,)) / k, 1.0)
    if grid_shift is None:
        return u_t, s
    return jnp.maximum(schedule.from_grid(u_t, grid_shift), s), s  # t >= s despite rounding of the round trip


def noised_batch(schedule: Schedule, x, key, k: int, label=None, grid: bool = False, grid_shift=None) -> Noised:
    """Algorithm 2, lines 1-3: times (`sample_times`), then forward diffusion of data `x` to `z_t`."""
    kt, kn, kz = jr.split(key, 3)
    t, s = sample_times(schedule, kt, x.shape[0], k, grid, grid_shift)
    return Noised(diffuse(schedule, x, t, jr.normal(kn, x.shape)), t, s, kz, label)


def generate(generator, schedule: Schedule, batch: Noised, zs_sampling="posterior"):
    """Algorithm 2, line 4: `x~ = g_eta(z_t)`, then `z_s ~ q(z_s | z_t, x~)` (stop-gradient on z_s).

    `zs_sampling="marginal"` draws `z_s ~ q(z_s | x~)` instead (the ablation of Sec. 5.2).
    Returns `(x~, z_s)`; gradients reach `x~` only.
    """
    x = apply(generator, batch.z_t, batch.t, batch.label)
    noise = jr.normal(batch.key, x.shape)
    if zs_sampling == "posterior":
        mean, std = posterior(schedule, batch.z_t, sg(x), batch.t, batch.s)
        z_s = mean + std * noise
    elif zs_sampling == "marginal":
        z_s = diffuse(schedule, sg(x), batch.s, noise)
    else:
        raise ValueError(f"unknown zs_sampling {zs_sampling!r}; choose one of {ZS_SAMPLING}")
    return x, sg(z_s)


def auxiliary_loss(aux, teacher, schedule: Schedule, x_tilde, z_s, s, weighting="edm", label=None):
    """Algorithm 2, even steps: `w(s){||sg(x~) - g_phi(z_s)||^2 + ||g_theta(z_s) - g_phi(z_s)||^2}` over phi.

    Its minimiser is `g_phi = (E_g[x~ | z_s] + g_theta(z_s)) / 2` (Sec. 3.1), which halves Eq. 6.
    """
    x_tilde, teacher_pred = sg(x_tilde), sg(apply(teacher, z_s, s, label))
    pred = apply(aux, z_s, s, label)
    w = loss_weight(weighting, schedule, s, x_tilde, teacher_pred)
    return jnp.mean(w * (sqnorm(x_tilde - pred) + sqnorm(teacher_pred - pred)))


def moment_matching_loss(x_tilde, aux_pred, teacher_pred, w):
    """Eq. 6 with the auxiliary model (Algorithm 2, odd steps): `w(s) x~^T sg[g_phi(z_s) - g_theta(z_s)]`.

    Array-level core, gradient through `x~` only; `w` is `(B,)`.
    """
    return jnp.mean(w * inner(x_tilde, sg(aux_pred - teacher_pred)))


def generator_loss(generator, aux, teacher, schedule: Schedule, batch: Noised, weighting="edm", zs_sampling="posterior"):
    """Algorithm 2, odd steps, end to end: generate `x~`, `z_s`, then Eq. 6 with the auxiliary model."""
    x, z_s = generate(generator, schedule, batch, zs_sampling)
    aux_pred, teacher_pred = apply(aux, z_s, batch.s, batch.label), apply(teacher, z_s, batch.s, batch.label)
    w = loss_weight(weighting, schedule, batch.s, sg(x), sg(teacher_pred))
    return moment_matching_loss(x, aux_pred, teacher_pred, w)


def vsd_loss(generator, aux, teacher, schedule: Schedule, z_1, s, key, weighting="edm", label=None):
    """Eq. 13 (VSD / Diff-Instruct): `(w(s) alpha_s^2 / sigma_s^2) x~^T sg[x_phi(z_s) - x_theta(z_s)]`, z_s ~ q(z_s | x~).

    One-step generator `x~ = g_eta(z_1, 1)`. Equal to Algorithm 2 at k = 1 up to the factor alpha_s^2/sigma_s^2.
    """
    x = apply(generator, z_1, jnp.ones(z_1.shape[0]), label)
    z_s = sg(diffuse(schedule, sg(x), s, jr.normal(key, x.shape)))
    aux_pred, teacher_pred = apply(aux, z_s, s, label), apply(teacher, z_s, s, label)
    alpha, sigma = schedule.alpha_sigma(s)
    w = loss_weight(weighting, schedule, s, sg(x), sg(teacher_pred)) * alpha**2 / sigma**2
    return moment_matching_loss(x, aux_pred, teacher_pred, w)


# ----------------------------------------------------------------------------------------------
# Moment matching, Algorithm 3 (instant, in the teacher's parameter space).


def teacher_loss_grad(teacher, schedule: Schedule, x, z_s, s, weighting="edm", label=None):
    """`grad_theta L_theta(x, z_s)`, `L_theta = w(s) ||x - g_theta(z_s)||^2` (Sec. 3.2), `x` and `z_s` held fixed.

    Differentiable in `x` (Eq. 9 needs that; Algorithm 3 passes `sg(x~')`). Returns a tree shaped
    like `params(teacher)`.
    """

    def loss(model):
        pred = apply(model, z_s, s, label)
        return jnp.mean(loss_weight(weighting, schedule, s, sg(x), sg(pred)) * sqnorm(x - pred))

    return params(eqx.filter_grad(loss)(teacher))


def instant_nu(generator, teacher, precond, schedule: Schedule, batch_prime: Noised, weighting="edm",
               zs_sampling="posterior", data_grad=None):
    """`nu = Lambda (grad_theta L_theta(x~', z_s') - g_0)` on batch B' (Algorithm 3), stop-gradient.

    `data_grad`: g_0, the teacher's expected gradient on real data (`mmd.data_moment`), or None for 0. Eq. 9
    assumes g_0 = 0 ("the teacher attained a minimum of its training loss"); Eq. 10 subtracts it.
    """
    x_p, zs_p = generate(generator, schedule, batch_prime, zs_sampling)
    grad = teacher_loss_grad(teacher, schedule, sg(x_p), zs_p, batch_prime.s, weighting, batch_prime.label)
    if data_grad is not None:
        grad = jax.tree.map(lambda g, g0: g - g0, grad, data_grad)
    return sg(jax.tree.map(lambda lam, g: lam * g, precond, grad))


def parameter_jvp(teacher, z_s, s, label, nu):
    """`(g_theta(z_s), J_theta g_theta(z_s) nu)`: the teacher's prediction and its derivative along `nu` in its
    parameters `params(teacher)` (one forward-mode pass), both stop-gradient."""
    theta, rest = partition(teacher)

    def predict(theta):
        return apply(eqx.combine(theta, rest), z_s, s, label)

    pred, j_nu = jax.jvp(predict, (theta,), (nu,))
    return sg(pred), sg(j_nu)


def instant_monitor(x, teacher_pred, j_nu, w, nu, data_grad=None):
    """Sec. 5.4's informative loss: `1/2 g^T Lambda g'`, g and g' the teacher gradients of the two batches, an unbiased
    estimate of Eq. 9, `1/2 ||E grad_theta L_theta||^2_Lambda` (with `data_grad` g0: `1/2 (g - g0)^T Lambda (g' -
    g0)`, the same estimate of Eq. 10). `nu = Lambda g'` (minus `Lambda g0`) is the tangent of `j_nu`."""
    monitor = -jnp.mean(w * inner(sg(x) - teacher_pred, j_nu))
    if data_grad is not None:
        monitor = monitor - 0.5 * sum(jnp.sum(g0 * n) for g0, n in zip(jax.tree.leaves(data_grad), jax.tree.leaves(nu)))
    return monitor


def instant_loss(generator, teacher, precond, schedule: Schedule, batch: Noised, batch_prime: Noised,
                 weighting="edm", zs_sampling="posterior", data_grad=None, nu=None):
    """Eq. 8 / Algorithm 3: `-w(s) x~^T sg{J_theta g_theta(z_s) nu}`, `nu = Lambda grad_theta L_theta(x~', z_s')`.

    The minus: one preconditioned step `phi = theta - lambda Lambda grad L` moves `g_phi - g_theta` by `-lambda J nu`,
    so `(1/lambda) L_{phi(lambda)}(eta) -> -w x~^T J nu` (Eq. 7-8); Eq. 8 as printed drops it. Appendix A agrees:
    the eta-gradient of this surrogate is exactly 1/2 the eta-gradient of Eq. 9 (`test_losses.py` proves both).

    **Arguments:**
    - `precond`: Lambda, a tree like `params(teacher)` (see `mmd.estimate_preconditioner`).
    - `batch`, `batch_prime`: two independent minibatches (B on which eta is trained, B' for nu).
    - `data_grad`: Eq. 10's g0 (`instant_nu`); `nu`: the tangent, if already computed (else `instant_nu`'s).

    **Returns:** `(surrogate, monitor)`. The surrogate only carries gradients; `monitor` is `instant_monitor`.
    """
    if nu is None:
        nu = instant_nu(generator, teacher, precond, schedule, batch_prime, weighting, zs_sampling, data_grad)
    x, z_s = generate(generator, schedule, batch, zs_sampling)
    teacher_pred, j_nu = parameter_jvp(teacher, z_s, batch.s, batch.label, nu)
    w = loss_weight(weighting, schedule, batch.s, sg(x), teacher_pred)
    surrogate = -jnp.mean(w * inner(x, j_nu))
    return surrogate, instant_monitor(x, teacher_pred, j_nu, w, nu, data_grad)


def eq9_moment(teacher, precond, schedule: Schedule, x, z_s, s, weighting="edm", label=None):
    """Eq. 9 on one batch: `1/2 ||mean_batch grad_theta L_theta(x, sg(z_s))||^2_Lambda`, differentiable in `x`."""
    grad = teacher_loss_grad(teacher, schedule, x, sg(z_s), s, weighting, label)
    return 0.5 * sum(jnp.sum(lam * g**2) for lam, g in zip(jax.tree.leaves(precond), jax.tree.leaves(grad)))


# ----------------------------------------------------------------------------------------------
# DMD2 (Yin et al. 2024; official code).


def distribution_matching_loss(x, real_pred, fake_pred):
    """DMD2 Sec. 3 (DMD's distribution matching gradient, official normalisation): its x-gradient is `grad / (B D)`,

    `grad = (x_fake(z) - x_real(z)) / mean_dims|x - x_real(z)|`, the loss `0.5 ||x - sg(x - grad)||^2`.
    """
    norm = einops.reduce(jnp.abs(x - real_pred), "b ... -> b", "mean")
    grad = sg((fake_pred - real_pred) / bcast(jnp.maximum(norm, 1e-6), x))
    return 0.5 * jnp.mean(sqnorm(x - sg(x - grad)))


def dmd_loss(x, real, fake, schedule: Schedule, t, noise, label=None):
    """DMD2 Sec. 3-4.1, the generator's loss without DMD's regression term: noise samples `x` to `t` and follow the
    difference of the fake and real scores there (`distribution_matching_loss`)."""
    z = sg(diffuse(schedule, x, t, noise))
    real_pred, fake_pred = sg(apply(real, z, t, label)), sg(apply(fake, z, t, label))
    return distribution_matching_loss(x, real_pred, fake_pred)


def gan_generator_loss(head, fake, schedule: Schedule, x, t, noise, label=None):
    """DMD2 Sec. 4.3, the generator's GAN term: non-saturating `softplus(-D(x))`, D a head on the fake score's
    bottleneck features of noised x."""
    z = diffuse(schedule, x, t, noise)
    return jnp.mean(jax.nn.softplus(-jax.vmap(head)(features(fake, z, t, label))))


def gan_discriminator_loss(head, fake, schedule: Schedule, x_real, x_fake, t_real, t_fake, keys, label_real=None, label_fake=None):
    """DMD2 Sec. 4.3, the discriminator's loss `softplus(D(fake)) + softplus(-D(real))`, both re-noised; gradients
    reach the head and the fake score's trunk."""
    k_r, k_f = keys
    z_r = diffuse(schedule, x_real, t_real, jr.normal(k_r, x_real.shape))
    z_f = diffuse(schedule, sg(x_fake), t_fake, jr.normal(k_f, x_fake.shape))
    r = jax.vmap(head)(features(fake, z_r, t_real, label_real))
    f = jax.vmap(head)(features(fake, z_f, t_fake, label_fake))
    return jnp.mean(jax.nn.softplus(f) + jax.nn.softplus(-r))
