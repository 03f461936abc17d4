"""Data: toy distributions whose density and exact denoiser are known, and small image sets.

Toy data (`ring8`, `gauss`, `gmm`, or `get_toy(name)`) come as a `ToyData` record holding the exact
denoiser `E[x | z_t]` (the teacher oracle, `models.MixtureDenoiser` / `models.GaussianDenoiser`) and
the mixture parameters `weights (K,)`, `means (K, D)`, `covs (K, D, D)` that the mode metrics of
`metrics.py` read. A Gaussian is stored as a one-component mixture in those fields, while its
`denoiser` stays the closed-form `GaussianDenoiser` (its posterior mean in one linear solve).

Images (`digits`, `load_npz`, or `get_images(spec)`) are float32 `(N, H, W, C)` in [-1, 1] with
optional int labels `(N,)`: the range and `sigma_data = 0.5` that EDM preconditioning assumes.
"""

import dataclasses
import zipfile
import zlib
from typing import Optional, Union

import equinox as eqx
import numpy as np

from models import GaussianDenoiser, MixtureDenoiser
from sampling import Schedule

MIN_SIDE, MAX_SIDE = 8, 64  # accepted square image sides, inclusive
MAX_CHANNELS = 4
MIN_IMAGES = 4  # the image metrics split the data in halves of >= 2 (a covariance each)
MAX_CLASSES = 1000  # labels 0..999: the class embedding has a row per class


def check_finite(name: str, x) -> np.ndarray:
    """Raise `ValueError` naming `name` if array `x` holds NaN or inf; return `x` as a numpy array."""
    a = np.asarray(x)
    if np.issubdtype(a.dtype, np.inexact):
        bad = ~np.isfinite(a)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} contains {int(np.isnan(a).sum())} NaN and {int(np.isinf(a).sum())} inf values "
                f"(first at index {first}); data must be finite"
            )
    return a


# ----------------------------------------------------------------------------------------------
# Toy data with a known density.


@dataclasses.dataclass(frozen=True, eq=False)
class ToyData:
    """A toy distribution, its exact denoiser, and its mixture parameters (a Gaussian has K = 1)."""

    name: str
    denoiser: Union[MixtureDenoiser, GaussianDenoiser]
    weights: np.ndarray  # (K,) float64, sums to 1
    means: np.ndarray  # (K, D) float64
    covs: np.ndarray  # (K, D, D) float64

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def stds(self) -> np.ndarray:
        """Per-component scale `sqrt(largest eigenvalue of cov)`, `(K,)`."""
        return np.sqrt(np.linalg.eigvalsh(self.covs)[:, -1])

    def sample(self, key, n: int):
        """`n` exact samples, `(n, D)` float32 (the denoiser's own sampler, jitted)."""
        return _sample(self.denoiser, key, n)

    def mean(self) -> np.ndarray:
        """Mean of the mixture, `sum_k w_k mu_k`, `(D,)`."""
        return self.weights @ self.means

    def cov(self) -> np.ndarray:
        """Covariance of the mixture, `sum_k w_k (S_k + mu_k mu_k^T) - m m^T`, `(D, D)`."""
        m = self.mean()
        second = np.einsum("k,kij->ij", self.weights, self.covs + np.einsum("ki,kj->kij", self.means, self.means))
        return second - np.outer(m, m)


@eqx.filter_jit
def _sample(denoiser, key, n):
    return denoiser.sample(key, n)  # n is a Python int, hence static under filter_jit


def _mixture(name, weights, means, covs, schedule):
    weights, means, covs = (np.asarray(a, np.float64) for a in (weights, means, covs))
    covs = 0.5 * (covs + np.swapaxes(covs, -1, -2))  # exact symmetry after float32 casts
    return ToyData(name, MixtureDenoiser(weights, means, covs, schedule), weights, means, covs)


def _random_rotation(rng, d):
    """A random rotation Q `(d, d)`: QR of a Gaussian matrix, signs fixed so Q is Haar (Mezzadri 2007)."""
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def _random_cov(rng, d, eigenvalues):
    """`Q diag(eigenvalues) Q^T` with a random rotation Q."""
    q = _random_rotation(rng, d)
    return (q * eigenvalues) @ q.T


def random_cov(rng, d: int, lo: float = 0.05, hi: float = 2.0) -> np.ndarray:
    """A random SPD matrix `(d, d)` with eigenvalues drawn uniformly in [lo, hi] (after the rotation)."""
    q = _random_rotation(rng, d)
    return (q * rng.uniform(lo, hi, d)) @ q.T


# Two well-separated components, weights 0.3 / 0.7: a sampler that recovers the weights mixes between modes
# (1-step sampling returns the mean, inside the heavier one). Arguments of `models.MixtureDenoiser`.
RING2 = dict(weights=[0.3, 0.7], means=[[-2.0, 0.0], [2.0, 0.0]], covs=[np.eye(2) * 0.1] * 2)


