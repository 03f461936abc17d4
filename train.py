"""`python train.py`: train a teacher, distil students with each algorithm, measure them against the truth.

Phases: teacher (or, with `--teacher exact`, a network regressed onto the closed-form denoiser), then
one phase per (method, k). Every phase is a sequence of `lax.scan` chunks of its `mmd.*_step`, with
a checkpoint after each chunk, so `--resume DIR` continues exactly where a run stopped. Then every
sampler draws 10,000 samples, `metrics.py` scores them against fresh true samples, and `report.py`
writes the report, the claims table and the plots. Same seed, same numbers.
"""

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from tqdm import tqdm

import data as D
from checkpoints import (  # noqa: F401 - re-exported: train.Run, train.Stop, ... are the public names
    CHECKPOINT_VERSION, NOT_TRAINING, TEACHER_FIELDS, CheckpointError, Run, Stop, WriteError, phase_fields, tree_arrays,
)
import losses as L
import mmd
import parallel
import tasks
import sampling
from sampling import sample

METHODS = ("mm_alternating", "mm_instant", "dmd2")


@dataclasses.dataclass(frozen=True)
class Config:
    """Defaults of the default run (ring8, trained teacher, MM k = 8, DMD2 k = 1 and 4)."""

    data: str = "ring8"  # ring8 | gauss | gmm | digits | npz:PATH
    dim: Optional[int] = None  # data dimension for gauss / gmm (None: their defaults, 8 / 16)
    teacher: str = "trained"  # trained (MLP) | exact (closed-form denoiser; students regressed onto it)
    methods: tuple = METHODS
    mm_steps: tuple = (8,)  # k for mm_alternating and mm_instant
    dmd2_steps: tuple = (1, 4)  # k for dmd2
    seed: int = 0
    zs_sampling: str = "posterior"  # posterior | marginal (Sec. 5.2)
    weighting: str = "auto"  # auto (flat for k <= 2, else edm; Sec. 3.3) | edm | flat | dmd
    instant_weighting: str = "same"  # Algorithm 3's w(s): same (as `weighting`) | auto | edm | flat | dmd
    ttur: int = 5  # DMD2 critic updates per generator update
    gan: bool = True
    backward_sim: bool = True
    per_step_critic: bool = True  # DMD2, k > 1: a fake score per generator step (see README, DMD2 with several steps)
    dmd2_grid: str = "official"  # DMD2 generator's step times: official (DMD2's 999/749/499/249, by log-SNR) | uniform
    dmd2_times: Optional[tuple] = None  # DMD2: explicit step times, one tuple per k (overrides dmd2_grid for that k)
    ablations: bool = False  # also run the marginal-z_s and no-GAN variants (claims table)
    batch: int = 256
    width: int = 128
    depth: int = 3
    teacher_steps: int = 8000
    teacher_lr: float = 2e-3
    teacher_ema: float = 0.0  # decay of the teacher's weight average (0: none, the last weights); see TeacherState
    mm_train_steps: int = 3000
    mm_lr: float = 1e-4
    instant_lr: float = 3e-4
    precond_eps: float = 1e-3  # guard of Lambda = 1 / (sqrt(v) + eps); see mmd.preconditioner_from_adam
    instant_eq10: bool = True  # subtract the teacher's expected gradient on real data from nu (Eq. 10)
    nu_decay: float = 0.97  # EMA of Algorithm 3's nu over updates (0: one batch, as printed)
    data_grad_batches: int = 1000  # real batches averaged, once, for Eq. 10's data term (its error is a fixed bias)
    nu_batch_mult: int = 2  # Algorithm 3's B' (the batch that gives nu) as a multiple of the batch B
    dmd2_train_steps: int = 1000
    dmd2_lr: float = 3e-4
    dmd2_lr_decay: bool = False  # the generator's learning rate decays along a cosine to 0 (the critic's stays)
    gan_gen_weight: float = 3e-3  # DMD2: weight of the generator's GAN loss (official ImageNet-64: 3e-3)
    dmd2_ema: float = 0.99  # decay of the DMD2 generator's weight average, which is sampled (0: the last weights)
    teacher_ks: tuple = (1, 2, 4, 8, 1000)
    n_samples: int = 10_000
    chunk: int = 250  # training steps per compiled lax.scan call (and per checkpoint)
    # images
    image_width: int = 64
    image_depth: int = 2
    guidance: float = 0.0  # classifier-free guidance scale of the teacher (0: none)
    p_uncond: float = 0.1  # label dropout when training a class-conditional teacher
    classifier_cache: str = "runs/digits_classifier.eqx"

    def __post_init__(self):
        if not 0 <= self.guidance < float("inf"):
            raise ValueError(f"guidance scale must be a finite number >= 0; got {self.guidance}")
        if tasks.is_image_data(self.data):
            if self.data.startswith("npz:") and not Path(self.data[4:]).is_file():
                raise ValueError(f"--data {self.data}: no such file")
            if self.teacher != "trained":
                raise ValueError("--teacher exact needs toy data (ring8, gauss, gmm): images have no closed form")
            if self.dim is not None:
                raise ValueError(f"--dim {self.dim}: only gauss and gmm take a dimension, not --data {self.data}")
        else:
            if self.dim is not None and (not isinstance(self.dim, int) or self.dim < 1):
                raise ValueError(f"--dim must be an integer >= 1; got {self.dim!r}")
            D.get_toy(self.data, self.dim)  # raises on unknown data
            if self.guidance != 0:  # toy networks have no classes, hence no unconditional prediction to guide with
                raise ValueError(f"--guidance {self.guidance} needs class-conditional images (digits, npz with labels)")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ValueError(f"--seed must be an integer in 0..2**32 - 1; got {self.seed!r}")
        for f in ("ttur", "batch", "width", "depth", "teacher_steps", "mm_train_steps", "dmd2_train_steps",
                  "n_samples", "chunk", "image_width", "image_depth", "data_grad_batches", "nu_batch_mult"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be an integer >= 1; got {v!r}")
        for flag, xs in (("--methods", self.methods), ("--steps", self.mm_steps), ("--steps", self.dmd2_steps)):
            if len(set(xs)) < len(xs):  # one checkpoint per phase name: a repeated phase would resume its twin
                raise ValueError(f"{flag} lists a value twice: {','.join(map(str, xs))}")
        if self.dmd2_grid not in ("official", "uniform"):
            raise ValueError(f"unknown dmd2_grid {self.dmd2_grid!r}; choose 'official' or 'uniform'")
        for times in self.dmd2_times or ():  # one tuple of input times per k; a k without one uses the uniform grid
            if not isinstance(times, tuple) or not times:
                raise ValueError(f"dmd2_times must be a tuple of tuples of step times; got {self.dmd2_times!r}")
            sampling.check_step_times(times, len(times))
        for f in ("teacher_ema", "dmd2_ema"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ValueError(f"{f} (EMA decay) must be in [0, 1); got {getattr(self, f)}")
        if self.teacher not in ("trained", "exact"):
            raise ValueError(f"unknown teacher {self.teacher!r}; choose 'trained' or 'exact'")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"--methods: unknown method {m!r}; choose from {METHODS}")
        for k in self.mm_steps + self.dmd2_steps + self.teacher_ks:
            if not isinstance(k, int) or k < 1:
                raise ValueError(f"every k (number of sampling steps) must be an integer >= 1; got {k!r}")
        mmd.MMConfig(weighting="edm" if self.weighting == "auto" else self.weighting, zs_sampling=self.zs_sampling)
        if self.instant_weighting not in ("same", "auto"):
            mmd.MMConfig(weighting=self.instant_weighting)
        mmd.DMD2Config(ttur=self.ttur)
        mmd.MMConfig(nu_decay=self.nu_decay)


# Toy data: DMD2 trains 6,000 generator updates without its GAN term and samples the 0.999 weight average (README,
# DMD2 table, three seeds on ring8, MMD^2 x 1e-3 at k = 1 / 4: 1,000 updates, average 0.99: 2.81 / 3.36; 3,000: 1.60 /
# 1.58; 6,000 with 0.999: 1.17 / 1.29, and the one-step generator's off-mode mass fell from 3.6-5.0% to 2.6-2.8%;
# without the GAN it was better on every seed at 1,000 updates, level at 3,000, and 2.6x cheaper). Images keep the
# GAN; smoke exercises it.
TOY_DMD2 = dict(gan=False, dmd2_train_steps=6000, dmd2_ema=0.999)
PRESETS = {
    "default": Config(**TOY_DMD2),
    "smoke": Config(width=32, depth=2, batch=128, teacher_steps=300, mm_train_steps=100, dmd2_train_steps=40,
                    mm_steps=(4,), dmd2_steps=(1, 2), teacher_ks=(1, 2, 4, 8, 1000), chunk=50, n_samples=2000),
    "full": Config(mm_steps=(1, 2, 4, 8), dmd2_steps=(1, 2, 4, 8), ablations=True, **TOY_DMD2),
}
# Images (digits, npz:PATH): smaller batches of a larger network; 898 samples, the size of the FD reference.
# default: a CPU run. lr 3e-3 instead of 1e-3 took a 2,000-step teacher's FD from 50 to 31, a weight average only
# lagged behind it (EMA 0.99 no better, 0.999 worse), and 8,000 steps take its class accuracy from 0.42 to 0.87; with
# 600 MM updates, mm_lr 1e-3 gave alternating k = 8 FD 9.5 against 26.6 / 22.7 / 11.2 at 1e-4 / 3e-4 / 2e-3 (README).
IMAGE_PRESETS = {
    "default": Config(data="digits", batch=128, teacher_steps=8000, teacher_lr=3e-3, mm_train_steps=600, mm_lr=1e-3,
                      dmd2_train_steps=100, dmd2_ema=0.0, dmd2_steps=(1,), teacher_ks=(1, 2, 4, 8, 64, 256), n_samples=898,
                      chunk=100, data_grad_batches=100, nu_batch_mult=1, instant_weighting="flat"),
    # dmd2_ema 0: 100 updates are too few for a 0.99 average (not measured on digits). Instant MM on digits (README,
    # one run each, FD): flat weighting 5.14 against EDM's 38.0 (alternating MM: EDM 9.51, flat 11.9); 1,000
    # data-term batches 39.8 and B' = 2B 37.2 against 38.0 with 100 and B' = B (both with EDM weighting).
    "smoke": Config(data="digits", batch=32, image_width=32, image_depth=1, teacher_steps=60, mm_train_steps=20,
                    dmd2_train_steps=6, mm_steps=(2,), dmd2_steps=(1,), teacher_ks=(1, 8), n_samples=200, chunk=20,
                    teacher_ema=0.9),
    # For one GPU (not measured in the session that set it; see README): a teacher trained 15x longer, every method
    # at k = 1, 2, 4, 8, the ablations, and the teacher's samplers at more step counts for metric_vs_nfe.png.
    "full": Config(data="digits", batch=128, teacher_steps=30_000, teacher_lr=1e-3, teacher_ema=0.999,
                   mm_train_steps=3000, dmd2_train_steps=1000, teacher_ks=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                   n_samples=898, chunk=1000, mm_steps=(1, 2, 4, 8), dmd2_steps=(1, 2, 4, 8), ablations=True,
                   instant_weighting="flat"),
}


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
        state, start, history, seconds = loaded

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
    """Wrap `step_fn(state, key, x, label)` so the batch (and its labels) is drawn inside the step,
    split over the devices of `mesh` (data parallelism; the step functions are unchanged).

    `dropout`: probability of replacing a label by the null class (classifier-free guidance training).
    """

    def step(state, key):
        kd, kl, ks = jr.split(key, 3)
        x, label = parallel.constrain_batch(task.draw(kd, n), mesh)
        if label is not None and dropout > 0:
            label = jnp.where(jr.uniform(kl, label.shape) < dropout, task.num_classes, label)
        return step_fn(state, ks, x, label)

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


def ema_update(ema, model, decay, n):
    """The EMA of a model's weights after its n-th update (n >= 1), bias-corrected as Adam's first moment.

    With `e_n = d e_{n-1} + (1 - d) p_n`, `e_0 = 0`, this returns `e_n / (1 - d^n)`, the average of p_1..p_n
    with weights proportional to `d^(n - i)` (no pull towards the initial weights), from the previous average:
    `avg_n = b avg_{n-1} + (1 - b) p_n`, `b = d (1 - d^(n-1)) / (1 - d^n)` (b = 0 at n = 1). `0 < decay < 1`.
    Only floating-point arrays are averaged; everything else is taken from `model`.
    """
    log_d = jnp.log(jnp.asarray(decay, jnp.float32))
    b = jnp.exp(log_d) * jnp.expm1((n - 1) * log_d) / jnp.expm1(n * log_d)
    avg = jax.tree.map(lambda e, p: b * e + (1 - b) * p, eqx.filter(ema, eqx.is_inexact_array),
                       eqx.filter(model, eqx.is_inexact_array))
    return eqx.combine(avg, eqx.filter(model, eqx.is_inexact_array, inverse=True))


class Averaged(eqx.Module):
    """A DMD2 state and the running average of its generator's weights (checkpointed together, so resume is exact).

    DMD2's generator and critic play a game at a constant learning rate, and the last weights swing from update
    to update; averaging the iterates is the usual cure (the official code trains 100x longer at a 100x smaller
    rate and keeps no average). The README's DMD2 table measured it on three seeds before it became the default.
    """

    state: eqx.Module  # mmd.DMD2State
    ema: eqx.Module  # bias-corrected EMA of state.generator.model
    count: jax.Array  # () int32, updates averaged into `ema`


def averaged(step, decay):
    """`step(state, key) -> (state, metrics)` of a DMD2 state, as a step of `Averaged` that also updates the
    average of the generator's weights (`ema_update`). The training itself is unchanged."""

    def fn(s: Averaged, key):
        inner, metrics = step(s.state, key)
        n = s.count + 1
        return Averaged(inner, ema_update(s.ema, inner.generator.model, decay, n), n), metrics

    return fn


def teacher_setup(cfg: Config, task: tasks.Task, mesh):
    """The teacher phase's initial state and step function: a network trained on the data, or (exact) regressed
    onto the closed-form denoiser, as a `TeacherState` whose `.model` (the EMA when `cfg.teacher_ema > 0`) is the
    frozen teacher."""
    opt = mmd.teacher_optimiser(cfg.teacher_lr, cfg.teacher_steps)
    kw = dict(optimiser=opt, schedule=task.schedule)
    if cfg.teacher == "trained":
        fn = lambda st, k, x, lab: mmd.teacher_step(st, x, k, label=lab, **kw)
    else:
        fn = lambda st, k, x, lab: mmd.regression_step(st, task.exact, x, k, label=lab, **kw)

    def fn_ema(st: TeacherState, k, x, lab):
        player, loss = fn(st.player, k, x, lab)
        n = st.count + 1
        ema = None if st.ema is None else ema_update(st.ema, player.model, cfg.teacher_ema, n)
        return TeacherState(player, ema, n), {"loss": loss}

    step = with_labels(fn_ema, task, cfg.batch, mesh, dropout=cfg.p_uncond)
    net = task.network(jr.key(cfg.seed))
    state = TeacherState(mmd.init_player(net, opt), net if cfg.teacher_ema > 0 else None, jnp.int32(0))
    return parallel.replicate(state, mesh), step


def train_teacher(run, cfg: Config, task: tasks.Task, mesh, key):
    state, step = teacher_setup(cfg, task, mesh)
    return run_phase(run, "teacher", state, step, cfg.teacher_steps, key, cfg.chunk, phase_fields(cfg, "teacher"))


def dmd2_times(cfg: Config, k, task: tasks.Task):
    """The DMD2 generator's k step times: `cfg.dmd2_times`' tuple of length k if any, else `cfg.dmd2_grid`'s
    (None for uniform; official: `sampling.dmd2_official_times` with the data's variance, averaged over
    coordinates, of 10,000 examples)."""
    given = next((t for t in cfg.dmd2_times or () if len(t) == k), None)
    if given is not None or cfg.dmd2_grid == "uniform" or k == 1:
        return given
    x = np.asarray(task.draw(jr.key(0), 10_000)[0], np.float64)
    return sampling.dmd2_official_times(task.schedule, k, float(np.mean(np.var(x, axis=0))))


def distil_setup(cfg: Config, method, k, overrides, task: tasks.Task, teacher, net, precond, mesh):
    """A distillation phase's initial state, step function and number of steps. `teacher` is what the losses
    call; `net` the network students start from."""
    c = dataclasses.replace(cfg, **overrides)
    b, sched = cfg.batch, task.schedule
    if method == "dmd2":
        dcfg = mmd.DMD2Config(k=k, ttur=c.ttur, gan=c.gan, backward_sim=c.backward_sim,
                              per_step_critic=c.per_step_critic, times=dmd2_times(c, k, task), gan_gen_weight=c.gan_gen_weight)
        opt = mmd.dmd2_optimiser(c.dmd2_lr, warmup=min(500, c.dmd2_train_steps // 5))
        if c.dmd2_lr_decay:
            opt = (mmd.dmd2_optimiser(c.dmd2_lr, warmup=min(500, c.dmd2_train_steps // 5),
                                      decay_steps=c.dmd2_train_steps), opt)
        state = mmd.init_dmd2(auxiliary_start(cfg, task, net), jr.key(cfg.seed + 1), opt, dcfg, task.feat_dim, student=net)
        step = with_labels(lambda st, kk, x, lab: mmd.dmd2_step(
            st, teacher, x.reshape(dcfg.ttur, b, *x.shape[1:]), kk, cfg=dcfg, optimiser=opt, schedule=sched,
            label=None if lab is None else lab.reshape(dcfg.ttur, b)), task, dcfg.ttur * b, mesh)
        num = c.dmd2_train_steps
        if c.dmd2_ema > 0:
            state, step = Averaged(state, state.generator.model, jnp.int32(0)), averaged(step, c.dmd2_ema)
    else:
        weighting = c.instant_weighting if method == "mm_instant" and c.instant_weighting != "same" else c.weighting
        weighting = weighting if weighting != "auto" else ("flat" if k <= 2 else "edm")
        mcfg = mmd.MMConfig(k=k, weighting=weighting, zs_sampling=c.zs_sampling)
        num = c.mm_train_steps
        if method == "mm_alternating":
            opt = mmd.mm_optimiser(c.mm_lr, num, warmup=min(1000, num // 10))
            state = mmd.init_alternating(auxiliary_start(cfg, task, net), opt, student=net)
            step = with_labels(lambda st, kk, x, lab: mmd.alternating_step(
                st, teacher, x, kk, cfg=mcfg, optimiser=opt, schedule=sched, label=lab), task, b, mesh)
        else:
            mcfg = dataclasses.replace(mcfg, nu_decay=c.nu_decay)
            if precond is None:  # check_checkpoints: the state's structure only
                precond = jax.tree.map(jnp.ones_like, eqx.filter(net, eqx.is_inexact_array))
            teacher, precond = instant_space(cfg, task, teacher, net, precond)
            data_grad = data_moment(cfg, task, teacher, weighting) if c.instant_eq10 and teacher is not None else None
            opt = mmd.mm_optimiser(c.instant_lr, num, warmup=min(1000, num // 10))
            state = mmd.init_instant(net, opt, precond)
            step = with_labels(lambda st, kk, x, lab: mmd.instant_step(
                st, teacher, precond, x[:b], x[b:], kk, cfg=mcfg, optimiser=opt, schedule=sched,
                label=None if lab is None else lab[:b], label_prime=None if lab is None else lab[b:],
                data_grad=data_grad), task, (1 + c.nu_batch_mult) * b, mesh)
    return parallel.replicate(state, mesh), step, num


def distil(run, cfg: Config, name, method, k, overrides, task: tasks.Task, teacher, net, precond, mesh, key):
    """One distillation phase: its student network, loss history and training seconds."""
    state, step, num = distil_setup(cfg, method, k, overrides, task, teacher, net, precond, mesh)
    state, history, seconds = run_phase(run, name, state, step, num, key, cfg.chunk, phase_fields(cfg, name, overrides))
    if isinstance(state, Averaged):  # DMD2 with cfg.dmd2_ema > 0: the weight average is the student
        return state.ema, history, seconds
    model = state.student.model if method == "mm_instant" else state.generator.model
    return model, history, seconds


def auxiliary_start(cfg: Config, task: tasks.Task, net):
    """Where Algorithm 2's auxiliary model and DMD2's fake score start: the teacher. Trained teacher: `net`
    itself. Exact teacher: the closed form's values with `net`'s parameters (`losses.Rebased`), not the
    regressed network, whose regression error would otherwise be the generator's first gradient."""
    return net if cfg.teacher != "exact" else L.Rebased(net, task.exact, net)


def instant_space(cfg: Config, task: tasks.Task, teacher, net, precond):
    """The teacher and preconditioner Algorithm 3 works with. Trained teacher: itself. Exact teacher: the
    closed form's values with the parameter space of the network regressed onto it (`losses.StraightThrough`)."""
    if cfg.teacher != "exact":
        return teacher, precond
    zeros = jax.tree.map(jnp.zeros_like, eqx.filter(task.exact, eqx.is_inexact_array))
    return L.StraightThrough(net, task.exact), L.StraightThrough(precond, zeros)


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


def draw_samples(model, task: tasks.Task, key, n, k, step, times=None):
    """Samples (class-conditional on labels 0, 1, 2, ... when the task has classes) and the wall time
    of drawing them (compiled beforehand, so compile time is excluded). `times`: see `sampling.sample`."""
    label = jnp.arange(n) % task.num_classes if task.num_classes else None
    fn = jax.jit(lambda key: sample(model, task.schedule, key, (n, *task.shape), k, step, label, times)).lower(key).compile()
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

    teacher_state, history, seconds = train_teacher(run, cfg, task, mesh, key_teacher)
    net = teacher_state.model  # the weight average (teacher_ema > 0): the teacher and the students' start
    teacher = net if cfg.teacher == "trained" else task.exact
    if cfg.guidance > 0:  # guide the teacher only; straight-through gradients (Sec. 3.3)
        teacher = L.GuidedTeacher(teacher, scale=cfg.guidance)
    phase_log = {"teacher": {"seconds": seconds, "final": {k: float(v[-1]) for k, v in history.items()}}}
    histories = {"teacher": history}
    precond = None
    if "mm_instant" in cfg.methods:  # "loaded from the teacher checkpoint" (Sec. 3.3): Adam's v of the network
        precond = mmd.preconditioner_from_adam(teacher_state.player.opt_state, eps=cfg.precond_eps)
        if cfg.guidance > 0:
            precond = L.GuidedTeacher(precond, scale=cfg.guidance)

    students = {}
    for i, (name, method, k, overrides) in enumerate(phases(cfg)):
        model, history, seconds = distil(run, cfg, name, method, k, overrides, task, teacher, net, precond, mesh,
                                         jr.fold_in(key_distil, i))
        students[name] = (model, "marginal" if method == "dmd2" else "ancestral", k,
                          dmd2_times(dataclasses.replace(cfg, **overrides), k, task) if method == "dmd2" else None)
        histories[name] = history
        phase_log[name] = {"seconds": seconds, "final": {k_: float(v[-1]) for k_, v in history.items()}}

    run.check()
    samplers = {f"teacher_{step}_k{k}": (teacher, step, k, None) for step in ("ancestral", "ddim") for k in cfg.teacher_ks}
    samplers.update(students)
    k_sample, k_ref, k_floor = jr.split(key_eval, 3)
    samples, results = {}, {}
    for name, (model, step, k, times) in tqdm(samplers.items(), desc="evaluate", file=sys.stdout):
        x, label, secs = draw_samples(model, task, k_sample, cfg.n_samples, k, step, times)  # label: the same for all
        samples[name] = x
        results[name] = {"k": k, "nfe": k, "sample_seconds": secs, **task.evaluate(x, label, k_ref)}
    floor = task.floor(k_floor)
    data_samples, data_labels = (None if a is None else np.asarray(a) for a in task.draw(k_floor, cfg.n_samples))
    main_keys = [n for n in samples if not any(a in n for a in ("_marginal_", "_posterior_", "_nogan_", "_gan_"))]
    run.write_npz("samples.npz", {n: samples[n] for n in main_keys})
    if len(main_keys) < len(samples):
        run.write_npz("samples_ablations.npz", {n: samples[n] for n in samples if n not in main_keys})
    R.write_all(run, cfg, task.primary, results, floor, phase_log, histories, samples, data_samples,
                parallel.describe_batch(cfg.batch, mesh), label, data_labels)
    return results


def parse(argv=None):
    """`(config, output directory, max chunks)` from the command line; bad input exits 2 with a one-line
    `error:` naming the value, before anything is written (`--overwrite` deletes only after all checks)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--data", help="ring8 | gauss | gmm | digits | npz:PATH (images (N,H,W,C), optional labels)")
    p.add_argument("--dim", type=int, help="data dimension of gauss / gmm")
    p.add_argument("--teacher", help="trained | exact")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--steps", help="comma-separated k values for every method (e.g. 1,2,4,8)")
    p.add_argument("--seed", type=int)
    p.add_argument("--zs-sampling", dest="zs_sampling", help="posterior | marginal (Sec. 5.2)")
    p.add_argument("--weighting", help="auto | edm | flat | dmd")
    p.add_argument("--ttur", type=int, help="DMD2 critic updates per generator update")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale of the teacher (images; 0 = none)")
    p.add_argument("--gan", dest="gan", action="store_true", default=None,
                   help="DMD2 with its GAN term (the default for images; toy data default to --no-gan, see README)")
    p.add_argument("--no-gan", dest="gan", action="store_false", default=None)
    p.add_argument("--no-backward-sim", dest="backward_sim", action="store_false", default=None)
    p.add_argument("--out", help="output directory (default runs/<data>-<timestamp>)")
    p.add_argument("--resume", help="continue the run in this directory with its saved config")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing --out")
    p.add_argument("--max-chunks", type=int, help="stop cleanly after this many training chunks (tests resume)")
    a = p.parse_args(argv)
    if a.max_chunks is not None and a.max_chunks < 1:
        p.error(f"--max-chunks must be >= 1; got {a.max_chunks}")
    if a.resume is not None:
        out = Path(a.resume)
        ignored = [k for k, v in vars(a).items() if v != p.get_default(k) and k not in ("resume", "max_chunks")]
        if ignored:
            names = {"gan": "gan" if a.gan else "no-gan", "backward_sim": "no-backward-sim"}
            p.error(f"--resume {out} continues with its saved config.json; drop "
                    f"{', '.join('--' + names.get(k, k.replace('_', '-')) for k in ignored)}")
        if not (out / "config.json").exists():
            p.error(f"--resume {out}: no config.json there, so no run to resume")
        try:
            fields = json.loads((out / "config.json").read_text())
            cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
            p.error(f"--resume {out}: bad config.json: {e}")
        return cfg, out, a.max_chunks
    presets = IMAGE_PRESETS if a.data and tasks.is_image_data(a.data) else PRESETS
    if a.preset not in presets:
        p.error(f"unknown preset {a.preset!r}; choose one of {sorted(presets)}")
    over = {k: getattr(a, k) for k in ("data", "dim", "teacher", "seed", "zs_sampling", "weighting", "ttur", "gan",
                                       "backward_sim", "guidance") if getattr(a, k) is not None}
    if a.methods is not None:
        over["methods"] = tuple(m.strip() for m in a.methods.split(","))
    if a.steps is not None:
        try:
            ks = tuple(int(k) for k in a.steps.split(","))
        except ValueError:
            p.error(f"--steps must be comma-separated integers >= 1; got {a.steps!r}")
        over.update(mm_steps=ks, dmd2_steps=ks)
    try:
        cfg = dataclasses.replace(presets[a.preset], **over)
        # read the file now, so that a bad one stops the run before --overwrite deletes anything
        if cfg.data.startswith("npz:") and D.load_npz(cfg.data[4:])[1] is None and cfg.guidance:
            raise ValueError(f"--guidance {cfg.guidance} needs labels; {cfg.data} has none")
    except ValueError as e:
        p.error(str(e))
    out = Path(a.out or f"runs/{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        p.error(f"--out {out} exists and is not empty; pass --resume {out} to continue it or --overwrite")
    if a.overwrite and out.exists():  # a fresh run: old checkpoints would otherwise be resumed
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for f in ("report.md", "report.json", "samples.npz", "samples_ablations.npz", "samples.png", "losses.png",
                  "metric_vs_nfe.png"):
            (out / f).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        p.error(f"cannot write to --out {out}: {e}")
    return cfg, out, a.max_chunks


def cli(argv=None) -> int:
    """`python train.py`: the exit code, with a one-line message for every expected failure: 0 done, 2 bad input
    (flags, data file, checkpoint; from `parse` too), 3 stopped cleanly (resume it), 4 diverged, 5 a write failed."""
    cfg, out, max_chunks = parse(argv)
    print(f"writing to {out}")
    run = Run(out, max_chunks)

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
