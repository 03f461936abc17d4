"""Property tests of DMD2 (losses.dmd_loss, dmd2.dmd2_step) on Gaussian data: the distribution-matching gradient
against the KL between Gaussians, the per-step critic (one optimiser state per copy, step j paired with copy j), the
order of the two time-scale update rule, backward simulation (marginal re-noising to the given step times, under
stop-gradient), the exact teacher's fake score under DMD2's AdamW, one optimiser per player and the official step
times. Each check has a companion that a wrong variant fails.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import losses as L
import dmd2
import mmd
from models import GaussianDenoiser, MLPDenoiser
from sampling import karras_grid_time, posterior, sample
from test_losses import SCHED, Z, random_cov, tree_vec
from test_short_runs import _data

# ----------------------------------------------------------------------------------------------
# DMD2: distribution matching with analytic real and fake denoisers.


class GaussGen(eqx.Module):
    """One-step generator x = m + a z_1, so its law is N(m, a^2 I) and its exact denoiser is known."""

    m: jax.Array
    a: jax.Array

    def __call__(self, z, t):
        return self.m + self.a * z


def kl_gauss(m, a, mu, cov):
    """KL(N(m, a^2 I) || N(mu, cov))."""
    d, prec = m.size, np.linalg.inv(cov)
    diff = mu - m
    return 0.5 * (a**2 * np.trace(prec) + diff @ prec @ diff - d + np.linalg.slogdet(cov)[1] - d * np.log(a**2))


def dmd_grad(gen, real, key, n=20_000, sign=1.0):
    fake = GaussianDenoiser(gen.m, float(gen.a) ** 2 * np.eye(gen.m.size))  # the generator's law, held fixed
    return _dmd_grad(gen, real, fake, key, n, sign)


@eqx.filter_jit  # one compiled program, not one per operation of the gradient
def _dmd_grad(gen, real, fake, key, n, sign):
    k1, k2, k3 = jr.split(key, 3)
    z1 = jr.normal(k1, (n, gen.m.size))
    t = karras_grid_time(SCHED, k2, (n,))

    def loss(g):
        x = L.apply(g, z1, jnp.ones(n))
        real_, fake_ = (real, fake) if sign > 0 else (fake, real)
        return L.dmd_loss(x, real_, fake_, SCHED, t, jr.normal(k3, x.shape))

    return eqx.filter_grad(loss)(gen)


@given(seed=st.integers(0, 1000))
def test_dmd_gradient_reduces_kl(seed):
    rng = np.random.default_rng(seed)
    mu, cov = rng.normal(size=2), random_cov(rng, 2, 0.3, 1.0)
    real = GaussianDenoiser(mu, cov)
    gen = GaussGen(jnp.asarray(mu + rng.normal(size=2), jnp.float32), jnp.float32(rng.uniform(0.2, 2.0)))
    kl = lambda g: kl_gauss(np.asarray(g.m, np.float64), float(g.a), mu, cov)
    for sign, better in ((1.0, True), (-1.0, False)):  # the flipped sign must fail
        g = dmd_grad(gen, real, jr.key(seed), sign=sign)
        step = 0.05 / float(jnp.sqrt(jnp.sum(g.m**2) + g.a**2))
        new = GaussGen(gen.m - step * g.m, gen.a - step * g.a)
        assert (kl(new) < kl(gen)) == better


def test_dmd_gradient_is_zero_when_fake_equals_real():
    real = GaussianDenoiser(jnp.array([0.3, -0.2]), 0.49 * jnp.eye(2))
    g = dmd_grad(GaussGen(jnp.array([0.3, -0.2]), jnp.float32(0.7)), real, jr.key(0))
    assert float(jnp.max(jnp.abs(tree_vec(g)))) < 1e-6


# ----------------------------------------------------------------------------------------------
# The per-step critic, backward simulation's step times, the optimisers, the official grid.


def _copies_moved(before, after, k):
    """Per copy of a `stack_copies` tree: whether any of its arrays differs between `before` and `after`."""
    a, b = ([np.asarray(u) for u in jax.tree.leaves(eqx.filter(t, eqx.is_array))] for t in (before, after))
    return [any(bool(np.any(u[i] != v[i])) for u, v in zip(a, b)) for i in range(k)]  # on the host: no program per shape


def test_per_step_critic_trains_only_the_drawn_copy():
    """With `per_step_critic`, under DMD2's AdamW (momentum, weight decay), a critic update moves only the copy it
    draws, weights and optimiser state: after 2 updates of 3 copies, 1 or 2 copies moved, the others are bit for bit
    as they were, weights and state, and each copy's Adam count is the number of updates it got. (One optimiser state
    shared by the copies moved all 3.)"""
    net = MLPDenoiser(2, width=16, depth=1, emb_dim=8, key=jr.key(0))
    cfg, opt = dmd2.DMD2Config(k=3, ttur=2, gan=True, per_step_critic=True), dmd2.dmd2_optimiser(1e-2, warmup=0)
    state = dmd2.init_dmd2(net, jr.key(1), opt, cfg, 16)
    x = jnp.stack([_data(jr.key(2), 32)] * cfg.ttur)
    new, _ = dmd2.dmd2_step(state, net, x, jr.key(3), cfg=cfg, optimiser=opt, schedule=SCHED)
    moved = _copies_moved(state.critic.model, new.critic.model, cfg.k)
    assert 1 <= sum(moved) <= cfg.ttur, moved
    assert _copies_moved(state.critic.opt_state, new.critic.opt_state, cfg.k) == moved
    counts = np.asarray(_adam_count(new.critic.opt_state))
    assert counts.sum() == cfg.ttur and list(counts > 0) == moved, counts


def _adam_count(opt_state):
    """The `count` of the (one) Adam state in an optax state."""
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
    return [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)][0]


N_GI, TIMES4 = 20_000, (1.0, 0.9, 0.7, 0.45)


def _backsim_inputs(times):
    """DMD2 backward-simulation inputs `z` and their steps' times for a generator that always outputs `c`."""
    c = jnp.array([3.0, -2.0])
    gen = lambda z, t: c + 0.0 * z
    z, t_j = dmd2.generator_input(gen, SCHED, jnp.zeros((N_GI, 2)), jr.key(0), dmd2.DMD2Config(k=4, times=times))
    return c, np.asarray(z), np.asarray(t_j)


