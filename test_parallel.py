"""Data parallelism: every step of `mmd.py`, unchanged, on a batch sharded over 8 devices.

Oracle: the same step on one device. Sharding may only change the order of the batch reductions
(8 per-device partial sums, then an all-reduce, instead of one sum over 64), so float32 results
agree to a few ulps of the summed terms; we allow rtol 1e-5 / atol 1e-6 (about 80 ulps; a sum of
64 float32 terms can be off by up to 64 eps ~ 8e-6 relative in the worst case, typically
sqrt(64) eps ~ 1e-6), and measured far less (see `_compare`). The tolerance can fail: the update
from one device's slice alone (no all-reduce) misses it by orders of magnitude.

The optimiser here is SGD with momentum, not Adam: Adam's first step is lr * sign(g), which would
hide any difference in the gradients; with SGD the parameter update is proportional to them.
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import dmd2
import mmd
import parallel
from models import MLPDenoiser
from uvit import ImageDenoiser
from sampling import Schedule

N_DEV, B = 8, 64
RTOL, ATOL = 1e-5, 1e-6
SCHED = Schedule()
OPT = optax.chain(optax.clip_by_global_norm(10.0), optax.sgd(0.05, momentum=0.9))
MM = mmd.MMConfig(k=2)
DMD = dmd2.DMD2Config(k=2, ttur=2)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < N_DEV:
        pytest.skip(f"needs {N_DEV} devices; found {jax.device_count()}")
    return parallel.data_mesh(jax.devices()[:N_DEV])


def _teacher():
    return MLPDenoiser(2, width=32, depth=1, emb_dim=8, key=jr.key(0))


def _data(key, shape=(B,)):
    """Two anisotropic clusters in 2-D."""
    k1, k2 = jr.split(key)
    centre = jnp.where(jr.bernoulli(k1, 0.5, shape)[..., None], jnp.array([1.0, 0.5]), jnp.array([-1.0, -0.5]))
    return centre + jr.normal(k2, shape + (2,)) * jnp.array([0.3, 0.1])


def _leaves(tree):
    return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def _host_leaves(tree):
    """`_leaves` as NumPy arrays: compared on the host, without compiling one program per operation and shape."""
    return [np.asarray(a) for a in _leaves(tree)]


def _compare(init, a, b):
    """Max abs and rel differences of two states and of their updates `state - init`."""
    la, lb, l0 = _host_leaves(a), _host_leaves(b), _host_leaves(init)
    diff = max(float(np.max(np.abs(u - v))) for u, v in zip(la, lb))
    rel = max(float(np.max(np.abs(u - v) / (np.abs(u) + ATOL))) for u, v in zip(la, lb))
    upd = max(float(np.max(np.abs(u - w))) for u, w in zip(la, l0))
    return {"max_abs": diff, "max_rel": rel, "update_scale": upd, "max_abs_over_update": diff / max(upd, 1e-30)}


# One update of each algorithm: `run(state, teacher, key, batch)` with the batch already placed.
# `batch` is `(x, x_prime)` for instant MM and `(ttur, B, 2)` real batches for DMD2.
ALGORITHMS = {
    "teacher": (
        lambda t: mmd.init_player(t, OPT),
        lambda k: _data(k),
        0,
        lambda s, t, k, x: mmd.teacher_step(s, x, k, optimiser=OPT, schedule=SCHED),
    ),
    "alternating": (
        lambda t: mmd.init_alternating(t, OPT),
        lambda k: _data(k),
        0,
        lambda s, t, k, x: mmd.alternating_step(s, t, x, k, cfg=MM, optimiser=OPT, schedule=SCHED),
    ),
    "instant": (
        lambda t: mmd.init_instant(t, OPT, jax.tree.map(jnp.ones_like, eqx.filter(t, eqx.is_inexact_array))),
        lambda k: (_data(k), _data(jr.fold_in(k, 1))),
        0,
        lambda s, t, k, xx: mmd.instant_step(
            s, t, jax.tree.map(jnp.ones_like, eqx.filter(t, eqx.is_inexact_array)), *xx, k,
            cfg=MM, optimiser=OPT, schedule=SCHED),
    ),
    "dmd2": (
        lambda t: dmd2.init_dmd2(t, jr.key(7), OPT, DMD, 32),
        lambda k: _data(k, (DMD.ttur, B)),
        1,
        lambda s, t, k, x: dmd2.dmd2_step(s, t, x, k, cfg=DMD, optimiser=OPT, schedule=SCHED),
    ),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_sharded_step_equals_single_device_step(mesh, name):
    init, draw, axis, run = ALGORITHMS[name]
    teacher = _teacher()
    state0, batch, key = init(teacher), draw(jr.key(1)), jr.key(2)

    state1, m1 = run(state0, teacher, key, batch)  # single device
    assert all(len(a.sharding.device_set) == 1 for a in _leaves(state1))

    sharded = parallel.shard_batch(batch, mesh, axis)
    state2, m2 = run(parallel.replicate(state0, mesh), parallel.replicate(teacher, mesh), key, sharded)

    # Inputs stayed split, outputs came back whole on every device.
    for x in jax.tree.leaves(sharded):
        assert x.sharding.shard_shape(x.shape)[axis] == B // N_DEV
    assert parallel.is_replicated(state2, mesh) and parallel.is_replicated(m2, mesh)
    assert all(bool(np.all(np.isfinite(a))) for a in _host_leaves(state2) + _host_leaves(m2))

    report = _compare(state0, state1, state2)
    metric_rel = [float(abs(u - v) / abs(u)) for u, v in zip(_host_leaves(m1), _host_leaves(m2))]
    print(name, report, "max rel metric difference", max(metric_rel))
    for u, v in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
        np.testing.assert_allclose(v, u, rtol=RTOL, atol=ATOL)
    for u, v in zip(_leaves(state1), _leaves(state2)):
        np.testing.assert_allclose(v, u, rtol=RTOL, atol=ATOL)
    assert report["update_scale"] > 1e3 * ATOL  # the step moved the parameters: the check is not vacuous


def test_one_device_slice_misses_the_tolerance(mesh):
    """Negative control: an update that sees only one device's slice (no cross-device mean) fails.

    The slice is tiled back to (B, 2) so that the already compiled single-device program is reused.
    """
    teacher = _teacher()
    state0, x, key = mmd.init_player(teacher, OPT), _data(jr.key(1)), jr.key(2)
    full, _ = mmd.teacher_step(state0, x, key, optimiser=OPT, schedule=SCHED)
    part, _ = mmd.teacher_step(state0, jnp.tile(x[: B // N_DEV], (N_DEV, 1)), key, optimiser=OPT, schedule=SCHED)
    report = _compare(state0, full, part)
    scale = max(float(np.max(np.abs(a))) for a in _host_leaves(full))
    assert report["max_abs"] > 100 * (ATOL + RTOL * scale), report


def test_short_sharded_training_run(mesh):
    """20 teacher steps as one `lax.scan` under `eqx.filter_jit`, data sharded along the batch axis.

    The compiled program also shows the split: its per-device batch is (B / 8, 2), the full (B, 2)
    never appears (no gather of the data), and it all-reduces (the batch means of loss and gradient).
    """
    opt = optax.adam(1e-2)
    steps = 20
    xs = parallel.shard_batch(_data(jr.key(3), (steps, B)), mesh, axis=1)  # (steps, B, 2)
    keys = jr.split(jr.key(4), steps)

    @eqx.filter_jit
    def train(state, xs, keys):
        step = lambda s, inp: mmd.teacher_step(s, inp[0], inp[1], optimiser=opt, schedule=SCHED)
        return mmd.scan_steps(step, state, (xs, keys))

    state0 = parallel.replicate(mmd.init_player(_teacher(), opt), mesh)
    compiled = train.lower(state0, xs, keys).compile()  # compile once: run it and read its HLO
    hlo = compiled.compiled.as_text()
    assert f"f32[{B // N_DEV},2]" in hlo and "all-reduce" in hlo
    assert f"f32[{B},2]" not in hlo and f"f32[{steps},{B},2]" not in hlo

    state, losses = compiled(state0, xs, keys)
    losses = np.asarray(losses)
    assert parallel.is_replicated(state, mesh) and np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses


@pytest.mark.slow  # ~30 s of XLA compilation for the two programs on CPU
def test_image_denoiser_sharded_step_with_labels(mesh):
    net = ImageDenoiser(8, 1, num_classes=10, width=32, depth=1, key=jr.key(0))
    opt = optax.sgd(0.05)
    state0 = mmd.init_player(net, opt)
    x = jnp.tanh(jr.normal(jr.key(1), (B, 8, 8, 1)))
    label = jr.randint(jr.key(2), (B,), 0, 10)
    step = lambda s, x, y: mmd.teacher_step(s, x, jr.key(3), optimiser=opt, schedule=net.schedule, label=y)
    state1, l1 = step(state0, x, label)
    state2, l2 = step(parallel.replicate(state0, mesh), *parallel.shard_batch((x, label), mesh))
    report = _compare(state0, state1, state2)
    print("image", report, "rel loss difference", float(abs(l1 - l2) / abs(l1)))
    assert parallel.is_replicated(state2, mesh)
    np.testing.assert_allclose(l2, l1, rtol=RTOL, atol=ATOL)
    for u, v in zip(_leaves(state1), _leaves(state2)):
        np.testing.assert_allclose(v, u, rtol=RTOL, atol=ATOL)
    assert report["update_scale"] > 1e3 * ATOL


_WORKER = """
import sys, numpy as np, jax, jax.random as jr
import parallel
assert parallel.maybe_initialize_distributed() and jax.process_count() == 2 and jax.device_count() == 8
import mmd, test_parallel as T
mesh = parallel.data_mesh()
state0 = mmd.init_player(T._teacher(), T.OPT)
state, loss = mmd.teacher_step(parallel.replicate(state0, mesh), parallel.shard_batch(T._data(jr.key(1)), mesh),
                               jr.key(2), optimiser=T.OPT, schedule=T.SCHED)
