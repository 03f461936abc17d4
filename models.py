"""Denoisers: exact ones for Gaussian data (the test oracles and exact teachers) and small networks.

Every denoiser follows the Equinox convention: `denoiser(z, t) -> x_hat` maps one unbatched example
`z` and a scalar VP time `t` to a prediction of the clean data; callers `vmap` it.
"""

import math

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.linalg as jsl
import numpy as np

from sampling import Schedule, posterior


# ----------------------------------------------------------------------------------------------
# Exact denoisers (REFERENCE.md Sec. 4).


def _check_covs(covs, dim):
    covs = np.asarray(covs, np.float64)
    if covs.shape[-2:] != (dim, dim):
        raise ValueError(f"covariance must have shape (..., {dim}, {dim}) to match the mean; got {covs.shape}")
    if not np.allclose(covs, np.swapaxes(covs, -1, -2), atol=1e-6):
        raise ValueError("covariance must be symmetric")
    eig = np.linalg.eigvalsh(covs)
    if np.any(eig <= 0):
        raise ValueError(f"covariance must be positive definite; smallest eigenvalue {eig.min():.3g} <= 0")


def _gaussian_posterior(mean, cov, z, alpha, sigma):
    """E[x | z] and log N(z; alpha mean, alpha^2 cov + sigma^2 I) for x ~ N(mean, cov), z = alpha x + sigma eps."""
    d = mean.shape[-1]
    c = alpha**2 * cov + sigma**2 * jnp.eye(d)
    chol = jnp.linalg.cholesky(c)
    r = z - alpha * mean
    sol = jsl.cho_solve((chol, True), r)  # c^-1 r
    x_mean = mean + alpha * cov @ sol
    logp = -0.5 * r @ sol - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * d * math.log(2 * math.pi)
    return x_mean, logp


