"""One jitted update step per algorithm: teacher, alternating MM (Algorithm 2), instant MM (Algorithm 3); DMD2's
is in `dmd2`, which shares the players, `apply_grads`, `per_player` and `scan_steps` of this module.

Each step takes and returns a small state record; the frozen teacher is an argument and is never
updated. Static choices (k, weighting, ...) live in frozen config dataclasses; optimisers are optax
transformations passed in (defaults below follow each paper). `scan_steps` runs any step as a
`lax.scan`, so a whole training phase compiles once.
"""

import dataclasses
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import losses as L
import sampling
from sampling import Schedule, diffuse, edm_train_time

sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------------------------
# Optimisers.


def mm_optimiser(lr=1e-4, total_steps=200_000, warmup=1000, clip=1.0, b1=0.0):
    """Moment matching, App. B: Adam(b1=0, b2=0.99, eps=1e-12), linear warm-up then linear decay to 0, clip 1.

    `b1 > 0` gives Adam momentum, which averages the gradient's noise over about 1 / (1 - b1) updates.
    """
    if not 0 <= warmup <= total_steps:
        raise ValueError(f"warmup must lie in [0, total_steps = {total_steps}] (a run that never leaves its warm-up "
                         f"never reaches lr); got {warmup}")
    warmup = min(warmup, max(total_steps // 2, 1))
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))], [warmup]
    )
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(sched, b1=b1, b2=0.99, eps=1e-12))


TEACHER_B2 = 0.99  # Adam's b2 of `teacher_optimiser`: what `preconditioner_from_adam` must be told


def teacher_optimiser(lr=1e-3, total_steps=10_000, warmup=200, clip=1.0):
    """Teacher training: Adam(0.9, 0.99), warm-up then cosine decay, clip 1 (the usual small-model recipe)."""
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, total_steps // 2), max(total_steps, 2))
    return optax.chain(optax.clip_by_global_norm(clip), optax.adam(sched, b1=0.9, b2=TEACHER_B2))


# ----------------------------------------------------------------------------------------------
# State records and configs.


class Player(eqx.Module):
    """A model being trained and its optimiser state."""

    model: eqx.Module
    opt_state: optax.OptState


def init_player(model, optimiser) -> Player:
    """`model` and the optimiser's state of its parameters (`losses.params`: `losses.Frozen` arrays are not)."""
    return Player(model, optimiser.init(L.params(model)))


def apply_grads(player: Player, grads, optimiser) -> Player:
    """One optimiser update of the player's parameters from `grads` (a gradient tree of its model); the optimiser
    sees neither the gradients nor the values of `losses.Frozen` arrays, so they stay as they are, bit for bit."""
    updates, opt_state = optimiser.update(L.params(grads), player.opt_state, L.params(player.model))
    return Player(eqx.apply_updates(player.model, updates), opt_state)


def per_player(optimiser):
    """`(generator's, other player's)` optimiser from one optimiser or a pair (an optax transform is itself a
    tuple); the other player is Algorithm 2's auxiliary model or DMD2's critic."""
    return (optimiser, optimiser) if isinstance(optimiser, optax.GradientTransformation) else tuple(optimiser)


class AlternatingState(eqx.Module):
    generator: Player  # g_eta
    aux: Player  # g_phi


