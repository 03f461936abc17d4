"""Property tests of the distillation objectives (losses.py) and steps (mmd.py) on Gaussian data.

Each identity is checked against a closed form or an independent computation, and each check has a
companion showing a deliberately wrong variant (flipped sign, wrong variance, multi-step t) fails it.
"""


import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import losses as L
import dmd2
import mmd
from models import GaussianDenoiser, MLPDenoiser
from jax.flatten_util import ravel_pytree

from sampling import Schedule, posterior

SCHED = Schedule()
Z = 5.0
seeds = st.integers(0, 2**31 - 1)


def random_cov(rng, d, lo=0.1, hi=1.5):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * rng.uniform(lo, hi, d)) @ q.T


def flat(schedule, s, x, x_teacher):
    return jnp.ones(x.shape[0])


def tree_vec(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))])


# ----------------------------------------------------------------------------------------------
# A linear-Gaussian world where every moment of Algorithm 2 is known in closed form.


class Affine(eqx.Module):
    """A time-independent affine map z -> W z + b (an auxiliary model / closed-form denoiser)."""

    w: jax.Array
    b: jax.Array

    def __call__(self, z, t):
        return self.w @ z + self.b


def linear_coefs(den: GaussianDenoiser, t):
    """E[x | z_t] = A z + b for a GaussianDenoiser."""
    d = den.mean.size
    b = den(jnp.zeros(d), t)
    return jax.jacfwd(den)(jnp.zeros(d), t), b


def posterior_coefs(t, s):
    """z_s = a1 z_t + a2 x + std eps, read off the implementation's posterior."""
    a1, std = posterior(SCHED, jnp.ones(()), jnp.zeros(()), t, s)
    a2, _ = posterior(SCHED, jnp.zeros(()), jnp.ones(()), t, s)
    return float(a1), float(a2), float(jnp.squeeze(std))


class World:
    """Data N(mu, S); generator x~ = E[x|z_t] + delta + c chol(Cov[x|z_t]) eps with eta = (delta, c)."""

    def __init__(self, seed, d=2, t=0.6, s=0.35):
        rng = np.random.default_rng(seed)
        self.d, self.t, self.s = d, t, s
        self.mu, self.cov = rng.normal(size=d), random_cov(rng, d)
        self.teacher = GaussianDenoiser(self.mu, self.cov)
        self.A, self.b = (np.asarray(a, np.float64) for a in linear_coefs(self.teacher, t))
        self.chol = np.linalg.cholesky(np.asarray(self.teacher.posterior_cov(t), np.float64) + 1e-9 * np.eye(d))
        self.a1, self.a2, self.std = posterior_coefs(t, s)
        self.alpha_t, self.sigma_t = (float(a) for a in SCHED.alpha_sigma(t))

    def gen(self, eta, z_t, eps):
        delta, c = eta
        return z_t @ self.A.T + self.b + delta + c * eps @ self.chol.T

    def draw(self, key, n, eta, std=None):
        k1, k2, k3, k4 = jr.split(key, 4)
        x = jr.multivariate_normal(k1, self.mu, self.cov, (n,))
        z_t = self.alpha_t * x + self.sigma_t * jr.normal(k2, x.shape)
        eps = jr.normal(k3, x.shape)
        x_tilde = self.gen(eta, z_t, eps)
        z_s = self.a1 * z_t + self.a2 * x_tilde + (self.std if std is None else std) * jr.normal(k4, x.shape)
        return z_t, eps, x_tilde, z_s

    def moments(self, eta, std=None):
        """Closed-form E_g[x~ | z_s] (affine) and E_q[x | z_s], plus the law of z_s under g."""
        d, (delta, c) = self.d, (np.asarray(eta[0], np.float64), float(eta[1]))
        std = self.std if std is None else std
        m_z = self.alpha_t * self.mu
        v_z = self.alpha_t**2 * self.cov + self.sigma_t**2 * np.eye(d)
        m_x = self.A @ m_z + self.b + delta
        c_xz = self.A @ v_z  # Cov(x~, z_t)
        v_x = self.A @ v_z @ self.A.T + c**2 * self.chol @ self.chol.T
        m_s = self.a1 * m_z + self.a2 * m_x
        v_s = self.a1**2 * v_z + 2 * self.a1 * self.a2 * c_xz + self.a2**2 * v_x + std**2 * np.eye(d)
        v_s = 0.5 * (v_s + v_s.T)
        c_xs = self.a1 * c_xz.T + self.a2 * v_x  # Cov(x~, z_s)
        g_w = c_xs @ np.linalg.inv(v_s)
        g_b = m_x - g_w @ m_s
        q_w, q_b = (np.asarray(a, np.float64) for a in linear_coefs(GaussianDenoiser(self.mu, self.cov), self.s))
        return (g_w, g_b), (q_w, q_b), (m_s, v_s)

    def mismatch(self, eta, std=None):
        """E_{z_s ~ g} ||E_g[x~ | z_s] - E_q[x | z_s]||^2 in closed form."""
        (g_w, g_b), (q_w, q_b), (m_s, v_s) = self.moments(eta, std)
        dw, db = g_w - q_w, g_b - q_b
        e0 = dw @ m_s + db
        return float(e0 @ e0 + np.trace(dw @ v_s @ dw.T))


