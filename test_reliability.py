"""Corrupt input gets a one-line error and an exit code, never a traceback; nothing on disk is lost.

1. Checkpoints: unreadable, truncated, of another version, network or config: exit 2 before any training, naming
   the file, the phase and what to do; every checkpoint of a resumed run is checked up front; nothing changes.
2. Writes that fail (disk full, permission lost): the previous file stays intact and loadable, no temporary file
   is left, the message names the path and the OS error; exit 5.
3. Data files (`--data npz:FILE`): exit 2 naming the file, the array and what was expected; nothing is unpickled.
4. The CLI under fuzzing: any mix of flags, valid or not, either starts training or exits 2 naming a bad value,
   and leaves every file that existed untouched.

No test here trains: `run_phase` is replaced by `started` where `main` must get as far as its first training step,
and checkpoints are written from initial states.
"""

import dataclasses
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import parallel
import tasks
import train

HERE = Path(__file__).resolve().parent
TINY = dataclasses.replace(
    train.PRESETS["smoke"], width=16, depth=1, batch=32, teacher_steps=40, mm_train_steps=30, dmd2_train_steps=20,
    mm_steps=(2,), dmd2_steps=(1,), ttur=2, teacher_ks=(1,), n_samples=1000, chunk=10,
)


class Started(Exception):
    """`main` reached its first training step."""


def started(run, name, *args, **kwargs):
    raise Started(name)


def files(root: Path):
    """{path relative to root: (bytes, mtime in ns)} of every file under `root`."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def make_run(out: Path, cfg=TINY, phases=("teacher", "mm_alternating_k2")):
    """A run directory as a stopped run leaves it: config.json and checkpoints at step 10 of `phases`, written
    from initial states (no training)."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    run, task, mesh = train.Run(out), tasks.make_task(cfg), parallel.data_mesh()
    teacher = train.teacher_setup(cfg, task, mesh)[0]
    states = {"teacher": (teacher, {})}
    for name, method, k, overrides in train.phases(cfg):
        states[name] = (train.distil_setup(cfg, method, k, overrides, task, None, teacher.model, None, mesh)[0], overrides)
    for name in phases:
        state, overrides = states[name]
        save(run, name, state, train.phase_fields(cfg, name, overrides))
    return run


def save(run, name, state, fields):
    run.save_phase(name, state, 10, {"loss": np.arange(10, dtype=np.float32)}, 1.0, fields)


def error_line(err: str):
    lines = err.strip().splitlines()
    return lines[-1] if lines else ""


def truncate(path: Path, n=100):
    path.write_bytes(path.read_bytes()[:n])


# ----------------------------------------------------------------------------------------------
# 3. Data files.

IMAGES = np.zeros((6, 8, 8, 1), np.uint8)


def npy_bytes(x):
    f = io.BytesIO()
    np.save(f, x)
    return f.getvalue()


def npz(**arrays):
    return lambda path: np.savez(path, **arrays)


def damaged(path):  # a valid zip directory over array bytes that fail their CRC
    np.savez(path, images=np.full_like(IMAGES, 7))
    raw = bytearray(path.read_bytes())
    i = raw.index(bytes([7] * 16))
    raw[i:i + 16] = bytes(16)
    path.write_bytes(bytes(raw))


DATA_CASES = {  # write(path), [what the message must contain; {p} is the file]
    "one byte of text": (lambda p: p.write_text("x"), ["{p} is not an .npz", "'images' (N, H, W, C)"]),
    "an .npy": (lambda p: p.write_bytes(npy_bytes(IMAGES)), ["{p} is not an .npz"]),
    "a truncated .npz": (lambda p: (npz(images=IMAGES)(p), truncate(p, 300)), ["{p} is not an .npz"]),
    "a damaged .npz": (damaged, ["cannot read array 'images' of {p}", "numeric arrays"]),
    "no images": (npz(pictures=IMAGES), ["{p} has no 'images' array", "['pictures']"]),
    "object images": (npz(images=np.array([None] * 6, dtype=object)), ["array 'images' of {p}", "Object arrays"]),
    "rank 3": (npz(images=IMAGES[..., 0]), ["images in {p} must be 4-D (N, H, W, C)"]),
    "complex dtype": (npz(images=IMAGES.astype(np.complex64)), ["images in {p} must be uint8", "complex64"]),
    "bool dtype": (npz(images=IMAGES.astype(bool)), ["images in {p} must be uint8", "bool"]),
    "floats in [0, 255]": (npz(images=IMAGES + np.float32(255)), ["images in {p} must already be in [-1, 1]"]),
    "too few images": (npz(images=IMAGES[:2]), ["images in {p} holds 2 images; need at least 4"]),
    "labels too short": (npz(images=IMAGES, labels=np.arange(5)), ["labels in {p} must have shape (6,)"]),
    "labels too large": (npz(images=IMAGES, labels=np.full(6, 10**6)), ["labels in {p} must be in 0..999"]),
    "negative labels": (npz(images=IMAGES, labels=-np.arange(6)), ["labels in {p} must be in 0..999", "-5"]),
    "text labels": (npz(images=IMAGES, labels=np.array(list("abcdef"))), ["labels in {p} must be integers", "<U1"]),
    "fractional labels": (npz(images=IMAGES, labels=np.full(6, 0.5)), ["labels in {p} must be integers"]),
    "object labels": (npz(images=IMAGES, labels=np.array([None] * 6, dtype=object)),
                      ["array 'labels' of {p}", "Object arrays"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_npz_exits_2_naming_file_array_and_expectation(case, tmp_path, monkeypatch, capsys):
    write, expected = DATA_CASES[case]
    path = tmp_path / "data.npz"
    write(path)
    before = files(tmp_path)

    def no_pickle(*args, **kwargs):
        raise AssertionError("unpickled a data file")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.parse(["--data", f"npz:{path}", "--preset", "smoke", "--out", str(out)])
    line = error_line(capsys.readouterr().err)
    assert e.value.code == 2 and "error:" in line, line
    for s in expected:
        assert s.format(p=path) in line, line
    assert files(tmp_path) == before  # out was not created
