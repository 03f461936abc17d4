"""Tests of the teacher adapters and `check_teacher` (teachers.py).

Each adapter wraps the closed-form Gaussian denoiser written in its own parameterisation and must give
`models.GaussianDenoiser` back on our schedule, at t = 0 and t = 1 too; the same check must fail for a wrong
parameterisation (v taken as eps, a shifted schedule taken as ours) and for the plain eps conversion near t = 1.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models import GaussianDenoiser, MLPDenoiser
from sampling import Schedule, ancestral_sample, diffuse, sd_logsnr
from teachers import FromEDM, FromEps, FromV, FromX, SameLogSNR, check_teacher

SCHED, SHIFTED = Schedule(), Schedule(shift=2.0)
D, N = 3, 64
EDGES = (0.0, 1.0, 1e-4, 1 - 1e-4, 1 - 1e-6, 0.997)  # the ends, and 0.997 where FromEps fades
SD_LOGSNR = jnp.asarray(sd_logsnr(np.arange(1000)), jnp.float32)  # a discrete 1000-step DDPM schedule
seeds = st.integers(0, 2**31 - 1)


def ddpm_logsnr(i):
    return jnp.interp(i, jnp.arange(1000.0), SD_LOGSNR)


def gauss(mean, cov, z, alpha, sigma):
    """E[x | z] for x ~ N(mean, cov) and z = alpha x + sigma eps."""
    c = alpha**2 * cov + sigma**2 * jnp.eye(mean.shape[0])
    return mean + alpha * cov @ jnp.linalg.solve(c, z - alpha * mean)


# ----------------------------------------------------------------------------------------------
# The closed form in each parameterisation. `*label` passes an optional class label on.


class Labelled(eqx.Module):
    """E[x | z_t] for x ~ N(mean + label, cov): the Gaussian's denoiser at z - alpha label, plus label."""

    g: GaussianDenoiser

    def __call__(self, z, t, label=None):
        if label is None:
            return self.g(z, t)
        return label + self.g(z - self.g.schedule.alpha_sigma(t)[0] * label, t)


class Eps(eqx.Module):
    x: eqx.Module  # an x-prediction on `schedule`
    schedule: Schedule = SCHED

    def __call__(self, z, t, *label):
        alpha, sigma = self.schedule.alpha_sigma(t)
        return (z - alpha * self.x(z, t, *label)) / sigma


class V(eqx.Module):
    x: eqx.Module

    def __call__(self, z, t, *label):
        alpha, sigma = SCHED.alpha_sigma(t)
        x = self.x(z, t, *label)
        return alpha * (z - alpha * x) / sigma - sigma * x


class EDM(eqx.Module):
    """EDM's D(y, s): x_hat at z = alpha y, alpha = 1 / sqrt(1 + s^2), sigma = s alpha (no time of ours)."""

    mean: jax.Array
    cov: jax.Array

    def __call__(self, y, s, label=None):
        alpha = 1 / jnp.sqrt(1 + s**2)
        if label is None:
            return gauss(self.mean, self.cov, alpha * y, alpha, s * alpha)
        return label + gauss(self.mean, self.cov, alpha * (y - label), alpha, s * alpha)


class DDPMEps(eqx.Module):
    """eps-prediction of a net trained on the DDPM schedule, called with a (fractional) step index 0..999."""

    mean: jax.Array
    cov: jax.Array

    def __call__(self, z, i):
        lam = ddpm_logsnr(i)
        alpha, sigma = jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))
        return (z - alpha * gauss(self.mean, self.cov, z, alpha, sigma)) / sigma


class UpTo(eqx.Module):
    """A net defined up to noise level `sigma_max` only (NaN above it), as an EDM net trained up to 80 may be."""

    net: eqx.Module
    sigma_max: float = eqx.field(static=True)

    def __call__(self, y, s, *label):
        return jnp.where(s <= self.sigma_max, self.net(y, s, *label), jnp.nan)


class Scaled(eqx.Module):
    """A net whose output is off by a relative error (1.01: 1% too large)."""

    net: eqx.Module
    factor: float = eqx.field(static=True)

    def __call__(self, z, t, *label):
        return self.factor * self.net(z, t, *label)


