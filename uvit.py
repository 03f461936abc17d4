"""The image denoiser: a small class-conditional UViT (simple diffusion, Hoogeboom et al. 2023), the network
the moment matching paper distils (its Sec. 5.1, 5.5 and App. B), EDM-preconditioned like the toy MLP of
`models.py`. Same convention: `denoiser(z, t, label) -> x_hat` on one unbatched `(H, W, C)` image.
"""

import math

import einops
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from models import edm_precond, fourier_features
from sampling import Schedule


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
    """Class-conditional UViT x-predictor for images `(H, W, C)`, EDM-preconditioned (`models.edm_precond`).

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