@dataclasses.dataclass(frozen=True)
class MMConfig:
    """Moment matching options (Algorithms 2 and 3)."""

    k: int = 8  # sampling steps of the student
    weighting: object = "edm"  # w(s): edm | flat | dmd (Sec. 3.3: flat or dmd for k = 1, 2) | a callable
    zs_sampling: str = "posterior"  # posterior q(z_s|z_t,x~) | marginal q(z_s|x~) (Sec. 5.2)
    time_grid: bool = False  # t on the k-step sampling grid (losses.sample_times) instead of s + U[0, 1/k]
    grid_shift: Optional[float] = None  # the student's step grid: sampling.grid_times (None: uniform in t)
    nu_decay: float = 0.0  # Algorithm 3: EMA of nu over updates (0: the last batch's nu, as printed)
    aux_steps: int = 1  # Algorithm 2: auxiliary updates per generator update (1: the paper's strict alternation)
    sigma_data: float = 0.5  # weighting "edm": the data scale of EDM's w(s) (0.5: EDM's, for images in [-1, 1])

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k (sampling steps) must be an integer >= 1; got {self.k!r}")
        if not isinstance(self.aux_steps, int) or isinstance(self.aux_steps, bool) or self.aux_steps < 1:
            raise ValueError(f"aux_steps (auxiliary updates per generator update) must be an integer >= 1; "
                             f"got {self.aux_steps!r}")
        if not callable(self.weighting) and self.weighting not in L.WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {L.WEIGHTINGS} or pass a callable "
                             f"w(schedule, s, x, x_teacher) -> (B,)")
        if self.zs_sampling not in L.ZS_SAMPLING:
            raise ValueError(f"unknown zs_sampling {self.zs_sampling!r}; choose one of {L.ZS_SAMPLING}")
        if not 0.0 <= self.nu_decay < 1.0:
            raise ValueError(f"nu_decay must lie in [0, 1); got {self.nu_decay!r}")
        if not 0.0 < self.sigma_data < float("inf"):
            raise ValueError(f"sigma_data (the data scale of EDM's weight) must be a finite number > 0; "
                             f"got {self.sigma_data!r}")

    @property
    def loss_weighting(self):
        """The `weighting` the losses take: `weighting` itself, or `losses.EDMWeight(sigma_data)` for "edm" at a
        sigma_data other than EDM's 0.5 (at 0.5 the name, which is the same weight)."""
        if self.weighting == "edm" and self.sigma_data != 0.5:
            return L.EDMWeight(self.sigma_data)
        return self.weighting


def check_compatible(teacher, student, example):
    """Raise if `student` and `teacher` do not map `example` (one unbatched input) to the same output shape."""
    def out_shape(model, name):
        try:
            return eqx.filter_eval_shape(model, example, jnp.float32(0.5)).shape
        except Exception as e:  # noqa: BLE001 - re-raised with the shapes named
            raise ValueError(f"{name} cannot take data of shape {example.shape}: {e}") from e

    shapes = [out_shape(teacher, "teacher"), out_shape(student, "student")]
    if shapes[0] != shapes[1] or shapes[0] != example.shape:
        raise ValueError(f"teacher output {shapes[0]}, student output {shapes[1]} and data {example.shape} must agree")


# ----------------------------------------------------------------------------------------------
# Teacher.


@eqx.filter_jit
def teacher_step(state: Player, x, key, *, optimiser, schedule: Schedule, weighting="edm", label=None):
    """One diffusion training step, t from EDM's training distribution. Returns `(state, loss)`."""
    kt, kn = jr.split(key)
    t = edm_train_time(schedule, kt, (x.shape[0],))
    loss, grads = eqx.filter_value_and_grad(L.diffusion_loss)(
        state.model, schedule, x, t, jr.normal(kn, x.shape), weighting, label
    )
    return apply_grads(state, grads, optimiser), loss


@eqx.filter_jit
def regression_step(state: Player, target, x, key, *, optimiser, schedule: Schedule, weighting="edm", label=None):
    """One step fitting `state.model` to the denoiser `target` (`--teacher exact`: a network copy of the oracle)."""
    kt, kn = jr.split(key)
    t = edm_train_time(schedule, kt, (x.shape[0],))
    loss, grads = eqx.filter_value_and_grad(L.regression_loss)(
        state.model, target, schedule, x, t, jr.normal(kn, x.shape), weighting, label
    )
    return apply_grads(state, grads, optimiser), loss


# ----------------------------------------------------------------------------------------------
# Algorithm 2: alternating moment matching.


