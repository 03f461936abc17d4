"""Data parallelism with `jax.sharding`: the step functions of `mmd.py` run unchanged.

Shard the batch over a 1-D device mesh, replicate parameters and optimiser state, and call the
existing `eqx.filter_jit` steps. XLA's SPMD partitioner then runs the per-example work on each
device's slice of the batch and inserts the all-reduce that the batch means (losses, gradients)
need; parameters and optimiser state come out replicated. No `pmap`, no `psum` in the losses.

    mesh = data_mesh()                                   # ("data",): all devices
    state = replicate(mmd.init_player(net, opt), mesh)   # (and the teacher, preconditioner, ...)
    x = shard_batch(x, mesh)                             # (B, *data); DMD2's (ttur, B, *data): axis=1
    state, loss = mmd.teacher_step(state, x, key, optimiser=opt, schedule=schedule)

Two facts this relies on:

- The mesh axis is `AxisType.Auto` (the compiler chooses intermediate shardings). `jax.make_mesh`
  defaults to `Explicit` axes (jax 0.10.2); under those, shardings are part of array types and
  `jax.vmap(model)(z, t)` with `z` sharded and `t` replicated raises "Mapped away dimension of
  inputs passed to vmap should be sharded the same", so the unchanged steps would not run.
- Random numbers do not depend on the sharding: `jr.normal(key, x.shape)` inside a step gives the
  same array whether `x` is sharded or not (jit semantics are sharding-invariant for either value
  of `jax_threefry_partitionable`). The flag changes how it is computed: with `True` (the
  default in recent jax; True in 0.10.2) each device generates only its own `(B / n, *data)`
  block, with no communication; with `False` the compiled program generates bits for the whole
  batch and moves them between devices (all-gather / dynamic-slice in the HLO). The flag does
  change the numbers themselves (a different bit stream), so compare runs only under the same
  setting; we leave the default. `test_parallel.py` checks both halves.

Multi-process (one controller per host): call `maybe_initialize_distributed()` first, then pass
the same global batch on every process. Checked on CPU with 2 processes x 4 devices (Gloo, JAX's
default CPU collectives) in the slow test `test_two_processes_match_one_device`; not on GPU/TPU.
"""

import os
from typing import Optional

import equinox as eqx
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"  # the mesh axis the batch is split over


# ----------------------------------------------------------------------------------------------
# Multi-host start-up.


def _multihost_environment() -> Optional[str]:
    """Name of the multi-process launcher this process runs under, or None on a single machine.

    Checked, in order (each means more than one process; a one-task job counts as single-machine):
    - `JAX_COORDINATOR_ADDRESS` (read by `jax.distributed.initialize` itself): an explicit setup,
      with `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` (our names, passed on) or a launcher below for the rest;
    - Slurm: `SLURM_NTASKS > 1` with `SLURM_PROCID` (one task per process, as `srun` starts them);
    - Open MPI: `OMPI_COMM_WORLD_SIZE > 1` (`mpirun` / `mpiexec`);
    - Cloud TPU pod slices: `TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES` listing more than one
      host (GKE sets them; on a GCE TPU VM without them, call `jax.distributed.initialize()` yourself).
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu-pod"
    return None


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` if a multi-process launcher is detected; else do nothing.

    Must run before any other JAX computation. Returns whether the distributed runtime is up.
    See `_multihost_environment` for the variables read; on one machine none of them is set.
    """
    if jax.distributed.is_initialized():
        return True
    launcher = _multihost_environment()
    if launcher is None:
        return False
    kw = {}
    if launcher == "JAX_COORDINATOR_ADDRESS":
        for name, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if os.environ.get(var):
                kw[name] = int(os.environ[var])
    jax.distributed.initialize(**kw)  # the coordinator address and the rest are auto-detected
    return True


# ----------------------------------------------------------------------------------------------
# Mesh, placement.


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis `"data"` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,), devices=devices)


def _put(x, sharding: NamedSharding):
    """`jax.device_put`, or, when the mesh spans other processes, build the global array from the
    same global value `x` held by every process (each process fills its own devices)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def batch_split(global_batch: int, mesh: Mesh) -> int:
    """Per-device batch `global_batch / devices`; raises `ValueError` if it does not divide."""
    n = mesh.shape[DATA]
    if global_batch % n:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n} (e.g. {max(n, global_batch - global_batch % n)})"
        )
    return global_batch // n


def describe_batch(global_batch: int, mesh: Mesh) -> dict:
    """What a report should say about the split: devices, processes, global and per-device batch."""
    return {
        "devices": mesh.shape[DATA],
        "processes": jax.process_count(),
        "global_batch": global_batch,
        "per_device_batch": batch_split(global_batch, mesh),
        "platform": mesh.devices.flat[0].platform,
    }


def shard_batch(x, mesh: Mesh, axis: int = 0):
    """Place a batch (an array or a pytree of arrays) on `mesh`, split along `axis` over `"data"`.

    `axis=0` for `(B, *data)` batches and `(B,)` labels; `axis=1` for DMD2's `(ttur, B, *data)`.
    In a multi-process run every process passes the same global batch (e.g. drawn from the same
    key); each keeps only its devices' slices.
    """
    def put(leaf):
        if leaf.ndim <= axis:
            raise ValueError(f"cannot shard axis {axis} of an array of shape {leaf.shape}")
        batch_split(leaf.shape[axis], mesh)
        spec = P(*([None] * axis), DATA)  # e.g. axis=1 -> P(None, "data"); later axes replicated
        return _put(leaf, NamedSharding(mesh, spec))

    return jax.tree.map(put, x)


def replicate(tree, mesh: Mesh):
    """Copy every array of `tree` (parameters, optimiser state, a teacher, ...) to every device.

    Non-array leaves (activation functions, static config, `None`) are left as they are.
    """
    dynamic, static = eqx.partition(tree, eqx.is_array)
    replicated = NamedSharding(mesh, P())
    return eqx.combine(jax.tree.map(lambda a: _put(a, replicated), dynamic), static)


def placed_like(tree, like):
    """`tree` with each array placed as the same array of `like` (its devices and sharding); other leaves as they are.

    A state read from a checkpoint lands on the default device; placed as the fresh state was, a resumed phase runs
    the very program that an uninterrupted run compiled (on a mesh, a differently placed input compiles another).
    """
    return jax.tree.map(lambda a, b: _put(a, b.sharding) if isinstance(b, jax.Array) and eqx.is_array(a) else a,
                        tree, like)


def is_replicated(tree, mesh: Mesh) -> bool:
    """True if every array leaf of `tree` holds the whole value on every device of `mesh`."""
    devices = set(mesh.devices.flat)
    return all(
        a.sharding.is_fully_replicated and a.sharding.device_set == devices
        for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    )


def constrain_batch(x, mesh: Mesh, axis: int = 0):
    """Inside `jit`: ask XLA to keep a batch drawn in the step split along `axis` over `"data"`.

    The in-step counterpart of `shard_batch` (for data sampled inside a `lax.scan` of steps); a no-op
    on a one-device mesh. Leaves of rank <= axis (e.g. `None` labels) are left alone.
    """
    if mesh.size == 1:
        return x
    spec = lambda leaf: NamedSharding(mesh, P(*([None] * axis), DATA))
    return jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(leaf, spec(leaf)), x)