assert parallel.is_replicated(state, mesh)
leaves = [np.asarray(a.addressable_data(0)).ravel() for a in T._leaves(state)]
np.save(sys.argv[1], np.concatenate(leaves + [np.asarray(loss.addressable_data(0)).ravel()]))
"""


@pytest.mark.slow  # starts two Python processes (~20 s)
def test_two_processes_match_one_device(tmp_path):
    """Multi-controller path: 2 processes x 4 CPU devices, started through `JAX_COORDINATOR_ADDRESS`
    (so `maybe_initialize_distributed` and the cross-process branch of `shard_batch` / `replicate`
    run), give the single-device update."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / f"{i}.npy")], env=env,
                                      cwd=os.path.dirname(os.path.abspath(__file__)), stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]

    state, loss = mmd.teacher_step(mmd.init_player(_teacher(), OPT), _data(jr.key(1)), jr.key(2), optimiser=OPT, schedule=SCHED)
    want = np.concatenate([np.asarray(a).ravel() for a in _leaves(state)] + [np.asarray(loss).ravel()])
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"{i}.npy"), want, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Bad input and bookkeeping.


def test_indivisible_batch_raises_naming_both_numbers(mesh):
    for call in (
        lambda: parallel.shard_batch(jnp.zeros((60, 2)), mesh),
        lambda: parallel.shard_batch({"x": jnp.zeros((64, 2)), "y": jnp.zeros((60,))}, mesh),
        lambda: parallel.shard_batch(jnp.zeros((2, 60, 2)), mesh, axis=1),
        lambda: parallel.batch_split(60, mesh),
    ):
        with pytest.raises(ValueError, match=r"global batch 60 .* 8 devices"):
            call()
    with pytest.raises(ValueError, match="cannot shard axis 1"):
        parallel.shard_batch(jnp.zeros((64,)), mesh, axis=1)