def init_alternating(teacher, optimiser, student=None) -> AlternatingState:
    """Student and auxiliary model both start from the teacher (Algorithm 2, Require); `student` if the
    student's family differs from the teacher's (the closed-form testbed). `optimiser`: one or a pair
    `(generator's, auxiliary's)`, as `alternating_step` takes it."""
    gen_opt, aux_opt = per_player(optimiser)
    return AlternatingState(init_player(teacher if student is None else student, gen_opt), init_player(teacher, aux_opt))


@eqx.filter_jit
def alternating_step(state: AlternatingState, teacher, x, key, *, cfg: MMConfig, optimiser, schedule: Schedule, label=None,
                     x_gen=None, label_gen=None):
    """Iterations of Algorithm 2: `cfg.aux_steps` even ones (auxiliary g_phi) then an odd one (generator g_eta).

    Each iteration draws its own times and noise from `key`; the auxiliary updates use the data batch `x`
    `(B, *data)` (and `label`), the generator's `x_gen` (and `label_gen`), or `x` again when `x_gen` is None.
    `optimiser`: one for both players or a pair `(generator's, auxiliary's)`. With `aux_steps` 1 this is the
    paper's strict alternation. Returns `(state, {"aux_loss", "gen_loss"})`, the auxiliary loss that of its
    last update.
    """
    k_aux, k_gen = jr.split(key)
    gen, aux = state.generator, state.aux
    gen_opt, aux_opt = per_player(optimiser)

    def aux_update(aux: Player, k):
        batch = L.noised_batch(schedule, x, k, cfg.k, label, cfg.time_grid, cfg.grid_shift)
        x_tilde, z_s = L.generate(gen.model, schedule, batch, cfg.zs_sampling)
        loss, grads = eqx.filter_value_and_grad(L.auxiliary_loss)(
            aux.model, teacher, schedule, sg(x_tilde), z_s, batch.s, cfg.loss_weighting, label
        )
        return apply_grads(aux, grads, aux_opt), loss

    aux, aux_losses = scan_steps(aux_update, aux, jr.split(k_aux, cfg.aux_steps))
    aux_loss = aux_losses[-1]

    if x_gen is None:
        x_gen, label_gen = x, label
    batch = L.noised_batch(schedule, x_gen, k_gen, cfg.k, label_gen, cfg.time_grid, cfg.grid_shift)
    gen_loss, grads = eqx.filter_value_and_grad(L.generator_loss)(
        gen.model, aux.model, teacher, schedule, batch, cfg.loss_weighting, cfg.zs_sampling
    )
    gen = apply_grads(gen, grads, gen_opt)
    return AlternatingState(gen, aux), {"aux_loss": aux_loss, "gen_loss": gen_loss}


# ----------------------------------------------------------------------------------------------
# Algorithm 3: instant (parameter-space) moment matching.


def check_preconditioner(precond, teacher):
    """Raise unless `precond` is a tree shaped like the teacher's parameters, `losses.params(teacher)`."""
    want = L.params(teacher)
    if jax.tree.structure(precond) != jax.tree.structure(want) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(precond), jax.tree.leaves(want))
    ):
        raise ValueError(
            "preconditioner tree does not match the teacher's parameters: "
            f"{jax.tree.structure(precond)} vs {jax.tree.structure(want)}"
        )


def preconditioner_from_adam(opt_state, *, b2, eps=1e-3):
    """Lambda = 1 / (sqrt(v_hat) + eps) from an optax Adam state (bias-corrected second moments).

    `b2`: the b2 the teacher's Adam ran with (`TEACHER_B2` for `teacher_optimiser`; optax's `adam` default is
    0.999). An optax state does not record it, and a wrong value silently mis-corrects v's bias.

    The guard `eps`: Adam's own 1e-8 (or App. B's 1e-12) lets parameters whose gradients are almost
    always zero (e.g. units dead on the data) get Lambda ~ 1e8 and dominate nu, which made a prototype
    diverge. 1e-3 caps Lambda at 1e3 and was stable; it is a documented choice, not the paper's.
    """
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    if len(adam) != 1:
        raise ValueError(f"expected exactly one Adam state in the optimiser state; found {len(adam)}")
    bias = 1.0 - b2 ** adam[0].count
    return jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v / bias) + eps), adam[0].nu)