class GaussianDenoiser(eqx.Module):
    """Exact `E[x | z_t]` for data x ~ N(mean, cov): `mean + alpha S (alpha^2 S + sigma^2 I)^-1 (z - alpha mean)`."""

    mean: jax.Array  # (D,)
    cov: jax.Array  # (D, D)
    schedule: Schedule = Schedule()

    def __init__(self, mean, cov, schedule: Schedule = Schedule()):
        mean = np.asarray(mean, np.float32)
        if mean.ndim != 1:
            raise ValueError(f"mean must be a vector (D,); got shape {mean.shape}")
        _check_covs(cov, mean.shape[0])
        self.mean, self.cov, self.schedule = jnp.asarray(mean), jnp.asarray(cov, jnp.float32), schedule

    def __call__(self, z, t):
        alpha, sigma = self.schedule.alpha_sigma(t)
        # theta = (mean, cov) is trained in the closed-form testbed: keep S symmetric, and solve without a
        # Cholesky factor, which a transiently indefinite S would turn into NaN
        cov = 0.5 * (self.cov + self.cov.T)
        c = alpha**2 * cov + sigma**2 * jnp.eye(self.mean.shape[0])
        return self.mean + alpha * cov @ jnp.linalg.solve(c, z - alpha * self.mean)

    def posterior_cov(self, t):
        """Cov[x | z_t] = S - alpha^2 S (alpha^2 S + sigma^2 I)^-1 S."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        c = alpha**2 * self.cov + sigma**2 * jnp.eye(self.mean.shape[0])
        return self.cov - alpha**2 * self.cov @ jnp.linalg.solve(c, self.cov)

    def sample(self, key, n):
        return jr.multivariate_normal(key, self.mean, self.cov, (n,))

    def log_prob(self, x):
        return _gaussian_posterior(self.mean, self.cov, x, 1.0, 0.0)[1]


class MixtureDenoiser(eqx.Module):
    """Exact `E[x | z_t] = sum_i r_i(z_t) E_i[x | z_t]` for a Gaussian mixture, responsibilities by log-sum-exp."""

    weights: jax.Array  # (K,)
    means: jax.Array  # (K, D)
    covs: jax.Array  # (K, D, D)
    schedule: Schedule = Schedule()

    def __init__(self, weights, means, covs, schedule: Schedule = Schedule()):
        weights, means = np.asarray(weights, np.float64), np.asarray(means, np.float32)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D); got {means.shape}")
        k, d = means.shape
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) to match means; got {weights.shape}")
        if np.any(weights < 0) or abs(weights.sum() - 1.0) > 1e-5:
            raise ValueError(f"mixture weights must be >= 0 and sum to 1; got sum {weights.sum():.6g}")
        covs = np.asarray(covs, np.float32)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}); got {covs.shape}")
        _check_covs(covs, d)
        self.weights, self.means, self.covs = jnp.asarray(weights, jnp.float32), jnp.asarray(means), jnp.asarray(covs)
        self.schedule = schedule

    def _components(self, z, alpha, sigma):
        post = jax.vmap(_gaussian_posterior, in_axes=(0, 0, None, None, None))
        x_means, logp = post(self.means, self.covs, z, alpha, sigma)  # (K, D), (K,)
        return x_means, jax.nn.log_softmax(jnp.log(self.weights) + logp)

    def responsibilities(self, z, t):
        """p(component i | z_t), shape (K,)."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        return jnp.exp(self._components(z, alpha, sigma)[1])

    def __call__(self, z, t):
        alpha, sigma = self.schedule.alpha_sigma(t)
        x_means, log_r = self._components(z, alpha, sigma)
        return jnp.exp(log_r) @ x_means

    def sample(self, key, n):
        kc, kx = jr.split(key)
        comp = jr.choice(kc, self.weights.shape[0], (n,), p=self.weights)
        chol = jnp.linalg.cholesky(self.covs)[comp]  # (n, D, D)
        eps = jr.normal(kx, (n, self.means.shape[1]))
        return self.means[comp] + jnp.einsum("nij,nj->ni", chol, eps)

    def log_prob(self, x):
        _, logp = jax.vmap(_gaussian_posterior, in_axes=(0, 0, None, None, None))(self.means, self.covs, x, 1.0, 0.0)
        return jax.nn.logsumexp(jnp.log(self.weights) + logp)


class AffineStepDenoiser(eqx.Module):
    """`x_hat = A_i z + b_i` with one affine map per step i of the k-step grid t_i = 1 - i/k (i = round((1 - t) k)).

    With Gaussian data every step of the exact sampler is affine, so this family contains a k-step sampler
    whose output is exactly the data distribution: the student of the closed-form testbed (`test_mmd.py`).
    """

    A: jax.Array  # (k, D, D)
    b: jax.Array  # (k, D)

    @classmethod
    def from_gaussian(cls, denoiser: GaussianDenoiser, k: int):
        """The exact denoiser at each grid time: `A_i = alpha S (alpha^2 S + sigma^2 I)^-1`, `b_i = mean - alpha A_i mean`."""
        t = 1.0 - jnp.arange(k) / k
        alpha, sigma = denoiser.schedule.alpha_sigma(t)
        d = denoiser.mean.shape[0]
        c = alpha[:, None, None] ** 2 * denoiser.cov + sigma[:, None, None] ** 2 * jnp.eye(d)
        a = alpha[:, None, None] * jnp.linalg.solve(c, jnp.broadcast_to(denoiser.cov, c.shape)).transpose(0, 2, 1)
        return cls(a, denoiser.mean - alpha[:, None] * (a @ denoiser.mean))

    def __call__(self, z, t):
        k = self.A.shape[0]
        i = jnp.clip(jnp.round((1.0 - t) * k).astype(jnp.int32), 0, k - 1)
        return self.A[i] @ z + self.b[i]

    def output_moments(self, schedule: Schedule):
        """Exact mean and covariance of the k-step ancestral sampler's output (`sampling.ancestral_sample`).

        z_1 ~ N(0, I); each step `z_s = c_z z_t + c_x (A_i z_t + b_i) + std eps` is affine with Gaussian noise.
        """
        k, d = self.b.shape
        m, p = jnp.zeros(d), jnp.eye(d)
        for i in range(k - 1):
            t, s = 1.0 - i / k, 1.0 - (i + 1) / k
            c_z = posterior(schedule, jnp.ones(()), jnp.zeros(()), t, s)[0]
            c_x, std = posterior(schedule, jnp.zeros(()), jnp.ones(()), t, s)
            step = c_z * jnp.eye(d) + c_x * self.A[i]
            m, p = step @ m + c_x * self.b[i], step @ p @ step.T + std**2 * jnp.eye(d)
        return self.A[-1] @ m + self.b[-1], self.A[-1] @ p @ self.A[-1].T