def _standardised_max_z(c, z, t_j, times):
    """Largest |z-score| of the mean and variance of `(z - alpha c) / sigma` per step, alpha, sigma at `times[j]`."""
    worst = 0.0
    for j, t in enumerate(times):
        sel = np.isclose(t_j, t)
        alpha, sigma = (float(a) for a in SCHED.alpha_sigma(jnp.float32(t)))
        u = (z[sel] - alpha * np.asarray(c)) / sigma
        n = len(u)
        worst = max(worst, np.abs(u.mean(0)).max() * np.sqrt(n), np.abs(u.var(0) - 1).max() / np.sqrt(2 / n))
    return worst


def test_backward_simulation_renoises_to_the_given_step_times():
    """`DMD2Config.times`: step j's input is `alpha_tj c + sigma_tj eps` for a generator that outputs c, with t_j
    the j-th given time (mean and variance of the standardised input within Z standard errors of 0 and 1, per step),
    each step drawn about 1/k of the time; the same check with the uniform grid's inputs fails."""
    c, z, t_j = _backsim_inputs(TIMES4)
    assert np.all(np.isclose(t_j[:, None], np.asarray(TIMES4)).any(1))
    counts = np.array([np.isclose(t_j, t).sum() for t in TIMES4])
    assert np.all(np.abs(counts / N_GI - 0.25) < Z * np.sqrt(0.25 * 0.75 / N_GI)), counts
    assert _standardised_max_z(c, z, t_j, TIMES4) < Z
    c, z_uniform, t_uniform = _backsim_inputs(None)
    step = np.round((1 - t_uniform) * 4).astype(int)  # j of each example on the uniform grid
    assert _standardised_max_z(c, z_uniform, np.asarray(TIMES4)[step], TIMES4) > Z


# ----------------------------------------------------------------------------------------------
# The two time-scale update rule, the per-step critic's pairing, backward simulation, the exact teacher's fake score.


class Const(eqx.Module):
    """A denoiser (or one-step generator) whose output is `b` whatever its input."""

    b: jax.Array

    def __call__(self, z, t):
        return self.b + 0.0 * z


class PerStep(eqx.Module):
    """A k-step generator that outputs row j of `p` at step j of the uniform grid t_j = 1 - j/k."""

    p: jax.Array  # (k, D)

    def __call__(self, z, t):
        return self.p[jnp.round((1.0 - t) * self.p.shape[0]).astype(jnp.int32)] + 0.0 * z