def test_batch_split_and_description(mesh):
    assert parallel.batch_split(64, mesh) == 8
    d = parallel.describe_batch(64, mesh)
    assert (d["devices"], d["global_batch"], d["per_device_batch"], d["processes"]) == (8, 64, 8, 1)
    x = parallel.shard_batch(jnp.zeros((3, 64, 2)), mesh, axis=1)
    assert x.sharding.spec == P(None, "data") and x.sharding.shard_shape(x.shape) == (3, 8, 2)


def test_placed_like_puts_a_loaded_state_where_the_fresh_one_is(mesh):
    """A state read from a checkpoint (arrays on the default device, or numpy) is placed as the fresh state: the same
    sharding for every array, so a resumed phase runs the uninterrupted run's program; values and non-arrays kept."""
    fresh = parallel.replicate(mmd.init_player(_teacher(), OPT), mesh)
    loaded = jax.tree.map(lambda a: np.asarray(a) + 1 if eqx.is_array(a) else a, fresh)
    got = parallel.placed_like(loaded, fresh)
    assert jax.tree.structure(got) == jax.tree.structure(fresh) and parallel.is_replicated(got, mesh)
    for g, f, want in zip(_leaves(got), _leaves(fresh), _leaves(loaded)):
        assert g.sharding == f.sharding
        np.testing.assert_array_equal(np.asarray(g), want)


