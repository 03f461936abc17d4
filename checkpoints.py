"""The run directory of `train.py`: atomic writes, per-phase checkpoints that are checked before they are
resumed, the stop flag that signals set, and `concurrently`, which runs phases side by side under that flag.

A checkpoint is `checkpoints/<phase>.eqx` (the state, `eqx.tree_serialise_leaves`) beside
`checkpoints/<phase>.npz` (loss history, seconds, and `meta`: a format version, the config fields the
phase depends on and the path, shape and dtype of every array). A checkpoint that does not match is
refused with a `CheckpointError` naming the file, the phase and the difference; nothing is deleted.
"""

import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np




class Stop(Exception):
    """Training stopped cleanly (signal or --max-chunks); the checkpoint is on disk."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, truncated, or written for another config, network or code."""


class WriteError(OSError):
    """Writing a file of the run failed (disk full, permissions); the previous version of the file is intact."""


CHECKPOINT_VERSION = 1  # bump when what a checkpoint holds changes; older checkpoints are then refused, by name
# Config fields the teacher phase depends on; a distillation phase depends on every field but NOT_TRAINING and
# the other algorithm's fields (DMD2_FIELDS or MM_FIELDS).
TEACHER_FIELDS = ("data", "dim", "teacher", "seed", "batch", "width", "depth", "teacher_steps", "teacher_lr",
                  "teacher_ema")
NOT_TRAINING = ("methods", "mm_steps", "dmd2_steps", "ablations", "teacher_ks", "teacher_samplers", "n_samples",
                "chunk", "jobs")


# Fields only DMD2 reads, and fields only the MM algorithms read: a phase of one does not depend on the other's.
DMD2_FIELDS = ("ttur", "gan", "backward_sim", "dmd2_train_steps", "dmd2_ema", "dmd2_lr", "dmd2_lr_decay")
MM_FIELDS = ("zs_sampling", "weighting", "mm_train_steps", "mm_train_steps_per_k", "mm_lr", "mm_aux_lr_per_k",
             "instant_train_steps", "nu_batch_mult", "data_grad_batches", "mm_ema", "step_grid")


def config_defaults():
    """`config.Config`'s default values, as JSON values (what `phase_fields` stores)."""
    from config import Config  # noqa: PLC0415 - config does not import this module; its users import both

    return json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(Config)}))


def phase_fields(cfg, name, overrides=None):
    """The config fields phase `name` depends on, as JSON values: stored beside its checkpoint, compared on resume.
    The teacher: TEACHER_FIELDS; a DMD2 phase (name `dmd2...`) every field but NOT_TRAINING and MM_FIELDS; an MM
    phase every field but NOT_TRAINING and DMD2_FIELDS."""
    c = dataclasses.asdict(dataclasses.replace(cfg, **(overrides or {})))
    other = MM_FIELDS if name.startswith("dmd2") else DMD2_FIELDS
    keep = TEACHER_FIELDS if name == "teacher" else [f for f in c if f not in NOT_TRAINING and f not in other]
    return json.loads(json.dumps({f: c[f] for f in keep}))


def tree_arrays(tree):
    """`[[path, shape, dtype], ...]` of the arrays in `tree`: what a checkpoint must match to load into it."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [[jax.tree_util.keystr(p), list(x.shape), str(x.dtype)] for p, x in leaves if hasattr(x, "dtype")]


def write_atomic(path: Path, write_fn):
    """Write `path` atomically: `write_fn(tmp_path)`, flush to disk, then rename over the target.

    If any of it fails the target keeps its previous content, the temporary file is removed, and
    `WriteError` names the target and the OS error.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:  # a crash after the rename must not leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(f"could not write {path}: {e.strerror or e}; its previous version, if any, is intact") from e
        raise