def least_squares(z, y):
    """Affine regression of y on z: the optimum of a diffusion loss over affine models."""
    zz = np.concatenate([np.asarray(z, np.float64), np.ones((z.shape[0], 1))], 1)
    coef = np.linalg.lstsq(zz, np.asarray(y, np.float64), rcond=None)[0]
    return Affine(jnp.asarray(coef[:-1].T, jnp.float32), jnp.asarray(coef[-1], jnp.float32))


def eq6_gradient(world, eta, key, n=20_000):
    """The Algorithm 2 generator gradient, with g_phi fitted to x~ on an independent batch (g_phi = E_g)."""
    k_fit, k_grad = jr.split(key)
    _, _, x_fit, zs_fit = world.draw(k_fit, n, eta)
    aux = least_squares(zs_fit, x_fit)
    z_t, eps, _, z_s = world.draw(k_grad, n, eta)
    s = jnp.full(n, world.s)
    aux_pred, teacher_pred = L.apply(aux, z_s, s), L.apply(world.teacher, z_s, s)

    def loss(eta):
        return L.moment_matching_loss(world.gen(eta, z_t, eps), aux_pred, teacher_pred, jnp.ones(n))

    g = jax.grad(loss)(eta)
    return np.concatenate([np.ravel(g[0]), np.ravel(g[1])])


def gradient_t_stat(world, eta, repeats=12):
    grads = np.stack([eq6_gradient(world, eta, jr.key(r)) for r in range(repeats)])
    mean, se = grads.mean(0), grads.std(0, ddof=1) / np.sqrt(repeats)
    return mean, se


ETA0 = (jnp.zeros(2), jnp.float32(1.0))


@given(seed=st.integers(0, 1000))
def test_eq3_holds_for_the_exact_conditional_sampler(seed):
    w = World(seed)
    assert w.mismatch(ETA0) < 1e-8  # E_g[x~ | z_s] = E_q[x | z_s]  (Eq. 3)
    assert w.mismatch(ETA0, std=SCHED.alpha_sigma(w.s)[1]) > 1e-3  # bites: z_s with the wrong variance


def test_eq6_fixed_point_and_descent():
    w = World(0)
    mean, se = gradient_t_stat(w, ETA0)
    assert np.all(np.abs(mean) < Z * se + 1e-6), (mean, se)  # zero within Monte-Carlo error
    eta = (jnp.array([0.4, -0.3]), jnp.float32(0.6))  # a generator that is off in mean and in spread
    mean, se = gradient_t_stat(w, eta)
    assert np.any(np.abs(mean) > Z * se)
    step = 0.2 / np.linalg.norm(mean)

    def stepped(sign):
        return (eta[0] - sign * step * mean[:2], eta[1] - sign * step * mean[2])

    assert w.mismatch(stepped(+1)) < w.mismatch(eta)  # descent on Eq. 6 reduces the moment mismatch
    assert w.mismatch(stepped(-1)) > w.mismatch(eta)  # bites: the flipped sign increases it


