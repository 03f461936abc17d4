"""End-to-end tests of train.py: resume == uninterrupted, determinism, divergence, SIGTERM, the report (the command
line's bad input: test_cli.py; single phases: test_phases.py).

Everything runs a tiny configuration (`TINY`, seconds of training). One uninterrupted run (`run_a`) is shared by the
tests. The resumed and the CLI runs compile the same programs as `run_a`; conftest's persistent compilation cache
loads them instead. It changes no numbers (the cached executable is the one XLA compiled).
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import train

HERE = Path(__file__).resolve().parent

# Small enough to train in seconds, large enough that every phase has several chunks (so a run can stop mid-phase).
TINY = dataclasses.replace(
    train.PRESETS["smoke"], width=16, depth=1, batch=32, teacher_steps=40, mm_train_steps=30, instant_train_steps=30,
    dmd2_train_steps=20,
    mm_steps=(2,), dmd2_steps=(1,), ttur=2, teacher_ks=(1,), n_samples=1000, chunk=10, teacher_ema=0.9, jobs=1,
)  # teacher_ema > 0: the resume test below then covers the weight average too; jobs = 1: its stops fall where it says
#    (phases trained at once: test_phases_at_once_equal_the_run_in_turn)
SAMPLERS = {"teacher_ancestral", "teacher_ddim", *train.METHODS}
REPORT_FILES = ("report.json", "report.md", "samples.npz", "samples.png", "losses.png", "metric_vs_nfe.png")
METRICS = ("mmd2", "energy", "mode_precision", "mode_recall", "mode_tv", "avg_loglik")


# ----------------------------------------------------------------------------------------------
# Helpers and fixtures.


def phase_steps(cfg):
    """{phase name: number of training steps}."""
    out = {"teacher": cfg.teacher_steps}
    for name, method, k, _ in train.phases(cfg):
        out[name] = cfg.train_steps(method, k)
    return out


def checkpoint_steps(out: Path):
    """{phase name: steps done} from the checkpoints in `out` (the loss history has one entry per step)."""
    steps = {}
    for p in sorted((out / "checkpoints").glob("*.eqx")):
        with np.load(p.with_suffix(".npz")) as f:
            steps[p.stem] = len(f[next(k for k in f.files if k != "seconds")])
    return steps


def no_timing(report):
    """report.json without wall-clock times (sampling seconds, phase and compile seconds) and the number of phases
    trained at once, as a string."""
    rep = json.loads(json.dumps(report))
    for r in rep["samplers"].values():
        del r["sample_seconds"]
    for p in [rep["config"], *rep["phases"].values()]:
        p.pop("jobs", None)
    for p in rep["phases"].values():
        del p["seconds"], p["compile_seconds"]
    return json.dumps(rep, sort_keys=True)  # strings, so NaN == NaN


def load(out: Path):
    with np.load(out / "samples.npz") as f:
        samples = {k: f[k] for k in f.files}
    return samples, json.loads((out / "report.json").read_text())


def leftovers(out: Path):
    """Temporary files of `Run.write` left behind (there should be none)."""
    return sorted(str(p) for p in out.rglob(".*.tmp"))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """One uninterrupted run of `TINY`."""
    out = tmp_path_factory.mktemp("run_a")
    results = train.main(TINY, train.Run(out))
    return out, results


# ----------------------------------------------------------------------------------------------
# 1, 2. Resume == uninterrupted; determinism.


def test_teacher_cache_reuses_the_teacher_of_the_same_config(tmp_path, monkeypatch):
    """With a teacher cache, a run whose teacher config (`TEACHER_FIELDS`) was trained before copies that teacher
    (the same weights and history) instead of training it; a run with another seed trains and stores its own; a
    student-only change (methods) does not miss the cache."""
    cfg = dataclasses.replace(TINY, teacher_steps=20)
    task, mesh, cache = train.tasks.make_task(cfg), train.parallel.data_mesh(), tmp_path / "cache"
    first = train.train_teacher(train.Run(tmp_path / "a", teacher_cache=cache), cfg, task, mesh, jr.key(0))
    assert [p.name for p in cache.iterdir()] == [train.teacher_cache_dir(train.Run(tmp_path / "x", teacher_cache=cache), cfg).name]
    trained = []
    real = train.mmd.teacher_step
    monkeypatch.setattr(train.mmd, "teacher_step", lambda *a, **kw: trained.append(1) or real(*a, **kw))
    other = dataclasses.replace(cfg, methods=("dmd2",))
    again = train.train_teacher(train.Run(tmp_path / "b", teacher_cache=cache), other, task, mesh, jr.key(0))
    assert not trained and (tmp_path / "b" / "checkpoints" / "teacher.eqx").exists()
    assert eqx.tree_equal(jax.device_get(first[0]), jax.device_get(again[0])) is True
    np.testing.assert_array_equal(first[1]["loss"], again[1]["loss"])
    seed1 = dataclasses.replace(cfg, seed=1)
    train.train_teacher(train.Run(tmp_path / "c", teacher_cache=cache), seed1, task, mesh, jr.key(1))
    assert trained and len(list(cache.iterdir())) == 2


def test_resume_equals_uninterrupted(run_a, tmp_path):
    """Stop after every three chunks (via the CLI's --resume parsing), resume each time: bitwise the run of `run_a`.
    TINY's phases have 4, 3, 3 and 2 chunks: the teacher and both MM phases are stopped mid-way (30 of 40 steps, 20
    of 30, 20 of 30), as with stops after every two chunks, in 5 runs instead of 7."""
    a, b = run_a[0], tmp_path / "b"
    total = phase_steps(TINY)
    with pytest.raises(train.Stop, match="max-chunks"):
        train.main(TINY, train.Run(b, max_chunks=3))
    cfg, out, max_chunks = train.parse(["--resume", str(b), "--max-chunks", "3"])
    assert (cfg, out, max_chunks) == (TINY, b, 3)  # the saved config is the original one
    assert train.parse(["--resume", str(b)])[2] is None

    stops, last, finished = [checkpoint_steps(b)], list(total)[-1], False
    while True:
        assert stops[-1] and all(0 < s <= total[n] for n, s in stops[-1].items()), stops  # a checkpoint is on disk
        assert not [f for f in REPORT_FILES if (b / f).exists()] and not leftovers(b)  # no report yet, no debris
        if 0 < stops[-1].get(last, 0) < total[last] or len(stops) >= 10:
            break
        try:  # stop again: every phase's state goes through a checkpoint mid-way
            train.main(cfg, train.Run(out, max_chunks))
            finished = True
            break
        except train.Stop:
            stops.append(checkpoint_steps(b))
    for n in list(total)[:-1]:  # every phase but the last (DMD2's two chunks end with the run's fourth stop)
        assert any(0 < st.get(n, 0) < total[n] for st in stops), (n, stops)  # went through a checkpoint mid-way
    if not finished:
        train.main(cfg, train.Run(out))  # resume to the end, without --max-chunks
    assert checkpoint_steps(b) == total

    (sa, ra), (sb, rb) = load(a), load(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].tobytes() == sb[k].tobytes(), k
    assert no_timing(ra) == no_timing(rb)
    for p in sorted((a / "checkpoints").glob("*")):  # the final states (models + optimisers) and loss histories
        if p.suffix == ".eqx":
            assert p.read_bytes() == (b / "checkpoints" / p.name).read_bytes(), p.name
        else:
            with np.load(p) as fa, np.load(b / "checkpoints" / p.name) as fb:
                assert fa.files == fb.files
                for k in fa.files:
                    if k != "seconds":
                        assert fa[k].tobytes() == fb[k].tobytes(), (p.name, k)


def test_run_phase_chunking_and_resume_do_not_change_numbers(tmp_path):
    """Step i uses fold_in(key, i): chunk sizes and a stop + resume give bitwise the same state and history."""

    def step(state, key):
        new = 0.9 * state + jr.normal(key, state.shape)
        return new, {"loss": jnp.sum(new**2)}

    state, key = jnp.zeros(3), jr.key(7)
    ref_state, ref_hist, _ = train.run_phase(train.Run(tmp_path / "a"), "p", state, step, 10, key, 10)
    got_state, got_hist, _ = train.run_phase(train.Run(tmp_path / "b"), "p", state, step, 10, key, 3)
    with pytest.raises(train.Stop):
        train.run_phase(train.Run(tmp_path / "c", max_chunks=1), "p", state, step, 10, key, 4)
    assert checkpoint_steps(tmp_path / "c") == {"p": 4}
    res_state, res_hist, _ = train.run_phase(train.Run(tmp_path / "c"), "p", state, step, 10, key, 4)
    for s, h in ((got_state, got_hist), (res_state, res_hist)):
        assert np.asarray(s).tobytes() == np.asarray(ref_state).tobytes()
        assert h["loss"].tobytes() == ref_hist["loss"].tobytes() and len(h["loss"]) == 10


# The same seed twice giving the same samples is test_resume_equals_uninterrupted (run_a against the resumed run);
# a different seed is test_different_seed_gives_different_samples, on the CLI run below.


def test_phases_at_once_equal_the_run_in_turn(run_a, tmp_path):
    """jobs = 2: the distillation phases train two at a time (threads). Stopped by a chunk budget that the phases share,
    then resumed, the run gives bitwise `run_a`'s samples and report (trained in turn)."""
    cfg, b = dataclasses.replace(TINY, jobs=2), tmp_path / "b"
    total = phase_steps(cfg)
    with pytest.raises(train.Stop, match="max-chunks"):
        train.main(cfg, train.Run(b, max_chunks=total["teacher"] // cfg.chunk + 2))
    stopped = checkpoint_steps(b)
    assert stopped["teacher"] == total["teacher"] and 0 < sum(stopped.values()) < sum(total.values()), stopped
    train.main(cfg, train.Run(b))
    (sa, ra), (sb, rb) = load(run_a[0]), load(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].tobytes() == sb[k].tobytes(), k
    assert no_timing(ra) == no_timing(rb)
    assert {p.get("jobs") for n, p in rb["phases"].items() if n != "teacher"} == {2}


def test_concurrently_runs_jobs_at_once_and_keeps_the_order(tmp_path):
    """Four functions that each wait for another one to be running: they finish only if two run at once."""
    meet = threading.Barrier(2, timeout=20)
    fns = [lambda i=i: (meet.wait(), i)[1] for i in range(4)]
    assert train.concurrently(train.Run(tmp_path), fns, 2) == [0, 1, 2, 3]
    assert train.concurrently(train.Run(tmp_path), [lambda i=i: i for i in range(3)], 1) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# 3. Divergence.


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A huge teacher learning rate, one step per chunk: the loss goes non-finite a few steps in (step 0 is
    finite: the warm-up starts at lr 0). Returns the run, the error and the teacher's initial state."""
    initial, real = {}, train.run_phase  # the state each phase starts from: the template to load its checkpoint

    def spy(run, name, state, *args, **kwargs):
        initial[name] = state
        return real(run, name, state, *args, **kwargs)

    cfg = dataclasses.replace(TINY, teacher_lr=1e6, chunk=1)
    run = train.Run(tmp_path_factory.mktemp("diverged"))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(FloatingPointError) as e:
        mp.setattr(train, "run_phase", spy)
        train.main(cfg, run)
    return run, str(e.value), initial["teacher"]


def test_divergence_names_phase_step_value_and_keeps_last_good_checkpoint(diverged):
    run, msg, like = diverged
    # either a loss went non-finite, or (checked after each chunk) the weights did
    m = re.search(r"phase (\S+): (?:(\w+) = (\S+) at step (\d+)|non-finite weights after step (\d+) \(losses [^)]*\))", msg)
    assert m, msg
    assert m[1] == "teacher" and (m[2] is None or (m[2] == "loss" and not np.isfinite(float(m[3]))))
    failed = int(m[4] or m[5])
    assert str(run.ckpt) in msg
    assert not leftovers(run.out) and not [f for f in REPORT_FILES if (run.out / f).exists()]
    assert failed > 0, "diverged in the first chunk: make it diverge later to test the checkpoint"
    _, saved, history, _ = run.load_phase("teacher", like)  # loads
    assert saved <= failed and f"(step {saved})" in msg  # the end of the last chunk that was all finite
    assert len(history["loss"]) == saved and np.isfinite(history["loss"]).all()


def test_divergence_last_good_checkpoint_is_finite(diverged):
    run, _, like = diverged
    state = run.load_phase("teacher", like)[0]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(eqx.filter(state, eqx.is_array)))


def test_run_phase_nan_in_a_later_chunk(tmp_path):
    """Synthetic phase whose loss is NaN from step 7 on (chunks of 3): error at step 7, checkpoint of step 6 stays."""

    def step(count, key):
        return count + 1, {"loss": jnp.where(count >= 7, jnp.nan, count.astype(jnp.float32))}

    run = train.Run(tmp_path)
    for _ in range(2):  # and again from the checkpoint: same error, checkpoint unchanged
        with pytest.raises(FloatingPointError, match=r"phase fake: loss = nan at step 7; .*\(step 6\)"):
            train.run_phase(run, "fake", jnp.int32(0), step, 20, jr.key(0), 3)
        count, saved, history, _ = run.load_phase("fake", jnp.int32(0))
        assert (int(count), saved) == (6, 6)
        np.testing.assert_array_equal(history["loss"], np.arange(6, dtype=np.float32))
        assert not leftovers(tmp_path)


def test_run_phase_never_checkpoints_a_non_finite_state(tmp_path):
    """The update of step 5 (the last of the chunk 3..5) makes the state NaN; step 5's loss is still finite."""

    def step(x, key):
        return jnp.where(x >= 5, jnp.nan, x + 1), {"loss": x}

    run = train.Run(tmp_path)
    with pytest.raises(FloatingPointError, match="phase fake"):
        train.run_phase(run, "fake", jnp.float32(0), step, 20, jr.key(0), 3)
    x, saved, _, _ = run.load_phase("fake", jnp.float32(0))
    assert np.isfinite(x) and saved <= 5


def test_a_diverging_phase_stops_the_phases_beside_it(tmp_path):
    """Two phases at once: `bad` goes NaN at step 7; `good`, 3,000 one-step chunks, stops after its current chunk with
    its checkpoint on disk, and the phase waiting for a free thread never starts. The error raised is `bad`'s."""

    def bad(count, key):
        return count + 1, {"loss": jnp.where(count >= 7, jnp.nan, count.astype(jnp.float32))}

    def good(count, key):
        return count + 1, {"loss": count.astype(jnp.float32)}

    run, started = train.Run(tmp_path), []
    fns = [lambda: train.run_phase(run, "good", jnp.int32(0), good, 3000, jr.key(0), 1),
           lambda: train.run_phase(run, "bad", jnp.int32(0), bad, 20, jr.key(0), 3),
           lambda: started.append("waiting")]
    with pytest.raises(FloatingPointError, match=r"phase bad: loss = nan at step 7"):
        train.concurrently(run, fns, 2)
    count, saved, history, _ = run.load_phase("good", jnp.int32(0))
    assert 0 < saved < 3000 and int(count) == saved and len(history["loss"]) == saved
    assert not started and run.stop_reason == "another phase stopped" and not leftovers(tmp_path)


# ----------------------------------------------------------------------------------------------
# 4. SIGTERM and --resume through the real CLI (subprocesses).

CLI_CFG = dataclasses.replace(TINY, seed=1, methods=("mm_alternating",))


def _wait_for(cond, proc, timeout):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`python train.py --resume DIR` of a tiny saved config; SIGTERM at the first checkpoint; `--resume DIR` again.

    (The CLI's presets are too large for a test, so the run starts from a config.json written here: the same
    path as continuing a run. Parsing of --preset / --out is tested in-process below.)
    """
    out = tmp_path_factory.mktemp("cli") / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(CLI_CFG), indent=1))
    env, rec = dict(os.environ), {"out": out}
    cmd = [sys.executable, str(HERE / "train.py"), "--resume", str(out)]
    log = out.parent
    with open(log / "1.out", "w") as o, open(log / "1.err", "w") as e:
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=o, stderr=e)
        try:
            rec["checkpoint_appeared"] = _wait_for((out / "checkpoints" / "teacher.eqx").exists, proc, 120)
            proc.send_signal(signal.SIGTERM)
            rec["rc1"] = proc.wait(timeout=120)
        finally:
            proc.kill()
    rec["out1"], rec["err1"] = (log / "1.out").read_text(), (log / "1.err").read_text()
    rec["steps_at_stop"] = checkpoint_steps(out)
    rec["report_at_stop"] = [f for f in REPORT_FILES if (out / f).exists()]
    p = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    rec["rc2"], rec["out2"], rec["err2"] = p.returncode, p.stdout, p.stderr
    return rec


def test_sigterm_stops_cleanly_and_resume_finishes(cli_run):
    r = cli_run
    assert r["checkpoint_appeared"], r["err1"][-3000:]
    assert r["rc1"] == 3, r["err1"][-3000:]
    assert f"Continue with: python train.py --resume {r['out']}" in r["out1"]
    assert "signal SIGTERM" in r["out1"]
    assert r["steps_at_stop"].get("teacher", 0) > 0  # a checkpoint is on disk
    assert not r["report_at_stop"]
    assert not leftovers(r["out"])
    assert r["rc2"] == 0, r["err2"][-3000:]
    assert "report.md" in r["out2"]
    assert (r["out"] / "report.md").stat().st_size > 0
    assert checkpoint_steps(r["out"]) == phase_steps(CLI_CFG)
    written = json.loads(json.dumps(dataclasses.asdict(CLI_CFG)))
    saved = json.loads((r["out"] / "config.json").read_text())
    assert {k: saved.get(k) for k in written} == written  # the run kept the config it was resumed with


def test_different_seed_gives_different_samples(run_a, cli_run):
    """CLI_CFG is TINY with seed 1 and only mm_alternating (phase 0 in both): teacher_* and mm_alternating_k2
    samples depend on nothing else, so they would be equal if the seed were ignored."""
    assert cli_run["rc2"] == 0
    sa, _ = load(run_a[0])
    sc, _ = load(cli_run["out"])
    assert set(sc) == {f"teacher_{s}_k1" for s in ("ancestral", "ddim")} | {"mm_alternating_k2"}
    for k in sc:
        assert sc[k].shape == sa[k].shape
        assert not np.allclose(sc[k], sa[k]), k


# ----------------------------------------------------------------------------------------------
# 5. The report.


def test_report_files(run_a):
    out, results = run_a
    samples, report = load(out)
    expected = {f"teacher_{s}_k{k}" for s in ("ancestral", "ddim") for k in TINY.teacher_ks}
    expected |= {f"{m}_k{k}" for m in train.METHODS for k in (TINY.dmd2_steps if m == "dmd2" else TINY.mm_steps)}
    assert set(samples) == expected
    assert {n.rsplit("_k", 1)[0] for n in samples} == SAMPLERS
    for n, x in samples.items():
        assert x.dtype == np.float32 and x.shape == (TINY.n_samples, 2), n
        assert np.isfinite(x).all(), n

    assert report["config"] == json.loads(json.dumps(dataclasses.asdict(TINY)))
    assert set(report["samplers"]) == expected
    for n, r in report["samplers"].items():
        k = int(n.rsplit("_k", 1)[1])
        assert set(METRICS) <= set(r) and r["k"] == r["nfe"] == k and r["sample_seconds"] > 0, n
        assert r == pytest.approx(results[n], nan_ok=True)
    assert set(report["phases"]) == set(phase_steps(TINY))
    for n, p in report["phases"].items():
        assert p["seconds"] > 0 and p["final"] and all(isinstance(v, float) for v in p["final"].values()), n
    assert report["claims"] and all(set(c) == {"claim", "measured", "held"} for c in report["claims"])
    assert report["primary"] == "mmd2" and "targets" not in report  # thresholds: `benchmarks.py targets`
    assert set(METRICS) <= set(report["floor"])

    md = (out / "report.md").read_text()
    assert all(n in md for n in expected) and "## Claims" in md
    for f in ("samples.png", "losses.png", "metric_vs_nfe.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    assert checkpoint_steps(out) == phase_steps(TINY)
    assert (out / "checkpoints" / "teacher.eqx").stat().st_size > 0
    assert not (out / "samples_ablations.npz").exists()
    assert not leftovers(out)


# ----------------------------------------------------------------------------------------------
# 6. The smoke presets end to end: `python train.py --data digits --preset smoke` (and, behind `slow`, `--preset smoke`).


# ring8's run goes behind `slow` (2 minutes of a 2-core CPU): `run_a` and `cli_run` above run the same toy pipeline,
# in-process and through the CLI. digits' is the one end-to-end run of the image path (UViT, classifier, FD).
@pytest.mark.parametrize("data", [pytest.param("ring8", marks=pytest.mark.slow), "digits"])
def test_smoke_preset_end_to_end(tmp_path, data):
    out = tmp_path / data
    cmd = [sys.executable, str(HERE / "train.py"), "--data", data, "--preset", "smoke", "--out", str(out)]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    samples, report = load(out)
    cfg = (train.IMAGE_PRESETS if data == "digits" else train.PRESETS)["smoke"]
    want = {f"teacher_{s}_k{k}" for s in cfg.teacher_samplers for k in cfg.teacher_ks}  # digits: ancestral only
    want |= {name for name, *_ in train.phases(cfg)}
    assert set(samples) == want and set(report["samplers"]) == want
    primary = "fd" if data == "digits" else "mmd2"
    for name, r in report["samplers"].items():
        assert np.isfinite(r[primary]), (name, r)
        assert samples[name].shape[0] == cfg.n_samples and np.isfinite(samples[name]).all()
    if data == "digits":  # class-conditional samples are scored by the digits classifier
        assert all(0.0 <= r["acc"] <= 1.0 for r in report["samplers"].values())
        assert report["floor"]["fd"] < min(r["fd"] for r in report["samplers"].values())
