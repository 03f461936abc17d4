"""The digits ablations of EXPERIMENTS.md: one change at a time to one student of the CPU digits teacher, several seeds.

    python ablation_digits.py [--preset full] [--keys N] [--student-steps J] METHOD K SEEDS [name=value ...]
    python ablation_digits.py --run DIR [--keys N] [PHASE,...]
    e.g.  python ablation_digits.py mm_instant 8 0,1,2 weighting=edm
          python ablation_digits.py dmd2 4 0,1 dmd2_train_steps=1000 dmd2_ema=0.99
          python ablation_digits.py --preset full --keys 8 mm_instant 8 0

METHOD is one of `train.METHODS`, or `teacher` (the teacher's own K-step ancestral sampler: the reference row),
K its number of steps, `name=value` overrides of `train.IMAGE_PRESETS[PRESET]` (PRESET `default` unless
`--preset` names another; any Config field; the value is read as the field's type, booleans as 0/1, tuples as
Python literals, e.g. `mm_train_steps_per_k="((1, 1500),)"`). The teacher
is that preset's digits teacher of `python train.py --data digits --preset PRESET` (seed 0), trained once and
cached in runs/ablation/digits_s0/ (default) or runs/ablation/digits_PRESET_s0/; it is shared with train.py through
the teacher cache (runs/teachers/; `MMD_TEACHER_CACHE=""`: off), so the two train it once between them. SEEDS
are the student's: seed 0 uses `fold_in(distillation key, METHODS.index(METHOD))`, which is the key of that
run's own phase where the run has one k per method (the default preset: `mm_alternating 8 0` and `mm_instant 8 0`
reproduce `report.md` of `python train.py --data digits`; `full` numbers its phases over k too, so its seed 0 is
one more student seed, not its run's), seed s > 0 folds s into it; the teacher, Eq. 10's data term and the
evaluation key stay those of seed 0. The student is trained exactly as
train.py trains it (`train.distil`, checkpointed, so a repeated line is read back) and sampled as train.py
samples it; each seed prints one JSON line: FD in the digits classifier's features and class accuracy of 898
class-conditional samples (`task.evaluate`, the numbers of train.py's report), and the training seconds.

`--keys N` (default 1) also draws and scores the samples with N - 1 further evaluation keys (`jr.fold_in` of the
run's key with 1, ..., N - 1; the classes and the real reference half stay the same, only the sampling noise
changes) and adds their per-key FD, mean and standard error of the mean. With 898 samples one key's FD spans
1.3-3 over eight keys for a k = 8 student (1.1 for the teacher's 256-step sampler), so a single key ranks only
large differences; "fd" stays key 0's, the number of train.py's report.

`--run DIR` scores the students of a finished `python train.py` run in DIR instead (every phase, or the PHASEs
named, e.g. `dmd2_k1,dmd2_k4`), read from its checkpoints without training or writing anything (a phase not
finished is refused), over `--keys N` keys as above: key 0 gives its report.md figures, the other keys say how far
one key can be trusted.

`--student-steps J` (0 < J < K, a diagnostic) samples with the student for its first J steps and the teacher for
the other K - J (same grid, same keys, still K network evaluations): which of its steps the student improves.
"""

import ast
import dataclasses
import json
import sys
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import checkpoints
import config
import parallel
import tasks
import train


def parse(args, preset="default"):
    if preset not in train.IMAGE_PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose from {sorted(train.IMAGE_PRESETS)}")
    base, over = train.IMAGE_PRESETS[preset], {}
    for a in args:
        name, _, val = a.partition("=")
        if not hasattr(base, name) or not val:
            raise SystemExit(f"error: {a!r} is not name=value of a Config field")
        kind = type(getattr(base, name))
        over[name] = bool(int(val)) if kind is bool else ast.literal_eval(val) if kind is tuple else kind(val)
    return over


class Handover(eqx.Module):
    """`student` at input times t > `after`, `teacher` below: a sampler whose first steps are the student's."""

    student: eqx.Module
    teacher: eqx.Module
    after: float

    def __call__(self, z, t, label=None):
        return jnp.where(t > self.after, self.student(z, t, label), self.teacher(z, t, label))