def test_auxiliary_fixed_point_is_the_average():
    """The implemented auxiliary loss, minimised over affine g_phi, gives (E_g[x~|z_s] + g_theta(z_s)) / 2."""
    w, n = World(1), 50_000
    eta = (jnp.array([0.5, 0.0]), jnp.float32(0.5))
    _, _, x_tilde, z_s = w.draw(jr.key(0), n, eta)
    s = jnp.full(n, w.s)
    phi0 = Affine(jnp.zeros((2, 2)), jnp.zeros(2))
    flat_p, unravel = ravel_pytree(phi0)

    @jax.jit  # one compiled program, not one per operation of the Hessian
    def newton(p, x_tilde, z_s, s):
        loss = lambda p: L.auxiliary_loss(unravel(p), w.teacher, SCHED, x_tilde, z_s, s, flat)
        return p - jnp.linalg.solve(jax.hessian(loss)(p), jax.grad(loss)(p))

    # the loss is quadratic in affine phi: one Newton step from anywhere is its exact minimiser
    p_star = newton(flat_p, x_tilde, z_s, s)
    phi = unravel(p_star)
    avg = least_squares(z_s, 0.5 * (x_tilde + L.apply(w.teacher, z_s, s)))
    np.testing.assert_allclose(phi.w, avg.w, atol=1e-3)
    np.testing.assert_allclose(phi.b, avg.b, atol=1e-3)
    (g_w, g_b), (q_w, q_b), _ = w.moments(eta)  # and in closed form, within Monte-Carlo error
    tol = Z * 2.0 / np.sqrt(n)
    np.testing.assert_allclose(phi.w, 0.5 * (g_w + q_w), atol=tol)
    np.testing.assert_allclose(phi.b, 0.5 * (g_b + q_b), atol=tol)
    assert np.max(np.abs(phi.w - g_w)) > 2 * tol  # bites: without the teacher term it would be E_g


# ----------------------------------------------------------------------------------------------
# Algorithm 3: Eq. 8 as the lambda -> 0 limit of Algorithm 2, and Appendix A (Eq. 8 vs Eq. 9).

D = 3


def small_world(seed):
    k = jr.split(jr.key(seed), 6)
    teacher = MLPDenoiser(D, width=16, depth=1, emb_dim=8, key=k[0])
    # a generator a little away from the teacher, so x~ differs from the teacher's mean prediction
    generator = jax.tree.map(lambda a: a + 0.2 * jr.normal(k[1], a.shape) if eqx.is_inexact_array(a) else a, teacher)
    precond = jax.tree.map(lambda a: jr.uniform(k[2], a.shape, minval=0.5, maxval=2.0), eqx.filter(teacher, eqx.is_inexact_array))
    x, x_p = jr.normal(k[3], (2, 64, D))
    return teacher, generator, precond, L.noised_batch(SCHED, x, k[4], 4), L.noised_batch(SCHED, x_p, k[5], 4)


@eqx.filter_jit
def _instant_grad(generator, teacher, precond, batch, batch_p, sign=-1.0):
    """The generator's gradient of Eq. 8's surrogate; `sign=1.0`: of Eq. 8 with the sign as printed (the negation)."""
    f = lambda g: L.instant_loss(g, teacher, precond, SCHED, batch, batch_p, "edm", "posterior")[0]
    return -sign * tree_vec(eqx.filter_grad(f)(generator))


@eqx.filter_jit
def _eq9_grad(generator, teacher, precond, batch):
    def f(g):
        x, z_s = L.generate(g, SCHED, batch)
        return L.eq9_moment(teacher, precond, SCHED, x, z_s, batch.s, "edm")

    return tree_vec(eqx.filter_grad(f)(generator))


@given(seed=seeds)
def test_appendix_a_instant_gradient_is_half_the_eq9_gradient(seed):
    teacher, generator, precond, batch, _ = small_world(seed)
    g9 = _eq9_grad(generator, teacher, precond, batch)
    g8 = _instant_grad(generator, teacher, precond, batch, batch)  # nu from the same batch
    np.testing.assert_allclose(g8, 0.5 * g9, rtol=2e-3, atol=1e-6 * float(jnp.max(jnp.abs(g9))))
    # bites: Eq. 8 with the sign as printed points the other way
    g8_flipped = _instant_grad(generator, teacher, precond, batch, batch, sign=1.0)
    assert not np.allclose(g8_flipped, 0.5 * g9, rtol=0.1)


@eqx.filter_jit
def algorithm2_limit_gradient(lam, generator, teacher, precond, batch, batch_p):
    """grad_eta (1/lambda) L_{phi(lambda)}(eta), phi(lambda) = theta - lambda Lambda grad_phi L(phi)|theta on B'."""
    x_p, zs_p = L.generate(generator, SCHED, batch_p)
    grad_phi = eqx.filter_grad(L.auxiliary_loss)(teacher, teacher, SCHED, x_p, zs_p, batch_p.s, "edm")
    phi = eqx.apply_updates(teacher, jax.tree.map(lambda p, g: -lam * p * g, precond, grad_phi))
    f = lambda g: L.generator_loss(g, phi, teacher, SCHED, batch, "edm") / lam
    return tree_vec(eqx.filter_grad(f)(generator))


