"""What `python train.py` runs: the `Config` of a run, the presets, and the command line that selects them.

`Config` holds every setting of a run (data, teacher, methods, step counts, learning rates) and checks them
when built, so a bad value stops the run before anything is trained or written. `PRESETS` (toy data) and
`IMAGE_PRESETS` (digits, npz) are the named starting points; `parse` turns the command line into a
`Config` and an output directory, with a one-line error naming any bad value.
"""

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import data as D
import dmd2
import mmd
import tasks

DESCRIPTION = "`python train.py`: train a teacher, distil students with each algorithm, measure them against the truth."

METHODS = ("mm_alternating", "mm_instant", "dmd2")


def per_k(name, pairs, what, value_ok):
    """Check a Config field of `(k, value)` pairs (k an integer >= 1, named once, `value_ok(value)`); a ValueError
    names the field, what it takes and the bad value."""
    if not (isinstance(pairs, tuple) and all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
            and p[0] >= 1 and value_ok(p[1]) for p in pairs)):
        raise ValueError(f"{name} must be a tuple of {what}; got {pairs!r}")
    if len({k for k, _ in pairs}) < len(pairs):
        raise ValueError(f"{name} names a k twice: {pairs!r}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Defaults of the default run (ring8, trained teacher, MM k = 8, DMD2 k = 1 and 4)."""

    data: str = "ring8"  # ring8 | gauss | gmm | digits | npz:PATH
    dim: Optional[int] = None  # data dimension for gauss / gmm (None: their defaults, 8 / 16)
    teacher: str = "trained"  # trained (a network) | exact (the closed-form denoiser; students regressed onto it)
    methods: tuple = METHODS  # which distillation algorithms run
    mm_steps: tuple = (8,)  # k (sampling steps) of the mm_alternating and mm_instant students
    dmd2_steps: tuple = (1, 4)  # k of the dmd2 students
    seed: int = 0  # every key of the run derives from it
    zs_sampling: str = "posterior"  # how the MM losses draw z_s: posterior | marginal (Sec. 5.2)
    weighting: str = "auto"  # the MM losses' w(s): auto (flat for k <= 2, else edm; Sec. 3.3) | edm | flat | dmd
    ttur: int = 5  # DMD2 critic updates per generator update
    gan: bool = True  # DMD2's GAN term
    backward_sim: bool = True  # DMD2, k > 1: the generator's inputs come from its own earlier steps
    ablations: bool = False  # also run the marginal-z_s and other-GAN variants (the report's claims table)
    batch: int = 256  # examples per update
    width: int = 128  # network width (MLP hidden units; UViT channels for images)
    depth: int = 3  # network depth (MLP hidden layers; UViT transformer blocks for images)
    teacher_steps: int = 8000  # teacher updates
    teacher_lr: float = 2e-3  # teacher's peak learning rate
    teacher_ema: float = 0.0  # decay of the teacher's weight average (0: none, the last weights)
    mm_train_steps: int = 3000  # Algorithm 2's updates
    mm_train_steps_per_k: tuple = ()  # ((k, updates), ...): Algorithm 2's updates for these k instead
    mm_lr: float = 1e-4  # Algorithm 2's peak learning rate (generator and auxiliary model)
    mm_aux_lr_per_k: tuple = ()  # ((k, lr), ...): Algorithm 2's auxiliary-model rate for these k instead of mm_lr
    instant_train_steps: int = 3000  # Algorithm 3's updates
    nu_batch_mult: int = 2  # Algorithm 3's B' (the batch that gives nu) as a multiple of the batch B
    data_grad_batches: int = 1000  # real batches averaged, once, for Algorithm 3's data term (Eq. 10)
    mm_ema: float = 0.0  # decay of the MM students' weight average, which is then sampled (0: the last weights)
    step_grid: str = "schedule"  # MM students' and teacher samplers' k-step grid: schedule (uniform in t) | cosine
    dmd2_train_steps: int = 1000  # DMD2 generator updates
    dmd2_ema: float = 0.99  # decay of the DMD2 generator's weight average, which is sampled (0: the last weights)
    dmd2_lr: float = 3e-4  # DMD2's AdamW peak learning rate, generator and critic
    dmd2_lr_decay: bool = False  # DMD2: the generator's rate decays along a cosine to 0 over its updates
    guidance: float = 0.0  # classifier-free guidance scale of the teacher (0: none; class-conditional images)
    teacher_ks: tuple = (1, 2, 4, 8, 256)  # k of the teacher's own samplers, the students' reference (256: converged)
    teacher_samplers: tuple = ("ancestral", "ddim")  # the teacher's samplers scored at each of teacher_ks
    n_samples: int = 10_000  # samples drawn per student and sampler for the report
    chunk: int = 250  # training steps per compiled lax.scan call (and per checkpoint)
    jobs: int = 2  # distillation phases trained at once, each in its own thread on the same devices (concurrently)

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
        for f in ("ttur", "batch", "width", "depth", "teacher_steps", "mm_train_steps", "instant_train_steps",
                  "dmd2_train_steps", "n_samples", "chunk", "data_grad_batches", "nu_batch_mult", "jobs"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be an integer >= 1; got {v!r}")
        per_k("mm_train_steps_per_k", self.mm_train_steps_per_k, "(k, updates) pairs of integers >= 1",
              lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        per_k("mm_aux_lr_per_k", self.mm_aux_lr_per_k,
              "(k, lr) pairs, k an integer >= 1 and lr a finite number > 0",
              lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v < float("inf"))
        for flag, xs in (("--methods", self.methods), ("--steps", self.mm_steps), ("--steps", self.dmd2_steps)):
            if len(set(xs)) < len(xs):  # one checkpoint per phase name: a repeated phase would resume its twin
                raise ValueError(f"{flag} lists a value twice: {','.join(map(str, xs))}")
        if not self.teacher_samplers or len(set(self.teacher_samplers)) < len(self.teacher_samplers) or any(
                s not in ("ancestral", "ddim") for s in self.teacher_samplers):
            raise ValueError(f"teacher_samplers must list 'ancestral' and / or 'ddim', each once; "
                             f"got {self.teacher_samplers!r}")
        if self.step_grid not in ("schedule", "cosine"):
            raise ValueError(f"unknown step_grid {self.step_grid!r}; choose 'schedule' or 'cosine'")
        for f in ("teacher_lr", "mm_lr", "dmd2_lr"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v < float("inf")):
                raise ValueError(f"{f} (peak learning rate) must be a finite number > 0; got {v!r}")
        for f in ("teacher_ema", "dmd2_ema", "mm_ema"):
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
        dmd2.DMD2Config(ttur=self.ttur)

    @property
    def grid_shift(self):
        """`MMConfig.grid_shift` of `step_grid`: None (uniform in t) or 0.0 (the unshifted cosine schedule's grid)."""
        return 0.0 if self.step_grid == "cosine" else None

    def train_steps(self, method: str, k: int) -> int:
        """The number of updates of `method`'s k-step student: dmd2_train_steps, instant_train_steps, or
        mm_train_steps (its entry for k in mm_train_steps_per_k, if any)."""
        if method == "dmd2":
            return self.dmd2_train_steps
        if method == "mm_instant":
            return self.instant_train_steps
        return dict(self.mm_train_steps_per_k).get(k, self.mm_train_steps)

    def aux_lr(self, k: int) -> Optional[float]:
        """Algorithm 2's auxiliary-model peak learning rate for the k-step student: its entry in mm_aux_lr_per_k,
        else None (the generator's mm_lr, one rate for both, as the paper)."""
        return dict(self.mm_aux_lr_per_k).get(k)


# Toy data: DMD2 trains 3,000 updates at lr 6e-4 without its GAN term, its generator's rate decayed to 0, and samples
# its 0.99 weight average (EXPERIMENTS.md#dmd2).
TOY_DMD2 = dict(gan=False, dmd2_train_steps=3000, dmd2_lr=6e-4, dmd2_lr_decay=True, dmd2_ema=0.99)
PRESETS = {
    # `python train.py` (EXPERIMENTS.md#ring8-the-default-run-and-the-exact-teacher).
    "default": Config(**TOY_DMD2),
    # Seconds: the end-to-end tests.
    "smoke": Config(width=32, depth=2, batch=128, teacher_steps=300, mm_train_steps=100, instant_train_steps=100,
                    dmd2_train_steps=40, mm_steps=(4,), dmd2_steps=(1, 2), teacher_ks=(1, 8), data_grad_batches=10,
                    chunk=50, n_samples=2000),
    # Every method at k = 1, 2, 4, 8 and the ablations of the claims table.
    "full": Config(mm_steps=(1, 2, 4, 8), dmd2_steps=(1, 2, 4, 8), ablations=True, **TOY_DMD2),
}
# Images (digits, npz:PATH): a small UViT; 898 samples, the size of the FD reference.
IMAGE = dict(data="digits", width=64, depth=2, step_grid="cosine", weighting="flat", teacher_samplers=("ancestral",),
             n_samples=898, data_grad_batches=100, nu_batch_mult=1)
IMAGE_PRESETS = {
    # A 2-core Xeon, alone: 16 minutes on a fast hour of its shared VM (EXPERIMENTS.md#digits-the-cpu-default-preset).
    "default": Config(**{**IMAGE, **dict(
        batch=128, teacher_steps=6000, teacher_lr=3e-3, mm_train_steps=50, mm_lr=1e-3, instant_train_steps=600,
        mm_ema=0.99, dmd2_train_steps=200, dmd2_lr=1e-3, dmd2_ema=0.95, gan=False, dmd2_steps=(1,),
        teacher_ks=(1, 2, 4, 8, 64, 256), chunk=100, jobs=1)}),  # its students gain nothing from two at once
    # Seconds: the end-to-end tests of the image path.
    "smoke": Config(data="digits", width=32, depth=1, batch=32, teacher_steps=30, teacher_ema=0.9, mm_train_steps=10,
                    instant_train_steps=10, dmd2_train_steps=4, ttur=2, mm_steps=(2,), dmd2_steps=(1,), teacher_ks=(1, 8),
                    teacher_samplers=("ancestral",), data_grad_batches=10, n_samples=200, chunk=10),
    # One GPU, meant for <= 15 minutes; quality measured on CPUs (EXPERIMENTS.md#digits-the-full-preset).
    "full": Config(**{**IMAGE, **dict(
        batch=128, teacher_steps=30_000, teacher_lr=1e-3, teacher_ema=0.999, mm_lr=1e-3, mm_train_steps=300,
        mm_train_steps_per_k=((1, 1500), (2, 1500)), mm_aux_lr_per_k=((1, 3e-4),), instant_train_steps=3000,
        mm_ema=0.9995, dmd2_train_steps=1000, mm_steps=(1, 2, 4, 8), dmd2_steps=(1, 2, 4, 8),
        teacher_ks=(1, 2, 4, 8, 16, 32, 64, 128, 256), teacher_samplers=("ancestral", "ddim"), chunk=1000,
        ablations=True, jobs=1)}),
}


def as_tuples(v):
    """A JSON value with its lists (nested too: mm_train_steps_per_k, mm_aux_lr_per_k) back as the
    Config's tuples."""
    return tuple(as_tuples(x) for x in v) if isinstance(v, list) else v


def parse(argv=None):
    """`(config, output directory, max chunks)` from the command line; bad input exits 2 with a one-line
    `error:` naming the value, before anything is written (`--overwrite` deletes only after all checks)."""
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
                   help="DMD2 with its GAN term (the default of --preset full for images; toy data and the digits CPU "
                        "default run --no-gan, see README)")
    p.add_argument("--no-gan", dest="gan", action="store_false", default=None)
    p.add_argument("--no-backward-sim", dest="backward_sim", action="store_false", default=None)
    p.add_argument("--out", help="output directory (default runs/<data>-<timestamp>)")
    p.add_argument("--resume", help="continue the run in this directory with its saved config")
    p.add_argument("--overwrite", action="store_true", help="allow writing into an existing --out")
    p.add_argument("--max-chunks", type=int, help="stop cleanly after this many training chunks (tests resume)")
    p.add_argument("--jobs", type=int, help="distillation phases trained at once (default: the preset's; the numbers "
                   "do not depend on it)")
    a = p.parse_args(argv)
    if a.max_chunks is not None and a.max_chunks < 1:
        p.error(f"--max-chunks must be >= 1; got {a.max_chunks}")
    if a.resume is not None:
        out = Path(a.resume)
        ignored = [k for k, v in vars(a).items() if v != p.get_default(k) and k not in ("resume", "max_chunks", "jobs")]
        if ignored:
            names = {"gan": "gan" if a.gan else "no-gan", "backward_sim": "no-backward-sim"}
            p.error(f"--resume {out} continues with its saved config.json; drop "
                    f"{', '.join('--' + names.get(k, k.replace('_', '-')) for k in ignored)}")
        if not (out / "config.json").exists():
            p.error(f"--resume {out}: no config.json there, so no run to resume")
        try:
            fields = json.loads((out / "config.json").read_text())
            cfg = Config(**{k: as_tuples(v) for k, v in fields.items()})
            cfg = cfg if a.jobs is None else dataclasses.replace(cfg, jobs=a.jobs)
        except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as e:
            p.error(f"--resume {out}: bad config.json: {e}")
        return cfg, out, a.max_chunks
    presets = IMAGE_PRESETS if a.data and tasks.is_image_data(a.data) else PRESETS
    if a.preset not in presets:
        p.error(f"unknown preset {a.preset!r}; choose one of {sorted(presets)}")
    over = {k: getattr(a, k) for k in ("data", "dim", "teacher", "seed", "zs_sampling", "weighting", "ttur", "gan",
                                       "backward_sim", "guidance", "jobs") if getattr(a, k) is not None}
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