def copy_phase(src: Path, dst: Path, name):
    """Copy phase `name`'s checkpoint from directory `src` to `dst`, each file atomically and the `.eqx` last (as
    `Run.save_phase` writes them), so an interrupted copy leaves no checkpoint that loads."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in (f"{name}.npz", f"{name}.eqx"):
        write_atomic(dst / f, lambda p, f=f: shutil.copyfile(src / f, p))


class Run:
    """The output directory: atomic writes, per-phase checkpoints, and the stop flag set by signals.
    `teacher_cache`: a directory of trained teachers by config (`train.train_teacher`), or None."""

    def __init__(self, out: Path, max_chunks: Optional[int] = None, teacher_cache: Optional[Path] = None):
        self.out, self.ckpt = out, out / "checkpoints"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.stop_reason, self.chunks_left = None, max_chunks
        self.teacher_cache = teacher_cache
        self._lock = threading.Lock()  # phases trained at once (`concurrently`) share the chunk budget

    def write(self, name, write_fn):
        """Write `out/name` atomically (`write_atomic`)."""
        write_atomic(self.out / name, write_fn)

    def write_text(self, name, text):
        self.write(name, lambda p: Path(p).write_text(text))

    def write_npz(self, name, arrays):
        def write(p):
            with open(p, "wb") as f:
                np.savez(f, **arrays)

        self.write(name, write)

    def save_phase(self, name, state, step, history, seconds, fields=None):
        """Checkpoint: `name.npz` (loss history, seconds, and `meta`: version, `fields`, the state's arrays), then
        `name.eqx` (state, step). A crash in between leaves a longer history, trimmed on load."""
        meta = json.dumps({"version": CHECKPOINT_VERSION, "config": fields, "arrays": tree_arrays(state)})
        self.write_npz(f"checkpoints/{name}.npz", {"seconds": seconds, **history, "meta": np.array(meta)})
        self.write(f"checkpoints/{name}.eqx", lambda p: eqx.tree_serialise_leaves(p, (state, jnp.int32(step))))

    def load_phase(self, name, like, fields=None):
        """`(state, step, history, seconds)` from phase `name`'s checkpoint (`like`: a state of the right structure),
        or None if it has none yet. Raises `CheckpointError`, naming the file, the phase and what to do, if it is
        unreadable, truncated, of another version of this code, of another network, or trained with other `fields`."""
        path, npz = self.ckpt / f"{name}.eqx", self.ckpt / f"{name}.npz"
        if not path.exists():
            return None

        def refuse(why):
            return CheckpointError(f"checkpoint {path} of phase {name} cannot be resumed: {' '.join(str(why).split())}. "
                                   f"Nothing was changed; delete {path} and {npz} to retrain this phase, "
                                   f"or start the run afresh with --out {self.out} --overwrite")

        if not zipfile.is_zipfile(npz):  # (np.load would take any other file for a pickle, and say so)
            raise refuse(f"{npz.name} is missing or not an .npz archive")
        try:
            with np.load(npz, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
                if not (isinstance(meta, dict) and isinstance(meta.get("config") or {}, dict)
                        and isinstance(meta.get("arrays") or [], list)):
                    raise ValueError(f"malformed metadata {str(meta)[:80]}")
                history = {k: f[k] for k in f.files if k not in ("seconds", "meta")}
                seconds = float(f["seconds"])
        except Exception as e:  # a damaged file can fail in many ways (zip, zlib, npy header, JSON); all mean the same
            raise refuse(f"{npz.name} is unreadable ({type(e).__name__}: {e})") from e
        if meta.get("version") != CHECKPOINT_VERSION:
            raise refuse(f"written by another version of train.py (checkpoint format {meta.get('version')}, "
                         f"this code {CHECKPOINT_VERSION})")
        saved = meta.get("config") or {}
        # A field saved there that this phase does not read (now) is ignored. A field missing there was added to
        # Config after the checkpoint was written, with a default that keeps the old behaviour: it was that default.
        defaults = config_defaults()
        saved = {k: saved.get(k, defaults.get(k)) for k in fields or {}}
        diff = [f"{k} = {saved[k]!r} there, {v!r} in this run" for k, v in sorted((fields or {}).items())
                if saved[k] != v]
        if fields is not None and diff:
            raise refuse(f"trained with another config ({'; '.join(diff)})")
        have, want = meta.get("arrays") or [], tree_arrays(like)
        if have != want:
            i = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))

            def show(arrays):
                return " ".join(map(str, arrays[i])) if i < len(arrays) and isinstance(arrays[i], list) else "none"

            raise refuse(f"another network or code (array {i}: {show(have)} there, {show(want)} in this run)")
        try:
            state, step = eqx.tree_deserialise_leaves(path, (like, jnp.int32(0)))
        except Exception as e:  # truncated or overwritten: equinox wraps whatever numpy raised
            cause = e
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise refuse(f"truncated or damaged ({path.stat().st_size} bytes; {type(cause).__name__}: {cause})") from e
        step = int(step)
        if not all(len(v) >= step for v in history.values()):
            raise refuse(f"its state is at step {step} but {npz.name} holds a shorter loss history")
        return state, step, {k: v[:step] for k, v in history.items()}, seconds

    def count_chunk(self):
        with self._lock:
            if self.chunks_left is not None:
                self.chunks_left -= 1
                if self.chunks_left <= 0:
                    self.stop_reason = self.stop_reason or "--max-chunks reached"

    def check(self):
        """Raise `Stop` if a signal arrived or the chunk budget is spent (before each chunk and evaluation)."""
        if self.stop_reason:
            raise Stop(self.stop_reason)


def concurrently(run: Run, fns, jobs: int):
    """`[fn() for fn in fns]`, with up to `jobs` of them running at once in threads (jobs = 1: in turn, here).

    The toy networks' updates are thousands of small XLA operations, each too small to keep two CPU cores busy, so two
    phases at once take about half the time of one after the other (EXPERIMENTS.md#2026-12-06-two-phases-at-once). XLA
    releases Python's lock while it computes, and each phase computes exactly what it computes alone (its own programs,
    keys and checkpoints): the numbers do not depend on `jobs`. The first exception sets `run.stop_reason`, so that the
    other phases stop after their current chunk (checkpointed) and the waiting ones do not start; it is then raised."""

    def guarded(fn):
        run.check()
        try:
            return fn()
        except BaseException:
            run.stop_reason = run.stop_reason or "another phase stopped"
            raise

    if jobs == 1:
        return [fn() for fn in fns]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(guarded, fn) for fn in fns]
        concurrent.futures.wait(futures)
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:  # the cause, not the Stop it caused in the others
        raise next((e for e in errors if not isinstance(e, Stop)), errors[0])
    return [f.result() for f in futures]