def test_eq8_is_the_small_step_limit_of_algorithm2():
    teacher, generator, precond, batch, batch_p = small_world(0)
    with jax.enable_x64(True):  # finite differences in lambda need the precision
        to64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)
        teacher, generator, precond, batch, batch_p = map(to64, (teacher, generator, precond, batch, batch_p))
        g8 = _instant_grad(generator, teacher, precond, batch, batch_p)
        errs = [float(jnp.linalg.norm(algorithm2_limit_gradient(jnp.float64(lam), generator, teacher, precond, batch, batch_p)
                                      - g8) / jnp.linalg.norm(g8)) for lam in (1e-1, 1e-2, 1e-3)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2, errs  # O(lambda) convergence
    assert errs[1] / errs[2] > 5, errs


# ----------------------------------------------------------------------------------------------
# One step: Algorithm 2 at k = 1 is VSD (Eq. 11-13).


def _weight_times_snr(schedule, s, x, xt):
    alpha, sigma = schedule.alpha_sigma(s)
    return L.edm_weight(schedule, s) * alpha**2 / sigma**2


# compiled once for every example, not one program per operation
_generator_grad, _vsd_grad = (eqx.filter_jit(eqx.filter_grad(f)) for f in (L.generator_loss, L.vsd_loss))


@given(seed=seeds)
def test_k1_alternating_equals_vsd(seed):
    teacher, generator, _, batch, _ = small_world(seed)
    aux = jax.tree.map(lambda a: a * 1.1 if eqx.is_inexact_array(a) else a, teacher)
    b = batch._replace(t=jnp.ones_like(batch.t), z_t=jr.normal(jr.key(seed), batch.z_t.shape))
    g_mm = tree_vec(_generator_grad(generator, aux, teacher, SCHED, b, _weight_times_snr))
    g_vsd = tree_vec(_vsd_grad(generator, aux, teacher, SCHED, b.z_t, b.s, b.key, "edm"))
    np.testing.assert_allclose(g_mm, g_vsd, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(g_vsd))))
    # bites: at t < 1 the posterior z_s is not forward diffusion, and the two differ
    b_half = b._replace(t=jnp.full_like(b.t, 0.8), s=jnp.minimum(b.s, 0.8))
    g_half = tree_vec(_generator_grad(generator, aux, teacher, SCHED, b_half, _weight_times_snr))
    g_vsd_half = tree_vec(_vsd_grad(generator, aux, teacher, SCHED, b.z_t, b_half.s, b.key, "edm"))
    assert not np.allclose(g_half, g_vsd_half, rtol=1e-2)


# ----------------------------------------------------------------------------------------------
# Jit, edge times, shapes.


class FlatMLP(eqx.Module):
    """The vector MLP applied to images through einops, to test image-shaped batches."""

    mlp: MLPDenoiser
    shape: tuple = eqx.field(static=True)

    def __call__(self, z, t):
        h, w, c = self.shape
        return jnp.reshape(self.mlp(jnp.ravel(z), t), (h, w, c))

    def features(self, z, t):
        return self.mlp.features(jnp.ravel(z), t)


@eqx.filter_jit
def _all_losses(teacher, precond, x, t, s):
    batch = L.Noised(jr.normal(jr.key(2), x.shape), t, s, jr.key(3))
    return jnp.stack([
        L.diffusion_loss(teacher, SCHED, x, t, x, "edm"),
        L.auxiliary_loss(teacher, teacher, SCHED, x, batch.z_t, s, "dmd"),
        L.generator_loss(teacher, teacher, teacher, SCHED, batch, "flat"),
        L.instant_loss(teacher, teacher, precond, SCHED, batch, batch)[1],
        L.vsd_loss(teacher, teacher, teacher, SCHED, x, s, jr.key(4)),
        L.dmd_loss(x, teacher, teacher, SCHED, t, x),
    ])


