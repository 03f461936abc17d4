"""`python train.py`: train a teacher, distil students with each algorithm, measure them against the truth.

Phases: teacher (or, with `--teacher exact`, a network regressed onto the closed-form denoiser), then
one phase per (method, k), `cfg.jobs` at a time (`concurrently`). Every phase is a sequence of `lax.scan`
chunks of its `mmd.*_step`, with a checkpoint after each chunk, so `--resume DIR` continues exactly where
a run stopped. Every sampler draws 10,000 samples (the teacher's in the queue's last slot, beside the last
phases), `metrics.py` scores them against fresh true samples, and `report.py` writes the report, the claims
table and the plots. Same seed, same numbers, whatever `cfg.jobs`.
"""

import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from tqdm import tqdm

from checkpoints import (  # noqa: F401 - re-exported: train.Run, train.Stop, ... are the public names
    CHECKPOINT_VERSION, NOT_TRAINING, TEACHER_FIELDS, CheckpointError, Run, Stop, WriteError, concurrently, copy_phase,
    phase_fields, tree_arrays,
)
import losses as L
import dmd2
import mmd
import parallel
import tasks
import sampling
from config import (  # noqa: F401 - re-exported: train.Config, train.parse, ... are the public names
    IMAGE_PRESETS, METHODS, PRESETS, TOY_DMD2, Config, parse,
)
from mmd import Averaged, averaged, ema_update, student  # noqa: F401 - re-exported (ablation drivers, tests)
from sampling import sample


# Seconds JAX spends tracing, lowering and compiling programs, from its monitoring events (reported in the thread
# that compiles), per thread: the report gives each phase's compile time beside its training time.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compiling = threading.local()


def _count_compile(event, seconds, **_):
    if event in COMPILE_EVENTS:
        _compiling.seconds = getattr(_compiling, "seconds", 0.0) + seconds


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_seconds() -> float:
    """Seconds this thread has spent compiling so far (differences of two readings time a block)."""
    return getattr(_compiling, "seconds", 0.0)


def phases(cfg: Config):
    """(name, method, k, overrides) for every distillation phase, ablations last."""
    out = []
    for method in cfg.methods:
        for k in cfg.dmd2_steps if method == "dmd2" else cfg.mm_steps:
            out.append((f"{method}_k{k}", method, k, {}))
    if cfg.ablations:
        k_mm, k_dmd = max(cfg.mm_steps), min(cfg.dmd2_steps)
        if "mm_alternating" in cfg.methods:
            other = "marginal" if cfg.zs_sampling == "posterior" else "posterior"
            out.append((f"mm_alternating_{other}_k{k_mm}", "mm_alternating", k_mm, {"zs_sampling": other}))
        if "dmd2" in cfg.methods:  # the other setting of the GAN term
            out.append((f"dmd2_{'nogan' if cfg.gan else 'gan'}_k{k_dmd}", "dmd2", k_dmd, {"gan": not cfg.gan}))
    return out


def run_phase(run: Run, name, state, step_fn, num_steps, key, chunk, fields=None):
    """Train `state` with `step_fn(state, key) -> (state, metrics)` for `num_steps` steps, resumably.

    Step i uses `fold_in(key, i)`, so chunking and resuming do not change the numbers. A non-finite
    metric stops training with the phase, step and value; the last good checkpoint stays. `fields`
    (`phase_fields`) is stored with each checkpoint and must match to resume from one.
    """
    start, history, seconds = 0, {}, 0.0
    loaded = run.load_phase(name, state, fields)
    if loaded is not None:
        state, start, history, seconds = parallel.placed_like(loaded[0], state), *loaded[1:]

    @eqx.filter_jit
    def advance(state, key, steps):
        state, metrics = mmd.scan_steps(lambda st, i: step_fn(st, jr.fold_in(key, i)), state, steps)
        leaves = jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(a)) for a in leaves])) if leaves else jnp.array(True)
        return state, metrics, finite

    with tqdm(total=num_steps, initial=start, desc=name, unit="step", dynamic_ncols=True, file=sys.stdout) as bar:
        while start < num_steps:
            run.check()
            n = min(chunk, num_steps - start)
            t0 = time.perf_counter()
            new_state, metrics, finite = advance(state, key, start + jnp.arange(n))
            metrics = {k: np.asarray(v) for k, v in metrics.items()}
            kept = f"the last good checkpoint (step {start}) is in {run.ckpt}" if start else "no checkpoint of this phase yet"
            for k, v in metrics.items():
                bad = ~np.isfinite(v)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise FloatingPointError(f"phase {name}: {k} = {v[i]} at step {start + i}; stopped, {kept}")
            if not bool(finite):
                raise FloatingPointError(f"phase {name}: non-finite weights after step {start + n - 1} "
                                         f"(losses {', '.join(f'{k} = {v[-1]:.4g}' for k, v in metrics.items())}); stopped, {kept}")
            seconds += time.perf_counter() - t0
            state, start = new_state, start + n
            history = {k: np.concatenate([history.get(k, np.zeros(0, v.dtype)), v]) for k, v in metrics.items()}
            run.save_phase(name, state, start, history, seconds, fields)
            bar.update(n)
            bar.set_postfix({k: f"{v[-1]:.4g}" for k, v in metrics.items()})
            run.count_chunk()
    return state, history, seconds