# ----------------------------------------------------------------------------------------------
# A small network denoiser for vector data, with EDM preconditioning (REFERENCE.md Sec. 5).


def edm_precond(schedule: Schedule, t, sigma_data):
    """EDM's (c_skip, c_out, c_in) in VP form: x_hat = c_skip z + c_out F(c_in z), d = sqrt(sigma^2 + alpha^2 sd^2)."""
    alpha, sigma = schedule.alpha_sigma(t)
    d = jnp.sqrt(sigma**2 + alpha**2 * sigma_data**2)
    return sigma_data**2 * alpha / d**2, sigma * sigma_data / d, 1.0 / d


def fourier_features(logsnr, dim):
    """Sinusoidal embedding of log-SNR with geometric frequencies (fixed, not trained)."""
    freqs = jnp.exp(jnp.linspace(math.log(1 / 16), math.log(4.0), dim // 2))
    angles = freqs * logsnr
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])


class ResBlock(eqx.Module):
    norm: eqx.nn.LayerNorm
    lin1: eqx.nn.Linear
    emb: eqx.nn.Linear
    lin2: eqx.nn.Linear

    def __init__(self, width, emb_dim, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.norm = eqx.nn.LayerNorm(width)
        self.lin1 = eqx.nn.Linear(width, width, key=k1)
        self.emb = eqx.nn.Linear(emb_dim, width, key=k2)
        self.lin2 = eqx.nn.Linear(width, width, key=k3)

    def __call__(self, h, emb):
        return h + self.lin2(jax.nn.silu(self.lin1(self.norm(h)) + self.emb(emb)))


class MLPDenoiser(eqx.Module):
    """Residual MLP x-predictor for vectors `(D,)`, conditioned on log-SNR, EDM-preconditioned.

    `features(z, t)` returns the last hidden layer `(width,)`, which DMD2's discriminator head reads.
    """

    embed: eqx.nn.MLP
    inp: eqx.nn.Linear
    blocks: list
    norm: eqx.nn.LayerNorm
    out: eqx.nn.Linear
    schedule: Schedule
    sigma_data: float = eqx.field(static=True)
    emb_dim: int = eqx.field(static=True)

    def __init__(self, dim, *, width=128, depth=3, emb_dim=32, sigma_data=0.5, schedule=Schedule(), key):
        ke, ki, kb, ko = jr.split(key, 4)
        self.embed = eqx.nn.MLP(emb_dim, emb_dim, emb_dim, depth=1, activation=jax.nn.silu, key=ke)
        self.inp = eqx.nn.Linear(dim, width, key=ki)
        self.blocks = [ResBlock(width, emb_dim, key=k) for k in jr.split(kb, depth)]
        self.norm = eqx.nn.LayerNorm(width)
        self.out = eqx.nn.Linear(width, dim, key=ko)
        self.schedule, self.sigma_data, self.emb_dim = schedule, sigma_data, emb_dim

    def features(self, z, t):
        _, _, c_in = edm_precond(self.schedule, t, self.sigma_data)
        emb = self.embed(fourier_features(self.schedule.logsnr(t), self.emb_dim))
        h = self.inp(c_in * z)
        for block in self.blocks:
            h = block(h, emb)
        return self.norm(h)

    def __call__(self, z, t):
        c_skip, c_out, _ = edm_precond(self.schedule, t, self.sigma_data)
        return c_skip * z + c_out * self.out(self.features(z, t))


class DiscriminatorHead(eqx.Module):
    """DMD2's GAN classifier: a small MLP on the fake-score network's bottleneck features.

    Features `(*spatial, C)` are mean-pooled over the spatial axes first, so the same head serves the
    vector MLP (`(C,)`) and image networks (`(h, w, C)`). Returns one logit (scalar).
    """

    mlp: eqx.nn.MLP

    def __init__(self, feat_dim, *, width=128, key):
        self.mlp = eqx.nn.MLP(feat_dim, "scalar", width, depth=2, activation=jax.nn.silu, key=key)

    def __call__(self, features):
        return self.mlp(einops.reduce(features, "... c -> c", "mean"))


# ----------------------------------------------------------------------------------------------
# Image denoiser (a small UViT in the manner of simple diffusion, Hoogeboom et al. 2023: the
# architecture the moment matching paper distils, its Sec. 5.1, 5.5 and App. B).
#
# Why a UViT and not a plain U-Net: at 8x8 the bottleneck is 4x4 = 16 tokens, where one
# self-attention layer sees the whole image for the price of a 16x16 matrix, whereas a U-Net
# would need several more 3x3 convolutions to reach the same receptive field. The same code grows
# to 64x64 by adding convolutional stages, which keeps the bottleneck at <= 8x8 (<= 64 tokens).
#
# Layout: the convolutional path works channels-first `(C, H, W)` (what `eqx.nn.GroupNorm` expects;
# `Conv` computes channels-last inside), the transformer on tokens `(N, C)`; the public interface is `(H, W, C)`.


def _num_stages(size: int) -> int:
    """Downsampling stages: halve the side while it is even and above 8 (8 -> 4, 16 -> 8, 32 -> 8, 64 -> 8)."""
    if size % 2:
        return 0
    n, side = 1, size // 2
    while side > 8 and side % 2 == 0:
        n, side = n + 1, side // 2
    return n


def _stage_channels(width: int, num_stages: int) -> list[int]:
    """Channels per level, full resolution first: halved per level above the bottleneck (which has
    `width`), as simple diffusion's multipliers grow towards low resolution; at least min(16, width).
    Most of the compute is in the full-resolution 3x3 convolutions, so this is what keeps it cheap."""
    return [max(width // 2 ** (num_stages - i), min(16, width)) for i in range(num_stages + 1)]


def _concrete_value(x):
    return not isinstance(x, jax.core.Tracer)


class Conv(eqx.Module):
    """`eqx.nn.Conv2d`'s parameters and interface `(C, H, W) -> (C_out, H, W)` (stride 1), computed as
    shifted copies of the input times the kernel (an einsum), not as an XLA convolution.

    Why: inside a loop whose carry holds the weights (our `lax.scan` over training steps), XLA:CPU's
    convolutions ran one teacher step at batch 128 in 1.5 s against 0.12 s outside a loop, in either
    layout (see also jax-ml/jax#12868); the einsum form runs at the same speed in and out of loops.
    """

    conv: eqx.nn.Conv2d

    def __init__(self, in_ch, out_ch, kernel, *, padding=0, key):
        self.conv = eqx.nn.Conv2d(in_ch, out_ch, kernel, padding=padding, key=key)

    def __call__(self, x):
        kh, kw = self.conv.weight.shape[2:]
        xp = jnp.pad(x, ((0, 0), *self.conv.padding))
        h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
        shifted = jnp.stack([xp[:, i : i + h, j : j + w] for i in range(kh) for j in range(kw)], 1)  # (C, kh kw, h, w)
        weight = einops.rearrange(self.conv.weight, "o c kh kw -> o (c kh kw)")
        return jnp.einsum("ok,khw->ohw", weight, einops.rearrange(shifted, "c k h w -> (c k) h w")) + self.conv.bias


class ImageResBlock(eqx.Module):
    """Pre-norm residual conv block with the embedding added as a per-channel bias (DDPM's ResBlock)."""

    norm1: eqx.nn.GroupNorm
    conv1: Conv
    emb: eqx.nn.Linear
    norm2: eqx.nn.GroupNorm
    conv2: Conv
    skip: Conv | None

    def __init__(self, in_ch, out_ch, emb_dim, *, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.norm1 = eqx.nn.GroupNorm(math.gcd(8, in_ch), in_ch)
        self.conv1 = Conv(in_ch, out_ch, 3, padding=1, key=k1)
        self.emb = eqx.nn.Linear(emb_dim, out_ch, key=k2)
        self.norm2 = eqx.nn.GroupNorm(math.gcd(8, out_ch), out_ch)
        self.conv2 = Conv(out_ch, out_ch, 3, padding=1, key=k3)
        self.skip = Conv(in_ch, out_ch, 1, key=k4) if in_ch != out_ch else None

    def __call__(self, x, emb):  # x: (C_in, H, W), emb: (E,) -> (C_out, H, W)
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + einops.rearrange(self.emb(jax.nn.silu(emb)), "c -> c 1 1")
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class TransformerBlock(eqx.Module):
    """Pre-LN transformer block with adaptive layer norm: `LN(x) (1 + scale(emb)) + shift(emb)` (DiT's adaLN)."""

    norm1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    norm2: eqx.nn.LayerNorm
    mlp1: eqx.nn.Linear
    mlp2: eqx.nn.Linear
    mod: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __init__(self, width, emb_dim, heads, *, mlp_ratio=4, key):
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        kq, kp, k1, k2, km = jr.split(key, 5)
        self.norm1 = eqx.nn.LayerNorm(width, use_weight=False, use_bias=False)
        self.qkv = eqx.nn.Linear(width, 3 * width, key=kq)
        self.proj = eqx.nn.Linear(width, width, key=kp)
        self.norm2 = eqx.nn.LayerNorm(width, use_weight=False, use_bias=False)
        self.mlp1 = eqx.nn.Linear(width, mlp_ratio * width, key=k1)
        self.mlp2 = eqx.nn.Linear(mlp_ratio * width, width, key=k2)
        self.mod = eqx.nn.Linear(emb_dim, 4 * width, key=km)
        self.heads = heads

    def __call__(self, x, emb):  # x: (N, C) tokens, emb: (E,)
        scale1, shift1, scale2, shift2 = jnp.split(self.mod(jax.nn.silu(emb)), 4)  # each (C,)
        h = jax.vmap(self.norm1)(x) * (1 + scale1) + shift1
        q, k, v = einops.rearrange(jax.vmap(self.qkv)(h), "n (three h d) -> three h n d", three=3, h=self.heads)
        logits = jnp.einsum("hnd,hmd->hnm", q, k) / math.sqrt(q.shape[-1])  # (heads, N, N)
        out = jnp.einsum("hnm,hmd->hnd", jax.nn.softmax(logits, axis=-1), v)
        x = x + jax.vmap(self.proj)(einops.rearrange(out, "h n d -> n (h d)"))
        h = jax.vmap(self.norm2)(x) * (1 + scale2) + shift2
        return x + jax.vmap(lambda u: self.mlp2(jax.nn.gelu(self.mlp1(u))))(h)


class ImageDenoiser(eqx.Module):
    """Class-conditional UViT x-predictor for images `(H, W, C)`, EDM-preconditioned (REFERENCE.md Sec. 5).

    `x_hat = c_skip z + c_out F(c_in z, emb)`, with `emb` from the log-SNR (Fourier features and an
    MLP) plus a learned class embedding. F: a 3x3 conv stem; per stage a residual conv block (its
    output kept as a skip) and a 2x2 patchify to half the side; `depth` transformer blocks on the
    `h x w` bottleneck tokens (learned position embedding); then per stage an unpatchify back up,
    concatenation with the skip and a residual conv block; a zero-initialised 3x3 output conv, so
    at init `x_hat = c_skip z`. Stages per side (see `_num_stages`): 8 -> 4x4 bottleneck (1 stage),
    16 -> 8x8 (1), 32 -> 8x8 (2), 64 -> 8x8 (3); an odd side gets no stage (attention at full size).
    The bottleneck has `width` channels and each level above it half as many, floored at 16
    (`_stage_channels`: `[32, 64]` at 8x8, `[16, 16, 32, 64]` at 64x64).

    Classes: `num_classes + 1` embedding rows, the last the null class used for classifier-free
    guidance; `label=None` and `label=num_classes` both select it. With `num_classes=0` the model
    is unconditional.

    **Arguments:**
    - `size`: side of the square images; `channels`: C.
    - `num_classes`: number of real classes (0 for unconditional).
    - `width`: channels of the transformer (the bottleneck) and size of the embedding.
    - `depth`, `heads`: transformer blocks and attention heads at the bottleneck.
    - `sigma_data`: EDM's data standard deviation (0.5 for images in [-1, 1]).
    - `schedule`: defaults to `Schedule.for_resolution(size)` (the shifted schedule, base 64).
    - `key`: PRNG key.
    """

    embed: eqx.nn.MLP
    class_embed: eqx.nn.Embedding
    stem: Conv
    down_blocks: list[ImageResBlock]
    downs: list[Conv]  # 1x1 conv on patchified (4 C, h, w) = a 2x2 stride-2 conv
    pos: jax.Array  # (h * w, width)
    blocks: list[TransformerBlock]
    norm: eqx.nn.LayerNorm
    ups: list[Conv]  # 1x1 conv to (4 C, h, w), then unpatchify = a 2x2 stride-2 transposed conv
    up_blocks: list[ImageResBlock]
    out_norm: eqx.nn.GroupNorm
    out: Conv
    schedule: Schedule
    size: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    sigma_data: float = eqx.field(static=True)

    def __init__(
        self,
        size,
        channels,
        *,
        num_classes=0,
        width=64,
        depth=2,
        heads=4,
        sigma_data=0.5,
        schedule=None,
        key,
    ):
        if size < 1 or channels < 1 or num_classes < 0:
            raise ValueError(f"need size, channels >= 1 and num_classes >= 0; got {size}, {channels}, {num_classes}")
        n = _num_stages(size)
        side = size // 2**n
        chs = _stage_channels(width, n)  # (n + 1,) channels per level, chs[n] = width
        ke, kc, ks, kd, kdn, kp, kb, kup, ku, ko = jr.split(key, 10)
        self.embed = eqx.nn.MLP(width, width, 4 * width, depth=1, activation=jax.nn.silu, key=ke)
        self.class_embed = eqx.nn.Embedding(num_classes + 1, width, key=kc)
        self.stem = Conv(channels, chs[0], 3, padding=1, key=ks)
        self.down_blocks = [ImageResBlock(chs[i], chs[i], width, key=k) for i, k in enumerate(jr.split(kd, n))]
        self.downs = [Conv(4 * chs[i], chs[i + 1], 1, key=k) for i, k in enumerate(jr.split(kdn, n))]
        self.pos = 0.02 * jr.normal(kp, (side * side, width))
        self.blocks = [TransformerBlock(width, width, heads, key=k) for k in jr.split(kb, depth)]
        self.norm = eqx.nn.LayerNorm(width)
        self.ups = [Conv(chs[i + 1], 4 * chs[i], 1, key=k) for i, k in enumerate(jr.split(kup, n))]
        self.up_blocks = [ImageResBlock(2 * chs[i], chs[i], width, key=k) for i, k in enumerate(jr.split(ku, n))]
        self.out_norm = eqx.nn.GroupNorm(math.gcd(8, chs[0]), chs[0])
        out = Conv(chs[0], channels, 3, padding=1, key=ko)
        self.out = eqx.tree_at(lambda c: (c.conv.weight, c.conv.bias), out, replace_fn=jnp.zeros_like)
        self.schedule = Schedule.for_resolution(size) if schedule is None else schedule
        self.size, self.channels, self.num_classes, self.width = size, channels, num_classes, width
        self.sigma_data = sigma_data

    def _label(self, label):
        """Embedding row of `label`: `None` is the null class `num_classes`; traced ints pass through."""
        if label is None:
            return jnp.asarray(self.num_classes)
        if _concrete_value(label):
            a = np.asarray(label)
            if a.shape != () or not np.issubdtype(a.dtype, np.integer) or not 0 <= a <= self.num_classes:
                raise ValueError(f"label must be an int scalar in [0, {self.num_classes}] or None; got {label!r}")
        return jnp.asarray(label)

    def _check_image(self, x):
        if x.shape != (self.size, self.size, self.channels):
            raise ValueError(f"expected an unbatched image {(self.size, self.size, self.channels)}; got {x.shape}")

    def embedding(self, t, label=None):
        """Conditioning vector `(width,)`: MLP(Fourier features of log-SNR) + class embedding."""
        row = self._label(label)
        return self.embed(fourier_features(self.schedule.logsnr(t), self.width)) + self.class_embed(row)

    def network(self, x, emb):
        """The raw network F on the preconditioned input `x = c_in z` `(H, W, C)`.

        **Returns:** `(F, features)`: `F` `(H, W, C)` and the bottleneck features `(h, w, width)`.
        """
        self._check_image(x)
        h = self.stem(einops.rearrange(x, "h w c -> c h w"))  # (C_0, H, W)
        skips = []
        for block, down in zip(self.down_blocks, self.downs):
            h = block(h, emb)
            skips.append(h)
            h = down(einops.rearrange(h, "c (h p) (w q) -> (c p q) h w", p=2, q=2))  # (C_next, H/2, W/2)
        side = h.shape[-1]
        tokens = einops.rearrange(h, "c h w -> (h w) c") + self.pos  # (h w, width)
        for block in self.blocks:
            tokens = block(tokens, emb)
        tokens = jax.vmap(self.norm)(tokens)
        features = einops.rearrange(tokens, "(h w) c -> h w c", h=side)  # (h, w, width)
        h = einops.rearrange(tokens, "(h w) c -> c h w", h=side)
        for up, block, skip in zip(self.ups[::-1], self.up_blocks[::-1], skips[::-1]):
            h = einops.rearrange(up(h), "(c p q) h w -> c (h p) (w q)", p=2, q=2)  # (C_prev, 2h, 2w)
            h = block(jnp.concatenate([h, skip]), emb)
        f = self.out(jax.nn.silu(self.out_norm(h)))  # (C, H, W)
        return einops.rearrange(f, "c h w -> h w c"), features

    def _forward(self, z, t, label):
        """One pass giving both `x_hat` `(H, W, C)` and the bottleneck features `(h, w, width)`."""
        self._check_image(z)
        emb = self.embedding(t, label)  # (width,)
        c_skip, c_out, c_in = edm_precond(self.schedule, t, self.sigma_data)
        f, features = self.network(c_in * z, emb)
        return c_skip * z + c_out * f, features

    def __call__(self, z, t, label=None):
        """`x_hat` `(H, W, C)` for one image `z` `(H, W, C)`, scalar VP time `t`, int `label` or None."""
        return self._forward(z, t, label)[0]

    def features(self, z, t, label=None):
        """Bottleneck features `(h, w, width)` (after the last transformer block and LayerNorm) for DMD2's head."""
        return self._forward(z, t, label)[1]

    def features_shape(self):
        """`(h, w, width)`, the shape `features` returns (static: works on `eqx.filter_eval_shape` output)."""
        side = self.size // 2 ** len(self.downs)
        return (side, side, self.width)