def estimate_preconditioner(teacher, schedule: Schedule, xs, key, *, b2=0.99, eps=1e-3, weighting="edm"):
    """Adam's preconditioner of the teacher, estimated from teacher-loss gradients on batches `xs`
    `(n, B, *data)` at the frozen teacher (the paper: "calculated fresh by running a few training steps").
    """
    adam = optax.scale_by_adam(b1=0.0, b2=b2)
    state = adam.init(L.params(teacher))

    def body(state, inp):
        x, k = inp
        kt, kn = jr.split(k)
        t = edm_train_time(schedule, kt, (x.shape[0],))
        grads = L.params(eqx.filter_grad(L.diffusion_loss)(teacher, schedule, x, t, jr.normal(kn, x.shape), weighting))
        return adam.update(grads, state)[1], None

    state, _ = jax.lax.scan(body, state, (xs, jr.split(key, xs.shape[0])))
    return preconditioner_from_adam(state, b2=b2, eps=eps)


def data_moment(teacher, schedule: Schedule, xs, key, *, weighting="edm", labels=None):
    """Eq. 10's second term, `E_{x, z_s ~ q} grad_theta L_theta(x, z_s)` with s ~ p(s), averaged over batches
    `xs` `(n, B, *data)` of real data (labels `(n, B)` or None).
    """
    def body(total, inp):
        x, lab, k = inp
        ks, kn = jr.split(k)
        s = L.sample_times(schedule, ks, x.shape[0], 1)[1]
        z_s = diffuse(schedule, x, s, jr.normal(kn, x.shape))
        g = L.teacher_loss_grad(teacher, schedule, x, z_s, s, weighting, lab)
        return jax.tree.map(jnp.add, total, g), None

    zero = jax.tree.map(jnp.zeros_like, L.params(teacher))
    total, _ = jax.lax.scan(body, zero, (xs, labels, jr.split(key, xs.shape[0])))
    return jax.tree.map(lambda g: g / xs.shape[0], total)


class InstantState(eqx.Module):
    """Algorithm 3's student and the running average of nu (used when `MMConfig.nu_decay > 0`)."""

    student: Player
    nu: optax.EmaState  # bias-corrected EMA of nu, a tree like the preconditioner


def init_instant(student, optimiser, precond) -> InstantState:
    """The student starts from the teacher (pass the teacher network)."""
    return InstantState(init_player(student, optimiser), optax.ema(0.0).init(precond))


@eqx.filter_jit
def instant_step(state: InstantState, teacher, precond, x, x_prime, key, *, cfg: MMConfig, optimiser,
                 schedule: Schedule, label=None, label_prime=None, data_grad=None):
    """One update of Algorithm 3 on two independent batches `x` (B) and `x_prime` (B', gives nu).

    `data_grad`: the teacher's expected gradient on real data (`data_moment`), subtracted from nu (Eq. 10);
    None assumes it is zero (Eq. 9). With `cfg.nu_decay > 0`, the JVP's tangent is the bias-corrected
    exponential moving average of nu over updates rather than the last batch's nu: it plays the part of
    Algorithm 2's auxiliary model, which also accumulates the teacher gradients of many batches.
    Returns `(state, {"instant_loss"})`; `instant_loss` estimates Eq. 10 (Eq. 9 if `data_grad` is None)
    with the tangent used (Sec. 5.4: it is informative).
    """
    check_preconditioner(precond, teacher)  # structure and shapes only: checked while tracing
    k1, k2 = jr.split(key)
    batch = L.noised_batch(schedule, x, k1, cfg.k, label, cfg.time_grid, cfg.grid_shift)
    batch_prime = L.noised_batch(schedule, x_prime, k2, cfg.k, label_prime, cfg.time_grid, cfg.grid_shift)
    student = state.student
    nu = L.instant_nu(student.model, teacher, precond, schedule, batch_prime, cfg.loss_weighting, cfg.zs_sampling,
                      data_grad)
    tangent, nu_state = optax.ema(cfg.nu_decay, debias=True).update(nu, state.nu)  # decay 0: tangent = nu
    (_, monitor), grads = eqx.filter_value_and_grad(L.instant_loss, has_aux=True)(
        student.model, teacher, precond, schedule, batch, batch_prime, cfg.loss_weighting, cfg.zs_sampling,
        data_grad=data_grad, nu=tangent
    )
    return InstantState(apply_grads(student, grads, optimiser), nu_state), {"instant_loss": monitor}