# ----------------------------------------------------------------------------------------------
# The phases.


def with_labels(step_fn, task: tasks.Task, n, mesh, *, dropout=0.0):
    """Wrap `step_fn(state, x, key, label)` so the batch (and its labels) is drawn inside the step,
    split over the devices of `mesh` (data parallelism; the step functions are unchanged).

    `dropout`: probability of replacing a label by the null class (classifier-free guidance training).
    """

    def step(state, key):
        kd, kl, ks = jr.split(key, 3)
        x, label = parallel.constrain_batch(task.draw(kd, n), mesh)
        if label is not None and dropout > 0:
            label = jnp.where(jr.uniform(kl, label.shape) < dropout, task.num_classes, label)
        return step_fn(state, x, ks, label)

    return step


class TeacherState(eqx.Module):
    """The teacher in training and the running average of its weights (checkpointed together, so resume is exact)."""

    player: mmd.Player  # the network being trained and its optimiser (Adam) state
    ema: Optional[eqx.Module]  # bias-corrected EMA of player.model (None: teacher_ema = 0)
    count: jax.Array  # () int32, updates averaged into `ema`

    @property
    def model(self):
        """The frozen teacher: the weight average if there is one, else the last weights."""
        return self.player.model if self.ema is None else self.ema


# `python train.py` keeps each trained teacher here, by config, and reuses it ("" in the environment: no cache).
TEACHER_CACHE = os.environ.get("MMD_TEACHER_CACHE", "runs/teachers")
P_UNCOND = 0.1  # label dropout of a class-conditional teacher: what guidance's unconditional prediction learns from


def teacher_setup(cfg: Config, task: tasks.Task, mesh):
    """The teacher phase's initial state and step function: a network trained on the data, or (exact) regressed
    onto the closed-form denoiser, as a `TeacherState` whose `.model` (the EMA when `cfg.teacher_ema > 0`) is the
    frozen teacher."""
    opt = mmd.teacher_optimiser(cfg.teacher_lr, cfg.teacher_steps)

    def update(player, x, k, lab):  # the diffusion loss on data, or the regression onto the closed form
        if cfg.teacher == "trained":
            return mmd.teacher_step(player, x, k, label=lab, optimiser=opt, schedule=task.schedule)
        return mmd.regression_step(player, task.exact, x, k, label=lab, optimiser=opt, schedule=task.schedule)

    def fn_ema(st: TeacherState, x, k, lab):
        player, loss = update(st.player, x, k, lab)
        n = st.count + 1
        ema = None if st.ema is None else mmd.ema_update(st.ema, player.model, cfg.teacher_ema, n)
        return TeacherState(player, ema, n), {"loss": loss}

    step = with_labels(fn_ema, task, cfg.batch, mesh, dropout=P_UNCOND)
    net = task.network(jr.key(cfg.seed))
    state = TeacherState(mmd.init_player(net, opt), net if cfg.teacher_ema > 0 else None, jnp.int32(0))
    return parallel.replicate(state, mesh), step