def main(method, k, seeds, over, preset="default", keys=1, student_steps=0):
    if keys < 1:
        raise SystemExit(f"error: --keys must be an integer >= 1; got {keys}")
    if student_steps and not (method != "teacher" and 0 < student_steps < k):
        raise SystemExit(f"error: --student-steps {student_steps} needs a student METHOD and 0 < J < K = {k}")
    if method not in (*train.METHODS, "teacher"):
        raise SystemExit(f"error: unknown METHOD {method!r}; choose from {(*train.METHODS, 'teacher')}")
    cfg = train.IMAGE_PRESETS[preset]
    task, mesh = tasks.make_task(cfg), parallel.data_mesh()
    root = Path("runs/ablation/digits_s0" if preset == "default" else f"runs/ablation/digits_{preset}_s0")
    key_teacher, key_distil, key_eval = jr.split(jr.key(cfg.seed), 3)
    teacher_run = train.Run(root, teacher_cache=train.TEACHER_CACHE or None)  # train.py's teacher, if it trained one
    state = train.train_teacher(teacher_run, cfg, task, mesh, key_teacher)[0]
    c = dataclasses.replace(cfg, **over)
    teacher, net, precond = train.frozen_teacher(c, task, state)  # as train.main reads it (students start from `net`)
    tag = "_".join([f"{method}_k{k}"] + [f"{n}={v}" for n, v in over.items()])
    times = train.step_times(c, method, k, task)
    grid = [1.0 - i / k for i in range(k)] if times is None else list(times)
    for seed in seeds:
        if method == "teacher":  # the reference row: the teacher's own k-step ancestral sampler
            model, secs = teacher, 0
        else:
            key = jr.fold_in(key_distil, train.METHODS.index(method))  # the default run's key for this phase
            key = key if seed == 0 else jr.fold_in(key, seed)
            run = train.Run(root / tag / f"s{seed}")
            try:  # a cached student of another config (the preset changed since) is refused, naming what to delete
                model, _, secs = train.distil(run, c, method, method, k, {}, task, teacher, net, precond, mesh, key)
            except (checkpoints.Stop, checkpoints.CheckpointError) as e:
                raise SystemExit(f"error: {e}") from None
        step = "marginal" if method == "dmd2" else "ancestral"
        if student_steps:  # switch between the input times of step J - 1 (the student's last) and step J
            model = Handover(model, teacher, 0.5 * (grid[student_steps - 1] + grid[student_steps]))
        out = score(model, task, c.n_samples, k, step, times, key_eval, keys, secs)
        print(tag + (f" student_steps={student_steps}" if student_steps else ""), seed, json.dumps(out), flush=True)


def score(model, task, n, k, step, times, key_eval, keys, secs):
    """FD and class accuracy of `n` samples of `model` (k steps of `step` on `times`) with evaluation key 0 (train.py's
    `key_eval`: the numbers of its report), its training `secs`, and with `keys > 1` the per-key FD, mean and
    standard error over keys 0..keys-1."""
    res = []
    for e in range(keys):  # key 0 is train.py's evaluation key
        key_e = key_eval if e == 0 else jr.fold_in(key_eval, e)
        x, label, _ = train.draw_samples(model, task, jr.split(key_e, 3)[0], n, k, step, times)
        res.append(task.evaluate(x, label, jr.split(key_e, 3)[1]))
    out = {"fd": res[0]["fd"], "acc": res[0].get("acc"), "secs": round(secs)}
    if keys > 1:
        fds = np.array([r["fd"] for r in res])
        out |= {"fd_keys": [round(float(v), 2) for v in fds], "fd_mean": round(float(fds.mean()), 3),
                "fd_sem": round(float(fds.std(ddof=1) / np.sqrt(keys)), 3)}
        if res[0].get("acc") is not None:
            out["acc_mean"] = round(float(np.mean([r["acc"] for r in res])), 4)
    return out


def score_run(out, keys=1, only=None):
    """Score the students of a finished `train.py` run in `out` (its config.json and checkpoints; nothing is trained
    or written) as `main` scores one: a JSON line per phase (`only`: those named), key 0 the run's report.md figure."""
    if not (Path(out) / "config.json").is_file():
        raise SystemExit(f"error: --run {out}: no config.json there, so no train.py run to score")
    cfg = config.parse(["--resume", str(out)])[0]
    names = [p[0] for p in train.phases(cfg)]
    if only and set(only) - set(names):
        raise SystemExit(f"error: {out} has no phase {sorted(set(only) - set(names))}; its phases are {names}")
    task, mesh = tasks.make_task(cfg), parallel.data_mesh()
    if task.primary != "fd":
        raise SystemExit(f"error: {out} is a {cfg.data} run; --run scores image runs (FD), see its report.md")
    run = train.Run(Path(out))
    run.stop_reason = f"{out} has an unfinished phase; finish it with `python train.py --resume {out}` first"
    key_teacher, key_distil, key_eval = jr.split(jr.key(cfg.seed), 3)
    try:  # every phase is read back as train.main reads it; the stop reason refuses one not finished
        teacher, net, precond = train.frozen_teacher(cfg, task, train.train_teacher(run, cfg, task, mesh, key_teacher)[0])
        for i, (name, method, k, over) in enumerate(train.phases(cfg)):
            if only and name not in only:
                continue
            model, _, secs = train.distil(run, cfg, name, method, k, over, task, teacher, net, precond, mesh,
                                          jr.fold_in(key_distil, i))
            times = train.step_times(dataclasses.replace(cfg, **over), method, k, task)
            step = "marginal" if method == "dmd2" else "ancestral"
            print(name, json.dumps(score(model, task, cfg.n_samples, k, step, times, key_eval, keys, secs)), flush=True)
    except (checkpoints.Stop, checkpoints.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None

if __name__ == "__main__":
    argv, flags = sys.argv[1:], {"--preset": "default", "--keys": "1", "--student-steps": "0", "--run": ""}
    while argv[:1] and argv[0] in flags and len(argv) > 1:
        flags[argv[0]], argv = argv[1], argv[2:]
    if flags["--run"]:
        if len(argv) > 1 or not flags["--keys"].isdigit() or int(flags["--keys"]) < 1:
            raise SystemExit(__doc__.split("\n\n")[1])
        raise SystemExit(score_run(flags["--run"], int(flags["--keys"]), argv[0].split(",") if argv else None))
    if len(argv) < 3 or not flags["--keys"].isdigit() or not flags["--student-steps"].isdigit():
        raise SystemExit(__doc__.split("\n\n")[1])
    main(argv[0], int(argv[1]), [int(s) for s in argv[2].split(",")], parse(argv[3:], flags["--preset"]),
         flags["--preset"], int(flags["--keys"]), int(flags["--student-steps"]))
