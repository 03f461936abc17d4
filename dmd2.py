"""DMD2 (Yin et al., 2024): distribution matching, the GAN term, the two time-scale update rule and backward
simulation, as one jitted step on a small state record (the generator and its critic: the fake score and the
discriminator head). It shares `mmd`'s players, optimiser plumbing and `scan_steps`; the losses live in `losses`.
"""

import dataclasses
from typing import Optional

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import losses as L
from mmd import Distiller, Player, with_average, apply_grads, batch_size, init_player, per_player, scan_steps
from models import DiscriminatorHead
from sampling import (Schedule, bcast, check_step_times, diffuse, dmd2_official_times, karras_grid_time,
                      step_grid)

sg = jax.lax.stop_gradient


def dmd2_optimiser(lr=2e-6, warmup=500, clip=10.0, weight_decay=0.01, decay_steps=None):
    """DMD2 (official ImageNet-64 config): AdamW(0.9, 0.999), weight decay 0.01, 500 warm-up steps, clip 10.

    `decay_steps`: None keeps the learning rate constant after the warm-up (official); an int decays it along
    a cosine to 0 at that update (our choice for the generator of short toy runs: see EXPERIMENTS.md's DMD2 tables).
    """
    if decay_steps is None:  # (optax's warm-up of 0 steps would hold the rate at 0 for good)
        sched = optax.warmup_constant_schedule(0.0, lr, warmup) if warmup > 0 else optax.constant_schedule(lr)
    else:
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(decay_steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, b1=0.9, b2=0.999, weight_decay=weight_decay))


class Critic(eqx.Module):
    fake: eqx.Module  # DMD2's fake score (a denoiser)
    head: Optional[DiscriminatorHead]  # GAN classifier on fake's features


class DMD2State(eqx.Module):
    generator: Player
    critic: Player  # Player(Critic(...)); a per-step critic: k copies of it, weights and optimiser state, stacked


@dataclasses.dataclass(frozen=True)
class DMD2Config:
    """DMD2 options (official code defaults for ImageNet-64 where they apply)."""

    k: int = 1  # generator steps (marginal re-noising between them)
    ttur: int = 5  # critic updates per generator update (two time-scale update rule)
    gan: bool = True
    backward_sim: bool = True  # multi-step: train on the generator's own earlier steps
    gan_gen_weight: float = 3e-3
    gan_disc_weight: float = 1e-2
    per_step_critic: bool = False  # k > 1: one fake score (+ head) per generator step, one step per batch
    times: Optional[tuple] = None  # the k input times of the generator's steps (None: uniform, 1 - j/k)

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k (generator steps) must be an integer >= 1; got {self.k!r}")
        if self.times is not None:
            check_step_times(self.times, self.k)
        if not isinstance(self.ttur, int) or self.ttur < 1:
            raise ValueError(f"ttur (critic updates per generator update) must be an integer >= 1; got {self.ttur!r}")



def check_gan(fake, cfg: DMD2Config, feat_dim):
    """Raise unless the GAN term can run: the fake score has `features(z, t[, label])` and `feat_dim` is given."""
    if not cfg.gan:
        return
    if not callable(getattr(fake, "features", None)):
        raise ValueError(f"DMD2's GAN term (gan=True) reads the fake score's bottleneck features, but "
                         f"{type(fake).__name__} has no method features(z, t[, label]); add one or pass gan=False")
    if not (isinstance(feat_dim, int) and feat_dim >= 1):
        raise ValueError(f"DMD2's GAN term (gan=True) needs feat_dim, the number of channels of features(); "
                         f"got {feat_dim!r}")


def init_dmd2(teacher, head_key, optimiser, cfg: DMD2Config, feat_dim=None, student=None) -> DMD2State:
    """Generator and fake score start from the teacher (the generator from `student` if given); the GAN head is new.
    `optimiser`: one for both players, or a pair `(generator's, critic's)` (as `dmd2_step` takes it). `feat_dim`:
    channels of `teacher.features`, needed with the GAN term only."""
    check_gan(teacher, cfg, feat_dim)
    gen_opt, critic_opt = per_player(optimiser)
    head = DiscriminatorHead(feat_dim, key=head_key) if cfg.gan else None
    gen = teacher if student is None else student
    critic = init_player(Critic(teacher, head), critic_opt)
    if cfg.per_step_critic and cfg.k > 1:  # k critics, each with its own weights and optimiser state
        critic = stack_copies(critic, cfg.k)
    return DMD2State(init_player(gen, gen_opt), critic)


def stack_copies(tree, k):
    """`k` copies of `tree`'s arrays stacked on a new leading axis (a per-step critic and its optimiser state)."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: jnp.stack([a] * k), arrays), static)


def select_copy(tree, j):
    """Copy `j` (a traced int) of a `stack_copies` tree; gradients flow back into that copy only."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a: a[j], arrays), static)