def frozen_teacher(cfg: Config, task: tasks.Task, state: TeacherState):
    """What the distillation phases read from the trained teacher: `(teacher, net, precond)`, the model the losses
    call (the closed form for `--teacher exact`; guided at `cfg.guidance`), the network the students start from (the
    weight average when teacher_ema > 0), and Algorithm 3's preconditioner (None without mm_instant)."""
    net = state.model
    precond = None
    if "mm_instant" in cfg.methods:  # "loaded from the teacher checkpoint" (Sec. 3.3): Adam's v of the network
        precond = mmd.preconditioner_from_adam(state.player.opt_state, b2=mmd.TEACHER_B2)
    teacher, precond = guided(cfg, net if cfg.teacher == "trained" else task.exact, precond)
    return teacher, net, precond


def teacher_cache_dir(run: Run, cfg: Config):
    """Where `run.teacher_cache` keeps the teacher of `cfg`: a directory named by a hash of the teacher's config fields
    (`phase_fields(cfg, "teacher")`: data, network, seed, steps, ...), or None without a cache, or for `npz:` data
    (a file can change under its name)."""
    if run.teacher_cache is None or cfg.data.startswith("npz:"):
        return None
    fields = json.dumps(phase_fields(cfg, "teacher"), sort_keys=True)
    return Path(run.teacher_cache) / f"{cfg.data}-{hashlib.sha256(fields.encode()).hexdigest()[:16]}"


def train_teacher(run, cfg: Config, task: tasks.Task, mesh, key):
    """The teacher phase, resumable. With a teacher cache (`teacher_cache_dir`), a teacher trained before with the same
    config is copied from it instead of trained again (the same numbers: training is deterministic), and a newly
    trained one is copied into it."""
    state, step = teacher_setup(cfg, task, mesh)
    cache = teacher_cache_dir(run, cfg)
    if cache is not None and (cache / "teacher.eqx").exists() and not (run.ckpt / "teacher.eqx").exists():
        copy_phase(cache, run.ckpt, "teacher")
        print(f"teacher: trained before with this config, copied from {cache}")
    out = run_phase(run, "teacher", state, step, cfg.teacher_steps, key, cfg.chunk, phase_fields(cfg, "teacher"))
    if cache is not None and not (cache / "teacher.eqx").exists():
        copy_phase(run.ckpt, cache, "teacher")
    return out


def dmd2_times(k, task: tasks.Task):
    """The DMD2 generator's k step times on the official grid (`sampling.dmd2_official_times`, DMD2's 999/749/...
    at the data's scale: its variance, averaged over coordinates, of 10,000 examples); None (t = 1) for k = 1."""
    if k == 1:
        return None
    x = np.asarray(task.draw(jr.key(0), 10_000)[0], np.float64)
    return sampling.dmd2_official_times(task.schedule, k, float(np.mean(np.var(x, axis=0))))


def step_times(cfg: Config, method, k, task: tasks.Task):
    """The k input times a sampler of `method` (a `METHODS` student or "teacher") steps through: DMD2's
    `dmd2_times`, else `cfg.step_grid`'s (None: the uniform grid)."""
    if method == "dmd2":
        return dmd2_times(k, task)
    return None if cfg.grid_shift is None else sampling.grid_times(task.schedule, k, cfg.grid_shift)


# Each setup builds one algorithm's `Distiller` from a Config. Keyword arguments `**kw` go to the distiller's
# constructor over the Config's values: the ablation drivers vary there what no Config field sets.


def alternating_setup(c: Config, k, task: tasks.Task, teacher, net, precond, **kw) -> mmd.Distiller:
    """Algorithm 2 with `c`'s settings: generator from `net`, auxiliary model from the teacher (`auxiliary_start`)."""
    return mmd.alternating_distiller(teacher, **{**dict(
        k=k, steps=c.train_steps("mm_alternating", k), schedule=task.schedule, lr=c.mm_lr, aux_lr=c.aux_lr(k),
        weighting=c.weighting, zs_sampling=c.zs_sampling, grid_shift=c.grid_shift, ema=c.mm_ema, student=net,
        aux_start=auxiliary_start(c, task, net)), **kw})


