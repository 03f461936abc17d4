"""Property tests of the foundation: noise process, posterior (Eq. 1-2), exact denoisers, samplers; and of mmd.py's
Algorithm 3 preconditioner and nu average, and Algorithm 2's data batch.

Every Monte-Carlo assertion uses a tolerance derived from its sample size (a multiple of the
standard error), and each property has a companion test showing that a deliberately wrong variant
fails the same check.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import metrics as M
from data import RING2, random_cov
from models import GaussianDenoiser, MixtureDenoiser, MLPDenoiser
from sampling import (
    Schedule,
    ancestral_sample,
    ddim_sample,
    diffuse,
    edm_time,
    edm_weight,
    grid_times,
    posterior,
    sample,
)

SCHED = Schedule()
N_MC = 40_000
Z = 5.0  # standard errors allowed in a Monte-Carlo check

times = st.floats(0.0, 1.0, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------------------------
# 1. Posterior consistency: z_t ~ q(z_t | x), z_s ~ q(z_s | z_t, x)  =>  z_s ~ N(alpha_s x, sigma_s^2).


@functools.partial(jax.jit, static_argnames="wrong_std")
def _two_stage(key, x, t, s, wrong_std=False):
    k1, k2 = jr.split(key)
    xs = jnp.broadcast_to(x, (N_MC,) + x.shape)
    z_t = diffuse(SCHED, xs, t, jr.normal(k1, xs.shape))
    mean, std = posterior(SCHED, z_t, xs, t, s)
    if wrong_std:  # the bug we must catch: posterior std replaced by sigma_s
        std = SCHED.alpha_sigma(s)[1]
    return mean + std * jr.normal(k2, xs.shape)


def _marginal_ok(z_s, x, s):
    alpha_s, sigma_s = SCHED.alpha_sigma(s)
    m_err = np.abs(np.mean(z_s, 0) - alpha_s * x)
    v_err = np.abs(np.var(z_s, 0) - sigma_s**2)
    m_tol = Z * sigma_s / np.sqrt(N_MC) + 1e-5
    v_tol = Z * sigma_s**2 * np.sqrt(2.0 / N_MC) + 1e-6
    return bool(np.all(m_err < m_tol) and np.all(v_err < v_tol))


@given(seed=seeds, t=times, u=st.floats(0.0, 1.0))
def test_posterior_marginalises_to_forward_diffusion(seed, t, u):
    s = u * t
    x = jr.normal(jr.key(seed), (3,)) * 2
    assert _marginal_ok(_two_stage(jr.key(seed + 1), x, t, s), x, s)


@given(t=times, u=st.floats(0.0, 1.0))
def test_posterior_closed_form_algebra(t, u):
    # E[z_s] = c alpha_t x + alpha_s r x = alpha_s x and Var = c^2 sigma_t^2 + std^2 = sigma_s^2,
    # with c the coefficient on z_t; read c and the x-coefficient off the (linear) posterior mean.
    s = u * t
    mean_z, std = posterior(SCHED, jnp.ones(()), jnp.zeros(()), t, s)
    mean_x, _ = posterior(SCHED, jnp.zeros(()), jnp.ones(()), t, s)
    (alpha_t, sigma_t), (alpha_s, sigma_s) = SCHED.alpha_sigma(t), SCHED.alpha_sigma(s)
    np.testing.assert_allclose(mean_z * alpha_t + mean_x, alpha_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean_z**2 * sigma_t**2 + std**2, sigma_s**2, rtol=1e-4, atol=1e-6)


def test_posterior_check_bites_on_wrong_std():
    x, t, s = jnp.array([1.0, -0.5, 2.0]), 0.5, 0.3
    assert _marginal_ok(_two_stage(jr.key(0), x, t, s), x, s)
    assert not _marginal_ok(_two_stage(jr.key(0), x, t, s, wrong_std=True), x, s)


# ----------------------------------------------------------------------------------------------
# 2. Limits, and finiteness on the whole (s, t) square.


@given(seed=seeds, t=times)
def test_posterior_limits(seed, t):
    z_t, x = jr.normal(jr.key(seed), (2, 4))
    mean, std = posterior(SCHED, z_t, x, t, t)  # s = t: stay at z_t
    np.testing.assert_allclose(mean, z_t, atol=1e-5)
    assert np.all(std == 0)
    mean, std = posterior(SCHED, z_t, x, max(t, 0.01), 0.0)  # s = 0 < t: land on x
    np.testing.assert_allclose(mean, x, atol=1e-5)
    assert np.all(std < 1e-6)
    s = 0.7 * t  # t = 1: forget z_t, q(z_s | x)
    mean, std = posterior(SCHED, z_t, x, 1.0, s)
    alpha_s, sigma_s = SCHED.alpha_sigma(s)
    np.testing.assert_allclose(mean, alpha_s * x, atol=1e-5)
    np.testing.assert_allclose(std, sigma_s, rtol=1e-5)


def _paper_posterior(z_t, x, t, s):
    """Eq. 2 as printed: var = (1/sigma_s^2 + alpha_ts^2 / sigma_ts^2)^-1 (the unstable form)."""
    (a_t, s_t), (a_s, s_s) = SCHED.alpha_sigma(t), SCHED.alpha_sigma(s)
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    var = 1.0 / (1.0 / s_s**2 + a_ts**2 / var_ts)
    return var * (a_ts / var_ts * z_t + a_s / s_s**2 * x), jnp.sqrt(var)


def _finite_on_square(post):
    grid = jnp.linspace(0.0, 1.0, 41)
    t, s = jnp.meshgrid(grid, grid)
    t, s = t.ravel(), jnp.minimum(s.ravel(), t.ravel())
    z_t, x = jnp.ones((t.size, 2)), -jnp.ones((t.size, 2))
    mean, std = post(z_t, x, t, s)
    grad_x = jax.grad(lambda x: jnp.sum(post(z_t, x, t, s)[0]))(x)
    return all(bool(jnp.all(jnp.isfinite(a))) for a in (mean, std, grad_x))


def test_posterior_finite_everywhere_and_naive_form_is_not():
    assert _finite_on_square(functools.partial(posterior, SCHED))
    # the check bites: the paper's printed form divides by zero at s = t
    assert not _finite_on_square(lambda z, x, t, s: _paper_posterior(z, x, t[:, None], s[:, None]))


# ----------------------------------------------------------------------------------------------
# 3. Exact denoisers against an independent computation.


def _joint_gaussian_posterior(mu, cov, z, alpha, sigma):
    """E[x | z] and Cov[x | z] from the precision matrix of the joint Gaussian of (x, z), in float64."""
    d = mu.size
    joint = np.block([[cov, alpha * cov], [alpha * cov, alpha**2 * cov + sigma**2 * np.eye(d)]])
    prec = np.linalg.inv(joint)
    pxx, pxz = prec[:d, :d], prec[:d, d:]
    cond_cov = np.linalg.inv(pxx)
    return mu - cond_cov @ pxz @ (z - alpha * mu), cond_cov


@given(seed=seeds, t=st.floats(0.01, 0.99))
def test_gaussian_denoiser_matches_joint_gaussian(seed, t):
    rng = np.random.default_rng(seed)
    d = 4
    mu, cov, z = rng.normal(size=d), random_cov(rng, d), rng.normal(size=d)
    den = GaussianDenoiser(mu, cov)
    alpha, sigma = (float(a) for a in SCHED.alpha_sigma(t))
    want_mean, want_cov = _joint_gaussian_posterior(mu, cov, z, alpha, sigma)
    np.testing.assert_allclose(den(jnp.asarray(z, jnp.float32), t), want_mean, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(den.posterior_cov(t), want_cov, rtol=1e-3, atol=1e-3)
    one = MixtureDenoiser([1.0], mu[None], cov[None])
    np.testing.assert_allclose(one(jnp.asarray(z, jnp.float32), t), den(jnp.asarray(z, jnp.float32), t), atol=1e-5)


def _mc_posterior_mean(key, sampler, z0, alpha, sigma, n=400_000):
    """Self-normalised importance estimate of E[x | z = z0] with x from the prior, and its std error."""
    x = sampler(key, n)[:, 0]
    logw = -0.5 * ((z0 - alpha * x) / sigma) ** 2
    w = np.exp(logw - logw.max())
    w = w / w.sum()
    est = np.sum(w * x)
    se = np.sqrt(np.sum(w**2 * (x - est) ** 2))
    return est, se


MIX1D = dict(weights=[0.25, 0.75], means=[[-1.0], [1.5]], covs=[[[0.3]], [[0.1]]])


@given(seed=seeds, t=st.floats(0.2, 0.8), z0=st.floats(-2.0, 2.0))
def test_exact_denoisers_match_monte_carlo_1d(seed, t, z0):
    alpha, sigma = (float(a) for a in SCHED.alpha_sigma(t))
    mix = MixtureDenoiser(**MIX1D)
    est, se = _mc_posterior_mean(jr.key(seed), mix.sample, z0, alpha, sigma)
    assert abs(float(mix(jnp.array([z0]), t)[0]) - est) < Z * se + 1e-3
    gauss = GaussianDenoiser([0.5], [[2.0]])
    est, se = _mc_posterior_mean(jr.key(seed), gauss.sample, z0, alpha, sigma)
    assert abs(float(gauss(jnp.array([z0]), t)[0]) - est) < Z * se + 1e-3


def test_monte_carlo_check_bites_on_wrong_weights():
    t, z0 = 0.5, 0.3
    alpha, sigma = (float(a) for a in SCHED.alpha_sigma(t))
    est, se = _mc_posterior_mean(jr.key(0), MixtureDenoiser(**MIX1D).sample, z0, alpha, sigma)
    wrong = MixtureDenoiser(**{**MIX1D, "weights": [0.5, 0.5]})  # responsibilities ignore the weights
    assert abs(float(wrong(jnp.array([z0]), t)[0]) - est) > Z * se + 1e-3


# ----------------------------------------------------------------------------------------------
# 4. Samplers with the exact teacher converge to the data distribution as num_steps grows.

N_SAMPLES = 20_000


def _wrong_std_sampler(den, key, shape, k):
    """Ancestral sampling whose re-noising uses sigma_s instead of the posterior std (a bug)."""

    def body(z, i):
        t, s = 1.0 - i / k, jnp.maximum(1.0 - (i + 1) / k, 0.0)
        x_hat = jax.vmap(den, (0, None))(z, t)
        mean, _ = posterior(SCHED, z, x_hat, t, s)
        return mean + SCHED.alpha_sigma(s)[1] * jr.normal(jr.fold_in(key, i), z.shape), x_hat

    return jax.lax.scan(body, jr.normal(key, shape), jnp.arange(k))[1][-1]


sampler_error = M.sampler_error


def sampler_noise_floor(cov, n=N_SAMPLES):
    return M.sampler_noise_floor(cov, n)


# Programs that run for seconds, compiled fully optimised whatever conftest's flags say: the closed-form testbed's
# training scans at LLVM's full level; the samplers (up to 512 steps of 20,000 points) as XLA compiles by default,
# with its fusion emitters too, under which 512 ancestral steps at d = 8 take 1.65 s instead of 2.81 s.
OPTIMISED = {"xla_backend_optimization_level": 3}
SAMPLERS = M.FULL


@functools.lru_cache(maxsize=None)
def _jitted(kind, k):
    fn = {"ancestral": ancestral_sample, "ddim": ddim_sample, "wrong": None}[kind]
    if kind == "wrong":
        return jax.jit(lambda den, key: _wrong_std_sampler(den, key, (N_SAMPLES, den.mean.size), k),
                       compiler_options=SAMPLERS)
    return jax.jit(lambda den, key: fn(den, SCHED, key, (N_SAMPLES, den.mean.size), k), compiler_options=SAMPLERS)


@pytest.mark.parametrize("kind", ["ancestral", "ddim"])
@given(seed=seeds, d=st.sampled_from([2, 8]))
def test_sampler_converges_with_exact_teacher(kind, seed, d):
    rng = np.random.default_rng(seed)
    mu, cov = rng.normal(size=d), random_cov(rng, d, 0.02, 1.0)
    den = GaussianDenoiser(mu, cov)
    errs = {k: sampler_error(_jitted(kind, k)(den, jr.key(seed)), mu, cov) for k in (1, 4, 64, 512)}
    floor = sampler_noise_floor(cov)
    one = _jitted(kind, 1)(den, jr.key(seed))
    assert np.max(np.abs(one - mu)) < 1e-3  # one step returns the mean only
    assert errs[1] > 0.9  # ... so the covariance is entirely missing
    assert errs[1] > errs[4] > errs[64]  # the error falls with the number of steps
    assert errs[512] < Z * floor  # and reaches the Monte-Carlo noise floor


def test_sampler_check_bites_on_wrong_variance():
    rng = np.random.default_rng(0)
    mu, cov = rng.normal(size=4), random_cov(rng, 4, 0.02, 1.0)
    den = GaussianDenoiser(mu, cov)
    err = sampler_error(_jitted("wrong", 512)(den, jr.key(0)), mu, cov)
    assert err > Z * sampler_noise_floor(cov)


@pytest.mark.parametrize("step", ["ancestral", "ddim", "marginal"])
def test_conditional_sampling_gives_each_example_its_own_label(step):
    """`sample(..., label)`: the denoiser sees example i's label (a class-conditional sampler that
    passed one class, or none, to every example would draw the wrong digits). The toy denoiser predicts its label."""
    label = jnp.arange(12) % 5
    seen = lambda z, t, lab: jnp.full_like(z, lab)
    x = sample(seen, SCHED, jr.key(0), (12, 3), 4, step, label)
    np.testing.assert_array_equal(np.asarray(x), np.broadcast_to(np.asarray(label, np.float32)[:, None], (12, 3)))


@pytest.mark.parametrize("k, recovers", [(256, True), (1, False)])
def test_ancestral_recovers_mixture_weights(k, recovers):
    mix = MixtureDenoiser(**RING2)
    x = jax.jit(lambda key: ancestral_sample(mix, SCHED, key, (N_SAMPLES, 2), k), compiler_options=SAMPLERS)(jr.key(3))
    se = np.sqrt(0.3 * 0.7 / N_SAMPLES)
    ok = np.all(np.abs(M.component_fractions(np.asarray(x), RING2["means"]) - np.array(RING2["weights"])) < Z * se)
    assert ok == recovers  # k = 1 returns the overall mean, which sits in the heavier component


# ----------------------------------------------------------------------------------------------
# 5. Jit, vmap, vector and image shapes.


@pytest.mark.parametrize("shape", [(16, 3), (4, 8, 8, 3)])
def test_shapes_jit_and_vmap(shape):
    key = jr.key(0)
    x = jr.normal(key, shape)
    t = jr.uniform(jr.fold_in(key, 1), shape[:1])
    s = t * 0.5
    z = jax.jit(diffuse, static_argnums=0)(SCHED, x, t, jr.normal(key, shape))
    mean, std = jax.jit(posterior, static_argnums=0)(SCHED, z, x, t, s)
    assert mean.shape == shape and jnp.broadcast_shapes(std.shape, shape) == shape
    one = jax.vmap(lambda z, x, t, s: posterior(SCHED, z, x, t, s)[0])(z, x, t, s)
    np.testing.assert_allclose(one, mean, atol=1e-6)
    for step in ("ancestral", "ddim", "marginal"):
        out = jax.jit(lambda key: sample(lambda z, t: 0.5 * z, SCHED, key, shape, 3, step))(key)
        assert out.shape == shape and bool(jnp.all(jnp.isfinite(out)))


def test_mlp_denoiser_and_time_distribution():
    net = MLPDenoiser(3, key=jr.key(0))
    out = jax.jit(jax.vmap(net))(jnp.ones((5, 3)), jnp.linspace(0, 1, 5))
    assert out.shape == (5, 3) and bool(jnp.all(jnp.isfinite(out)))
    s = edm_time(SCHED, jr.key(0), (100_000,))
    sig = np.exp(-np.asarray(SCHED.logsnr(s)) / 2)  # EDM sigma back from VP time
    assert sig.min() >= 0.002 * 0.999 and sig.max() <= 80 * 1.001
    # median of EDM's rho = 7 schedule: u = 1/2
    med = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert abs(np.median(sig) / med - 1) < 0.05
    w = edm_weight(SCHED, jnp.array([0.5]))  # sigma_edm = 1: (1 + 1/4) / (1/4)
    np.testing.assert_allclose(w, 5.0, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Step grids: uniform in the time u of the cosine schedule shifted by grid_shift (sampling.grid_times).


def cosine_logsnr(u, shift):
    return -2.0 * np.log(np.tan(np.pi * np.asarray(u, np.float64) / 2)) + shift


@given(res=st.sampled_from([8, 16, 32, 64, 128]), g=st.floats(-3.0, 5.0), k=st.integers(1, 16))
def test_grid_times_have_the_grid_schedules_log_snr(res, g, k):
    sched = Schedule.for_resolution(res)
    uniform = grid_times(sched, k, sched.shift)  # the schedule's own shift: the uniform grid t = 1 - i/k
    np.testing.assert_allclose(uniform, 1.0 - np.arange(k) / k, atol=2e-6)
    times = grid_times(sched, k, g)
    assert times[0] == 1.0 and np.all(np.diff(times) < 0) and times[-1] > 0
    u = 1.0 - np.arange(1, k) / k  # every step but the first (pure noise) has the grid's log-SNR
    np.testing.assert_allclose(np.asarray(sched.logsnr(jnp.asarray(times[1:]))), cosine_logsnr(u, g), atol=2e-3)
    np.testing.assert_allclose(sched.to_grid(sched.from_grid(jnp.asarray(u), g), g), u, atol=2e-6)


@pytest.mark.parametrize("warp", [True, False])
def test_algorithm2_times_on_a_grid_draw_delta_uniform_in_grid_time(warp):
    """`losses.sample_times` with `grid_shift`: t >= s, and in the grid's time u, u_t - u_s ~ U[0, 1/k] where
    u_s < 1 - 1/k (no clipping at 1): mean 1/(2k) and variance 1/(12 k^2) within Z standard errors. Without the
    warp (`grid_shift=None`: delta uniform in t) the same check must fail on an 8x8 image schedule."""
    import losses as L  # noqa: PLC0415

    sched, k, n = Schedule.for_resolution(8), 8, 200_000
    t, s = L.sample_times(sched, jr.key(0), n, k, grid_shift=0.0 if warp else None)
    assert bool(jnp.all(t >= s)) and bool(jnp.all(t <= 1.0))
    u_s, u_t = (np.asarray(sched.to_grid(a, 0.0), np.float64) for a in (s, t))
    d = (u_t - u_s)[u_s < 1 - 1 / k]
    m = len(d)
    assert m > n // 4
    ok_mean = abs(d.mean() - 1 / (2 * k)) < Z * (1 / k) / np.sqrt(12 * m)
    ok_var = abs(d.var() - 1 / (12 * k**2)) < Z * np.sqrt(1 / (180 * k**4) / m)  # var of (U^2) terms: 1/(180 k^4)
    assert (ok_mean and ok_var) == warp
    if warp:  # grid=True: t is the first grid time at or above s
        tg, sg_ = L.sample_times(sched, jr.key(1), 10_000, k, grid=True, grid_shift=0.0)
        grid = np.asarray(grid_times(sched, k, 0.0))
        nearest = np.abs(np.asarray(tg)[:, None] - grid[None]).min(axis=1)
        assert nearest.max() < 1e-5 and bool(jnp.all(tg >= sg_))


# ----------------------------------------------------------------------------------------------
# mmd.py's steps: Algorithm 3's preconditioner and nu average, Algorithm 2's data batch.


def test_preconditioner_from_adam_is_adams_bias_corrected_second_moment():
    """`preconditioner_from_adam` of the teacher optimiser's state after n updates with gradients g_1..g_n is
    `1 / (sqrt(v_hat) + eps)`, `v_hat = (1 - b2) sum_i b2^(n-i) g_i^2 / (1 - b2^n)` with the teacher's b2 = 0.99
    (`mmd.TEACHER_B2`, which the caller must pass), after 5 updates and after 300 with shrinking gradients; without
    the bias correction (5), or with b2 = 0.999 (300), it fails."""
    import mmd  # noqa: PLC0415

    opt, params = mmd.teacher_optimiser(1e-3, 1000, 10), {"w": jnp.zeros(3)}

    @functools.partial(jax.jit, static_argnums=0)
    def adam_state(n):
        i = jnp.arange(n)[:, None]
        grads = jnp.array([0.05, -0.1, 0.0]) * jnp.exp(-i / 30.0) * (1 + i % 3)
        body = lambda state, g: (opt.update({"w": g}, state, params)[1], None)  # global norm < clip 1
        return jax.lax.scan(body, opt.init(params), grads)[0], grads

    def want(grads, b2, debias=True):
        n, g2 = len(grads), np.asarray(grads, np.float64) ** 2
        v = (1 - b2) * np.tensordot(b2 ** (n - 1 - np.arange(n)), g2, 1)
        return 1.0 / (np.sqrt(v / (1 - b2**n if debias else 1.0)) + 1e-3)

    for n, wrong in ((5, dict(b2=0.99, debias=False)), (300, dict(b2=0.999))):
        state, grads = adam_state(n)
        got = np.asarray(mmd.preconditioner_from_adam(state, b2=mmd.TEACHER_B2, eps=1e-3)["w"], np.float64)
        np.testing.assert_allclose(got, want(grads, 0.99), rtol=1e-4)
        assert got[2] == pytest.approx(1e3)  # a parameter without gradient: the guard caps Lambda at 1 / eps
        assert np.max(np.abs(want(grads, **wrong)[:2] / got[:2] - 1)) > 0.3, (n, wrong)  # bites


def test_nu_average_is_bias_corrected():
    """`MMConfig.nu_decay = d`: the JVP's tangent is the bias-corrected EMA of nu over updates. With a frozen student
    (learning rate 0) and nu from B' = a, b, a in turn, the monitor `1/2 g^T tangent` (g of the fixed batch B) is
    m_a, then `(d m_a + m_b) / (1 + d)`, then `(d^2 m_a + d m_b + m_a) / (1 + d + d^2)`, where m_a, m_b are the
    monitors of d = 0; an uncorrected average ((1 - d) m_a first) fails."""
    import optax  # noqa: PLC0415

    import mmd  # noqa: PLC0415

    net = MLPDenoiser(2, width=16, depth=1, emb_dim=8, key=jr.key(0))
    precond = jax.tree.map(jnp.ones_like, eqx.filter(net, eqx.is_inexact_array))
    x, xa = jr.normal(jr.key(1), (2, 64, 2))
    xb = 3.0 * jr.normal(jr.key(2), (64, 2)) + 1.0
    opt, d = optax.sgd(0.0), 0.8

    def monitors(decay, primes):
        cfg, state, out = mmd.MMConfig(k=4, nu_decay=decay), mmd.init_instant(net, opt, precond), []
        for xp in primes:
            state, m = mmd.instant_step(state, net, precond, x, xp, jr.key(3), cfg=cfg, optimiser=opt, schedule=SCHED)
            out.append(float(m["instant_loss"]))
        return out

    m_a, m_b = monitors(0.0, (xa,))[0], monitors(0.0, (xb,))[0]
    assert abs(m_a - m_b) > 0.2 * max(abs(m_a), abs(m_b))  # the two batches give different nu
    got = monitors(d, (xa, xb, xa))
    want = [m_a, (d * m_a + m_b) / (1 + d), (d**2 * m_a + d * m_b + m_a) / (1 + d + d**2)]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert abs((1 - d) * m_a - got[0]) > 0.1 * abs(m_a)  # bites: without the correction


def test_alternating_step_feeds_one_data_batch_to_both_updates(monkeypatch):
    """Algorithm 2 as `mmd.alternating_step` does it: the auxiliary update(s) and the generator update noise the same
    clean batch `x` (with their own times and noise), not a fresh batch each."""
    import losses as L  # noqa: PLC0415
    import mmd  # noqa: PLC0415

    net = MLPDenoiser(2, width=16, depth=1, emb_dim=8, key=jr.key(0))
    opt, x = mmd.mm_optimiser(1e-3, 10, 2), jnp.zeros((8, 2))
    for aux_steps in (1, 2):
        seen, real = [], L.noised_batch
        monkeypatch.setattr(L, "noised_batch", lambda sched, x, *a, **kw: seen.append(x) or real(sched, x, *a, **kw))
        cfg = mmd.MMConfig(k=2, aux_steps=aux_steps)
        step = lambda st, x: mmd.alternating_step(st, net, x, jr.key(1), cfg=cfg, optimiser=opt, schedule=SCHED)
        eqx.filter_eval_shape(step, mmd.init_alternating(net, opt), x)
        assert len(seen) == 2 and seen[0] is seen[1], (aux_steps, seen)
        monkeypatch.setattr(L, "noised_batch", real)


def test_alternating_distiller_with_fresh_data_gives_the_generator_its_own_batch(monkeypatch):
    """`alternating_distiller` (`fresh_data=True`), the paper's fresh data at every iteration: a step takes 2B examples,
    the auxiliary update noises the first B and the generator update the other B (labels split alike); an odd
    number of examples is refused with the shape."""
    import losses as L  # noqa: PLC0415
    import mmd  # noqa: PLC0415

    net = MLPDenoiser(2, width=16, depth=1, emb_dim=8, key=jr.key(0))
    d = mmd.alternating_distiller(net, k=2, steps=10, schedule=SCHED, fresh_data=True)
    assert d.batch_multiple == 2 and mmd.alternating_distiller(net, k=2, steps=10, fresh_data=False).batch_multiple == 1
    x = jnp.arange(16.0).reshape(8, 2)
    seen, real = [], L.noised_batch

    def noised_batch(sched, x, *a, **kw):  # records, in program order, the batch each update noises
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), x, ordered=True)
        return real(sched, x, *a, **kw)

    monkeypatch.setattr(L, "noised_batch", noised_batch)
    jax.block_until_ready(d.step(d.init(), x, jr.key(1)))
    jax.effects_barrier()
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], x[:4])
    np.testing.assert_array_equal(seen[1], x[4:])
    with pytest.raises(ValueError, match=r"fresh_data \(two batches of B\).*got shape \(7, 2\)"):
        d.step(d.init(), x[:7], jr.key(1))


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_errors():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        posterior(SCHED, z, z, 1.5, 0.2)
    with pytest.raises(ValueError, match=r"s must lie in \[0, 1\]"):
        posterior(SCHED, z, z, 0.5, -0.1)
    with pytest.raises(ValueError, match="s <= t"):
        posterior(SCHED, z, z, 0.3, 0.6)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        ancestral_sample(lambda z, t: z, SCHED, jr.key(0), (2, 3), 0)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianDenoiser(jnp.zeros(2), jnp.array([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="sum to 1"):
        MixtureDenoiser([0.5, 0.6], jnp.zeros((2, 2)), jnp.stack([jnp.eye(2)] * 2))
    with pytest.raises(ValueError, match="shape"):
        GaussianDenoiser(jnp.zeros(3), jnp.eye(2))
    with pytest.raises(ValueError, match="unknown step"):
        sample(lambda z, t: z, SCHED, jr.key(0), (2, 3), 2, "euler")