def ring8(schedule: Schedule = Schedule()) -> ToyData:
    """Eight isotropic Gaussians (std 0.15) on the circle of radius 2, at angles `2 pi i / 8`, weights `(i + 1) / 36`.

    The unequal weights make mode dropping and mode re-weighting visible to `metrics.mode_tv`.
    """
    i = np.arange(8)
    angles = 2 * np.pi * i / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], -1)  # (8, 2)
    covs = np.broadcast_to(0.15**2 * np.eye(2), (8, 2, 2))
    return _mixture("ring8", (i + 1) / np.sum(i + 1), means, covs, schedule)


def gauss(d: int = 8, seed: int = 0, schedule: Schedule = Schedule()) -> ToyData:
    """Anisotropic Gaussian in `d` dims: eigenvalues log-spaced in [0.05, 1.5], random rotation and mean N(0, 0.5^2 I).

    Its `denoiser` is the closed-form `GaussianDenoiser`; `weights/means/covs` hold it as a K = 1 mixture.
    """
    rng = np.random.default_rng(seed)
    cov = _random_cov(rng, d, np.geomspace(0.05, 1.5, d))
    cov = 0.5 * (cov + cov.T)
    mean = 0.5 * rng.normal(size=d)
    return ToyData(f"gauss{d}", GaussianDenoiser(mean, cov, schedule), np.ones(1), mean[None], cov[None])


def gmm(d: int = 16, k: int = 6, seed: int = 0, schedule: Schedule = Schedule()) -> ToyData:
    """A `k`-component mixture in `d` dims with unequal weights and random full covariances.

    Weights are `Uniform(0.5, 2)` draws normalised; each covariance has eigenvalues in [0.01, 0.09]
    (stds 0.1..0.3) under its own random rotation; means are `N(0, s^2 I)` draws, `s = max(1, sep / d**0.5)`,
    each redrawn until it is `sep = max(3, 1.2 d**0.5)` (>= 10 component stds) from the others, so that
    the "4-sigma" regions of `metrics.mode_assign` never overlap (checked in the tests).
    """
    if k < 1 or d < 1:
        raise ValueError(f"gmm needs d >= 1 and k >= 1; got d = {d}, k = {k}")
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 2.0, k)
    covs = np.stack([_random_cov(rng, d, rng.uniform(0.01, 0.09, d)) for _ in range(k)])
    min_sep = max(3.0, 1.2 * d**0.5)
    scale = max(1.0, min_sep / d**0.5)  # typical pair distance sqrt(2 d) scale > min_sep
    means = np.zeros((0, d))
    for _ in range(100_000):  # place means one at a time, each redrawn until far from the others
        m = scale * rng.normal(size=d)
        if np.all(np.linalg.norm(means - m, axis=-1) >= min_sep):
            means = np.concatenate([means, m[None]])
        if len(means) == k:
            break
    if len(means) < k:
        raise ValueError(f"could not place {k} means {min_sep:.2f} apart in {d} dims; use fewer components")
    return _mixture(f"gmm{d}k{k}", weights / weights.sum(), means, covs, schedule)


TOYS = {"ring8": ring8, "gauss": gauss, "gmm": gmm}


def get_toy(name: str, d: Optional[int] = None, seed: int = 0, schedule: Schedule = Schedule()) -> ToyData:
    """Toy data by name (`"ring8"`, `"gauss"`, `"gmm"`); `d=None` keeps each one's default dimension."""
    if name not in TOYS:
        raise ValueError(f"unknown toy dataset {name!r}; accepted names: {sorted(TOYS)}")
    if name == "ring8":
        if d not in (None, 2):
            raise ValueError(f"ring8 is 2-dimensional; got d = {d}")
        return ring8(schedule)
    kw = {} if d is None else {"d": d}
    return TOYS[name](seed=seed, schedule=schedule, **kw)


# ----------------------------------------------------------------------------------------------
# Images.

DIGITS_TEST_FRAC = 0.2