def instant_setup(c: Config, k, task: tasks.Task, teacher, net, precond, **kw) -> mmd.Distiller:
    """Algorithm 3 with `c`'s settings, in the parameter space of `net` (`instant_space`), with Eq. 10's data term
    (`data_moment`, under the losses' own w(s); `data_grad=None` in `kw` drops it: Eq. 9)."""
    if precond is None:  # check_checkpoints: the state's structure only
        precond = jax.tree.map(jnp.ones_like, L.params(net))
    teacher, precond = instant_space(c, task, teacher, net, precond)
    weighting = kw.get("weighting", c.weighting)
    weighting = mmd.auto_weighting(k) if weighting == "auto" else weighting
    if "data_grad" not in kw and teacher is not None:
        sigma_data = kw.get("sigma_data", mmd.MMConfig.sigma_data)
        w = mmd.MMConfig(weighting=weighting, sigma_data=sigma_data).loss_weighting
        kw["data_grad"] = data_moment(c, task, teacher, w)
    return mmd.instant_distiller(teacher, precond, **{**dict(
        k=k, steps=c.train_steps("mm_instant", k), schedule=task.schedule, weighting=weighting,
        zs_sampling=c.zs_sampling, grid_shift=c.grid_shift, nu_batch_mult=c.nu_batch_mult, ema=c.mm_ema,
        student=net), **kw})


def dmd2_setup(c: Config, k, task: tasks.Task, teacher, net, precond, **kw) -> mmd.Distiller:
    """DMD2 with `c`'s settings: generator from `net` on the official step grid (`dmd2_times`), fake score from the
    teacher (`auxiliary_start`)."""
    return dmd2.dmd2_distiller(teacher, **{**dict(
        k=k, steps=c.dmd2_train_steps, lr=c.dmd2_lr, lr_decay=c.dmd2_lr_decay, schedule=task.schedule, ttur=c.ttur,
        gan=c.gan, feat_dim=task.feat_dim, times=dmd2_times(k, task), backward_sim=c.backward_sim, ema=c.dmd2_ema,
        head_key=jr.key(c.seed + 1), student=net, fake_start=auxiliary_start(c, task, net)), **kw})


SETUPS = {"mm_alternating": alternating_setup, "mm_instant": instant_setup, "dmd2": dmd2_setup}


def distil_setup(cfg: Config, method, k, overrides, task: tasks.Task, teacher, net, precond, mesh, **kw):
    """A distillation phase's initial state, step function `(state, key) -> (state, metrics)` and number of steps.
    `teacher` is what the losses call; `net` the network students start from; `overrides` Config fields of this
    phase; `kw` the distiller's own arguments (`SETUPS`)."""
    d = SETUPS[method](dataclasses.replace(cfg, **overrides), k, task, teacher, net, precond, **kw)
    step = with_labels(d.step, task, d.batch_multiple * cfg.batch, mesh)
    return parallel.replicate(d.init(), mesh), step, d.steps


def guided(cfg: Config, teacher, precond=None):
    """What the losses call: the teacher (and Algorithm 3's preconditioner, if any) guided at `cfg.guidance`
    when it is > 0, with straight-through gradients (Sec. 3.3). Only the teacher is guided: the students
    still start from the unguided network."""
    if cfg.guidance > 0:
        teacher = L.GuidedTeacher(teacher, scale=cfg.guidance)
        precond = None if precond is None else L.GuidedTeacher(precond, scale=cfg.guidance)
    return teacher, precond


def distil(run, cfg: Config, name, method, k, overrides, task: tasks.Task, teacher, net, precond, mesh, key):
    """One distillation phase: its student network, loss history and training seconds."""
    state, step, num = distil_setup(cfg, method, k, overrides, task, teacher, net, precond, mesh)
    state, history, seconds = run_phase(run, name, state, step, num, key, cfg.chunk, phase_fields(cfg, name, overrides))
    return mmd.student(state), history, seconds  # the weight average when there is one


def auxiliary_start(cfg: Config, task: tasks.Task, net):
    """Where Algorithm 2's auxiliary model and DMD2's fake score start: the teacher. Trained teacher: `net`
    itself. Exact teacher: the closed form's values with `net`'s parameters (`losses.Rebased`), not the
    regressed network, whose regression error would otherwise be the generator's first gradient."""
    return net if cfg.teacher != "exact" else L.Rebased(net, task.exact, net)


def instant_space(cfg: Config, task: tasks.Task, teacher, net, precond):
    """The teacher and preconditioner Algorithm 3 works with. Trained teacher: itself. Exact teacher: the
    closed form's values with the parameter space of the network regressed onto it (`losses.StraightThrough`),
    whose preconditioner is the network's."""
    if cfg.teacher != "exact":
        return teacher, precond
    teacher = L.StraightThrough(net, task.exact)
    return teacher, eqx.tree_at(lambda p: p.model, L.params(teacher), precond)


