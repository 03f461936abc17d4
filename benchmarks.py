"""Benchmarks: sampler convergence with the exact teacher, and the cost of one update per algorithm.

`python benchmarks.py sampler|steps|memory|all [--batch B] [--width W] [--scan N] [--repeats R]` prints
markdown tables; `python benchmarks.py teacher-ema [--data digits] [--teacher-steps N]` trains a teacher (minutes);
`python benchmarks.py guidance [--preset full] [--scales 0,0.5,1,2] [--out DIR]` runs `train.py` once per scale;
`python benchmarks.py targets RUN_DIR` checks a finished run's report.json against this implementation's targets.

- `sampler`: `sampler_error` (relative error of sample mean and covariance, `metrics.py`) of ancestral
  and DDIM sampling with the exact `GaussianDenoiser`, for 1 ... 512 steps, beside the Monte-Carlo
  noise floor; and the error of the recovered component weight of a two-component mixture.
- `steps`: the steady-state time of one update of each algorithm (run `--scan` times inside
  `mmd.scan_steps` under one `eqx.filter_jit`, so Python overhead is excluded) as a ratio to one
  teacher training step, beside the ratio implied by counting network evaluations (`NFE`), and the
  compile time of each step. Rounds are interleaved over the algorithms and each ratio is the median
  of per-round ratios, so a background load that drifts hits numerator and denominator alike.
- `memory`: XLA's compiled memory of one update of each algorithm for the image denoiser.
- `teacher-ema`: the teacher of a data set's default preset with and without the average of its weights.
- `guidance`: digits with the teacher guided at several scales; the teacher and alternating MM k = 8.
- `targets`: pass / fail of the acceptance thresholds this implementation set itself (teacher class accuracy >= 0.8,
  instant MM within 1.5x of alternating, DMD2 k = 1 off the modes <= 3%, ...), which are not claims of the papers and
  so are not in a run's report.md.
"""

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import dmd2
import mmd
import report
from data import RING2, random_cov
from metrics import component_fractions, sampler_error, sampler_noise_floor
from models import GaussianDenoiser, MixtureDenoiser, MLPDenoiser
from sampling import Schedule, ancestral_sample, ddim_sample

SEED = 0
NUM_STEPS = (1, 2, 4, 8, 64, 512)
SAMPLERS = {"ancestral": ancestral_sample, "ddim": ddim_sample}

# Network evaluations per update: forward 1, forward + backward 3, JVP 2, forward + backward to the
# input only (no weight gradients) 2. DMD2's discriminator head is not a network evaluation (NOTES).
NFE = {
    "teacher": (3, "model fwd+bwd 3"),
    "alternating": (10, "aux update (gen fwd 1 + teacher fwd 1 + aux fwd+bwd 3) + gen update (gen fwd+bwd 3 "
                        "+ aux fwd 1 + teacher fwd 1)"),
    "instant": (9, "gen fwd 1 on B' + teacher fwd+bwd 3 on B' + gen fwd+bwd 3 on B + teacher JVP 2 on B"),
    "dmd2": (57, "5 x critic (gen fwd 1 + fake fwd+bwd 3 + fake features fwd+bwd on real and fake 6) + gen update "
                 "(gen fwd+bwd 3 + real fwd 1 + fake fwd 1 + fake features fwd + input-only bwd 2)"),
}
NOTES = """Notes: counts follow mmd.py/losses.py at k = 8 (MM) and DMD2Config() (k = 1, ttur = 5, GAN on; k = 1
needs no backward simulation). Finer counts: Algorithm 3's JVP is in the teacher's *parameters*, so its
tangent has two matmuls per layer (dW x + W dx), ~3 rather than 2; DMD2's discriminator head (a
width-128 MLP) runs fwd+bwd twice per critic update and fwd + input-only bwd once per generator
update, uncounted above. Each update also runs its optimiser (1 teacher, 2 alternating, 1 instant,
ttur + 1 DMD2). Compile = first call minus a steady call (tracing + XLA compilation); the target is
judged on CPU seconds, which depend little on the machine's load and bound the wall time on an idle
machine; wall seconds are shown too."""


