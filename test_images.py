"""Tests of the image denoiser (`uvit.ImageDenoiser`): shapes, EDM preconditioning, the null class,
class conditioning, and a tiny overfit run showing that gradients reach every parameter.

The output conv is zero-initialised, so at init `x_hat = c_skip z` whatever the label; tests that
need the network's output to matter first replace that layer with a random one (`perturbed`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import models
import uvit
from models import edm_precond
from uvit import ImageDenoiser
from sampling import diffuse

NUM_CLASSES = 10


def perturbed(model, key, scale=0.1):
    """The model with a random (non-zero) output conv, so F actually reaches x_hat."""
    kw, kb = jr.split(key)
    w, b = model.out.conv.weight, model.out.conv.bias
    return eqx.tree_at(
        lambda m: (m.out.conv.weight, m.out.conv.bias), model, (scale * jr.normal(kw, w.shape), scale * jr.normal(kb, b.shape))
    )


def make(size, channels, *, seed=0, **kw):
    model = ImageDenoiser(size, channels, num_classes=NUM_CLASSES, key=jr.key(seed), **kw)
    return perturbed(model, jr.key(seed + 1))


# ----------------------------------------------------------------------------------------------
# One compiled pass per model structure (XLA compiles take seconds here, eager warm-up longer):
# `run` returns the conditioned and unconditioned predictions, their features and the pieces of the
# preconditioning, so every single-example test below reuses the same executable.


@eqx.filter_jit
def run(model, z, t, label):
    c_skip, c_out, c_in = edm_precond(model.schedule, t, model.sigma_data)
    f, _ = model.network(c_in * z, model.embedding(t, label))
    x_cond, feats_cond = model._forward(z, t, label)
    x_null, feats_null = model._forward(z, t, None)
    return dict(x=x_cond, feats=feats_cond, x_null=x_null, feats_null=feats_null, F=f, c_skip=c_skip, c_out=c_out)


def call(model, z, t, label):
    return run(model, z, jnp.asarray(t, jnp.float32), jnp.asarray(label, jnp.int32))


@pytest.fixture(scope="module")
def base8():
    """The default 8x8x1 model as constructed (zero output conv). Built once: eager init compiles per shape."""
    return ImageDenoiser(8, 1, num_classes=NUM_CLASSES, key=jr.key(0))


@pytest.fixture(scope="module")
def model8(base8):
    return perturbed(base8, jr.key(1))


@pytest.fixture(scope="module")
def z8():
    return jr.normal(jr.key(2), (8, 8, 1))


# ----------------------------------------------------------------------------------------------
# Shapes.

BOTTLENECK_SIDE = {8: 4, 16: 8, 28: 7, 32: 8, 64: 8}


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (32, 3), (64, 3)])
def test_shapes(size, channels, model8):
    model = model8 if size == 8 else make(size, channels)
    z = jr.normal(jr.key(2), (size, size, channels))
    out = call(model, z, 0.5, 3)
    side = BOTTLENECK_SIDE[size]
    for x_key, f_key in (("x", "feats"), ("x_null", "feats_null")):  # label 3 and label None
        assert out[x_key].shape == z.shape
        assert np.all(np.isfinite(out[x_key]))
        assert out[f_key].shape == model.features_shape() == (side, side, 64)
        assert np.all(np.isfinite(out[f_key]))


def test_stages_per_size():
    assert {s: uvit._num_stages(s) for s in (8, 16, 28, 32, 64)} == {8: 1, 16: 1, 28: 2, 32: 2, 64: 3}
    assert uvit._stage_channels(64, 1) == [32, 64] and uvit._stage_channels(64, 3) == [16, 16, 32, 64]
    for size, side in BOTTLENECK_SIDE.items():
        model = eqx.filter_eval_shape(ImageDenoiser, size, 1, width=16, depth=1, key=jr.key(0))
        assert model.features_shape() == (side, side, 16)


def test_discriminator_head_reads_features(model8, z8):
    head = models.DiscriminatorHead(64, width=32, key=jr.key(3))
    logit = head(call(model8, z8, 0.3, 1)["feats"])
    assert logit.shape == () and np.isfinite(logit)


def test_jit_vmap_matches_single(model8):
    n = 3
    z = jr.normal(jr.key(4), (n, 8, 8, 1))
    t = jnp.array([0.1, 0.5, 0.9])
    labels = jnp.array([0, 7, NUM_CLASSES])  # the last one the null class

    @eqx.filter_jit
    def batched(model, z, t, labels):
        cond = jax.vmap(model)(z, t, labels)
        null = jax.vmap(model, in_axes=(0, 0, None))(z, t, None)
        return cond, null, jax.vmap(model.features)(z, t, labels)

    cond, null, feats = batched(model8, z, t, labels)
    assert cond.shape == null.shape == z.shape
    assert feats.shape == (n, *model8.features_shape())
    for i in range(n):
        single = call(model8, z[i], t[i], labels[i])
        np.testing.assert_allclose(cond[i], single["x"], atol=1e-5)
        np.testing.assert_allclose(null[i], single["x_null"], atol=1e-5)
        np.testing.assert_allclose(feats[i], single["feats"], atol=1e-5)
    np.testing.assert_allclose(cond[2], null[2], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# EDM preconditioning.


def _identity_at_zero(x_hat, z):
    """At t = 0, sigma ~ 3e-7: c_skip = 1 and c_out ~ 0, so x_hat must equal z."""
    return np.allclose(x_hat, z, atol=1e-5, rtol=0)


def test_precond_identity_at_t0(model8, z8):
    out = call(model8, z8, 0.0, 2)
    assert _identity_at_zero(out["x"], z8)
    # The check can fail: the same network with a broken preconditioning does not pass it.
    assert not _identity_at_zero(out["c_out"] * out["F"], z8)  # dropped c_skip
    assert not _identity_at_zero(out["c_skip"] * z8 + out["F"], z8)  # dropped c_out
    assert float(jnp.max(jnp.abs(out["F"]))) > 1e-2  # ... because F is not negligible


def test_precond_formula_mid_t(model8, z8):
    """x_hat = c_skip z + c_out F(c_in z, emb), and the network's output matters at mid t."""
    out = call(model8, z8, 0.37, 4)
    np.testing.assert_allclose(out["x"], out["c_skip"] * z8 + out["c_out"] * out["F"], atol=1e-6)
    assert float(jnp.max(jnp.abs(out["x"] - out["c_skip"] * z8))) > 1e-2