def data_moment(cfg: Config, task: tasks.Task, teacher, weighting):
    """Eq. 10's data term for this teacher and weighting, from `cfg.data_grad_batches` real batches."""
    kx, kg = jr.split(jr.fold_in(jr.key(cfg.seed), 1_000_003))
    xs, labels = jax.jit(jax.vmap(lambda i: task.draw(jr.fold_in(kx, i), cfg.batch)))(jnp.arange(cfg.data_grad_batches))
    # on one device from host copies: a teacher replicated over the mesh (fresh) and one loaded from its
    # checkpoint (resumed) would otherwise compile to different reductions and differ in the last bit
    teacher = jax.device_get(teacher)
    return eqx.filter_jit(mmd.data_moment)(teacher, task.schedule, xs, kg, weighting=weighting, labels=labels)


def check_checkpoints(run: Run, cfg: Config, task: tasks.Task, mesh):
    """Load every checkpoint a resumed run already has, before its first training step: a bad one stops the
    run now (`CheckpointError`), not when its phase is reached."""
    if not any(run.ckpt.glob("*.eqx")):
        return
    teacher = teacher_setup(cfg, task, mesh)[0]
    run.load_phase("teacher", teacher, phase_fields(cfg, "teacher"))
    for name, method, k, overrides in phases(cfg):
        if (run.ckpt / f"{name}.eqx").exists():  # the state's structure only: no teacher, no preconditioner
            like = distil_setup(cfg, method, k, overrides, task, None, teacher.model, None, mesh)[0]
            run.load_phase(name, like, phase_fields(cfg, name, overrides))


def sample_labels(task: tasks.Task, n):
    """The labels of `n` class-conditional samples: 0, 1, 2, ... in turn (None when the task has no classes)."""
    return np.arange(n, dtype=np.int32) % task.num_classes if task.num_classes else None


def sampler(model, task: tasks.Task, key, n, k, step, times=None):
    """`(program, label)`: the compiled program that draws `n` samples from `key` (class-conditional on
    `sample_labels`), and those labels. `times`: see `sampling.sample`."""
    label = sample_labels(task, n)
    fn = jax.jit(lambda key: sample(model, task.schedule, key, (n, *task.shape), k, step, label, times))
    return fn.lower(key).compile(), label


def draw_samples(model, task: tasks.Task, key, n, k, step, times=None):
    """Samples, their labels (None without classes) and the wall time of drawing them (compile time excluded)."""
    return timed_draw(sampler(model, task, key, n, k, step, times), key)


def timed_draw(program, key):
    """`draw_samples` with a `sampler` compiled already: samples, labels and the wall time of running it."""
    fn, label = program
    t0 = time.perf_counter()
    x = np.asarray(jax.block_until_ready(fn(key)), np.float32)
    return x, None if label is None else np.asarray(label), time.perf_counter() - t0


