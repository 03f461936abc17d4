"""Each algorithm's step (mmd.py) run end to end on a 2-D Gaussian with its exact teacher.

Short runs of Algorithm 2, Algorithm 3 and DMD2 each move a k = 2 student toward the data by more than the
sampler's own noise floor; Eq. 10's data term vanishes for the exact teacher and not for a shifted one.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import losses as L
import dmd2
import mmd
from models import GaussianDenoiser, MLPDenoiser
from sampling import sample
from test_losses import SCHED, Z, random_cov, tree_vec

# ----------------------------------------------------------------------------------------------
# Short runs: each algorithm moves a k = 2 student toward the data (exact teacher, 2-D Gaussian).

K_SHORT, N_SHORT = 2, 200
MU_SHORT = np.array([0.5, -0.3])
COV_SHORT = random_cov(np.random.default_rng(0), 2, 0.05, 0.5)
EXACT = GaussianDenoiser(MU_SHORT, COV_SHORT)


def _data(key, n=256):
    return EXACT.sample(key, n)


def _student_error(model, step):
    from test_mmd import sampler_error  # noqa: PLC0415

    x = eqx.filter_jit(lambda m: sample(m, SCHED, jr.key(9), (20_000, 2), K_SHORT, step))(model)
    return sampler_error(np.asarray(x), MU_SHORT, COV_SHORT)


@pytest.fixture(scope="module")
def net_teacher():
    """An MLP regressed onto the exact denoiser: the network every student starts from."""
    opt = mmd.teacher_optimiser(2e-3, 600, 50)
    run = eqx.filter_jit(lambda st, keys: mmd.scan_steps(
        lambda st, k: mmd.regression_step(st, EXACT, _data(k), jr.fold_in(k, 1), optimiser=opt, schedule=SCHED), st, keys))
    state, _ = run(mmd.init_player(MLPDenoiser(2, width=64, depth=2, emb_dim=16, key=jr.key(0)), opt), jr.split(jr.key(1), 600))
    return state.model


def _assert_moves_toward_data(before, after):
    from test_mmd import sampler_noise_floor  # noqa: PLC0415

    assert before - after > Z * sampler_noise_floor(COV_SHORT), (before, after)


def test_short_alternating_run(net_teacher):
    cfg, opt = mmd.MMConfig(k=K_SHORT, weighting="flat"), mmd.mm_optimiser(1e-3, N_SHORT, 50)
    run = eqx.filter_jit(lambda a, keys: mmd.scan_steps(
        lambda a, k: mmd.alternating_step(a, EXACT, _data(k), jr.fold_in(k, 1), cfg=cfg, optimiser=opt, schedule=SCHED), a, keys))
    state, _ = run(mmd.init_alternating(net_teacher, opt), jr.split(jr.key(2), N_SHORT))
    _assert_moves_toward_data(_student_error(net_teacher, "ancestral"), _student_error(state.generator.model, "ancestral"))


def test_rebased_auxiliary_model_starts_as_the_exact_teacher(net_teacher):
    """`--teacher exact`: the auxiliary model / fake score `losses.Rebased(net, exact, net)` has the closed
    form's values, so the generator's first gradient (Eq. 6, and DMD2's `fake - real`) is zero up to
    rounding; the plain regressed network (the former start) gives a gradient of its regression error.
    Training moves the network part only."""
    rebased = L.Rebased(net_teacher, EXACT, net_teacher)
    z, t = jr.normal(jr.key(0), (64, 2)), jr.uniform(jr.key(1), (64,), minval=0.05, maxval=0.95)
    apply = eqx.filter_jit(L.apply)  # one compiled program per model, not one per operation
    np.testing.assert_allclose(apply(rebased, z, t), apply(EXACT, z, t), atol=1e-5)
    batch = L.noised_batch(SCHED, _data(jr.key(2)), jr.key(3), K_SHORT)
    grad = eqx.filter_jit(lambda aux: tree_vec(eqx.filter_grad(L.generator_loss)(net_teacher, aux, EXACT, SCHED, batch, "flat")))
    plain = float(jnp.linalg.norm(grad(net_teacher)))
    assert plain > 1e-3 and float(jnp.linalg.norm(grad(rebased))) < 1e-3 * plain
    x = _data(jr.key(4))  # DMD2's generator gradient at x (any x: the scores compared at noised x)
    t1, noise = jnp.full((x.shape[0],), 0.5), jr.normal(jr.key(5), x.shape)
    dmd_grad = eqx.filter_jit(jax.grad(L.dmd_loss))
    dmd = lambda fake: float(jnp.linalg.norm(dmd_grad(x, EXACT, fake, SCHED, t1, noise)))
    assert dmd(net_teacher) > 1e-5 and dmd(rebased) < 1e-3 * dmd(net_teacher)
    cfg, opt = mmd.MMConfig(k=K_SHORT, weighting="flat"), mmd.mm_optimiser(1e-3, 10, 2)
    state = mmd.init_alternating(rebased, opt, student=net_teacher)
    for i in range(3):
        state, _ = mmd.alternating_step(state, EXACT, _data(jr.key(10 + i)), jr.key(20 + i), cfg=cfg, optimiser=opt, schedule=SCHED)
    aux = state.aux.model
    assert jnp.array_equal(tree_vec(aux.anchor), tree_vec(net_teacher)) and jnp.array_equal(tree_vec(aux.base), tree_vec(EXACT))
    assert not jnp.array_equal(tree_vec(aux.model), tree_vec(net_teacher))


def test_short_instant_run(net_teacher):
    cfg, opt = mmd.MMConfig(k=K_SHORT, weighting="flat"), mmd.mm_optimiser(1e-3, N_SHORT, 50)
    precond = mmd.estimate_preconditioner(net_teacher, SCHED, jnp.stack([_data(jr.key(i)) for i in range(10)]), jr.key(0))
    run = eqx.filter_jit(lambda p, keys: mmd.scan_steps(
        lambda p, k: mmd.instant_step(p, net_teacher, precond, _data(k), _data(jr.fold_in(k, 2)), jr.fold_in(k, 1),
                                      cfg=cfg, optimiser=opt, schedule=SCHED), p, keys))
    state, _ = run(mmd.init_instant(net_teacher, opt, precond), jr.split(jr.key(3), N_SHORT))
    _assert_moves_toward_data(_student_error(net_teacher, "ancestral"), _student_error(state.student.model, "ancestral"))


def test_short_dmd2_run(net_teacher):
    cfg, opt = dmd2.DMD2Config(k=K_SHORT, ttur=5), dmd2.dmd2_optimiser(1e-3, 50)
    real = lambda k: jnp.stack([_data(jr.fold_in(k, i)) for i in range(cfg.ttur)])
    run = eqx.filter_jit(lambda d, keys: mmd.scan_steps(
        lambda d, k: dmd2.dmd2_step(d, EXACT, real(k), jr.fold_in(k, 9), cfg=cfg, optimiser=opt, schedule=SCHED), d, keys))
    state, _ = run(dmd2.init_dmd2(net_teacher, jr.key(5), opt, cfg, 64), jr.split(jr.key(4), N_SHORT // 2))
    _assert_moves_toward_data(_student_error(net_teacher, "marginal"), _student_error(state.generator.model, "marginal"))


# ----------------------------------------------------------------------------------------------
# Eq. 10's data term.


def _per_batch_data_grads(teacher, n=48, b=256, seed=0):
    xs = EXACT.sample(jr.key(seed), n * b).reshape(n, b, 2)
    one = lambda x, k: ravel_pytree(mmd.data_moment(teacher, SCHED, x[None], k, weighting="flat"))[0]
    return np.asarray(jax.jit(jax.vmap(one))(xs, jr.split(jr.key(seed + 1), n)), np.float64)


def _data_moment_z(teacher):
    g = _per_batch_data_grads(teacher)
    return np.abs(g.mean(0)) / (g.std(0, ddof=1) / np.sqrt(len(g)) + 1e-12)


def test_data_moment_vanishes_for_the_exact_teacher():
    """E_data grad_theta L_theta = 0 when g_theta is the true posterior mean (Eq. 10's data term), theta = (mu, S).

    Each parameter's mean over 48 independent batches is within Z standard errors of 0; a teacher with a
    shifted mean fails the same check."""
    assert _data_moment_z(EXACT).max() < Z
    wrong = GaussianDenoiser(MU_SHORT + 0.3, COV_SHORT)
    assert _data_moment_z(wrong).max() > Z
