"""The command line (`config.parse`, `train.cli`): every bad flag, value or combination exits 2 with a one-line
error naming it, before anything is written or deleted; good ones give the Config they say; under fuzzing any mix
of flags either reaches the first training step or exits 2, and leaves every file that existed untouched.
No test here trains (`run_phase` is replaced where `main` must get as far as its first training step).
"""

import dataclasses
import io
import json
import os
import re
import shutil
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import tasks
import train
from test_reliability import IMAGES, TINY, Started, error_line, files, make_run, started, truncate

# ----------------------------------------------------------------------------------------------
# 1. Bad input: a clear error naming the value, before anything is written; good input, the Config it says.


def test_existing_out_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as e:
        train.parse(["--preset", "smoke", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "--overwrite" in err, err
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    cfg, got, _ = train.parse(["--preset", "smoke", "--out", str(out), "--overwrite"])
    assert (cfg, got) == (train.PRESETS["smoke"], out)


def test_out_not_writable(tmp_path, capsys):
    parent = tmp_path / "a-file"
    parent.write_text("x")
    out = parent / "out"  # a path under a regular file: fails even as root
    with pytest.raises(SystemExit) as e:
        train.parse(["--preset", "smoke", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "cannot write to --out" in err and str(out) in err, err
    assert parent.read_text() == "x"


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "a-file"
    out.write_text("x")
    with pytest.raises(SystemExit) as e:
        train.parse(["--preset", "smoke", "--out", str(out)])
    assert e.value.code == 2 and str(out) in capsys.readouterr().err
    assert out.read_text() == "x"


@pytest.mark.parametrize("make", [lambda d: d.mkdir(), lambda d: None], ids=["empty-dir", "missing"])
def test_resume_without_config(make, tmp_path, capsys):
    out = tmp_path / "run"
    make(out)
    with pytest.raises(SystemExit) as e:
        train.parse(["--resume", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and str(out) in err, err
    assert not (out / "checkpoints").exists()


def test_resume_takes_jobs(tmp_path):
    """How many phases train at once does not change a number, so a resumed run may change it (and only it)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(TINY)))
    assert train.parse(["--resume", str(out), "--jobs", "3"])[0] == dataclasses.replace(TINY, jobs=3)
    assert train.parse(["--resume", str(out)])[0] == TINY


def test_resume_with_unknown_config_field(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**dataclasses.asdict(TINY), "no_such_field": 1}))
    with pytest.raises(SystemExit) as e:
        train.parse(["--resume", str(out)])
    assert e.value.code == 2 and "no_such_field" in capsys.readouterr().err


def test_good_arguments(tmp_path):
    out = tmp_path / "new" / "run"
    cfg, got, max_chunks = train.parse(["--preset", "smoke", "--data", "gauss", "--dim", "4", "--methods",
                                        "dmd2, mm_instant", "--steps", "1,4", "--seed", "3", "--no-gan",
                                        "--ttur", "2", "--out", str(out), "--max-chunks", "5", "--jobs", "3"])
    assert cfg == dataclasses.replace(train.PRESETS["smoke"], data="gauss", dim=4, methods=("dmd2", "mm_instant"),
                                      mm_steps=(1, 4), dmd2_steps=(1, 4), seed=3, gan=False, ttur=2, jobs=3)
    assert (got, max_chunks) == (out, 5)
    assert out.is_dir() and not list(out.iterdir())  # created, the write probe removed, nothing else


@pytest.mark.parametrize("gan", [True, False])
def test_ablations_run_the_other_gan_setting(gan, tmp_path):
    """With ablations, DMD2's GAN term is also run the other way from the config (toy presets and the digits CPU
    default are without it)."""
    cfg = dataclasses.replace(TINY, ablations=True, gan=gan)
    (abl,) = [p for p in train.phases(cfg) if "gan" in p[0]]
    assert abl == (f"dmd2_{'nogan' if gan else 'gan'}_k1", "dmd2", 1, {"gan": not gan})
    assert train.PRESETS["default"].gan is False and train.IMAGE_PRESETS["full"].gan is True
    assert train.IMAGE_PRESETS["default"].gan is False  # the digits CPU default: no GAN at 200 updates (README)
    assert train.parse(["--gan", "--out", str(tmp_path / "x")])[0].gan is True
    assert train.parse(["--data", "digits", "--gan", "--out", str(tmp_path / "y")])[0].gan is True


# ----------------------------------------------------------------------------------------------
# 2. More flags and values, guidance without labels, what --resume refuses; the fuzzer.


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--data", "bogus"], "'bogus'"),
        (["--methods", "mm_alternating,bogus"], "'bogus'"),
        (["--preset", "bogus"], "'bogus'"),
        (["--steps", "0"], "got 0"),
        (["--steps", "1,abc"], "'1,abc'"),
        (["--teacher", "bogus"], "'bogus'"),
        (["--weighting", "bogus"], "'bogus'"),
        (["--zs-sampling", "bogus"], "'bogus'"),
        (["--ttur", "0"], "got 0"),
        (["--ttur", "two"], "'two'"),
        (["--dim", "3"], "d = 3"),  # ring8 is 2-d
        (["--data", "npz:/no/such/file.npz"], "/no/such/file.npz"),
        (["--guidance", "-1"], "-1"),
        (["--data", "gauss", "--dim", "0"], "got 0"),
        (["--data", "gmm", "--dim", "-3"], "got -3"),
        (["--data", "digits", "--dim", "4"], "--dim 4"),
        (["--seed", "-1"], "got -1"),
        (["--seed", str(2**64)], str(2**64)),
        (["--max-chunks", "0"], "--max-chunks must be >= 1; got 0"),
        (["--jobs", "0"], "jobs must be an integer >= 1; got 0"),
        (["--guidance", "nan"], "got nan"),
        (["--guidance", "inf"], "got inf"),
        (["--guidance", "0.5"], "--guidance 0.5 needs class-conditional"),  # ring8: no classes to guide with
        (["--methods", ""], "unknown method ''"),
        (["--steps", ""], "got ''"),
        (["--methods", "dmd2,dmd2"], "dmd2,dmd2"),
        (["--steps", "2,2"], "2,2"),
    ],
)
def test_bad_argument(argv, expected, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.parse(["--preset", "smoke", *argv, "--out", str(out)])
    line = error_line(capsys.readouterr().err)
    assert e.value.code == 2 and "error:" in line and expected in line, line
    assert not out.exists()


def test_guidance_needs_labels(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", images=IMAGES)
    with pytest.raises(SystemExit) as e:
        train.parse(["--data", f"npz:{tmp_path / 'd.npz'}", "--guidance", "1", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--guidance 1.0 needs labels" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("extra, named", [(["--seed", "3"], "--seed"), (["--no-gan"], "--no-gan"),
                                          (["--gan"], "--gan"),
                                          (["--out", "x"], "--out"), (["--overwrite"], "--overwrite")])
def test_resume_refuses_flags_it_would_ignore(extra, named, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(TINY)))
    with pytest.raises(SystemExit) as e:
        train.parse(["--resume", str(out), *extra])
    line = error_line(capsys.readouterr().err)
    assert e.value.code == 2 and named in line and "config.json" in line, line


@pytest.mark.parametrize("text", ["[1]", '{"data": 5}', '{"batch": "many"}', '{"seed": -1}', "{"])
def test_resume_with_bad_config(text, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(text)
    with pytest.raises(SystemExit) as e:
        train.parse(["--resume", str(out)])
    assert e.value.code == 2 and f"--resume {out}: bad config.json" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("field, value", [("dmd2_lr", 0.0), ("dmd2_lr", True), ("teacher_lr", float("nan")),
                                          ("mm_lr", -1e-3), ("teacher_lr", float("inf"))])
def test_config_refuses_a_bad_learning_rate(field, value):  # set by presets and a resumed run's config.json
    with pytest.raises(ValueError, match=re.escape(f"{field} (peak learning rate) must be a finite number > 0; "
                                                   f"got {value!r}")):
        dataclasses.replace(TINY, **{field: value})


# Flag: (valid values, invalid values). A value is valid on its own; `bad_tokens` adds the combinations that are not.
FLAGS = {
    "--preset": (["default", "smoke", "full"], ["bogus"]),
    "--data": (["ring8", "gauss", "gmm", "digits", "npz:good.npz"],
               ["bogus", "npz:", "npz:missing.npz", "npz:text.npz", "npz:object.npz", "npz:rank3.npz", "npz:labels.npz"]),
    "--dim": (["2", "3", "8"], ["0", "-3", "x", "1.5"]),
    "--teacher": (["trained", "exact"], ["bogus"]),
    "--methods": (["dmd2", "mm_alternating,mm_instant", "dmd2, mm_instant"], ["bogus", "", "dmd2,dmd2", "dmd2,,mm_instant"]),
    "--steps": (["1", "2,4", "1,2,4,8"], ["0", "-1", "1,abc", "", "1.5", "2,2"]),
    "--seed": (["0", "7", "4294967295"], ["-1", "4294967296", "99999999999999999999999", "x"]),
    "--zs-sampling": (["posterior", "marginal"], ["bogus"]),
    "--weighting": (["auto", "edm", "flat", "dmd"], ["bogus"]),
    "--ttur": (["1", "3"], ["0", "-2", "two"]),
    "--guidance": (["0", "0.5"], ["-1", "nan", "inf", "x"]),
    "--max-chunks": (["1", "9"], ["0", "-1", "x"]),
    "--jobs": (["1", "3"], ["0", "-2", "x"]),
    "--out": (["new", "new/deeper", "existing"], ["afile", "afile/sub"]),
    "--no-gan": ([None], []),
    "--gan": ([None], []),
    "--no-backward-sim": ([None], []),
    "--overwrite": ([None], []),
    "--bogus": ([], [None]),
    "junk": ([], [None]),
}
RESUME = ["resumable", "resumable_bad", "noconf", "badconf", "missing", "afile"]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The files the fuzzer's arguments name; copied afresh for every example."""
    box = tmp_path_factory.mktemp("sandbox")
    rng = np.random.default_rng(0)
    np.savez(box / "good.npz", images=rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), labels=np.arange(16) % 3)
    (box / "text.npz").write_text("x")
    np.savez(box / "object.npz", images=np.array([None] * 16, dtype=object))
    np.savez(box / "rank3.npz", images=IMAGES[..., 0])
    np.savez(box / "labels.npz", images=IMAGES, labels=np.arange(3))
    (box / "afile").write_text("x")
    (box / "existing" / "checkpoints").mkdir(parents=True)
    (box / "existing" / "checkpoints" / "teacher.eqx").write_text("old")
    (box / "existing" / "report.md").write_text("old")
    (box / "existing" / "keep.txt").write_text("old")
    make_run(box / "resumable", phases=("teacher",))
    make_run(box / "resumable_bad", phases=("teacher",))
    truncate(box / "resumable_bad" / "checkpoints" / "teacher.eqx")
    (box / "noconf").mkdir()
    (box / "badconf").mkdir()
    (box / "badconf" / "config.json").write_text("[1]")
    return box


def bad_tokens(given):
    """Strings of which the error must name one: each invalid flag or its value and, for values valid on their own,
    the combination that fails."""
    bad = []
    for f, (v, good) in given.items():
        if not good:
            bad += [f] if v is None else [f, repr(v) if v == "" else v[4:] if v.startswith("npz:") and v != "npz:" else v]
    ok = {f: v for f, (v, good) in given.items() if good}
    if "--resume" in given:
        return bad
    if "--data" not in given or given["--data"][1]:
        data = ok.get("--data", "ring8")
        image = data in ("digits", "npz:good.npz")
        if "--dim" in ok and (image or (data == "ring8" and ok["--dim"] != "2")):
            bad.append(ok["--dim"])
        if image and ok.get("--teacher") == "exact":
            bad.append("exact")
        if not image and ok.get("--guidance", "0") != "0":
            bad.append("--guidance")
    if ok.get("--out") == "existing" and "--overwrite" not in given:
        bad.append("existing")
    return bad


@settings(max_examples=max(30, settings().max_examples))  # each example is fast: more than CI's 6
@given(st.data())
def test_cli_fuzz(sandbox, tmp_path_factory, data):
    """Random flags, values and combinations through `train.cli` up to the first training step."""
    box = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(sandbox, box, dirs_exist_ok=True)
    given = {}  # flag: (value, valid on its own)
    if data.draw(st.sampled_from([False, False, False, True]), label="resume"):
        target = data.draw(st.sampled_from(RESUME), label="--resume")
        given["--resume"] = (target, target == "resumable")
        if data.draw(st.booleans(), label="with --max-chunks"):
            n = data.draw(st.sampled_from(["1", "0"]), label="--max-chunks")
            given["--max-chunks"] = (n, n == "1")
        extra = data.draw(st.sampled_from([None, "--seed", "--no-gan", "--gan", "--out", "--preset"]), label="extra flag")
        if extra:  # a flag that --resume would ignore: refused, by name
            given[extra] = (FLAGS[extra][0][-1], False)
    else:
        for flag in data.draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=6, unique=True), label="flags"):
            valid, invalid = FLAGS[flag]
            good = not invalid or (valid and data.draw(st.sampled_from([True, True, True, False]), label="valid"))
            given[flag] = (data.draw(st.sampled_from(valid if good else invalid), label=flag), good)
    argv = [s for f, (v, _) in given.items() for s in ([f] if v is None else [f, v])]
    bad = bad_tokens(given)
    before = files(box)

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stderr(err), redirect_stdout(io.StringIO()):
        mp.chdir(box)
        mp.setattr(train, "run_phase", started)
        mp.setattr(tasks.M, "load_or_train_classifier", lambda *args, **kwargs: None)  # trains one if not cached
        try:
            code = train.cli(argv)
        except SystemExit as e:
            code = e.code
        except Started:
            code = "started"
    err = err.getvalue()
    event(f"outcome: {code}")
    assert "Traceback" not in err, (argv, err)
    if bad:
        line = error_line(err)
        assert code == 2 and "error:" in line and any(t in line for t in bad), (argv, bad, code, err)
        assert all(s.startswith(("usage:", " ")) for s in err.strip().splitlines()[:-1]), err  # argparse's usage
        assert files(box) == before, argv
    else:
        assert code == "started", (argv, code, err)
        after = files(box)
        overwrite = "--overwrite" in given and given.get("--out", (None,))[0] == "existing"
        overwritten = {"existing/checkpoints/teacher.eqx", "existing/report.md"} if overwrite else set()
        assert {k: v for k, v in after.items() if k in before} == {k: v for k, v in before.items() if k not in overwritten}
    shutil.rmtree(box)
