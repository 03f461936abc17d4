"""Corrupt input gets a one-line error and an exit code, never a traceback; nothing on disk is lost.

1. Checkpoints: unreadable, truncated, of another version, network or config: exit 2 before any training, naming
   the file, the phase and what to do; every checkpoint of a resumed run is checked up front; nothing changes.
2. Writes that fail (disk full, permission lost): the previous file stays intact and loadable, no temporary file
   is left, the message names the path and the OS error; exit 5.
3. Data files (`--data npz:FILE`): exit 2 naming the file, the array and what was expected; nothing is unpickled.
(The command line, fuzzed too, is test_cli.py, which uses the run directories made here.)

No test here trains: `run_phase` is replaced by `started` where `main` must get as far as its first training step,
and checkpoints are written from initial states.
"""

import dataclasses
import errno
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import parallel
import tasks
import train

HERE = Path(__file__).resolve().parent
TINY = dataclasses.replace(
    train.PRESETS["smoke"], width=16, depth=1, batch=32, teacher_steps=40, mm_train_steps=30, instant_train_steps=30,
    dmd2_train_steps=20,
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
# 1. Checkpoints.


def older_code(out):  # the .npz as the code before checkpoint metadata wrote it
    npz = out / "checkpoints" / "teacher.npz"
    np.savez(npz, seconds=1.0, loss=np.arange(10, dtype=np.float32))


def other_config(out):
    cfg = dataclasses.replace(TINY, teacher_lr=0.5)
    save(train.Run(out), "teacher", train.teacher_setup(cfg, tasks.make_task(cfg), parallel.data_mesh())[0],
         train.phase_fields(cfg, "teacher"))


def other_network(out):  # a network of another shape, under this run's config: another version of the code
    cfg = dataclasses.replace(TINY, width=8)
    save(train.Run(out), "teacher", train.teacher_setup(cfg, tasks.make_task(cfg), parallel.data_mesh())[0],
         train.phase_fields(TINY, "teacher"))


CHECKPOINT_CASES = {  # spoil(out), the phase named, what the message says
    "truncated state": (lambda out: truncate(out / "checkpoints" / "teacher.eqx"), "teacher", "truncated"),
    "empty state": (lambda out: truncate(out / "checkpoints" / "teacher.eqx", 0), "teacher", "truncated"),
    "garbage history": (lambda out: (out / "checkpoints" / "teacher.npz").write_text("x"), "teacher",
                        "teacher.npz is missing or not an .npz archive"),
    "no history": (lambda out: (out / "checkpoints" / "teacher.npz").unlink(), "teacher", "teacher.npz is missing"),
    "older code": (older_code, "teacher", "another version"),
    "other config": (other_config, "teacher", "teacher_lr = 0.5 there, 0.002 in this run"),
    "other network": (other_network, "teacher", "another network"),
    "later phase truncated": (lambda out: truncate(out / "checkpoints" / "mm_alternating_k2.eqx"), "mm_alternating_k2",
                              "truncated"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoint_stops_before_training(case, tmp_path, monkeypatch):
    """`--resume` of a run with one bad checkpoint: `CheckpointError` before the first training step (also when
    the bad one is a later phase's), naming file, phase and remedy in one line; no file changes."""
    out = tmp_path / "run"
    make_run(out)
    spoil, phase, why = CHECKPOINT_CASES[case]
    spoil(out)
    before = files(out)
    monkeypatch.setattr(train, "run_phase", started)
    cfg, got, _ = train.parse(["--resume", str(out)])
    with pytest.raises(ValueError) as e:
        train.main(cfg, train.Run(got))
    msg = str(e.value)
    assert type(e.value).__name__ == "CheckpointError", msg
    assert str(out / "checkpoints" / f"{phase}.eqx") in msg and f"phase {phase}" in msg and why in msg, msg
    assert "--overwrite" in msg and "delete" in msg and "\n" not in msg, msg
    assert files(out) == before


def test_good_checkpoints_resume(tmp_path, monkeypatch):
    """The same run, unspoilt, gets to the teacher's training (its checkpoint loads, config.json is left as it is)."""
    out = tmp_path / "run"
    make_run(out)
    before = files(out)
    monkeypatch.setattr(train, "run_phase", started)
    cfg, got, _ = train.parse(["--resume", str(out)])
    with pytest.raises(Started, match="teacher"):
        train.main(cfg, train.Run(got))
    assert files(out) == before


def test_truncated_checkpoint_cli(tmp_path):
    """A teacher.eqx cut to 100 bytes, then `python train.py --resume DIR` as a user runs it: exit 2, one line."""
    out = tmp_path / "run"
    make_run(out, phases=("teacher",))
    truncate(out / "checkpoints" / "teacher.eqx")
    before = files(out)
    p = subprocess.run([sys.executable, str(HERE / "train.py"), "--resume", str(out)], cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
    path = out / "checkpoints" / "teacher.eqx"
    assert f"error: checkpoint {path} of phase teacher" in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert files(out) == before


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    """At the level of `Run`: another shape, dtype or number of arrays is named; equinox alone would load an
    extra trailing array silently."""
    run = train.Run(tmp_path)
    run.save_phase("p", (jnp.zeros(3), jnp.zeros(2)), 4, {"loss": np.zeros(4)}, 1.0)
    for like, shown in [((jnp.zeros(4), jnp.zeros(2)), "array 0: [0] [3] float32 there, [0] [4] float32 in this run"),
                        ((jnp.zeros(3, jnp.int32), jnp.zeros(2)), "[0] [3] int32 in this run"),
                        ((jnp.zeros(3),), "array 1: [1] [2] float32 there, none in this run")]:
        with pytest.raises(ValueError, match="another network or code") as e:
            run.load_phase("p", like)
        assert shown in str(e.value), str(e.value)
    state, step, history, _ = run.load_phase("p", (jnp.zeros(3), jnp.zeros(2)))
    assert step == 4 and len(history["loss"]) == 4


@pytest.mark.parametrize("phase", ["mm_alternating_k2", "mm_instant_k2", "dmd2_k1", "dmd2_nogan_k1"])
def test_a_phase_resumes_across_changes_of_fields_it_does_not_read(phase, tmp_path):
    """An MM phase ignores DMD2's fields and a DMD2 phase MM's (and any phase what only scoring reads), and a
    field saved there that the phase no longer reads does not refuse it; a field it reads does."""
    run, state = train.Run(tmp_path), (jnp.zeros(3),)
    save(run, phase, state, train.phase_fields(TINY, phase))
    dmd2_phase = phase.startswith("dmd2")
    ignored = dict(mm_lr=0.5, zs_sampling="marginal", step_grid="cosine") if dmd2_phase else dict(ttur=7, gan=False)
    read = dict(ttur=7) if dmd2_phase else dict(mm_lr=0.5)
    for over in ({**ignored, "teacher_samplers": ("ancestral",), "n_samples": 3}, read, {"batch": 3}):
        fields = train.phase_fields(dataclasses.replace(TINY, **over), phase)
        if over is read or "batch" in over:
            with pytest.raises(ValueError, match=f"trained with another config \\({next(iter(over))} = "):
                run.load_phase(phase, state, fields)
        else:
            assert run.load_phase(phase, state, fields)[1] == 10
    stale = {**train.phase_fields(TINY, phase), "a_field_no_longer_read": 1}  # as an older code version saved it
    save(run, phase, state, stale)
    assert run.load_phase(phase, state, train.phase_fields(TINY, phase))[1] == 10
    # a field added to Config after the checkpoint was written: it was trained at the field's default
    new = "dmd2_ema" if dmd2_phase else "step_grid"
    save(run, phase, state, {k: v for k, v in train.phase_fields(TINY, phase).items() if k != new})
    assert run.load_phase(phase, state, train.phase_fields(TINY, phase))[1] == 10
    other = dict(dmd2_ema=0.5) if dmd2_phase else dict(step_grid="cosine")
    with pytest.raises(ValueError, match=f"{new} = {getattr(TINY, new)!r} there, {other[new]!r} in this run"):
        run.load_phase(phase, state, train.phase_fields(dataclasses.replace(TINY, **other), phase))


# ----------------------------------------------------------------------------------------------
# 2. Writes that fail.


def disk_full(target, *args, **kwargs):
    """Stands in for a writer (`np.savez(file)`, `eqx.tree_serialise_leaves(path)`): part of the file, then ENOSPC."""
    if isinstance(target, (str, os.PathLike)):
        Path(target).write_bytes(b"partial")
    else:
        target.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fails", ["history", "state"])
def test_failed_checkpoint_write_keeps_the_previous_one(fails, tmp_path, monkeypatch):
    """Disk full while writing the second chunk's checkpoint (its .npz, or its .eqx after the .npz): the first
    checkpoint still loads, at its step, with its history; no temporary file; the error names path and cause."""

    def step(x, key):
        return x + 1.0, {"loss": x.sum()}

    with pytest.raises(train.Stop):
        train.run_phase(train.Run(tmp_path, max_chunks=1), "p", jnp.zeros(3), step, 9, jr.key(0), 3)
    before = files(tmp_path)
    if fails == "history":
        monkeypatch.setattr(np, "savez", disk_full)
    else:
        monkeypatch.setattr(eqx, "tree_serialise_leaves", disk_full)
    run = train.Run(tmp_path)
    with pytest.raises(OSError) as e:
        train.run_phase(run, "p", jnp.zeros(3), step, 9, jr.key(0), 3)
    monkeypatch.undo()
    name = "p.npz" if fails == "history" else "p.eqx"
    msg = str(e.value)
    assert type(e.value).__name__ == "WriteError" and str(tmp_path / "checkpoints" / name) in msg, msg
    assert os.strerror(errno.ENOSPC) in msg and "\n" not in msg, msg
    assert not list(tmp_path.rglob("*.tmp"))
    after = files(tmp_path)
    assert after["checkpoints/p.eqx"] == before["checkpoints/p.eqx"]
    assert after == before or fails == "state"  # a state that failed after its history: a longer history, trimmed
    x, saved, history, _ = run.load_phase("p", jnp.zeros(3))
    assert saved == 3 and np.asarray(x).tolist() == [3.0] * 3 and history["loss"].tolist() == [0.0, 3.0, 6.0]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_report_write_keeps_the_previous_file(code, tmp_path):
    run = train.Run(tmp_path)
    run.write_text("report.md", "previous")

    def fail(path):
        Path(path).write_text("half a rep")
        raise OSError(code, os.strerror(code))

    with pytest.raises(OSError) as e:
        run.write("report.md", fail)
    assert type(e.value).__name__ == "WriteError"
    assert str(tmp_path / "report.md") in str(e.value) and os.strerror(code) in str(e.value)
    assert (tmp_path / "report.md").read_text() == "previous" and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("error, code", [("WriteError", 5), ("CheckpointError", 2), ("Stop", 3),
                                         ("FloatingPointError", 4)])
def test_cli_exit_codes(error, code, tmp_path, monkeypatch, capsys):
    """`train.cli` maps each expected failure to its exit code and one line (README, Reliability)."""
    exc = getattr(train, error, None) or FloatingPointError
    msg = f"could not write {tmp_path / 'x'}: {os.strerror(errno.ENOSPC)}" if code == 5 else "what happened"

    def main(cfg, run):
        raise exc(msg)

    monkeypatch.setattr(train, "main", main)
    assert train.cli(["--preset", "smoke", "--out", str(tmp_path / "out")]) == code
    out, err = capsys.readouterr()
    text = out if code == 3 else err
    assert msg in error_line(text) and "Traceback" not in err, (out, err)
    if code in (3, 5):
        assert f"--resume {tmp_path / 'out'}" in error_line(text)


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


def test_data_file_damaged_before_resume(tmp_path, monkeypatch, capsys):
    """The file of a resumed run's config, damaged since: exit 2 from `main`, before training, naming it."""
    data, out = tmp_path / "d.npz", tmp_path / "run"
    np.savez(data, images=IMAGES)
    out.mkdir()
    cfg = dataclasses.replace(train.IMAGE_PRESETS["smoke"], data=f"npz:{data}")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    data.write_text("x")
    before = files(tmp_path)
    monkeypatch.setattr(train, "run_phase", started)
    assert train.cli(["--resume", str(out)]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: ") and f"{data} is not an .npz" in line, line
    assert files(tmp_path) == before