def main(cfg: Config, run: Run):
    import report as R  # noqa: PLC0415

    task = tasks.make_task(cfg)
    parallel.maybe_initialize_distributed()
    mesh = parallel.data_mesh()
    parallel.batch_split(cfg.batch, mesh)  # raises before training if the batch does not divide
    check_checkpoints(run, cfg, task, mesh)
    config = json.dumps(dataclasses.asdict(cfg), indent=1)
    if not (run.out / "config.json").is_file() or (run.out / "config.json").read_text() != config:
        run.write_text("config.json", config)  # (a resumed run leaves its file untouched)
    key_teacher, key_distil, key_eval = jr.split(jr.key(cfg.seed), 3)

    c0 = compile_seconds()
    teacher_state, history, seconds = train_teacher(run, cfg, task, mesh, key_teacher)
    teacher, net, precond = frozen_teacher(cfg, task, teacher_state)
    phase_log = {"teacher": {"seconds": seconds, "compile_seconds": compile_seconds() - c0,
                             "final": {k: float(v[-1]) for k, v in history.items()}}}
    histories = {"teacher": history}

    def student_phase(i, name, method, k, overrides):
        c0 = compile_seconds()
        model, history, seconds = distil(run, cfg, name, method, k, overrides, task, teacher, net, precond, mesh,
                                         jr.fold_in(key_distil, i))
        return model, history, {"seconds": seconds, "compile_seconds": compile_seconds() - c0,
                                "final": {k_: float(v[-1]) for k_, v in history.items()}}

    todo = phases(cfg)

    def updates(i):  # of phase i, DMD2's counting its ttur critic updates
        _, method, k, _ = todo[i]
        return cfg.train_steps(method, k) * (cfg.ttur + 1 if method == "dmd2" else 1)

    k_sample, k_ref, k_floor = jr.split(key_eval, 3)
    label = sample_labels(task, cfg.n_samples)
    teacher_samplers = {f"teacher_{step}_k{k}": (teacher, step, k, step_times(cfg, "teacher", k, task))
                        for step in cfg.teacher_samplers for k in cfg.teacher_ks}

    def drawn_and_scored(samplers):  # {name: (samples, seconds, scores)}, each drawn alone (compile excluded), in turn
        out = {}
        for name, (m, s, k, t) in samplers.items():
            run.check()  # a stop does not wait for the rest of the many-step samplers
            x, _, seconds = draw_samples(m, task, k_sample, cfg.n_samples, k, s, t)
            out[name] = x, seconds, task.evaluate(x, label, k_ref)
        return out

    jobs = cfg.jobs if jax.process_count() == 1 else 1  # processes must launch their collectives in the same order
    order = sorted(range(len(todo)), key=updates, reverse=True) if jobs > 1 else range(len(todo))  # the longest first
    *done, evaluated = concurrently(run, [lambda i=i: student_phase(i, *todo[i]) for i in order]
                                    + [lambda: drawn_and_scored(teacher_samplers)],
                                    jobs)
    done = dict(zip(order, done))
    students = {}
    for i, (name, method, k, overrides) in enumerate(todo):
        model, history, log = done[i]
        students[name] = (model, "marginal" if method == "dmd2" else "ancestral", k,
                          step_times(dataclasses.replace(cfg, **overrides), method, k, task))
        histories[name], phase_log[name] = history, {**log, "jobs": jobs}

    run.check()
    # the teacher's rows ran in the queue's last slot (they need no student); the students' are scored one at a time:
    # two threads running the mixture's log-density program at once have deadlocked XLA CPU (2026-12-07)
    evaluated.update(drawn_and_scored(students))
    samples, seconds, scores = ({n: v[j] for n, v in evaluated.items()} for j in range(3))
    samplers = {**teacher_samplers, **students}
    results = {name: {"k": samplers[name][2], "nfe": samplers[name][2], "sample_seconds": seconds[name],
                      **scores[name]} for name in samplers}
    floor = task.floor(k_floor)
    data_samples, data_labels = (None if a is None else np.asarray(a) for a in task.draw(k_floor, cfg.n_samples))
    main_keys = [n for n in samples if not any(a in n for a in ("_marginal_", "_posterior_", "_nogan_", "_gan_"))]
    run.write_npz("samples.npz", {n: samples[n] for n in main_keys})
    if len(main_keys) < len(samples):
        run.write_npz("samples_ablations.npz", {n: samples[n] for n in samples if n not in main_keys})
    R.write_all(run, cfg, task.primary, results, floor, phase_log, histories, samples, data_samples,
                parallel.describe_batch(cfg.batch, mesh), label, data_labels)
    return results


def cli(argv=None) -> int:
    """`python train.py`: the exit code, with a one-line message for every expected failure: 0 done, 2 bad input
    (flags, data file, checkpoint; from `parse` too), 3 stopped cleanly (resume it), 4 diverged, 5 a write failed."""
    cfg, out, max_chunks = parse(argv)
    print(f"writing to {out}")
    run = Run(out, max_chunks, TEACHER_CACHE or None)

    def on_signal(signum, frame):  # finish the current chunk, checkpoint, exit
        run.stop_reason = f"signal {signal.Signals(signum).name}"

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.perf_counter()
    try:
        main(cfg, run)
    except Stop as e:
        print(f"stopped ({e}); checkpoint saved. Continue with: python train.py --resume {out}")
        return 3
    except FloatingPointError as e:
        print(f"training diverged: {e}", file=sys.stderr)
        return 4
    except ValueError as e:  # bad data or checkpoints, found only once loaded (NaN, shapes, batch vs devices)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # WriteError: disk full, permissions; every checkpoint on disk is a complete one
        print(f"error: {e}. Once fixed, continue with: python train.py --resume {out}", file=sys.stderr)
        return 5
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    print(f"done in {time.perf_counter() - t0:.0f} s; report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