def put_copy(tree, j, copy):
    """`tree` (a `stack_copies` tree) with its copy `j` (a traced int) replaced by `copy`; the others untouched."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.tree.map(lambda a, c: a.at[j].set(c), arrays, eqx.filter(copy, eqx.is_array)), static)


def drawn_step(key, cfg: DMD2Config):
    """With `cfg.per_step_critic` (k > 1): the one generator step j ~ U{0..k-1} of a whole batch, which its own
    critic (copy j) sees; otherwise None (j drawn per example, one critic for the mixture of all steps)."""
    if not (cfg.per_step_critic and cfg.k > 1):
        return None
    return jr.randint(key, (), 0, cfg.k)


def generator_input(generator, schedule: Schedule, x_real, key, cfg: DMD2Config, label=None, j=None):
    """The input of the generator step being trained, at t_j of its grid (`cfg.times`, else 1 - j/k),
    j ~ U{0..k-1} per example (or the given step `j` for every example).

    Backward simulation (DMD2 Sec. 4.5): run the generator itself, without gradient, from pure noise
    through steps 0..j-1 with marginal re-noising. Without it: forward-diffuse real data to t_j.
    """
    b, k = x_real.shape[0], cfg.k
    kj, kz, ks = jr.split(key, 3)
    j = jr.randint(kj, (b,), 0, k) if j is None else jnp.full((b,), j)
    time_of, next_of = step_grid(k, cfg.times)
    t_j = time_of(j)
    if not cfg.backward_sim:
        return diffuse(schedule, x_real, t_j, jr.normal(kz, x_real.shape)), t_j

    def body(z, i):
        t = jnp.full((b,), time_of(i))
        x_hat = L.apply(generator, z, t, label)
        z_next = diffuse(schedule, x_hat, jnp.full((b,), next_of(i)), jr.normal(jr.fold_in(ks, i), z.shape))
        return jnp.where(bcast(i < j, z), z_next, z), None

    z, _ = jax.lax.scan(body, jr.normal(kz, x_real.shape), jnp.arange(k - 1))
    return sg(z), t_j


def critic_loss(critic: Critic, generator, schedule: Schedule, x_real, key, cfg: DMD2Config, label=None, j=None):
    """DMD2 Sec. 3, 4.2-4.3, the critic's loss: the fake score's diffusion loss on stop-gradient generator samples
    (+ the weighted discriminator loss with the GAN term); `j`: the
    generator step whose samples `critic` (copy j of a per-step critic) sees (`drawn_step`)."""
    k_in, k_t, k_n, k_g = jr.split(key, 4)
    z, t_j = generator_input(generator, schedule, x_real, k_in, cfg, label, j)
    x_fake = sg(L.apply(generator, z, t_j, label))
    t = karras_grid_time(schedule, k_t, (x_real.shape[0],))
    fake_loss = L.diffusion_loss(critic.fake, schedule, x_fake, t, jr.normal(k_n, x_fake.shape), "edm", label)
    if not cfg.gan:
        return fake_loss, (fake_loss, jnp.zeros(()))
    kt1, kt2, kn1, kn2 = jr.split(k_g, 4)
    t_r, t_f = karras_grid_time(schedule, kt1, t.shape), karras_grid_time(schedule, kt2, t.shape)
    disc = L.gan_discriminator_loss(critic.head, critic.fake, schedule, x_real, x_fake, t_r, t_f, (kn1, kn2), label, label)
    return fake_loss + cfg.gan_disc_weight * disc, (fake_loss, disc)


def dmd2_generator_loss(generator, critic: Critic, real, schedule: Schedule, x_real, key, cfg: DMD2Config, label=None,
                        j=None):
    """DMD2 Sec. 4.1, 4.3, the generator's loss: distribution matching (`losses.dmd_loss`, + the weighted
    non-saturating GAN term) at a step of its grid (Sec. 4.4-4.5); `j`: the generator step trained,
    whose critic (copy j of a per-step critic) is `critic` (`drawn_step`)."""
    k_in, k_t, k_n, k_g = jr.split(key, 4)
    z, t_j = generator_input(generator, schedule, x_real, k_in, cfg, label, j)
    x = L.apply(generator, z, t_j, label)
    b = x.shape[0]
    dm = L.dmd_loss(x, real, critic.fake, schedule, karras_grid_time(schedule, k_t, (b,)), jr.normal(k_n, x.shape), label)
    if not cfg.gan:
        return dm, (dm, jnp.zeros(()))
    kt, kn = jr.split(k_g)
    gan = L.gan_generator_loss(critic.head, critic.fake, schedule, x, karras_grid_time(schedule, kt, (b,)), jr.normal(kn, x.shape), label)
    return dm + cfg.gan_gen_weight * gan, (dm, gan)


@eqx.filter_jit
def dmd2_step(state: DMD2State, real, x_real, key, *, cfg: DMD2Config, optimiser, schedule: Schedule, label=None):
    """`cfg.ttur` critic updates (fake score + discriminator) then one generator update.

    `optimiser`: one for both players or a pair `(generator's, critic's)`. `real` is the teacher (optionally a
    `losses.GuidedTeacher`); `x_real` is `(ttur, B, *data)`, one real batch per critic update (the generator's GAN
    term needs none; without backward simulation it noises `x_real[0]`), `label` None or `(ttur, B)`: the class of
    each real example, which the generator is also asked for. A per-step critic (`cfg.per_step_critic`): every
    update, of the critic or the generator, draws one step j; a critic update moves copy j alone, weights and
    optimiser state (the other copies do not move at all), and the generator's update of step j reads copy j.
    Returns `(state, {"fake_loss", "disc_loss", "dm_loss", "gan_loss"})`.
    """
    if x_real.ndim < 2 or x_real.shape[0] != cfg.ttur:
        raise ValueError(f"x_real must be (ttur, B, *data), one real batch per critic update (ttur = {cfg.ttur}); "
                         f"got shape {x_real.shape}")
    k_c, k_g = jr.split(key)
    gen = state.generator
    gen_opt, critic_opt = per_player(optimiser)

    def critic_update(critic: Player, inp):
        x, lab, k = inp
        j = drawn_step(jr.fold_in(k, 1), cfg)
        one = critic if j is None else select_copy(critic, j)  # a per-step critic: copy j and its optimiser state
        (_, (fake_loss, disc)), grads = eqx.filter_value_and_grad(critic_loss, has_aux=True)(
            one.model, gen.model, schedule, x, k, cfg, lab, j
        )
        one = apply_grads(one, grads, critic_opt)
        return (one if j is None else put_copy(critic, j, one)), (fake_loss, disc)

    critic, (fake_losses, discs) = scan_steps(critic_update, state.critic, (x_real, label, jr.split(k_c, cfg.ttur)))
    j = drawn_step(jr.fold_in(k_g, 1), cfg)
    (_, (dm, gan)), grads = eqx.filter_value_and_grad(dmd2_generator_loss, has_aux=True)(
        gen.model, critic.model if j is None else select_copy(critic.model, j), real, schedule, x_real[0], k_g, cfg,
        None if label is None else label[0], j
    )
    gen = apply_grads(gen, grads, gen_opt)
    metrics = {"fake_loss": fake_losses[-1], "disc_loss": discs[-1], "dm_loss": dm, "gan_loss": gan}
    return DMD2State(gen, critic), metrics




def dmd2_distiller(teacher, *, k: int, steps: int, schedule: Schedule = Schedule(), lr=6e-4, lr_decay=True, ttur=5,
                   gan=False, feat_dim=None, gan_gen_weight=3e-3, times="official", data_var=None,
                   per_step_critic=True, backward_sim=True, ema=0.99, head_key=None, student=None,
                   fake_start=None) -> Distiller:
    """DMD2 for `teacher` (the real score), with the settings the toy record chose (`DMD2Config` has the official ones).

    **Arguments:**
    - `k`: generator steps; `steps`: generator updates the optimisers' schedules span (the critic makes `ttur` x more).
    - `lr`, `lr_decay`: both players' AdamW rate; `lr_decay` decays the generator's along a cosine to 0.
    - `gan`, `feat_dim`, `gan_gen_weight`: the GAN term reads `fake_start.features(z, t[, label])` of `feat_dim`
      channels (required with `gan=True`, ignored without).
    - `times`: the generator's k step times: `"official"` (DMD2's 999/749/... grid at the data's scale: needs
      `data_var`, the data's variance averaged over coordinates), None (uniform, 1 - j/k) or a tuple.
    - `per_step_critic`, `backward_sim`: `DMD2Config`'s. `ema`: decay of the generator's weight average (0: none).
    - `head_key`: initialises the discriminator head (None: `jax.random.key(0)`).
    - `student`, `fake_start`: where the generator and the fake score start (None: the teacher).

    A step takes `ttur` real batches, `x` `(ttur * B, *data)`.
    """
    if times == "official":
        if k > 1 and data_var is None:
            raise ValueError("times='official' puts DMD2's grid at the data's scale: pass data_var (the data's "
                             "variance averaged over coordinates, e.g. x.var(0).mean()), or times=None for uniform")
        times = None if k == 1 else dmd2_official_times(schedule, k, data_var)
    cfg = DMD2Config(k=k, ttur=ttur, gan=gan, backward_sim=backward_sim, per_step_critic=per_step_critic, times=times,
                     gan_gen_weight=gan_gen_weight)
    fake = teacher if fake_start is None else fake_start
    check_gan(fake, cfg, feat_dim)
    warmup = min(500, steps // 5)
    opt = dmd2_optimiser(lr, warmup=warmup)
    if lr_decay:
        opt = (dmd2_optimiser(lr, warmup=warmup, decay_steps=steps), opt)

    def init():
        key = jr.key(0) if head_key is None else head_key
        return init_dmd2(fake, key, opt, cfg, feat_dim, student=teacher if student is None else student)

    def step(state, x, key, label=None):
        what = f"dmd2_distiller (ttur = {ttur} real batches)"
        x = einops.rearrange(x, "(n b) ... -> n b ...", n=ttur, b=batch_size(x, ttur, what))
        label = None if label is None else einops.rearrange(label, "(n b) -> n b", n=ttur)
        return dmd2_step(state, teacher, x, key, cfg=cfg, optimiser=opt, schedule=schedule, label=label)

    init, step = with_average(init, step, ema)
    return Distiller(init, step, k, schedule, steps, "marginal", times, ttur)