def test_zero_init_output_is_skip(base8, z8):
    out = call(base8, z8, 0.5, 1)
    np.testing.assert_allclose(out["x"], out["c_skip"] * z8, atol=1e-6)


def test_default_schedule_is_shifted():
    for size in (8, 64):
        model = eqx.filter_eval_shape(ImageDenoiser, size, 1, width=16, depth=1, key=jr.key(0))
        assert model.schedule.shift == pytest.approx(2 * np.log(64 / size))


# ----------------------------------------------------------------------------------------------
# Class conditioning.


def test_null_class_is_none(model8, z8):
    out = call(model8, z8, 0.4, NUM_CLASSES)
    np.testing.assert_array_equal(out["x"], out["x_null"])
    np.testing.assert_array_equal(out["feats"], out["feats_null"])


def test_labels_condition(model8, z8):
    outs = [call(model8, z8, 0.5, label)["x"] for label in (0, 1, NUM_CLASSES)]
    for i in range(3):
        for j in range(i):
            assert float(jnp.max(jnp.abs(outs[i] - outs[j]))) > 1e-3


def test_unconditional_model(z8):
    """num_classes = 0: one embedding row, the null class; label None and 0 both trace (abstractly, no compile)."""
    model = eqx.filter_eval_shape(ImageDenoiser, 8, 1, key=jr.key(0))
    assert model.class_embed.weight.shape == (1, 64)
    out = eqx.filter_eval_shape(run, model, z8, jnp.float32(0.5), jnp.int32(0))
    assert out["x"].shape == out["x_null"].shape == z8.shape


@pytest.mark.parametrize("label", [-1, NUM_CLASSES + 1, 2.0, np.array([1, 2])])
def test_bad_label_raises(model8, label):
    with pytest.raises(ValueError, match="label"):
        model8(jnp.zeros((8, 8, 1)), 0.5, label)


def test_bad_shape_raises(model8):
    with pytest.raises(ValueError, match="unbatched"):
        model8(jnp.zeros((2, 8, 8, 1)), 0.5, 1)


# ----------------------------------------------------------------------------------------------
# A tiny overfit run: the x-prediction loss on a fixed batch falls, and every parameter moves.


def test_overfit_smoke(base8):
    """From the zero-initialised output conv, so the first step only moves `out`; later ones reach the rest."""
    batch, steps = 16, 40
    kx, kn, kt = jr.split(jr.key(0), 3)
    model = base8
    x = jnp.clip(0.5 * jr.normal(kx, (batch, 8, 8, 1)), -1, 1)  # (B, 8, 8, 1)
    t = jr.uniform(kt, (batch,), minval=0.2, maxval=0.9)  # (B,)
    z = diffuse(model.schedule, x, t, jr.normal(kn, x.shape))  # (B, 8, 8, 1)
    labels = jnp.arange(batch) % (NUM_CLASSES + 1)  # every row of the class embedding, the null one too

    def loss_fn(model):
        return jnp.mean((jax.vmap(model)(z, t, labels) - x) ** 2)

    optim = optax.adam(3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    init = model
    losses = []
    for _ in range(steps):
        model, opt_state, loss = step(model, opt_state)
        losses.append(float(loss))  # the loss before this step's update
    assert losses[-1] < 0.1 * losses[0], losses[::5]

    before = jax.tree_util.tree_leaves_with_path(eqx.filter(init, eqx.is_array))
    after = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    frozen = [jax.tree_util.keystr(p) for (p, b), a in zip(before, after) if np.array_equal(b, a)]
    assert not frozen, f"parameters that never moved: {frozen}"


@pytest.mark.parametrize("kernel, padding", [(3, 1), (1, 0)])
def test_conv_equals_equinox_conv2d(kernel, padding):
    """uvit.Conv (shifted copies + einsum, fast inside lax.scan on CPU) computes eqx.nn.Conv2d exactly."""
    from uvit import Conv  # noqa: PLC0415

    conv = Conv(3, 5, kernel, padding=padding, key=jr.key(0))
    x = jr.normal(jr.key(1), (3, 8, 8))
    np.testing.assert_allclose(conv(x), conv.conv(x), rtol=1e-5, atol=1e-5)
    # bites: a kernel flipped in space (a correlation vs convolution mix-up) differs
    flipped = eqx.tree_at(lambda c: c.conv.weight, conv, conv.conv.weight[:, :, ::-1, ::-1])
    assert kernel == 1 or not np.allclose(flipped(x), conv.conv(x), atol=1e-3)