def test_replicate_leaves_non_arrays_alone(mesh):
    state = mmd.init_player(_teacher(), OPT)
    rep = parallel.replicate(state, mesh)
    assert jax.tree.structure(rep) == jax.tree.structure(state)
    assert parallel.is_replicated(rep, mesh) and not parallel.is_replicated(state, mesh)
    assert rep.model.embed.activation is state.model.embed.activation  # a function, untouched
    assert rep.model.sigma_data == state.model.sigma_data


LAUNCHER_VARS = ["JAX_COORDINATOR_ADDRESS", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"]


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, None),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # a one-task Slurm job is one machine
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, "slurm"),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
        ({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}, "tpu-pod"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ],
)
def test_multihost_detection(monkeypatch, env, want):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert parallel._multihost_environment() == want


def test_initialize_is_a_no_op_on_one_machine(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert parallel.maybe_initialize_distributed() is False
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_threefry_is_partitionable_so_noise_is_generated_per_slice(mesh):
    """`jr.normal(key, x.shape)` in a step: same numbers sharded or not, and no gather of random bits.

    With `jax_threefry_partitionable=False` the numbers are still sharding-invariant (jit semantics),
    but they differ from the default's, and the program moves random bits between devices.
    """
    assert jax.config.jax_threefry_partitionable
    f = jax.jit(lambda k, x: x + jr.normal(k, x.shape))  # (the jit cache keys on the flag)
    x = jnp.zeros((B, 2))
    xs = parallel.shard_batch(x, mesh)
    default = f(jr.key(3), x)
    np.testing.assert_array_equal(f(jr.key(3), xs), default)
    hlo = f.lower(jr.key(3), xs).compile().as_text()
    assert "all-gather" not in hlo and "collective-permute" not in hlo

    with jax.threefry_partitionable(False):
        legacy = f(jr.key(3), x)
        np.testing.assert_array_equal(f(jr.key(3), xs), legacy)
        assert not np.allclose(legacy, default)
        hlo = f.lower(jr.key(3), xs).compile().as_text()
        assert "all-gather" in hlo or "collective-permute" in hlo