class World:
    """Data N(mean, cov) in D = 3; z drawn from q(z_t) at N times: uniform, the EDGES and `t_extra`."""

    def __init__(self, seed, t_extra, t_range=(0.0, 1.0)):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(D, D)))
        self.cov = (q * rng.uniform(0.1, 1.5, D)) @ q.T
        self.mean = rng.normal(size=D)
        self.truth = GaussianDenoiser(self.mean, self.cov)
        t = np.concatenate([rng.uniform(size=N - len(EDGES) - 1), EDGES, [t_extra]])
        self.t = jnp.asarray(np.clip(t, *t_range), jnp.float32)
        x = jnp.asarray(rng.multivariate_normal(self.mean, self.cov, N), jnp.float32)
        self.z = diffuse(SCHED, x, self.t, jnp.asarray(rng.normal(size=(N, D)), jnp.float32))


def evaluate(denoiser, z, t):
    return jax.vmap(denoiser)(z, t)  # eager: a jit would recompile for each world


def excess(adapter, w, alpha_min=None):
    """max over the world of |x_hat - E[x | z_t]| / tolerance: <= 1 passes. The tolerance is float32 rounding,
    8e-7 (1 + |z|) per coordinate; for an eps-net (`alpha_min` set) that times 1 + FromEps's gain from eps to x,
    sigma alpha / max(alpha, alpha_min)^2, plus its fade where alpha < alpha_min, 0.4 alpha_min |S| |z - alpha m|."""
    err = jnp.abs(evaluate(adapter, w.z, w.t) - evaluate(w.truth, w.z, w.t)).max(-1)
    tol = 8e-7 * (1 + jnp.abs(w.z).max(-1))
    if alpha_min is not None:
        alpha, sigma = SCHED.alpha_sigma(w.t)
        dev = jnp.linalg.norm(w.z - alpha[:, None] * w.mean, axis=-1)
        fade = 0.4 * alpha_min * np.linalg.eigvalsh(w.cov).max() * dev / sigma**2
        tol = tol * (1 + sigma * alpha / jnp.maximum(alpha, alpha_min) ** 2) + jnp.where(alpha < alpha_min, fade, 0.0)
    return float((err / tol).max())


ADAPTERS = {
    "eps": lambda w: FromEps(Eps(w.truth), mean=w.mean),
    "v": lambda w: FromV(V(w.truth)),
    "edm": lambda w: FromEDM(EDM(w.truth.mean, w.truth.cov)),
    "shifted x": lambda w: FromX(GaussianDenoiser(w.mean, w.cov, SHIFTED), SameLogSNR(SHIFTED.logsnr)),
    "shifted eps": lambda w: FromEps(Eps(GaussianDenoiser(w.mean, w.cov, SHIFTED), SHIFTED), mean=w.mean,
                                     time_fn=SameLogSNR(SHIFTED.logsnr)),
    "v, our schedule through SameLogSNR": lambda w: FromV(V(w.truth), time_fn=SameLogSNR(SCHED.logsnr)),
}


@pytest.mark.parametrize("name", ADAPTERS)
@given(seed=seeds, t=st.floats(0.0, 1.0))
def test_adapter_gives_back_the_gaussian_denoiser(name, seed, t):
    w = World(seed, t)
    assert excess(ADAPTERS[name](w), w, alpha_min=0.01 if "eps" in name else None) <= 1.0


@given(seed=seeds, t=st.floats(0.0, 1.0))
def test_ddpm_eps_net_through_log_snr(seed, t):
    """A discrete-DDPM eps-net, remapped to our t through log-SNR, on the times where our log-SNR is in its range."""
    t_range = tuple(float(SCHED.time(lam)) for lam in (SD_LOGSNR[0], SD_LOGSNR[-1]))
    w = World(seed, t, t_range)
    adapter = FromEps(DDPMEps(w.truth.mean, w.truth.cov), mean=w.mean, time_fn=SameLogSNR(ddpm_logsnr, hi=999.0))
    assert excess(adapter, w, alpha_min=0.01) <= 1.0