def markdown(header, rows):
    """A markdown table from a header and rows of already-formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ----------------------------------------------------------------------------------------------
# 1. Sampler convergence with the exact teacher.


@eqx.filter_jit
def _draw(denoiser, key, sampler, shape, num_steps):
    return SAMPLERS[sampler](denoiser, denoiser.schedule, key, shape, num_steps)


def sampler_table(n=20_000, num_steps=NUM_STEPS, dims=(2, 8), seed=SEED):
    """Markdown table of sampler errors (rows: data and sampler; columns: num_steps).

    Gaussian rows: `sampler_error` of `n` samples from N(mu, cov), cov = `random_cov` with eigenvalues
    in [0.02, 1] (as `test_mmd.test_sampler_converges_with_exact_teacher`); floor = `sampler_noise_floor`.
    Mixture rows (`data.RING2`): |fraction of samples nearest the first mean - 0.3|; floor = its binomial std error.
    Every (data, sampler, num_steps) uses the key `fold_in(fold_in(key(seed), d), num_steps)`, d = 0 for the mixture.
    """
    key = jr.key(seed)
    rows, floors = [], []
    for d in dims:
        rng = np.random.default_rng(seed + d)
        mu, cov = rng.normal(size=d), random_cov(rng, d, 0.02, 1.0)
        den, floor = GaussianDenoiser(mu, cov), sampler_noise_floor(cov, n)
        floors.append(f"d = {d}: {floor:.4f}")
        for name in SAMPLERS:
            errs = [sampler_error(np.asarray(_draw(den, jr.fold_in(jr.fold_in(key, d), k), name, (n, d), k)), mu, cov)
                    for k in num_steps]
            rows.append([f"Gaussian d = {d}", name, f"{floor:.4f}"] + [f"{e:.4f}" for e in errs])
    mix, w = MixtureDenoiser(**RING2), RING2["weights"][0]
    floor = np.sqrt(w * (1 - w) / n)
    floors.append(f"mixture weight: {floor:.4f}")
    for name in SAMPLERS:
        draws = [np.asarray(_draw(mix, jr.fold_in(jr.fold_in(key, 0), k), name, (n, 2), k)) for k in num_steps]
        errs = [abs(component_fractions(x, RING2["means"])[0] - w) for x in draws]
        rows.append(["mixture 0.3/0.7, weight error", name, f"{floor:.4f}"] + [f"{e:.4f}" for e in errs])
    title = f"Sampler error with the exact teacher, {n} samples (noise floor {', '.join(floors)})\n\n"
    return title + markdown(["data", "sampler", "floor"] + [f"k = {k}" for k in num_steps], rows)


# ----------------------------------------------------------------------------------------------
# 2. Cost of one update per algorithm.


def make_steps(batch=256, width=128, depth=3, seed=SEED, names=tuple(NFE)):
    """`{name: (state, step)}` for `names` (of `NFE`'s keys) and `frozen`, on 2-D Gaussian data.

    `step(state, frozen, key) -> (state, metrics)` draws its data inside the step from
    `frozen["data"].sample` (the same for every algorithm) and reads the frozen teacher (the MLP
    itself, untrained: the cost does not depend on the weights) and instant MM's preconditioner
    from `frozen`, so nothing large is closed over as a constant.
    """
    key, schedule = jr.key(seed), Schedule()
    rng = np.random.default_rng(seed)
    data = GaussianDenoiser(rng.normal(size=2), random_cov(rng, 2, 0.02, 1.0))
    net = MLPDenoiser(2, width=width, depth=depth, key=jr.fold_in(key, 0))
    frozen = {"data": data, "teacher": net}
    if "instant" in names:
        xs = data.sample(jr.fold_in(key, 1), 8 * batch).reshape(8, batch, 2)
        frozen["precond"] = eqx.filter_jit(mmd.estimate_preconditioner)(net, schedule, xs, jr.fold_in(key, 2))
    t_opt, m_opt, d_opt = mmd.teacher_optimiser(), mmd.mm_optimiser(), dmd2.dmd2_optimiser()
    mcfg, dcfg = mmd.MMConfig(), dmd2.DMD2Config()
    draw = lambda f, k, n: f["data"].sample(k, n)

    def teacher(st, f, k):
        return mmd.teacher_step(st, draw(f, k, batch), jr.fold_in(k, 1), optimiser=t_opt, schedule=schedule)

    def alternating(st, f, k):
        return mmd.alternating_step(st, f["teacher"], draw(f, k, batch), jr.fold_in(k, 1), cfg=mcfg,
                                    optimiser=m_opt, schedule=schedule)

    def instant(st, f, k):
        return mmd.instant_step(st, f["teacher"], f["precond"], draw(f, k, batch), draw(f, jr.fold_in(k, 2), batch),
                                jr.fold_in(k, 1), cfg=mcfg, optimiser=m_opt, schedule=schedule)

    def dmd2_(st, f, k):
        x_real = draw(f, k, dcfg.ttur * batch).reshape(dcfg.ttur, batch, 2)
        return dmd2.dmd2_step(st, f["teacher"], x_real, jr.fold_in(k, 1), cfg=dcfg, optimiser=d_opt, schedule=schedule)

    inits = {
        "teacher": lambda: (mmd.init_player(net, t_opt), teacher),
        "alternating": lambda: (mmd.init_alternating(net, m_opt), alternating),
        "instant": lambda: (mmd.init_instant(net, m_opt, frozen["precond"]), instant),
        "dmd2": lambda: (dmd2.init_dmd2(net, jr.fold_in(key, 3), d_opt, dcfg, width), dmd2_),
    }
    return {name: inits[name]() for name in names}, frozen


@eqx.filter_jit
def _run(step, state, frozen, keys):
    """`len(keys)` updates as one `lax.scan` (the state is not fed back between calls: same work each call)."""
    return mmd.scan_steps(lambda st, k: step(st, frozen, k), state, keys)


def time_steps(steps, frozen, scan=50, repeats=7, seed=SEED):
    """Per step name: `(first, steady)`, each an array `[wall s, CPU s]` of one call of `scan` updates;
    `first` is the compiling call, `steady` `(repeats, 2)` are later calls, rounds interleaved over names."""
    keys = jr.split(jr.key(seed), scan)

    def timed(state, step):
        w, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(_run(step, state, frozen, keys))
        return np.array([time.perf_counter() - w, time.process_time() - c])

    first = {name: timed(*sf) for name, sf in steps.items()}
    steady = {name: [] for name in steps}
    for _ in range(repeats):
        for name, sf in steps.items():
            steady[name].append(timed(*sf))
    return {name: (first[name], np.array(steady[name])) for name in steps}


def steps_table(batch=256, width=128, depth=3, scan=50, repeats=7, seed=SEED, names=tuple(NFE)):
    """Markdown table: per-step ms, measured and NFE ratios to a teacher step, compile seconds, targets.

    `names`: which of `NFE`'s keys to time; the teacher (the unit) always is.
    """
    steps, frozen = make_steps(batch, width, depth, seed, ("teacher",) + tuple(n for n in names if n != "teacher"))
    timings = time_steps(steps, frozen, scan, repeats, seed)
    base, base_nfe = timings["teacher"][1][:, 0], NFE["teacher"][0]
    rows = []
    for name, (first, steady) in timings.items():
        ratio = float(np.median(steady[:, 0] / base))  # per-round ratios: drift in load cancels
        nfe, count = NFE[name]
        rel = ratio / (nfe / base_nfe)
        wall, cpu = first - np.median(steady, axis=0)
        ms = 1e3 * np.median(steady[:, 0]) / scan
        rows.append([name, f"{ms:.2f}", f"{ratio:.2f}", f"{nfe / base_nfe:.2f} ({nfe}/{base_nfe})", f"{rel:.2f}",
                     "met" if 1 / 1.5 <= rel <= 1.5 else "not met", f"{cpu:.1f}", f"{wall:.1f}",
                     "met" if cpu < 10 else "not met", count])
    title = (f"Cost of one update, MLPDenoiser(2, width={width}, depth={depth}), batch {batch}, {scan} updates per "
             f"timed scan, median of {repeats} interleaved rounds (jax {jax.__version__}, "
             f"{jax.devices()[0].platform})\n\n")
    header = ["step", "ms / step", "measured ratio", "NFE ratio", "measured / NFE", "within 1.5x",
              "compile CPU s", "compile wall s", "compile < 10 s", "NFE count"]
    return title + markdown(header, rows) + "\n\n" + NOTES


def memory_table(configs=((8, 1, 64, 128), (64, 3, 64, 8))):
    """Compiled memory of one update of each algorithm for the image denoiser, per device.

    `configs`: (side, channels, width, per-device batch). Numbers are XLA's `memory_analysis()` of the
    compiled step (arguments + outputs + temporaries, aliasing not subtracted), so an upper bound.
    """
    from uvit import ImageDenoiser  # noqa: PLC0415

    rows = []
    for side, ch, width, b in configs:
        net = ImageDenoiser(side, ch, num_classes=10, width=width, key=jr.key(0))
        sched = net.schedule
        x, lab = jnp.zeros((b, side, side, ch)), jnp.zeros((b,), jnp.int32)
        t_opt, m_opt, d_opt = mmd.teacher_optimiser(), mmd.mm_optimiser(), dmd2.dmd2_optimiser()
        cfg, dcfg = mmd.MMConfig(), dmd2.DMD2Config()
        precond = jax.tree.map(jnp.ones_like, eqx.filter(net, eqx.is_inexact_array))
        calls = {
            "teacher": (lambda st: mmd.teacher_step(st, x, jr.key(0), optimiser=t_opt, schedule=sched, label=lab),
                        mmd.init_player(net, t_opt)),
            "alternating": (lambda st: mmd.alternating_step(st, net, x, jr.key(0), cfg=cfg, optimiser=m_opt,
                                                            schedule=sched, label=lab), mmd.init_alternating(net, m_opt)),
            "instant": (lambda st: mmd.instant_step(st, net, precond, x, x, jr.key(0), cfg=cfg, optimiser=m_opt,
                                                    schedule=sched, label=lab, label_prime=lab), mmd.init_instant(net, m_opt, precond)),
            "dmd2": (lambda st: dmd2.dmd2_step(st, net, jnp.stack([x] * dcfg.ttur), jr.key(0), cfg=dcfg, optimiser=d_opt,
                                              schedule=sched, label=jnp.stack([lab] * dcfg.ttur)),
                     dmd2.init_dmd2(net, jr.key(1), d_opt, dcfg, width)),
        }
        params = sum(a.size for a in jax.tree.leaves(eqx.filter(net, eqx.is_inexact_array)))
        row = [f"{side}x{side}x{ch}", f"{params / 1e3:.0f}k", str(b)]
        for name, (fn, state) in calls.items():
            dyn, static = eqx.partition(state, eqx.is_array)
            jitted = jax.jit(lambda d: eqx.filter(fn(eqx.combine(d, static)), eqx.is_array))
            mem = jitted.lower(dyn).compile().memory_analysis()
            total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            row.append(f"{total / 2**20:.0f}")
        rows.append(row)
    header = ["image", "params", "batch / device", "teacher MiB", "alternating MiB", "instant MiB", "dmd2 (ttur 5) MiB"]
    return "Compiled memory of one update per device (XLA memory_analysis: arguments + outputs + temporaries)\n\n" + markdown(header, rows)


# ----------------------------------------------------------------------------------------------
# 4. What the teacher's weight average buys.


def teacher_ema_table(data="digits", steps=None, decays=(0.99, 0.995, 0.998, 0.999), eval_ks=(8, 64), seed=0, lr=None):
    """Markdown table: the teacher of the `default` preset of `data`, trained once, sampled (ancestral) with its last
    weights and with the EMA of each decay, all kept during the same training run (`train.ema_update`), so the rows
    differ only in the averaging. Metrics as in `train.py` (digits: FD in classifier features and class accuracy)."""
    import dataclasses  # noqa: PLC0415

    import parallel  # noqa: PLC0415
    import tasks  # noqa: PLC0415
    import train  # noqa: PLC0415

    presets = train.IMAGE_PRESETS if tasks.is_image_data(data) else train.PRESETS
    over = {k: v for k, v in (("teacher_steps", steps), ("teacher_lr", lr)) if v}
    cfg = dataclasses.replace(presets["default"], data=data, seed=seed, **over)
    task, mesh = tasks.make_task(cfg), parallel.data_mesh()
    opt = mmd.teacher_optimiser(cfg.teacher_lr, cfg.teacher_steps)

    def fn(st, x, k, lab):
        (player, emas, _), n1 = st, st[2] + 1
        player, loss = mmd.teacher_step(player, x, k, optimiser=opt, schedule=task.schedule, label=lab)
        return (player, [train.ema_update(e, player.model, d, n1) for e, d in zip(emas, decays)], n1), {"loss": loss}

    step = train.with_labels(fn, task, cfg.batch, mesh, dropout=train.P_UNCOND)
    net = task.network(jr.key(cfg.seed))
    state = (mmd.init_player(net, opt), [net] * len(decays), jnp.int32(0))
    advance = eqx.filter_jit(lambda st, keys: mmd.scan_steps(step, st, keys))
    key_train, key_sample, key_ref = jr.split(jr.key(cfg.seed), 3)
    t0 = time.perf_counter()
    for start in range(0, cfg.teacher_steps, cfg.chunk):
        state, _ = advance(state, jr.split(jr.fold_in(key_train, start), min(cfg.chunk, cfg.teacher_steps - start)))
    jax.block_until_ready(state)
    train_s = time.perf_counter() - t0
    models = {"last weights (teacher_ema = 0)": state[0].model, **{f"EMA {d}": e for d, e in zip(decays, state[1])}}
    wanted = ("fd", "acc") if task.primary == "fd" else ("mmd2", "mode_tv")
    results = {(name, k): task.evaluate(*train.draw_samples(model, task, key_sample, cfg.n_samples, k, "ancestral")[:2],
                                        key_ref) for name, model in models.items() for k in eval_ks}
    metrics = [m for m in wanted if m in next(iter(results.values()))]
    rows = [[name] + [f"{results[name, k][m]:.3g}" for k in eval_ks for m in metrics] for name in models]
    header = ["teacher weights"] + [f"{m}, {k} steps" for k in eval_ks for m in metrics]
    title = (f"Teacher weight average: {data}, {cfg.teacher_steps} teacher steps (lr {cfg.teacher_lr}, batch {cfg.batch}), "
             f"{cfg.n_samples} samples, ancestral sampler; training took {train_s:.0f} s\n\n")
    return title + markdown(header, rows)


# ----------------------------------------------------------------------------------------------
# 5. Classifier-free guidance of the teacher, and what alternating MM makes of it.


def guidance_table(scales=(0.0, 0.5, 1.0, 2.0), preset="full", out="runs/guidance", k=8):
    """Markdown table: FD and class accuracy of the guided teacher (its most-step ancestral sampler and 8 steps) and of
    alternating MM at `k` steps distilled from it, for each guidance scale, on digits with `IMAGE_PRESETS[preset]`.

    One `train.main` run per scale in `out/g<scale>`; the teacher (trained with label dropout, independent of the
    scale) is trained once and its checkpoint copied into the other runs, which therefore skip that phase.
    """
    import dataclasses  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import train  # noqa: PLC0415

    base = train.IMAGE_PRESETS[preset]
    t_ks = sorted({8, max(base.teacher_ks)}, reverse=True)
    rows, first = [], None
    for g in scales:
        cfg = dataclasses.replace(base, guidance=float(g), methods=("mm_alternating",), mm_steps=(k,), ablations=False,
                                  teacher_ks=tuple(t_ks))
        run_dir = Path(out) / f"g{g:g}"
        if first is not None:  # the same teacher: its final checkpoint, so train.main skips the teacher phase
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            for f in ("teacher.eqx", "teacher.npz"):
                shutil.copy(first / "checkpoints" / f, run_dir / "checkpoints" / f)
        t0 = time.perf_counter()
        res = train.main(cfg, train.Run(run_dir))
        first = first or run_dir
        cell = lambda n: f"{res[n]['fd']:.3g} / {res[n].get('acc', float('nan')):.3f}"
        rows.append([f"{g:g}"] + [cell(f"teacher_ancestral_k{t}") for t in t_ks] +
                    [cell(f"mm_alternating_k{k}"), f"{time.perf_counter() - t0:.0f}"])
    header = (["guidance scale"] + [f"teacher {t} steps: FD / acc" for t in t_ks] +
              [f"alternating MM k = {k}: FD / acc", "run s"])
    return f"Guidance on digits, preset {preset!r}, runs in {out}/\n\n" + markdown(header, rows)


# ----------------------------------------------------------------------------------------------
# 6. Acceptance targets of a finished run (thresholds of this implementation, not claims of the papers).


def targets(results, floor, m="mmd2"):
    """This implementation's acceptance targets on one run's `results` (report.json's "samplers") and noise
    `floor`, judged on the primary metric `m`. Rows `{"target", "measured", "met"}`; `measured` names the samplers
    whose numbers decided each."""
    rows = []
    add = lambda target, measured, met: rows.append({"target": target, "measured": measured, "met": bool(met)})
    cmp = lambda metric, a, b: report._cmp(results, metric, a, b)
    t_many = max((r["k"] for n, r in results.items() if n.startswith("teacher_ancestral_k")), default=None)
    ref, a8, al, d1 = f"teacher_ancestral_k{t_many}", "teacher_ancestral_k8", "mm_alternating_k8", "dmd2_k1"
    t_ref, t8, alt, d = results.get(ref), results.get(a8), results.get(al), results.get(d1)
    if t_ref and "acc" in t_ref:
        add(f"teacher {t_many}-step class accuracy >= 0.8", f"acc {t_ref['acc']:.3g} ({ref})", t_ref["acc"] >= 0.8)
    if alt and t_ref:
        add(f"alternating k=8 {m} <= teacher {t_many}-step {m}", cmp(m, al, ref), alt[m] <= t_ref[m])
        if m == "fd":
            for x in (1.2, 2):
                add(f"alternating k=8 {m} within {x}x of teacher {t_many}-step",
                    f"{m} {alt[m]:.3g} ({al}) vs {x} x {t_ref[m]:.3g} ({ref})", alt[m] <= x * t_ref[m])
        if "mode_tv" in alt:
            add(f"alternating k=8 mode_tv <= teacher {t_many}-step mode_tv", cmp("mode_tv", al, ref),
                alt["mode_tv"] <= t_ref["mode_tv"])
        if "acc" in alt:
            add(f"alternating k=8 class accuracy >= teacher {t_many}-step", cmp("acc", al, ref),
                alt["acc"] >= t_ref["acc"])
            add(f"alternating k=8 class accuracy within 0.03 of teacher {t_many}-step", cmp("acc", al, ref),
                alt["acc"] >= t_ref["acc"] - 0.03)
        # Sampling time scales with network evaluations, so the ideal speed-up is the NFE ratio (256 / 8 = 32x);
        # fixed per-call costs (compiled loop, transfers) eat into it, hence the allowance of 2x.
        ideal, speed = t_ref["nfe"] / alt["nfe"], t_ref["sample_seconds"] / alt["sample_seconds"]
        add(f"alternating k=8 sampling faster than the {t_many}-step teacher by >= 1/2 of the NFE ratio",
            f"{speed:.1f}x ({ref} {t_ref['sample_seconds']:.3g} s / {al} {alt['sample_seconds']:.3g} s) vs "
            f"NFE ratio {t_ref['nfe']}/{alt['nfe']} = {ideal:.0f}x", speed >= 0.5 * ideal)
    if alt and t8:
        frac = 2 if m == "fd" else 3
        add(f"alternating k=8 {m} <= 1/{frac} of teacher 8-step {m}",
            f"{m} {alt[m]:.3g} ({al}) vs {t8[m]:.3g} / {frac} ({a8})", alt[m] <= t8[m] / frac)
    if d and t_ref:
        for x in (2, 3) if m == "fd" else (2,):
            add(f"DMD2 k=1 {m} within {x}x of teacher {t_many}-step",
                f"{m} {d[m]:.3g} ({d1}) vs {x} x {t_ref[m]:.3g} ({ref})", d[m] <= x * t_ref[m])
    if d and "class_div" in d and "class_div" in floor:  # one image per class scores 0
        add("DMD2 k=1 within-class diversity >= 0.7x the data's",
            f"class_div {d['class_div']:.3g} ({d1}) vs 0.7 x {floor['class_div']:.3g} (real vs real)",
            d["class_div"] >= 0.7 * floor["class_div"])
    ins, d4 = results.get("mm_instant_k8"), results.get("dmd2_k4")
    if ins and alt:  # Algorithm 3 against Algorithm 2 and the teacher's own 8 steps
        add(f"instant k=8 {m} <= 1.5x alternating k=8",
            f"{m} {ins[m]:.3g} (mm_instant_k8) vs 1.5 x {alt[m]:.3g} ({al})", ins[m] <= 1.5 * alt[m])
    if ins and t8 and m == "mmd2":
        add(f"instant k=8 {m} <= 1/3 of teacher 8-step {m}",
            f"{m} {ins[m]:.3g} (mm_instant_k8) vs {t8[m]:.3g} / 3 ({a8})", ins[m] <= t8[m] / 3)
    if d and d4:  # DMD2 with several steps against one
        add(f"DMD2 k=4 {m} <= DMD2 k=1 {m}", cmp(m, "dmd2_k4", d1), d4[m] <= d[m])
    if d and t8 and m == "mmd2":
        add(f"DMD2 k=1 {m} <= teacher 8-step {m}", cmp(m, d1, a8), d[m] <= t8[m])
    if d and "mode_precision" in d:
        off = 1.0 - d["mode_precision"]
        add("DMD2 k=1 off-mode fraction <= 3%", f"{off:.1%} of samples off every mode ({d1})", off <= 0.03)
    for n, r in results.items():
        if m == "mmd2" and not n.startswith("teacher") and r["k"] >= 4:
            add(f"{n} MMD^2 within 2x of the noise floor (meaningful with --teacher exact)",
                f"mmd2 {r['mmd2']:.2e} ({n}) vs 2 x {max(floor['mmd2'], 0):.2e} (real vs real)",
                r["mmd2"] <= 2 * max(floor["mmd2"], 0))
    return rows


def targets_table(run_dir):
    """Markdown table of `targets` for the train.py run in `run_dir` (read from its report.json), and the count met."""
    rep = json.loads((Path(run_dir) / "report.json").read_text())
    m = rep.get("primary", "fd" if "fd" in rep["floor"] else "mmd2")
    rows = targets(rep["samplers"], rep["floor"], m)
    table = markdown(["target", "measured", "met"], [[r["target"], r["measured"], "yes" if r["met"] else "no"]
                                                     for r in rows])
    return f"{table}\n\n{sum(r['met'] for r in rows)} of {len(rows)} targets met ({run_dir})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", choices=("sampler", "steps", "memory", "all", "teacher-ema", "guidance", "targets"))
    p.add_argument("run", nargs="?", help="targets: a finished train.py run directory (reads its report.json)")
    p.add_argument("--preset", default="full", help="guidance: the digits preset (full: an accelerator run)")
    p.add_argument("--scales", default="0,0.5,1,2", help="guidance: comma-separated guidance scales")
    p.add_argument("--out", default="runs/guidance", help="guidance: directory of the runs")
    p.add_argument("--data", default="digits", help="teacher-ema: the data set (its default preset)")
    p.add_argument("--teacher-steps", type=int, help="teacher-ema: training steps (default: the preset's)")
    p.add_argument("--teacher-lr", type=float, help="teacher-ema: learning rate (default: the preset's)")
    p.add_argument("--seed", type=int, default=SEED, help="teacher-ema: seed of the teacher run")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--scan", type=int, default=50, help="updates per timed call")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per step (median)")
    args = p.parse_args(argv)
    if args.name == "targets":
        if args.run is None or not (Path(args.run) / "report.json").is_file():
            p.error(f"targets needs a finished train.py run directory (with report.json); got {args.run!r}")
        print(targets_table(args.run))
    if args.name in ("sampler", "all"):
        t0 = time.perf_counter()
        print(f"{sampler_table()}\n\n(sampler benchmark: {time.perf_counter() - t0:.0f} s)\n", flush=True)
    if args.name in ("steps", "all"):
        t0 = time.perf_counter()
        table = steps_table(args.batch, args.width, scan=args.scan, repeats=args.repeats)
        print(f"{table}\n\n(steps benchmark: {time.perf_counter() - t0:.0f} s)", flush=True)
    if args.name in ("memory", "all"):
        print(memory_table(), flush=True)
    if args.name == "teacher-ema":  # trains a teacher: minutes, not part of `all`
        t0 = time.perf_counter()
        print(f"{teacher_ema_table(args.data, args.teacher_steps, seed=args.seed, lr=args.teacher_lr)}\n\n(teacher-ema: {time.perf_counter() - t0:.0f} s)")
    if args.name == "guidance":  # trains: a GPU run with the full preset
        scales = tuple(float(g) for g in args.scales.split(","))
        print(guidance_table(scales, args.preset, args.out), flush=True)


if __name__ == "__main__":
    main()