def digits(split: str = "all"):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, pixels 0..16) scaled to [-1, 1].

    **Arguments:**
    - `split`: `"all"`, or `"train"` / `"test"`: a fixed random 80 / 20 partition (numpy seed 0)
      used to train and to check `metrics.train_digits_classifier`.

    **Returns:** `(images, labels)`: `(N, 8, 8, 1)` float32 and `(N,)` int32.
    """
    from sklearn.datasets import load_digits  # bundled with the package: no download

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # 0..16 -> -1..1
    labels = bunch.target.astype(np.int32)
    if split == "all":
        return images, labels
    perm = np.random.default_rng(0).permutation(len(labels))
    n_test = int(round(DIGITS_TEST_FRAC * len(labels)))
    splits = {"test": perm[:n_test], "train": perm[n_test:]}
    if split not in splits:
        raise ValueError(f"unknown digits split {split!r}; accepted: ['all', 'test', 'train']")
    idx = np.sort(splits[split])
    return images[idx], labels[idx]


def digits_halves(seed: int = 0):
    """`digits()` split into two random halves, `((images_a, labels_a), (images_b, labels_b))`, 898 and 899 images.

    Half b is the reference for image metrics and half a the real-vs-real floor (`metrics.image_floor`).
    A random split matters: the data set is ordered by writer, and its first and second halves differ.
    """
    images, labels = digits()
    perm = np.random.default_rng(seed).permutation(len(labels))
    a, b = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])
    return (images[a], labels[a]), (images[b], labels[b])


def check_images(images, labels=None, name="images", labels_name="labels"):
    """Validate and convert an image array to float32 `(N, H, W, C)` in [-1, 1]; labels to int32 `(N,)`.

    Integer images must be 0..255 and are mapped by `x / 127.5 - 1`. Float images are taken to be in
    [-1, 1] already and rejected otherwise (we do not guess between [0, 1] and [0, 255]).
    Accepted shapes: square sides `MIN_SIDE..MAX_SIDE` (8..64, any integer), 1..4 channels, N >= 4.
    Labels: integers (or integer-valued floats) in `0..MAX_CLASSES - 1`.
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (N, H, W, C); got shape {x.shape}")
    n, h, w, c = x.shape
    if h != w:
        raise ValueError(f"{name} must be square; got H = {h} != W = {w} (shape {x.shape})")
    if not MIN_SIDE <= h <= MAX_SIDE:
        raise ValueError(f"{name} side must be in {MIN_SIDE}..{MAX_SIDE}; got {h} (shape {x.shape})")
    if not 1 <= c <= MAX_CHANNELS:
        raise ValueError(f"{name} must have 1..{MAX_CHANNELS} channels (last axis); got C = {c} (shape {x.shape})")
    if n < MIN_IMAGES:
        raise ValueError(f"{name} holds {n} images; need at least {MIN_IMAGES} (shape {x.shape})")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"integer {name} must be in 0..255; got range [{lo}, {hi}]")
        x = x.astype(np.float32) / 127.5 - 1.0
    elif np.issubdtype(x.dtype, np.floating):
        check_finite(name, x)
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(
                f"float {name} must already be in [-1, 1]; got range [{lo:.4g}, {hi:.4g}] "
                "(store uint8 0..255 to have them scaled)"
            )
        x = np.clip(x.astype(np.float32), -1.0, 1.0)
    else:
        raise ValueError(f"{name} must be uint8 0..255 or float in [-1, 1]; got dtype {x.dtype}")
    if labels is None:
        return x, None
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{labels_name} must have shape ({n},) to match {n} images; got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{labels_name} must be integers; got dtype {y.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        check_finite(labels_name, y)
        if not np.all(y == np.round(y)):
            raise ValueError(f"{labels_name} must be integers; got dtype {y.dtype} with non-integer values")
    if y.min() < 0 or y.max() >= MAX_CLASSES:
        raise ValueError(f"{labels_name} must be in 0..{MAX_CLASSES - 1}; got range [{y.min()}, {y.max()}]")
    return x, y.astype(np.int32)


def load_npz(path: str):
    """Images from a `.npz` with `images` (N, H, W, C) (uint8 0..255 or float in [-1, 1]) and optional `labels` (N,).

    Never unpickles: anything but such an archive of numeric arrays raises `ValueError` naming the file,
    the array and what was expected.

    **Returns:** `(images, labels_or_None)` as in `check_images`.
    """
    expected = "expected an .npz (np.savez) of numeric arrays 'images' (N, H, W, C) and optionally 'labels' (N,)"
    if not zipfile.is_zipfile(path):  # np.load would take any other file for a pickle
        raise ValueError(f"{path} is not an .npz archive; {expected}")
    key, arrays = None, {}
    try:
        with np.load(path, allow_pickle=False) as f:
            found = sorted(f.files)
            for key in ("images", "labels"):
                if key in found:
                    arrays[key] = f[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # damaged, or an object array
        where = f"array {key!r} of {path}" if key else path
        raise ValueError(f"cannot read {where} ({e}); {expected}") from e
    if "images" not in arrays:
        raise ValueError(f"{path} has no 'images' array; found keys {found}; {expected}")
    return check_images(arrays["images"], arrays.get("labels"), name=f"images in {path}",
                        labels_name=f"labels in {path}")


def get_images(spec: str):
    """`"digits"` or `"npz:PATH"` -> `(images (N, H, W, C) float32 in [-1, 1], labels (N,) int32 or None)`."""
    if spec == "digits":
        return digits()
    if spec.startswith("npz:") and len(spec) > 4:
        return load_npz(spec[4:])
    raise ValueError(f"unknown image dataset {spec!r}; accepted: 'digits' or 'npz:PATH'")