def test_ttur_updates_the_critic_first_and_the_generator_sees_it():
    """`dmd2_step` (DMD2's AdamW for both players): `ttur` critic updates, then one generator update against the
    updated critic. The fake score starts equal to the real one, so only an updated critic gives the generator a
    distribution matching gradient: the generator's output moves by about the learning rate towards the real
    prediction, against about lr x weight decay from the decay alone (a generator updated first, or against the old
    critic, fails)."""
    r, p0, lr = jnp.array([0.5, 0.5]), jnp.array([0.2, -1.0]), 1e-2
    cfg, opt = dmd2.DMD2Config(k=1, ttur=3, gan=False), dmd2.dmd2_optimiser(lr, warmup=0)
    state = dmd2.init_dmd2(Const(r), jr.key(0), opt, cfg, 0, student=Const(p0))
    new, _ = dmd2.dmd2_step(state, Const(r), jnp.zeros((3, 8, 2)), jr.key(1), cfg=cfg, optimiser=opt, schedule=SCHED)
    assert int(_adam_count(new.critic.opt_state)) == 3 and int(_adam_count(new.generator.opt_state)) == 1
    moved = np.asarray(new.critic.model.fake.b - r)
    assert np.all(np.sign(moved) == np.sign(np.asarray(p0 - r))) and np.all(np.abs(moved) > lr)  # towards the samples
    step = np.asarray(new.generator.model.b - p0)
    assert np.all(np.sign(step) == -np.sign(np.asarray(p0 - r))) and np.all(np.abs(step) > 0.5 * lr), step


def test_per_step_critic_pairs_generator_step_j_with_copy_j():
    """With `per_step_critic` (DMD2's AdamW): a critic update trains copy j on generator step j's samples (copy j's
    output moves towards step j's output), and the generator update of step j follows copy j (step j's output moves
    along `real - fake_j`). Steps alternate in sign, so pairing j with any other copy fails."""
    k, d, lr = 4, 2, 1e-2
    signs = jnp.array([1.0, -1.0, 1.0, -1.0])[:, None] * jnp.ones((k, d))
    real = Const(jnp.full(d, 0.5))
    cfg, opt = dmd2.DMD2Config(k=k, ttur=1, gan=False, backward_sim=False, per_step_critic=True), \
        dmd2.dmd2_optimiser(lr, warmup=0)
    step = eqx.filter_jit(lambda s, key: dmd2.dmd2_step(s, real, jnp.zeros((1, 8, d)), key, cfg=cfg, optimiser=opt,
                                                        schedule=SCHED)[0])

    def moved_row(before, after):
        rows = np.flatnonzero(np.any(np.asarray(after != before), axis=1))
        assert len(rows) == 1, rows  # one copy / one step per update
        return int(rows[0]), np.asarray(after - before)[rows[0]]

    critic_steps, generator_steps = set(), set()
    start = dmd2.init_dmd2(Const(jnp.zeros(d)), jr.key(0), opt, cfg, 0, student=PerStep(3.0 * signs))
    starts = (start, eqx.tree_at(lambda s: s.critic.model.fake.b, dmd2.init_dmd2(
        Const(jnp.zeros(d)), jr.key(0), opt, cfg, 0, student=PerStep(jnp.zeros((k, d)))), real.b + signs))
    for i in range(16):
        new = step(starts[0], jr.key(i))  # the critic: copy j (from 0) moves towards step j's output 3 sign_j
        j, delta = moved_row(starts[0].critic.model.fake.b, new.critic.model.fake.b)
        assert np.all(np.sign(delta) == np.asarray(signs[j])), (j, delta)
        critic_steps.add(j)
        new = step(starts[1], jr.key(i))  # the generator: step j (from 0) moves along real - fake_j = -sign_j
        j, delta = moved_row(starts[1].generator.model.p, new.generator.model.p)
        assert np.all(np.sign(delta) == -np.asarray(signs[j])), (j, delta)
        generator_steps.add(j)
    assert critic_steps == generator_steps == set(range(k))


class Scale(eqx.Module):
    """A generator `x_hat = c z` (not constant, so posterior and marginal re-noising differ)."""

    c: jax.Array

    def __call__(self, z, t):
        return self.c * z