@pytest.mark.parametrize("shape", [(3,), (4, 4, 2)])
def test_every_loss_and_step_is_finite_on_edge_times(shape):
    d = int(np.prod(shape))
    net = MLPDenoiser(d, width=16, depth=1, emb_dim=8, key=jr.key(0))
    teacher = net if len(shape) == 1 else FlatMLP(net, shape)
    b = 8
    x = jr.normal(jr.key(1), (b,) + shape)
    precond = jax.tree.map(jnp.ones_like, eqx.filter(teacher, eqx.is_inexact_array))
    edges = {"s=t": (0.4, 0.4), "t=1": (1.0, 0.3), "s~0": (0.01, 1e-4), "s=t=1": (1.0, 1.0), "s=t=0": (0.0, 0.0)}
    for edge, (t, s) in edges.items():
        vals = _all_losses(teacher, precond, x, jnp.full(b, t), jnp.full(b, s))
        assert bool(jnp.all(jnp.isfinite(vals))), (edge, vals)
    if len(shape) > 1:
        return  # the steps are shape-agnostic code around these losses; compile them once (vectors)
    opt = mmd.mm_optimiser(1e-3, 10, 2)
    cfg = mmd.MMConfig(k=2)
    alt, m1 = mmd.alternating_step(mmd.init_alternating(teacher, opt), teacher, x, jr.key(5), cfg=cfg, optimiser=opt, schedule=SCHED)
    inst, m2 = mmd.instant_step(mmd.init_instant(teacher, opt, precond), teacher, precond, x, x, jr.key(6), cfg=cfg, optimiser=opt, schedule=SCHED)
    dcfg = dmd2.DMD2Config(k=2, ttur=2)
    dmd, m3 = dmd2.dmd2_step(dmd2.init_dmd2(teacher, jr.key(7), opt, dcfg, 16), teacher, jnp.stack([x, x]), jr.key(8),
                            cfg=dcfg, optimiser=opt, schedule=SCHED)
    for m in (m1, m2, m3):
        assert all(bool(jnp.isfinite(v)) for v in m.values()), m
    for state in (alt, inst, dmd):
        assert bool(jnp.all(jnp.isfinite(tree_vec(state))))


# ----------------------------------------------------------------------------------------------
# Eq. 10's data term in nu and in the monitor.


@eqx.filter_jit
def _eq10_terms(generator, teacher, precond, batch, data_grad):
    """nu without and with the data term, and the monitor of Eq. 10 with B' = B."""
    nu = lambda g0: L.instant_nu(generator, teacher, precond, SCHED, batch, "edm", "posterior", g0)
    monitor = L.instant_loss(generator, teacher, precond, SCHED, batch, batch, data_grad=data_grad)[1]
    return nu(None), nu(data_grad), monitor