WRONG = {
    "v taken as eps": lambda w: FromEps(V(w.truth), mean=w.mean),
    "eps taken as v": lambda w: FromV(Eps(w.truth)),
    "x taken as eps": lambda w: FromEps(w.truth, mean=w.mean),
    "shifted schedule taken as ours": lambda w: FromX(GaussianDenoiser(w.mean, w.cov, SHIFTED)),
    "eps without the data mean": lambda w: FromEps(Eps(w.truth)),
}


@pytest.mark.parametrize("name", WRONG)
def test_wrong_parameterisation_fails_the_same_check(name):
    for seed in range(3):
        w = World(seed, 1.0)
        assert excess(WRONG[name](w), w, alpha_min=0.01) > 30.0, seed


def test_eps_at_t1_exact_where_the_plain_conversion_is_not():
    """At t = 1 (alpha = 3e-7) eps is z up to alpha x / sigma, below float32 resolution: (z - sigma eps) / alpha
    turns that rounding into errors of ~0.1, while FromEps gives E[x | z_1] = E[x] + 1e-6 to float32 rounding."""
    w = World(0, 1.0)
    w.t, w.z = jnp.ones(N), jnp.asarray(np.random.default_rng(0).normal(size=(N, D)), jnp.float32)
    assert excess(FromEps(Eps(w.truth), mean=w.mean), w) <= 1.0
    assert excess(FromEps(Eps(w.truth), alpha_min=0.0), w) > 1e4


def test_adapters_add_no_parameters():
    w = World(0, 0.5)
    net = Eps(w.truth)
    leaves = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))
    adapter = FromEps(net, mean=w.mean, time_fn=SameLogSNR(SHIFTED.logsnr))
    assert len(leaves(adapter)) == len(leaves(net)) == 2


@pytest.mark.parametrize("name", ["eps", "v", "edm"])
def test_label_is_passed_on(name):
    w = World(1, 0.5)
    w.t = jnp.minimum(w.t, 0.99)  # short of FromEps's fade
    nets = {"eps": FromEps(Eps(Labelled(w.truth)), mean=w.mean + 2.0), "v": FromV(V(Labelled(w.truth))),
            "edm": FromEDM(EDM(w.truth.mean, w.truth.cov))}
    label = jnp.full((N, D), 2.0)
    got = jax.vmap(nets[name])(w.z, w.t, label)
    want = jax.vmap(Labelled(w.truth))(w.z, w.t, label)
    assert float(jnp.abs(got - want).max()) < 1e-4


# ----------------------------------------------------------------------------------------------
# A 1% error in the network's output at t = 1, where alpha = 3e-7.

NOISY = {
    "eps": lambda w, f: FromEps(Scaled(Eps(w.truth), f), mean=w.mean),
    "v": lambda w, f: FromV(Scaled(V(w.truth), f)),
    "edm": lambda w, f: FromEDM(Scaled(EDM(w.truth.mean, w.truth.cov), f)),
    "edm, sigma_max 80": lambda w, f: FromEDM(UpTo(Scaled(EDM(w.truth.mean, w.truth.cov), f), 80.0), sigma_max=80.0),
}


@pytest.mark.parametrize("name", NOISY)
def test_one_percent_error_at_t1_moves_x_hat_by_little(name):
    """At t = 1, x_hat is E[x] up to alpha |S z| = 1e-6; a 1% error in the net moves it by at most 1% of |x|
    (EDM at sigma_max: by |S z| / 80 more); the plain eps conversion moves it by 3e6 x 1% of |eps|."""
    w = World(2, 1.0)
    z, t = w.z, jnp.ones(N)
    got = evaluate(NOISY[name](w, 1.01), z, t)
    slack = 1e-5 + (np.linalg.eigvalsh(w.cov).max() * jnp.abs(z).max() / 80 if "80" in name else 0.0)
    assert bool(jnp.all(jnp.isfinite(got)))
    assert float(jnp.abs(got - w.mean).max()) <= 0.01 * float(jnp.abs(w.mean).max()) + slack
    plain = evaluate(FromEps(Scaled(Eps(w.truth), 1.01), mean=w.mean, alpha_min=0.0), z, t)
    assert float(jnp.abs(plain - w.mean).max()) > 1e3