def test_backward_simulation_renoises_with_the_marginal_under_stop_gradient():
    """Backward simulation with a generator `x_hat = c z`: step j's input has the law of marginal re-noising,
    `z_{i+1} = alpha_{i+1} c z_i + sigma_{i+1} eps`, variance `v_{i+1} = alpha^2 c^2 v_i + sigma^2` from v_0 = 1
    (within Z standard errors per step); the posterior q(z_s | z_t, x_hat) gives other variances and fails. The
    input is under stop-gradient: d/dc of `sum(g_c(z))` is `sum(z)`, not also through the simulated z."""
    c, n, k = -1.0, N_GI, 4
    cfg = dmd2.DMD2Config(k=k)
    z, t_j = jax.jit(lambda c: dmd2.generator_input(Scale(c), SCHED, jnp.zeros((n, 2)), jr.key(0), cfg))(c)
    z, t_j = np.asarray(z, np.float64), np.asarray(t_j)
    grid = [1.0 - i / k for i in range(k)]
    v_marginal, v_posterior = [1.0], [1.0]
    for i in range(k - 1):
        t, s = jnp.float32(grid[i]), jnp.float32(grid[i + 1])
        alpha, sigma = (float(a) for a in SCHED.alpha_sigma(s))
        v_marginal.append(alpha**2 * c**2 * v_marginal[-1] + sigma**2)
        a1, std = (float(jnp.squeeze(a)) for a in posterior(SCHED, jnp.ones(()), jnp.zeros(()), t, s))
        a2 = float(posterior(SCHED, jnp.zeros(()), jnp.ones(()), t, s)[0])
        v_posterior.append((a1 + a2 * c) ** 2 * v_posterior[-1] + std**2)
    for j, t in enumerate(grid):
        u = z[np.isclose(t_j, t)]
        se = v_marginal[j] * np.sqrt(2 / len(u))
        assert np.all(np.abs(u.var(0) - v_marginal[j]) < Z * se), (j, u.var(0), v_marginal[j])
        if j >= 2:  # bites: from the second re-noising on (the first, from t = 1, is the same either way)
            assert np.all(np.abs(u.var(0) - v_posterior[j]) > Z * se), (j, u.var(0), v_posterior[j])

    def output_sum(c):
        z, t = dmd2.generator_input(Scale(c), SCHED, jnp.zeros((64, 2)), jr.key(1), cfg)
        return jnp.sum(L.apply(Scale(c), z, t)), jnp.sum(z)

    grad, total = jax.jit(jax.grad(output_sum, has_aux=True))(jnp.float32(c))
    np.testing.assert_allclose(grad, total, rtol=1e-5)


def test_rebased_fake_score_stays_rebased_under_dmd2s_optimiser():
    """`--teacher exact`: DMD2's fake score `Rebased(net, exact, net)` trained by `dmd2_step` with DMD2's AdamW
    (weight decay 0.01): after 20 generator updates (40 critic updates) its `base` and `anchor` are bit for bit the
    closed form and the starting network (so the fake score still reads `exact + (net_phi - net_0)`), while its
    network moved."""
    net = MLPDenoiser(2, width=16, depth=1, emb_dim=8, key=jr.key(0))
    exact = GaussianDenoiser(jnp.array([0.5, -0.3]), 0.8 * jnp.eye(2))
    cfg, opt = dmd2.DMD2Config(k=1, ttur=2, gan=False), dmd2.dmd2_optimiser(1e-2, warmup=0)
    state = dmd2.init_dmd2(L.Rebased(net, exact, net), jr.key(1), opt, cfg, 16, student=net)
    x = jnp.stack([_data(jr.key(2), 32)] * cfg.ttur)
    step = lambda st, key: dmd2.dmd2_step(st, exact, x, key, cfg=cfg, optimiser=opt, schedule=SCHED)
    fake = eqx.filter_jit(mmd.scan_steps)(step, state, jr.split(jr.key(3), 20))[0].critic.model.fake
    for before, after in ((exact, fake.base), (net, fake.anchor)):
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.max(jnp.abs(tree_vec(fake.model) - tree_vec(net)))) > 1e-3


