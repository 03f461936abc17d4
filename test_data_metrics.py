"""Tests of `data.py` and `metrics.py`: parameters, sample moments, metric values against oracles.

Monte-Carlo assertions use tolerances derived from the sample size (`Z` standard errors, or the
spread of a permutation null), and each metric is also shown to move for a deliberately wrong sample.
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

import data
import metrics
from models import GaussianDenoiser, MixtureDenoiser

Z = 5.0  # standard errors allowed in a Monte-Carlo check
TOYS = {"ring8": data.ring8(), "gauss": data.gauss(), "gmm": data.gmm()}


def moment_zscores(x, mean, cov):
    """Largest |error| / standard error of the sample mean and of the sample covariance entries."""
    x = np.asarray(x, np.float64)
    n = len(x)
    xc = x - x.mean(0)
    z_mean = np.abs(x.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
    prods = np.einsum("ni,nj->nij", xc, xc)  # (n, D, D)
    z_cov = np.abs(prods.mean(0) - cov) / (prods.std(0) / np.sqrt(n))
    return z_mean.max(), z_cov.max()


# ----------------------------------------------------------------------------------------------
# Toy data.


def test_ring8_parameters():
    toy = data.ring8()
    i = np.arange(8)
    np.testing.assert_allclose(toy.weights, (i + 1) / 36)
    np.testing.assert_allclose(np.linalg.norm(toy.means, axis=1), 2.0)
    np.testing.assert_allclose(np.arctan2(toy.means[:, 1], toy.means[:, 0]) % (2 * np.pi), 2 * np.pi * i / 8, atol=1e-12)
    np.testing.assert_allclose(toy.covs, np.broadcast_to(0.0225 * np.eye(2), (8, 2, 2)))
    np.testing.assert_allclose(toy.stds, 0.15)
    np.testing.assert_allclose(np.asarray(toy.denoiser.weights), toy.weights, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TOYS))
def test_sample_moments(name):
    toy = TOYS[name]
    x = np.asarray(toy.sample(jr.key(0), 20_000))
    assert x.shape == (20_000, toy.dim) and x.dtype == np.float32
    z_mean, z_cov = moment_zscores(x, toy.mean(), toy.cov())
    assert z_mean < Z and z_cov < Z, (z_mean, z_cov)
    # A 10% too wide sample fails the same check.
    m = toy.mean()
    assert moment_zscores(m + 1.1 * (x - m), m, toy.cov())[1] > Z


def test_gauss_parameters():
    toy = data.gauss(d=8, seed=3)
    assert isinstance(toy.denoiser, GaussianDenoiser) and toy.weights.shape == (1,)
    eig = np.linalg.eigvalsh(toy.covs[0])
    np.testing.assert_allclose(eig, np.geomspace(0.05, 1.5, 8), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(toy.denoiser.mean), toy.means[0], rtol=1e-6)
    assert not np.allclose(data.gauss(d=8, seed=4).means, toy.means)
    np.testing.assert_array_equal(data.gauss(d=8, seed=3).covs, toy.covs)  # fixed seed, fixed data


@pytest.mark.parametrize("d,k,seed", [(2, 6, 0), (16, 6, 0), (16, 6, 1), (8, 10, 2), (64, 8, 0)])
def test_gmm_modes_disjoint(d, k, seed):
    """The n_std regions of `mode_assign` cannot overlap: centre distance > sum of the two radii."""
    toy = data.gmm(d=d, k=k, seed=seed)
    assert isinstance(toy.denoiser, MixtureDenoiser) and toy.means.shape == (k, d)
    assert np.abs(toy.weights.sum() - 1) < 1e-12 and toy.weights.max() / toy.weights.min() > 1.2
    radius = np.sqrt(metrics.mode_radius2(d)) * toy.stds  # (K,)
    dist = np.linalg.norm(toy.means[:, None] - toy.means[None], axis=-1)
    off = ~np.eye(k, dtype=bool)
    assert np.all(dist[off] > (radius[:, None] + radius[None])[off])


def test_get_toy():
    assert data.get_toy("ring8").name == "ring8"
    assert data.get_toy("gauss", d=4).dim == 4
    assert data.get_toy("gmm", d=3, seed=1).dim == 3
    with pytest.raises(ValueError, match=r"'swissroll'.*\['gauss', 'gmm', 'ring8'\]"):
        data.get_toy("swissroll")
    with pytest.raises(ValueError, match="d = 3"):
        data.get_toy("ring8", d=3)


# ----------------------------------------------------------------------------------------------
# MMD and energy distance.


def naive_pair_means(x, y, f):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = lambda a, b: f(np.sqrt(np.sum((a[:, None] - b[None]) ** 2, -1)))  # noqa: E731
    off = lambda m: (m.sum() - np.trace(m)) / (len(m) * (len(m) - 1))  # noqa: E731
    return off(k(x, x)), off(k(y, y)), k(x, y).mean()


def test_mmd_energy_match_float64_reference():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 3)) + 3.0, 1.2 * rng.normal(size=(257, 3)) + 3.2  # sizes not multiples of a block
    hs = np.array([0.3, 1.0, 3.0])
    kxx, kyy, kxy = naive_pair_means(x, y, lambda r: np.mean([np.exp(-(r**2) / (2 * h**2)) for h in hs], 0))
    np.testing.assert_allclose(metrics.mmd2(x, y, hs), kxx + kyy - 2 * kxy, rtol=1e-4)
    hs = metrics.median_distance(y) * np.asarray(metrics.BANDWIDTH_FACTORS)
    kxx, kyy, kxy = naive_pair_means(x, y, lambda r: np.mean([np.exp(-(r**2) / (2 * h**2)) for h in hs], 0))
    np.testing.assert_allclose(metrics.mmd2(x, y), kxx + kyy - 2 * kxy, rtol=1e-4)
    dxx, dyy, dxy = naive_pair_means(x, y, lambda r: r)
    np.testing.assert_allclose(metrics.energy_distance(x, y), 2 * dxy - dxx - dyy, rtol=1e-4)
    # the within-reference term is remembered per reference: another one of the same shape, then the first again
    hs = np.array([0.3, 1.0, 3.0])
    for ref in (0.8 * y + 0.5, y):
        kxx, kyy, kxy = naive_pair_means(x, ref, lambda r: np.mean([np.exp(-(r**2) / (2 * h**2)) for h in hs], 0))
        np.testing.assert_allclose(metrics.mmd2(x, ref, hs), kxx + kyy - 2 * kxy, rtol=1e-4)
        dxx, dyy, dxy = naive_pair_means(x, ref, lambda r: r)
        np.testing.assert_allclose(metrics.energy_distance(x, ref), 2 * dxy - dxx - dyy, rtol=1e-4)


@pytest.mark.parametrize("name", ["ring8", "gmm"])
@pytest.mark.parametrize("metric", [metrics.mmd2, metrics.energy_distance])
def test_two_sample_null_and_shift(name, metric):
    """Same law: |value| within Z permutation-null stds. Shifted by one component std: far outside."""
    toy, n = TOYS[name], 2000
    x, y = (np.asarray(toy.sample(k, n)) for k in jr.split(jr.key(1)))
    kw = {"bandwidths": metrics.median_distance(y) * np.asarray(metrics.BANDWIDTH_FACTORS)} if metric is metrics.mmd2 else {}
    rng = np.random.default_rng(0)
    pooled = np.concatenate([x, y])
    null = []
    for _ in range(20):
        p = rng.permutation(2 * n)
        null.append(metric(pooled[p[:n]], pooled[p[n:]], **kw))
    null_std = np.std(null)
    assert abs(np.mean(null)) < Z * null_std / np.sqrt(20) + 1e-9  # the estimator is unbiased
    assert abs(metric(x, y, **kw)) < Z * null_std
    shifted = metric(x + toy.stds.min() / np.sqrt(toy.dim), y, **kw)
    assert shifted > Z * null_std


def test_energy_distance_closed_form_1d():
    """X ~ N(0, 1), Y ~ N(mu, 1): 2 E|X - Y| - E|X - X'| - E|Y - Y'| with E|N(m, 2)| in closed form."""
    from scipy import stats

    mu, n = 1.0, 4000
    truth = 2 * (2 / np.sqrt(np.pi) * np.exp(-(mu**2) / 4) + mu * (1 - 2 * stats.norm.cdf(-mu / np.sqrt(2)))) - 4 / np.sqrt(np.pi)
    vals = [metrics.energy_distance(np.asarray(jr.normal(k, (n, 1))), np.asarray(jr.normal(jr.fold_in(k, 1), (n, 1))) + mu) for k in jr.split(jr.key(0), 8)]
    assert abs(np.mean(vals) - truth) < Z * np.std(vals) / np.sqrt(len(vals)), (np.mean(vals), truth)


# ----------------------------------------------------------------------------------------------
# Mode metrics and log-likelihood.


def test_mode_radius():
    assert metrics.mode_radius2(1) == pytest.approx(16.0)
    tail = 2 * (1 - 0.9999683287581669)  # P(|N(0, 1)| > 4)
    for d in (2, 16):
        assert np.mean(np.sum(np.random.default_rng(d).normal(size=(200_000, d)) ** 2, 1) > metrics.mode_radius2(d)) < tail * 3 + 5e-5


@pytest.mark.parametrize("name", ["ring8", "gmm"])
def test_mode_assign_matches_direct_mahalanobis(name):
    toy = TOYS[name]
    x = np.asarray(toy.sample(jr.key(8), 2000)) * 1.3  # many samples near the region boundaries
    diff = x[None] - toy.means[:, None]  # (K, N, D)
    m2 = np.einsum("knd,knd->kn", diff, np.linalg.solve(toy.covs[:, None], diff[..., None])[..., 0])
    assign, inside = metrics.mode_assign(x, toy.means, toy.covs)
    np.testing.assert_array_equal(assign, m2.argmin(0))
    np.testing.assert_array_equal(inside, m2.min(0) <= metrics.mode_radius2(toy.dim))
    assert 0.05 < inside.mean() < 0.95


def expected_tv(weights, n):
    """E[1/2 sum_k |p_k - w_k|] for multinomial frequencies, normal approximation."""
    return 0.5 * np.sum(np.sqrt(2 * weights * (1 - weights) / (np.pi * n)))


@pytest.mark.parametrize("name", ["ring8", "gmm"])
def test_mode_metrics(name):
    toy, n = TOYS[name], 10_000
    x = np.asarray(toy.sample(jr.key(2), n))
    p = (toy.means, toy.covs)
    assert metrics.mode_precision(x, *p) > 1 - 1e-3
    assert metrics.mode_recall(x, *p, toy.weights) == 1.0
    tv = metrics.mode_tv(x, *p, toy.weights)
    assert tv < 3 * expected_tv(toy.weights, n), (tv, expected_tv(toy.weights, n))
    # Samples from the first half of the modes only: recall 1/2, TV = the missing mass.
    half = len(toy.weights) // 2
    w_half = toy.weights[:half] / toy.weights[:half].sum()
    xh = np.asarray(MixtureDenoiser(w_half, toy.means[:half], toy.covs[:half]).sample(jr.key(3), n))
    assert metrics.mode_recall(xh, *p, toy.weights) == 0.5
    assert metrics.mode_precision(xh, *p) > 1 - 1e-3
    assert abs(metrics.mode_tv(xh, *p, toy.weights) - toy.weights[half:].sum()) < Z * expected_tv(w_half, n)
    # Three times as wide around each sample's own mode, or shifted by 5 stds: precision drops.
    assign, _ = metrics.mode_assign(x, *p)
    wide = toy.means[assign] + 3.0 * (x - toy.means[assign])
    assert metrics.mode_precision(wide, *p) < 0.9
    shift = np.zeros(toy.dim)
    shift[0] = 5 * toy.stds.max() * np.sqrt(metrics.mode_radius2(toy.dim) / 16)
    assert metrics.mode_precision(x + shift, *p) < 0.9
    # NaN samples count as off-mode, never as a mode.
    x_nan = x.copy()
    x_nan[: n // 2] = np.nan
    assert metrics.mode_precision(x_nan, *p) == pytest.approx(0.5, abs=1e-3)


def test_avg_loglik_is_minus_entropy():
    toy = TOYS["gauss"]
    x = np.asarray(toy.sample(jr.key(4), 20_000))
    entropy = 0.5 * np.linalg.slogdet(2 * np.pi * np.e * toy.covs[0])[1]
    logp = np.asarray(jax.vmap(toy.denoiser.log_prob)(jnp.asarray(x)))
    assert abs(metrics.avg_loglik(x, toy) + entropy) < Z * logp.std() / np.sqrt(len(x))
    assert metrics.avg_loglik(x + 0.5, toy) < -entropy - 0.1


def test_evaluate_floor_and_wrong_sampler():
    toy, n = TOYS["ring8"], 3000
    floor = metrics.evaluate_floor(toy, jr.key(5), n=n, n_ref=n)
    assert set(floor) == {"mmd2", "energy", "mode_precision", "mode_recall", "mode_tv", "avg_loglik"}
    uniform = MixtureDenoiser(np.full(8, 1 / 8), toy.means, toy.covs)  # right modes, wrong weights
    bad = metrics.evaluate(uniform.sample(jr.key(6), n), toy, jr.key(7), n_ref=n)
    assert bad["mode_tv"] > 5 * floor["mode_tv"] and bad["mmd2"] > 5 * abs(floor["mmd2"])
    assert bad["mode_recall"] == floor["mode_recall"] == 1.0


# ----------------------------------------------------------------------------------------------
# Frechet distance.


def whitened(rng, n, d):
    """n samples with sample mean exactly 0 and sample covariance (ddof=1) exactly I."""
    z = rng.normal(size=(n, d))
    z -= z.mean(0)
    return z @ np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))).T


def test_mean_pairwise_distance_and_component_fractions():
    """E|X - Y| = 2 / sqrt(pi) for independent standard normals; a collapsed sampler has no diversity."""
    x = np.random.default_rng(0).normal(size=(2000, 1))
    se = 0.85 * np.sqrt(4 / 2000)  # ~ std of |X - Y| over sqrt of the effective sample size
    assert abs(metrics.mean_pairwise_distance(x) - 2 / np.sqrt(np.pi)) < Z * se
    assert metrics.mean_pairwise_distance(np.ones((50, 8, 8, 1))) == 0.0
    # within-class: two classes of N(0, 1) and N(0, 4) points, 2/sqrt(pi) and twice that; one image per class: 0
    y = np.repeat([0, 1], 1000)
    x2 = np.concatenate([x[:1000], 2 * x[1000:]])
    se1 = 0.85 * np.sqrt(4 / 1000)
    assert abs(metrics.within_class_distance(x2, y) - 1.5 * 2 / np.sqrt(np.pi)) < Z * 1.5 * se1
    assert metrics.within_class_distance(np.repeat(np.arange(10.0), 5)[:, None], np.repeat(np.arange(10), 5)) == 0.0
    frac = metrics.component_fractions(np.array([[-1.0, 0], [-3, 1], [2, 0], [0.5, 0]]), [[-2.0, 0], [2, 0]])
    np.testing.assert_array_equal(frac, [0.5, 0.5])


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    z1, z2 = whitened(rng, 500, 1), whitened(rng, 700, 1)
    (m1, s1), (m2, s2) = (0.3, 1.7), (-1.2, 0.4)
    assert metrics.frechet_distance(m1 + s1 * z1, m2 + s2 * z2) == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-10)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)  # commuting (diagonal) covariances
    assert metrics.frechet_gaussian(np.zeros(5), np.diag(a), np.ones(5), np.diag(b)) == pytest.approx(
        5 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-10
    )
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    assert abs(metrics.frechet_distance(x, x)) < 1e-8 * np.trace(np.cov(x, rowvar=False))


@given(st.integers(0, 2**31 - 1))
def test_frechet_matches_sqrtm(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, 6, 6))
    c1, c2 = a @ a.T + 0.01 * np.eye(6), b @ b.T + 0.01 * np.eye(6)
    mu1, mu2 = rng.normal(size=(2, 6))
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
    assert metrics.frechet_gaussian(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-6, abs=1e-8)
    assert metrics.frechet_gaussian(mu1, c1, mu2, c2) > 0


# ----------------------------------------------------------------------------------------------
# Digits classifier and image metrics.


@pytest.fixture(scope="module")
def classifier():
    return metrics.train_digits_classifier(seed=0)


def test_classifier_accuracy_and_determinism(classifier):
    x, y = data.digits("test")
    pred = np.asarray(jnp.argmax(jax.vmap(classifier)(jnp.asarray(x)), -1))
    assert np.mean(pred == y) > 0.9
    again = metrics.train_digits_classifier(seed=0)
    for a, b in zip(jax.tree.leaves(classifier), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    train_idx = set(map(bytes, data.digits("train")[0].reshape(-1, 64).round(3)))
    assert len(train_idx) > 1000  # the splits are real splits of the 1,797 images
    assert len(data.digits("train")[1]) + len(y) == 1797


def test_classifier_cache(tmp_path, classifier, monkeypatch):
    path = str(tmp_path / "clf.eqx")
    monkeypatch.setattr(metrics, "train_digits_classifier", lambda seed=0: classifier)
    first = metrics.load_or_train_classifier(path)
    assert os.path.exists(path) and os.listdir(tmp_path) == ["clf.eqx"]  # no temporary left behind
    monkeypatch.setattr(metrics, "train_digits_classifier", lambda seed=0: pytest.fail("should load, not train"))
    loaded = metrics.load_or_train_classifier(path)
    assert eqx.tree_equal(jax.tree.map(np.asarray, first), jax.tree.map(np.asarray, loaded))
    (tmp_path / "junk.eqx").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.eqx.*delete it to retrain"):
        metrics.load_or_train_classifier(str(tmp_path / "junk.eqx"))
    monkeypatch.setattr(metrics, "train_digits_classifier", lambda seed=0: classifier)
    nested = tmp_path / "runs" / "fresh" / "clf.eqx"  # a clean clone has no runs/ yet
    metrics.load_or_train_classifier(str(nested))
    assert nested.exists()


def test_image_metrics(classifier):
    floor = metrics.image_floor(classifier)
    assert floor["acc"] > 0.9 and floor["acc_heldout"] > 0.9 and floor["class_tv"] < 0.1
    (images, labels), (ref, _) = data.digits_halves()
    n = len(images)
    noise = np.clip(np.random.default_rng(0).normal(size=(n, 8, 8, 1)), -1, 1).astype(np.float32)
    bad = metrics.image_metrics(noise, labels[:n], classifier, ref)
    assert bad["fd"] > 20 * floor["fd"] and bad["acc"] < 0.3
    shuffled = metrics.image_metrics(images[:n], np.random.default_rng(1).permutation(labels[:n]), classifier, ref)
    assert shuffled["acc"] < 0.3 and shuffled["fd"] < 2 * floor["fd"]
    all_images, all_labels = data.digits()
    dropped = metrics.image_metrics(all_images[all_labels < 5][:n], None, classifier, ref)  # half the classes
    assert "acc" not in dropped and dropped["class_tv"] > 0.4 and dropped["fd"] > 5 * floor["fd"]
    with pytest.raises(ValueError, match=r"\(898, 16, 16, 1\)"):
        metrics.image_metrics(np.zeros((n, 16, 16, 1), np.float32), None, classifier, ref)
    overshoot = metrics.image_metrics(1.05 * images, labels, classifier, ref)  # generator overshoot is clipped
    assert overshoot["acc"] > 0.9
    with pytest.raises(ValueError, match="NaN"):
        metrics.image_metrics(np.where(images > 0.9, np.nan, images), labels, classifier, ref)


# ----------------------------------------------------------------------------------------------
# Image loading and validation.


def test_digits_range():
    images, labels = data.digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32 and labels.shape == (1797,)
    assert images.min() == -1.0 and images.max() == 1.0 and set(labels) == set(range(10))


def test_load_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=raw, labels=np.arange(5))
    images, labels = data.get_images(f"npz:{tmp_path / 'a.npz'}")
    np.testing.assert_allclose(images, raw / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(labels, np.arange(5))
    np.savez(tmp_path / "b.npz", images=images)
    again, none = data.load_npz(str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(again, images)
    assert none is None


@pytest.mark.parametrize(
    "images,labels,match",
    [
        (np.zeros((4, 8, 8), np.uint8), None, r"4-D.*\(4, 8, 8\)"),
        (np.zeros((4, 8, 10, 1), np.uint8), None, "H = 8 != W = 10"),
        (np.zeros((4, 4, 4, 1), np.uint8), None, r"8\.\.64; got 4"),
        (np.zeros((4, 128, 128, 1), np.uint8), None, r"8\.\.64; got 128"),
        (np.zeros((4, 8, 8, 5), np.uint8), None, "C = 5"),
        (np.where(np.arange(4)[:, None, None, None] == 1, np.nan, np.zeros((4, 8, 8, 1), np.float32)), None, r"64 NaN.*\(1, 0, 0, 0\)"),
        (np.full((4, 8, 8, 1), np.inf, np.float32), None, "256 inf"),
        (np.full((4, 8, 8, 1), 2.0, np.float32), None, r"\[-1, 1\].*2"),
        (np.full((4, 8, 8, 1), 300, np.int32), None, r"0\.\.255.*300"),
        (np.zeros((4, 8, 8, 1), np.uint8), np.arange(3), r"\(4,\).*\(3,\)"),
        (np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 2, -1]), "-1"),
    ],
)
def test_bad_images(tmp_path, images, labels, match):
    kw = {} if labels is None else {"labels": labels}
    np.savez(tmp_path / "bad.npz", images=images, **kw)
    with pytest.raises(ValueError, match=match):
        data.load_npz(str(tmp_path / "bad.npz"))


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="'cifar'.*'digits' or 'npz:PATH'"):
        data.get_images("cifar")
    np.savez(tmp_path / "x.npz", pictures=np.zeros((2, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match=r"no 'images'.*\['pictures'\]"):
        data.load_npz(str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match=r"weights contains 1 NaN .*index \(2,\)"):
        data.check_finite("weights", np.array([1.0, 2.0, np.nan]))
    with pytest.raises(ValueError, match="same D"):
        metrics.mmd2(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="bandwidths must be > 0"):
        metrics.mmd2(np.ones((5, 2)), np.zeros((5, 2)))  # constant reference: median distance 0