# ----------------------------------------------------------------------------------------------
# Loops.


def scan_steps(step, state, xs):
    """`lax.scan` of `step(state, x) -> (state, out)` over the leading axis of `xs`, for any eqx state."""
    dynamic, static = eqx.partition(state, eqx.is_array)

    def body(dynamic, x):
        new, out = step(eqx.combine(dynamic, static), x)
        return eqx.partition(new, eqx.is_array)[0], out

    dynamic, outs = jax.lax.scan(body, dynamic, xs)
    return eqx.combine(dynamic, static), outs


# ----------------------------------------------------------------------------------------------
# Students' weight average.


def ema_update(ema, model, decay, n):
    """The EMA of a model's weights after its n-th update (n >= 1), bias-corrected as Adam's first moment.

    With `e_n = d e_{n-1} + (1 - d) p_n`, `e_0 = 0`, this returns `e_n / (1 - d^n)`, the average of p_1..p_n
    with weights proportional to `d^(n - i)` (no pull towards the initial weights), from the previous average:
    `avg_n = b avg_{n-1} + (1 - b) p_n`, `b = d (1 - d^(n-1)) / (1 - d^n)` (b = 0 at n = 1). `0 < decay < 1`.
    Only parameters (`losses.params`) are averaged; everything else is taken from `model`.
    """
    log_d = jnp.log(jnp.asarray(decay, jnp.float32))
    b = jnp.exp(log_d) * jnp.expm1((n - 1) * log_d) / jnp.expm1(n * log_d)
    avg = jax.tree.map(lambda e, p: b * e + (1 - b) * p, L.params(ema), L.params(model))
    return eqx.combine(avg, L.partition(model)[1])


class Averaged(eqx.Module):
    """A student's training state and the running average of its weights (checkpointed together, so resume is exact).

    DMD2's generator and critic play a game at a constant learning rate, and the last weights swing from update
    to update; averaging the iterates is the usual cure (the official code trains 100x longer at a 100x smaller
    rate and keeps no average). Moment matching students can be averaged too (the paper keeps no average).
    """

    state: eqx.Module  # dmd2.DMD2State, AlternatingState or InstantState
    ema: eqx.Module  # bias-corrected EMA of student(state)
    count: jax.Array  # () int32, updates averaged into `ema`


def student(state):
    """The network a distillation state samples with: Algorithm 3's student, else the generator (Algorithm 2, DMD2);
    the weight average of an `Averaged` state."""
    if isinstance(state, Averaged):
        return state.ema
    return state.student.model if isinstance(state, InstantState) else state.generator.model


def averaged(step, decay):
    """`step(state, x, key, label) -> (state, metrics)` of a distillation state, as a step of `Averaged` that also
    updates the average of the student's weights (`ema_update`). The training itself is unchanged."""

    def fn(s: Averaged, x, key, label=None):
        inner, metrics = step(s.state, x, key, label)
        n = s.count + 1
        return Averaged(inner, ema_update(s.ema, student(inner), decay, n), n), metrics

    return fn


# ----------------------------------------------------------------------------------------------
# An algorithm set up for a teacher: what a port of this code calls (train.py calls it too).