def test_sampler_runs_on_the_given_step_times():
    """`sample(..., times=...)`: the uniform grid given explicitly matches the default; the returned x_hat is the
    last step's (a denoiser that outputs its time returns times[-1]); bad grids are refused, naming them."""
    net = MLPDenoiser(2, width=16, depth=1, emb_dim=8, key=jr.key(0))
    for step in ("ancestral", "marginal"):
        a = sample(net, SCHED, jr.key(1), (64, 2), 4, step)
        b = sample(net, SCHED, jr.key(1), (64, 2), 4, step, times=(1.0, 0.75, 0.5, 0.25))
        np.testing.assert_allclose(a, b, atol=1e-5)
    out = sample(lambda z, t: z * 0 + t, SCHED, jr.key(1), (8, 2), 3, "marginal", times=(1.0, 0.6, 0.35))
    np.testing.assert_allclose(out, 0.35, rtol=1e-6)
    for bad in ((1.0, 0.5), (1.0, 0.5, 0.7), (1.2, 0.5, 0.2), (1.0, 0.5, 0.0)):
        with pytest.raises(ValueError, match="step times"):
            sample(net, SCHED, jr.key(1), (8, 2), 3, "marginal", times=bad)
        with pytest.raises(ValueError, match="step times"):
            dmd2.DMD2Config(k=3, times=bad)


def test_dmd2_step_takes_one_optimiser_per_player():
    """`optimiser=(generator's, critic's)`: a zero learning rate for the generator leaves it unchanged while the
    critic trains, and the reverse; `dmd2.dmd2_optimiser(decay_steps=n)` reaches learning rate 0 at update n, and
    with `warmup=0` its first update is at the full rate."""
    net = MLPDenoiser(2, width=16, depth=1, emb_dim=8, key=jr.key(0))
    cfg, x = dmd2.DMD2Config(k=2, ttur=1), _data(jr.key(2), 32)[None]
    for frozen in ("generator", "critic"):
        opts = (optax.sgd(0.0), optax.sgd(1e-2)) if frozen == "generator" else (optax.sgd(1e-2), optax.sgd(0.0))
        state = dmd2.init_dmd2(net, jr.key(1), opts, cfg, 16)
        new, _ = dmd2.dmd2_step(state, net, x, jr.key(3), cfg=cfg, optimiser=opts, schedule=SCHED)
        for player in ("generator", "critic"):
            a, b = (jax.tree.leaves(eqx.filter(getattr(s, player).model, eqx.is_array)) for s in (state, new))
            same = all(np.array_equal(u, v) for u, v in zip(a, b))  # on the host: no program per shape
            assert same == (player == frozen), (frozen, player)
    for decay_steps, stopped in ((5, True), (None, False)):
        opt, params = dmd2.dmd2_optimiser(1e-2, warmup=2, decay_steps=decay_steps), jnp.ones(3)
        state = opt.init(params)
        for _ in range(6):  # updates 0..5; the last one runs at schedule count 5
            upd, state = opt.update(jnp.ones(3), state, params)
        assert bool(jnp.all(upd == 0)) == stopped, (decay_steps, upd)
    for decay_steps in (None, 5):  # no warm-up: the full rate from the first update
        opt, params = dmd2.dmd2_optimiser(1e-2, warmup=0, decay_steps=decay_steps), jnp.ones(3)
        upd = opt.update(jnp.ones(3), opt.init(params), params)[0]
        np.testing.assert_allclose(upd, -1e-2 * (1.0 + 0.01), rtol=1e-3)  # Adam's first step, weight decay 0.01


def test_dmd2_official_times_match_the_official_log_snr():
    """`sampling.dmd2_official_times`: t_0 = 1 (pure noise) and, for j >= 1, this schedule's log-SNR at t_j equals SD's
    scaled-linear log-SNR at DDPM step 999 - 250 j (k = 4) minus log(data variance); SD's last alpha-bar is the
    known 0.0047 (a plain linear beta schedule gives 0.0016 and fails)."""
    from sampling import dmd2_official_times, sd_logsnr

    abar_last = 1.0 / (1.0 + np.exp(-sd_logsnr(999)))
    assert abs(abar_last - 0.0047) < 0.0002
    for var in (1.0, 2.0):
        times = dmd2_official_times(SCHED, 4, var)
        assert times[0] == 1.0 and all(a > b for a, b in zip(times, times[1:]))
        lam = np.asarray(SCHED.logsnr(jnp.asarray(times[1:])))
        np.testing.assert_allclose(lam, sd_logsnr([749, 499, 249]) - np.log(var), atol=2e-3)
    assert dmd2_official_times(SCHED, 1) == (1.0,)
    assert len(dmd2_official_times(SCHED, 8)) == 8