def test_ancestral_sampling_with_a_one_percent_eps_error_stays_bounded():
    """4 ancestral steps from an eps-net 1% too large everywhere, on unit-scale data: FromEps stays within the
    data's range; the plain conversion throws samples to |x| ~ 1e4."""
    truth = GaussianDenoiser(jnp.array([0.5, -0.3]), jnp.array([[1.0, 0.3], [0.3, 0.5]]))
    noisy = Scaled(Eps(truth), 1.01)
    x = ancestral_sample(FromEps(noisy, mean=truth.mean), SCHED, jr.key(0), (512, 2), 4)
    assert bool(jnp.all(jnp.isfinite(x))) and float(jnp.abs(x).max()) < 10.0
    plain = ancestral_sample(FromEps(noisy, mean=truth.mean, alpha_min=0.0), SCHED, jr.key(0), (512, 2), 4)
    assert float(jnp.abs(plain).max()) > 100.0


# ----------------------------------------------------------------------------------------------
# check_teacher: one test per error it names.


class Net(eqx.Module):
    """A teacher built from a function of (z, t) (the test cases below)."""

    fn: object = eqx.field(static=True)
    w: jax.Array = eqx.field(default_factory=lambda: jnp.ones(2))

    def __call__(self, z, t):
        return self.fn(z * self.w[0], t)


class NoCall(eqx.Module):
    w: jax.Array = eqx.field(default_factory=lambda: jnp.ones(2))


class NeedsLabel(eqx.Module):
    def __call__(self, z, t, label):
        return z + label


EXAMPLE = jnp.array([0.5, -1.0])


@pytest.mark.parametrize("teacher, label", [
    (GaussianDenoiser(jnp.zeros(2), jnp.eye(2)), None),
    (FromEps(Eps(GaussianDenoiser(jnp.zeros(2), jnp.eye(2)))), None),
    (FromV(V(GaussianDenoiser(jnp.zeros(2), jnp.eye(2)))), None),
    (FromEDM(EDM(jnp.zeros(2), jnp.eye(2))), jnp.zeros(2)),
    (MLPDenoiser(2, width=16, depth=1, key=jr.key(0)), None),
    (NeedsLabel(), jnp.float32(1.0)),
])
def test_check_teacher_passes_good_teachers(teacher, label):
    assert check_teacher(teacher, EXAMPLE, label=label) is None


def bad(teacher, match, example=EXAMPLE, label=None):
    with pytest.raises(ValueError, match=match):
        check_teacher(teacher, example, label=label)


def test_check_teacher_not_a_module():
    bad(lambda z, t: z, "must be an eqx.Module")


def test_check_teacher_not_callable():
    bad(NoCall(), "not callable: define __call__")


def test_check_teacher_output_shape():
    bad(Net(lambda z, t: z[:1]), r"returned shape \(1,\) for z of shape \(2,\)")


def test_check_teacher_example_with_a_batch_axis():
    mlp = MLPDenoiser(2, width=16, depth=1, key=jr.key(0))
    bad(mlp, r"batch, pass example\[0\]", example=jnp.ones((8, 2)))  # the net raises on (8, 2)
    bad(Net(lambda z, t: z.mean(0)), r"returned shape \(2,\) for z of shape \(8, 2\).*example\[0\]", jnp.ones((8, 2)))


def test_check_teacher_batched_net():
    bad(Net(lambda z, t: z + t[:, None]), "one example z .* and a scalar t")


@pytest.mark.parametrize("t", [0.0, 0.5, 1.0])
def test_check_teacher_not_finite(t):
    bad(Net(lambda z, s: jnp.where(s == t, jnp.nan, 1.0) * z), f"not finite at t = {t:g}")


def test_check_teacher_plain_eps_conversion_at_t1():
    naive = FromEps(Scaled(Eps(GaussianDenoiser(jnp.zeros(2), jnp.eye(2))), 1.01), alpha_min=0.0)
    bad(naive, "output at t = 1 reaches .* use FromEps")


def test_check_teacher_label_required():
    bad(NeedsLabel(), "a conditional teacher needs `label=`")


def test_check_teacher_label_refused():
    bad(GaussianDenoiser(jnp.zeros(2), jnp.eye(2)), "takes no label: pass label=None", label=jnp.float32(1.0))


def test_check_teacher_not_traceable():
    bad(Net(lambda z, t: z if t > 0.5 else -z), r"fails under jax.jit\(jax.vmap")