@dataclasses.dataclass(frozen=True)
class Distiller:
    """One algorithm set up for one teacher (`alternating_distiller`, `instant_distiller`, `dmd2.dmd2_distiller`).

    Its optimisers are built once, inside: the jitted step functions take the optimiser as a static argument,
    so a fresh optimiser on every call would recompile every step.

    **Fields:**
    - `init`: `() -> state`, the initial training state (an `eqx.Module`; checkpoint it with `eqx.tree_serialise_leaves`).
    - `step`: `(state, x, key, label=None) -> (state, metrics)`, one update. `x` is `(batch_multiple * B, *data)`
      real examples (`label` `(batch_multiple * B,)` classes or None); compiled on its first call.
    - `k`, `schedule`, `steps`: the student's sampling steps, the noise schedule, the updates its optimiser plans for.
    - `sampler`, `times`: how the student samples (`sampling.sample`'s `step` and `times`).
    - `batch_multiple`: real examples per update, in batches of B (Algorithm 3: B + B'; DMD2: one batch per critic update).
    """

    init: Callable
    step: Callable
    k: int
    schedule: Schedule
    steps: int
    sampler: str = "ancestral"
    times: Optional[tuple] = None
    batch_multiple: int = 1

    def student(self, state):
        """The network to sample with (the weight average when the distiller keeps one)."""
        return student(state)

    def sample(self, state, key, shape, label=None):
        """`shape` samples `(n, *data)` of the student in `k` steps (`label`: `(n,)` classes or None)."""
        return sampling.sample(self.student(state), self.schedule, key, shape, self.k, self.sampler, label, self.times)


def auto_weighting(k: int) -> str:
    """w(s) by the number of steps (Sec. 3.3): flat for k <= 2, EDM's otherwise."""
    return "flat" if k <= 2 else "edm"