@given(seed=seeds)
def test_eq10_subtracts_the_data_term_from_nu(seed):
    """`data_grad` g_0: nu = Lambda (g - g_0) (Eq. 10), g the teacher gradient of the batch, and the monitor with
    B' = B is `1/2 (g - g_0)^T Lambda (g - g_0)`; `Lambda (g + g_0)` fails both."""
    teacher, generator, precond, batch, _ = small_world(seed)
    g0 = jax.tree.map(lambda a: jr.normal(jr.key(seed), a.shape), precond)
    nu_plain, nu_eq10, monitor = _eq10_terms(generator, teacher, precond, batch, g0)
    lam, g, g0, got = (np.asarray(ravel_pytree(t)[0], np.float64) for t in (precond, nu_plain, g0, nu_eq10))
    g = g / lam  # nu without a data term is Lambda g
    scale = float(np.max(np.abs(lam * g0)))
    np.testing.assert_allclose(got, lam * (g - g0), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(float(monitor), 0.5 * np.sum(lam * (g - g0) ** 2), rtol=1e-4)
    assert np.max(np.abs(got - lam * (g + g0))) > 0.1 * scale  # bites: the data term added


# ----------------------------------------------------------------------------------------------
# DMD2's losses: the normalised distribution matching gradient and the GAN terms.


def _diffuse64(x, t, noise):
    """`alpha_t x + sigma_t noise` in float64 numpy, t `(B,)`."""
    alpha, sigma = (np.asarray(a, np.float64)[:, None] for a in SCHED.alpha_sigma(jnp.asarray(t)))
    return alpha * np.asarray(x, np.float64) + sigma * np.asarray(noise, np.float64)


def _gauss_pred(mean, cov, z, t):
    """E[x | z_t] for x ~ N(mean, cov), in float64 numpy (the closed form of models.GaussianDenoiser)."""
    alpha, sigma = (np.asarray(a, np.float64)[:, None] for a in SCHED.alpha_sigma(jnp.asarray(t)))
    out = []
    for zi, a, s in zip(np.asarray(z, np.float64), alpha[:, 0], sigma[:, 0]):
        c = a**2 * cov + s**2 * np.eye(len(mean))
        out.append(mean + a * cov @ np.linalg.solve(c, zi - a * mean))
    return np.stack(out)


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    """`dmd_loss`'s x-gradient, per example, is `(x_fake(z) - x_real(z)) / mean_dims|x - x_real(z)| / (B D)` with
    z = alpha_t x + sigma_t noise (DMD2's normaliser; closed-form Gaussian real and fake denoisers, float64). Without
    the normaliser, or normalised by |x - x_fake(z)|, it fails."""
    b, d = 16, 3
    rng = np.random.default_rng(0)
    mr, mf, cr, cf = rng.normal(size=d), rng.normal(size=d), random_cov(rng, d), random_cov(rng, d)
    x, noise = jr.normal(jr.key(0), (b, d)) * 2.0, jr.normal(jr.key(1), (b, d))
    t = jnp.linspace(0.05, 0.95, b)
    grad = np.asarray(eqx.filter_jit(jax.grad(L.dmd_loss))(
        x, GaussianDenoiser(mr, cr), GaussianDenoiser(mf, cf), SCHED, t, noise), np.float64)
    z = _diffuse64(x, t, noise)
    real, fake = _gauss_pred(mr, cr, z, t), _gauss_pred(mf, cf, z, t)
    xn = np.asarray(x, np.float64)
    want = (fake - real) / np.mean(np.abs(xn - real), 1, keepdims=True) / (b * d)
    np.testing.assert_allclose(grad, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    for wrong in ((fake - real) / (b * d), (fake - real) / np.mean(np.abs(xn - fake), 1, keepdims=True) / (b * d)):
        assert np.max(np.abs(wrong - want)) > 0.05 * np.abs(want).max()  # bites


class _Identity(eqx.Module):
    """A "fake score" whose features are its input z: the GAN head then sees z itself."""

    def __call__(self, z, t):
        return z

    def features(self, z, t):
        return z


class _Linear(eqx.Module):
    """A discriminator head `D(f) = w^T f + c`."""

    w: jax.Array
    c: jax.Array

    def __call__(self, f):
        return f @ self.w + self.c


def test_gan_losses_have_the_non_saturating_values_and_signs():
    """DMD2's GAN terms on noised samples z = alpha x + sigma eps, D a linear head on z: the generator's is
    `mean softplus(-D(z))`, the discriminator's `mean softplus(D(z_fake)) + softplus(-D(z_real))` with no gradient
    to the generator's samples; swapped signs fail."""
    b, d = 32, 2
    head, fake = _Linear(jnp.array([0.7, -1.3]), jnp.float32(0.2)), _Identity()
    xr, xf = jr.normal(jr.key(0), (b, d)) + 1.0, jr.normal(jr.key(1), (b, d)) - 1.0
    tr, tf = jnp.linspace(0.1, 0.9, b), jnp.linspace(0.9, 0.1, b)
    keys, noise = tuple(jr.split(jr.key(2))), jr.normal(jr.key(3), (b, d))

    @jax.jit
    def losses(xr, xf):
        gen = L.gan_generator_loss(head, fake, SCHED, xf, tf, noise)
        disc, grad_xf = jax.value_and_grad(
            lambda xf: L.gan_discriminator_loss(head, fake, SCHED, xr, xf, tr, tf, keys), 0)(xf)
        return gen, disc, grad_xf

    gen, disc, grad_xf = losses(xr, xf)
    softplus = lambda a: np.logaddexp(0.0, a)
    head64 = lambda z: z @ np.asarray(head.w, np.float64) + 0.2
    d_gen = head64(_diffuse64(xf, tf, noise))
    d_real = head64(_diffuse64(xr, tr, jr.normal(keys[0], (b, d))))
    d_fake = head64(_diffuse64(xf, tf, jr.normal(keys[1], (b, d))))
    np.testing.assert_allclose(float(gen), np.mean(softplus(-d_gen)), rtol=1e-5)
    np.testing.assert_allclose(float(disc), np.mean(softplus(d_fake) + softplus(-d_real)), rtol=1e-5)
    assert float(jnp.max(jnp.abs(grad_xf))) == 0.0
    assert abs(np.mean(softplus(d_gen)) - float(gen)) > 0.1  # bites: the saturating sign
    assert abs(np.mean(softplus(-d_fake) + softplus(d_real)) - float(disc)) > 0.1  # bites: real and fake swapped


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance: value and straight-through gradient.


class _Conditional(eqx.Module):
    """`x_hat = w[label] * z`, row -1 of w the null class (label None)."""

    w: jax.Array  # (classes + 1, D)

    def __call__(self, z, t, label=None):
        return self.w[-1 if label is None else label] * z


def test_guided_teacher_value_and_straight_through_gradient():
    """`GuidedTeacher(model, scale)`: value `x_c + scale (x_c - x_u)` (clipped if asked), gradient in z and in the
    parameters that of the conditional prediction x_c alone (Sec. 3.3's straight-through); a flipped guidance
    direction fails the value, the guided value's own gradient (no stop-gradient) fails the gradient."""
    model = _Conditional(jnp.array([[0.5, 2.0], [1.5, -1.0], [-0.7, 0.3]]))
    z, t, label, scale, coef = jnp.array([0.8, -1.2]), jnp.float32(0.4), 1, 0.75, jnp.array([1.0, -2.0])
    w_c, w_u = np.asarray(model.w[label]), np.asarray(model.w[-1])
    x_c, x_u = w_c * np.asarray(z), w_u * np.asarray(z)
    f = lambda m, z: jnp.sum(coef * m(z, t, label))  # a linear read-out of the prediction

    @eqx.filter_jit
    def value_and_grads(teacher):
        return teacher(z, t, label), eqx.filter_grad(f)(teacher, z).model.w, jax.grad(f, argnums=1)(teacher, z)

    plain_w = np.asarray(eqx.filter_grad(f)(model, z).w)  # the conditional prediction's own gradients
    plain_z = np.asarray(coef) * w_c
    guided_z = np.asarray(coef) * ((1 + scale) * w_c - scale * w_u)
    for clip in (None, 0.5):
        value, grad_w, grad_z = value_and_grads(L.GuidedTeacher(model, scale=scale, clip=clip))
        want = x_c + scale * (x_c - x_u)
        want = want if clip is None else np.clip(want, -clip, clip)
        np.testing.assert_allclose(value, want, rtol=1e-6)
        flipped = x_c - scale * (x_c - x_u)
        assert np.max(np.abs(np.asarray(value) - (flipped if clip is None else np.clip(flipped, -clip, clip)))) > 0.1
        np.testing.assert_allclose(grad_w, plain_w, rtol=1e-6)
        np.testing.assert_allclose(grad_z, plain_z, rtol=1e-6)
        assert np.max(np.abs(guided_z - plain_z)) > 0.1  # bites: the guided value's gradient is another


# ----------------------------------------------------------------------------------------------
# EDM's weight at the data's scale.


def test_edm_weight_takes_the_data_scale():
    """`MMConfig(sigma_data=sd).loss_weighting` is EDM's `(sigma^2 + sd^2) / (sigma sd)^2`, sigma^2 = exp(-lambda_s);
    at EDM's 0.5 it is the name "edm" itself (the same weight, so default runs are unchanged); sd <= 0 is refused."""
    s = jnp.linspace(0.05, 0.95, 7)
    sigma2 = np.exp(-np.asarray(SCHED.logsnr(s), np.float64))
    for sd in (0.5, 1.4):
        w = mmd.MMConfig(sigma_data=sd).loss_weighting
        got = np.asarray(L.loss_weight(w, SCHED, s, None, None), np.float64)
        np.testing.assert_allclose(got, (sigma2 + sd**2) / (sigma2 * sd**2), rtol=1e-5)
    assert mmd.MMConfig().loss_weighting == "edm" and mmd.MMConfig(sigma_data=1.4).loss_weighting == L.EDMWeight(1.4)
    assert mmd.MMConfig(weighting="flat", sigma_data=1.4).loss_weighting == "flat"
    with pytest.raises(ValueError, match="sigma_data .* > 0; got 0.0"):
        mmd.MMConfig(sigma_data=0.0)


# ----------------------------------------------------------------------------------------------
# What a parameter is: `Frozen` arrays are not, under any optimiser.


def _rebased():
    """`Rebased(net, exact, net)`, as `--teacher exact` builds Algorithm 2's auxiliary model and DMD2's fake score."""
    net = MLPDenoiser(2, width=16, depth=1, emb_dim=8, key=jr.key(0))
    return L.Rebased(net, GaussianDenoiser(jnp.array([0.5, -0.3]), 0.8 * jnp.eye(2)), net)


@pytest.mark.parametrize("optimiser", ["dmd2", "mm"])
def test_frozen_arrays_stay_bitwise_under_the_real_optimisers(optimiser):
    """200 updates of DMD2's AdamW (weight decay 0.01) or App. B's Adam leave `Rebased`'s frozen `base` (the closed
    form) and `anchor` bit for bit as they were, while its network trains; the optimiser state holds the network's
    parameters only. (AdamW's weight decay shrank both when every array was handed to the optimiser.)"""
    aux, n = _rebased(), 200
    opt = dmd2.dmd2_optimiser(1e-2, warmup=10) if optimiser == "dmd2" else mmd.mm_optimiser(1e-2, n, 10)
    x = jr.normal(jr.key(1), (64, 2))

    def step(player, key):
        kt, kn = jr.split(key)
        t = jr.uniform(kt, (64,), minval=0.05, maxval=0.95)
        grads = eqx.filter_grad(L.diffusion_loss)(player.model, SCHED, x, t, jr.normal(kn, x.shape), "flat")
        return mmd.apply_grads(player, grads, opt), None

    player = mmd.init_player(aux, opt)
    new = eqx.filter_jit(lambda p, keys: mmd.scan_steps(step, p, keys))(player, jr.split(jr.key(2), n))[0].model
    for part in ("base", "anchor"):
        for a, b in zip(jax.tree.leaves(getattr(aux, part)), jax.tree.leaves(getattr(new, part))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=part)
    assert float(jnp.max(jnp.abs(tree_vec(new.model) - tree_vec(aux.model)))) > 1e-3  # the network did train
    assert len(jax.tree.leaves(player.opt_state)) == len(jax.tree.leaves(opt.init(eqx.filter(aux.model, eqx.is_array))))


def test_frozen_is_not_a_parameter():
    """`params` leaves every `Frozen` out (`Rebased`'s base and anchor, `StraightThrough`'s value, which wrap
    themselves); a call through `Frozen` gives the wrapped values with zero gradient; Algorithm 3's teacher gradient
    and its preconditioner are trees of the network's parameters (`check_preconditioner` refuses one of all arrays)."""
    aux = _rebased()
    net, exact = aux.model, aux.base.tree
    assert isinstance(aux.anchor, L.Frozen) and L.frozen(aux.anchor) is aux.anchor
    theta = L.params(aux)
    assert theta.base is None and theta.anchor is None
    assert jax.tree.structure(theta.model) == jax.tree.structure(eqx.filter(net, eqx.is_inexact_array))
    z, t = jr.normal(jr.key(1), (8, 2)), jnp.full(8, 0.5)

    @eqx.filter_jit
    def through_frozen(net):
        value, grad = eqx.filter_value_and_grad(lambda f: jnp.sum(L.apply(f, z, t)))(L.Frozen(net))
        return value, jnp.sum(L.apply(net, z, t)), tree_vec(grad)

    value, plain, grad = through_frozen(net)
    assert value == plain and float(jnp.max(jnp.abs(grad))) == 0.0
    st_teacher = L.StraightThrough(net, exact)
    assert isinstance(st_teacher.value, L.Frozen) and L.params(st_teacher).value is None
    grad = eqx.filter_eval_shape(L.teacher_loss_grad, st_teacher, SCHED, z, z, t)
    assert jax.tree.structure(grad) == jax.tree.structure(L.params(st_teacher))
    precond = eqx.tree_at(lambda p: p.model, L.params(st_teacher), jax.tree.map(jnp.ones_like, L.params(net)))
    mmd.check_preconditioner(precond, st_teacher)
    with pytest.raises(ValueError, match="preconditioner tree does not match"):
        mmd.check_preconditioner(jax.tree.map(jnp.ones_like, eqx.filter(st_teacher, eqx.is_inexact_array)), st_teacher)


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_errors():
    net = MLPDenoiser(2, width=8, depth=1, emb_dim=8, key=jr.key(0))
    with pytest.raises(ValueError, match="unknown weighting 'edmm'"):
        mmd.MMConfig(weighting="edmm")
    with pytest.raises(ValueError, match="unknown weighting"):
        L.loss_weight("nope", SCHED, jnp.ones(2), jnp.ones((2, 2)), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"k \(sampling steps\) must be an integer >= 1; got 0"):
        mmd.MMConfig(k=0)
    with pytest.raises(ValueError, match=r"k \(generator steps\) must be an integer >= 1"):
        dmd2.DMD2Config(k=-1)
    with pytest.raises(ValueError, match="ttur .* >= 1; got 0"):
        dmd2.DMD2Config(ttur=0)
    with pytest.raises(ValueError, match="unknown zs_sampling"):
        mmd.MMConfig(zs_sampling="prior")
    with pytest.raises(ValueError, match="preconditioner tree does not match"):
        mmd.check_preconditioner({"a": jnp.ones(2)}, net)
    with pytest.raises(ValueError, match=r"teacher output \(2,\), student output \(3,\)"):
        mmd.check_compatible(net, Affine(jnp.ones((3, 2)), jnp.zeros(3)), jnp.zeros(2))
    other = MLPDenoiser(3, width=8, depth=1, emb_dim=8, key=jr.key(0))
    with pytest.raises(ValueError, match=r"student cannot take data of shape \(2,\)"):
        mmd.check_compatible(net, other, jnp.zeros(2))
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        L.GuidedTeacher(net, scale=-1.0)