def warmup_steps(steps: int) -> int:
    """The MM optimisers' linear warm-up: a tenth of the run, at most 1,000 updates (App. B's)."""
    return min(1000, steps // 10)


def batch_size(x, n, what):
    """B of a step's `x` `(n * B, *data)`, with an error naming the shapes."""
    if x.ndim < 2 or x.shape[0] % n:
        raise ValueError(f"{what}: a step takes (n * B, *data) = ({n} x B, ...) examples; got shape {x.shape}")
    return x.shape[0] // n


def with_average(init, step, ema):
    """`(init, step)` of a distiller, with a weight average of the student of decay `ema` when it is > 0."""
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema (decay of the student's weight average) must lie in [0, 1); got {ema!r}")
    if ema == 0:
        return init, step

    def init_averaged():
        state = init()
        return Averaged(state, student(state), jnp.int32(0))

    return init_averaged, averaged(step, ema)


def _grid(schedule, k, grid_shift):
    return None if grid_shift is None else sampling.grid_times(schedule, k, grid_shift)


def alternating_distiller(teacher, *, k: int, steps: int, schedule: Schedule = Schedule(), lr=1e-4, aux_lr=None,
                          weighting="auto", sigma_data=0.5, zs_sampling="posterior", grid_shift=None, aux_steps=1,
                          b1=0.0, ema=0.0, fresh_data=True, student=None, aux_start=None) -> Distiller:
    """Algorithm 2 (alternating moment matching) for `teacher`, a frozen unbatched denoiser `teacher(z, t[, label])`.

    **Arguments:**
    - `k`: the student's sampling steps; `steps`: generator updates the optimisers' schedules span.
    - `lr`, `aux_lr`: peak learning rates of the generator and the auxiliary model (None: `lr`, as the paper).
    - `weighting`: w(s), `"auto"` (`auto_weighting(k)`), `"edm"`, `"flat"`, `"dmd"` or a callable (`losses.loss_weight`).
    - `sigma_data`: the data's standard deviation in EDM's weight (EDM's 0.5 by default).
    - `zs_sampling`, `grid_shift`, `aux_steps`: `MMConfig`'s. `b1`: Adam's momentum (App. B: 0).
    - `ema`: decay of a weight average of the student, which `Distiller.student` then returns (0: none).
    - `fresh_data`: the generator's update gets its own data batch, as the paper's Algorithm 2 draws data at every
      iteration: a step takes 2B examples, the first B for the auxiliary model (False: one batch of B for both).
    - `student`, `aux_start`: where generator and auxiliary model start (None: the teacher, Algorithm 2's Require).
    """
    cfg = MMConfig(k=k, weighting=auto_weighting(k) if weighting == "auto" else weighting, zs_sampling=zs_sampling,
                   grid_shift=grid_shift, aux_steps=aux_steps, sigma_data=sigma_data)
    opt = mm_optimiser(lr, steps, warmup_steps(steps), b1=b1)  # one optimiser for both players, as the paper
    if aux_lr is not None or aux_steps > 1:  # the auxiliary model's own schedule, over its own number of updates
        n_aux = steps * aux_steps
        opt = (opt, mm_optimiser(lr if aux_lr is None else aux_lr, n_aux, warmup_steps(n_aux), b1=b1))

    def init():
        return init_alternating(teacher if aux_start is None else aux_start, opt, student=student)

    def step(state, x, key, label=None):
        if not fresh_data:
            return alternating_step(state, teacher, x, key, cfg=cfg, optimiser=opt, schedule=schedule, label=label)
        b = batch_size(x, 2, "alternating_distiller with fresh_data (two batches of B)")
        lab, lab_gen = (None, None) if label is None else (label[:b], label[b:])
        return alternating_step(state, teacher, x[:b], key, cfg=cfg, optimiser=opt, schedule=schedule, label=lab,
                                x_gen=x[b:], label_gen=lab_gen)

    init, step = with_average(init, step, ema)
    return Distiller(init, step, k, schedule, steps, "ancestral", _grid(schedule, k, grid_shift), 1 + fresh_data)


def instant_distiller(teacher, precond, *, k: int, steps: int, schedule: Schedule = Schedule(), lr=3e-4,
                      weighting="auto", sigma_data=0.5, zs_sampling="posterior", grid_shift=None, nu_decay=0.97,
                      nu_batch_mult=2, data_grad=None, b1=0.0, ema=0.0, student=None) -> Distiller:
    """Algorithm 3 (instant moment matching, in the teacher's parameter space) for `teacher`.

    **Arguments:**
    - `precond`: Lambda, a tree like the teacher's parameters (`preconditioner_from_adam` of the teacher's Adam
      state, or `estimate_preconditioner`).
    - `k`, `steps`, `lr`, `weighting`, `sigma_data`, `zs_sampling`, `grid_shift`, `b1`, `ema`: as `alternating_distiller`.
    - `nu_decay`: average of nu over updates (`MMConfig.nu_decay`; 0: one batch's, as printed).
    - `nu_batch_mult`: B' = `nu_batch_mult` x B, the batch that gives nu; a step takes `(1 + nu_batch_mult) B` examples.
    - `data_grad`: Eq. 10's teacher gradient on real data (`data_moment`), or None (Eq. 9).
    - `student`: where the student starts (None: the teacher).
    """
    if not isinstance(nu_batch_mult, int) or nu_batch_mult < 1:
        raise ValueError(f"nu_batch_mult (B' / B) must be an integer >= 1; got {nu_batch_mult!r}")
    cfg = MMConfig(k=k, weighting=auto_weighting(k) if weighting == "auto" else weighting, zs_sampling=zs_sampling,
                   grid_shift=grid_shift, nu_decay=nu_decay, sigma_data=sigma_data)
    if teacher is not None:  # (None: a state's structure only, as train.check_checkpoints builds one)
        check_preconditioner(precond, teacher)
    opt = mm_optimiser(lr, steps, warmup_steps(steps), b1=b1)
    m = 1 + nu_batch_mult

    def init():
        return init_instant(teacher if student is None else student, opt, precond)

    def step(state, x, key, label=None):
        b = batch_size(x, m, "instant_distiller (B + B' examples)")
        lab, lab_prime = (None, None) if label is None else (label[:b], label[b:])
        return instant_step(state, teacher, precond, x[:b], x[b:], key, cfg=cfg, optimiser=opt, schedule=schedule,
                            label=lab, label_prime=lab_prime, data_grad=data_grad)

    init, step = with_average(init, step, ema)
    return Distiller(init, step, k, schedule, steps, "ancestral", _grid(schedule, k, grid_shift), m)
