"""The run's report: tables (report.md, report.json), the claims table, and the plots.

A claim of either paper "held" in this run if the stated comparison of measured numbers holds;
comparisons the run did not include are marked "not run" with the flag that would include them.
"""

import json

import einops
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402



def _get(results, method, k):
    return results.get(f"{method}_k{k}")


def _ks(results, method):
    return sorted(int(n.rsplit("_k", 1)[1]) for n in results if n.startswith(method + "_k"))


def instant_decay(history):
    """Smoothed instant loss (Eq. 9 estimate): final / peak ratio and the fitted exponential rate after the peak."""
    loss = np.asarray(history["instant_loss"], np.float64)
    w = max(len(loss) // 20, 1)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    peak = int(np.argmax(smooth))
    tail = smooth[peak:]
    pos = tail > 0
    rate = np.polyfit(np.arange(len(tail))[pos], np.log(tail[pos]), 1)[0] if pos.sum() > 2 else float("nan")
    return float(smooth[-1] / smooth[peak]), float(rate), smooth


def claims(results, histories, samples, m="mmd2"):
    rows = []
    t_many = max((int(n.rsplit("_k", 1)[1]) for n in results if n.startswith("teacher_ancestral_k")), default=None)

    def add(claim, measured, held):
        rows.append({"claim": claim, "measured": measured, "held": held})

    for method in ("mm_alternating", "mm_instant", "dmd2"):
        for k in _ks(results, method):
            if k >= 8 and t_many:
                s, t = _get(results, method, k), _get(results, "teacher_ancestral", t_many)
                add(f"{method} with k = {k} at least as good as the teacher with {t_many} steps ({m})",
                    f"{s[m]:.2e} vs {t[m]:.2e}", bool(s[m] <= t[m]))
    for method in ("mm_alternating", "mm_instant", "dmd2"):
        ks = _ks(results, method)
        if 1 in ks and max(ks) > 1:
            one, many = _get(results, method, 1), _get(results, method, max(ks))
            add(f"{method}: multi-step (k = {max(ks)}) better than one step ({m})",
                f"{many[m]:.2e} vs {one[m]:.2e}", bool(many[m] < one[m]))
        elif ks:
            add(f"{method}: multi-step better than one step", "not run (needs k = 1 and k > 1: --steps 1,8)", None)
    common = sorted(set(_ks(results, "mm_alternating")) & set(_ks(results, "mm_instant")))
    for k in common:
        a, i = _get(results, "mm_alternating", k), _get(results, "mm_instant", k)
        add(f"alternating better than instant at k = {k} ({m})", f"{a[m]:.2e} vs {i[m]:.2e}",
            bool(a[m] < i[m]))
    marg = [n for n in samples if n.startswith("mm_alternating_marginal_k")]
    for n in marg:
        k = int(n.rsplit("_k", 1)[1])
        post = samples.get(f"mm_alternating_k{k}")
        if post is not None:
            tp, tm = (float(np.sum(np.var(a.reshape(len(a), -1), 0))) for a in (post, samples[n]))
            add(f"posterior z_s more diverse than marginal z_s (alternating, k = {k}; total variance)",
                f"{tp:.3f} vs {tm:.3f}", bool(tp > tm))
    if not marg:
        add("posterior z_s more diverse than marginal z_s", "not run (needs --preset full or ablations)", None)
    for n, h in histories.items():
        if "instant_loss" in h and len(h["instant_loss"]) > 40:
            ratio, rate, _ = instant_decay(h)
            add(f"the instant loss falls roughly exponentially ({n})",
                f"final/peak {ratio:.3f}, log-rate {rate:.2e}/step", bool(ratio < 0.25 and rate < 0))
    nogan = [n for n in results if n.startswith("dmd2_nogan_k")]
    for n in nogan:
        k = int(n.rsplit("_k", 1)[1])
        g, ng = _get(results, "dmd2", k), results[n]
        if g is not None:
            add(f"DMD2 with GAN better than without (k = {k}, {m})", f"{g[m]:.2e} vs {ng[m]:.2e}",
                bool(g[m] < ng[m]))
    if not nogan:
        add("DMD2 with GAN better than without", "not run (needs --preset full or ablations)", None)
    return rows


def targets(results, floor, m="mmd2"):
    """The targets of the train.py issue, as measured."""
    rows = []
    t_many = max((r["k"] for n, r in results.items() if n.startswith("teacher_ancestral_k")), default=None)
    t_ref, t8 = _get(results, "teacher_ancestral", t_many), _get(results, "teacher_ancestral", 8)
    alt, d1 = _get(results, "mm_alternating", 8), _get(results, "dmd2", 1)
    if alt and t_ref:
        rows.append((f"alternating k=8 {m} <= teacher {t_many}-step {m}", f"{alt[m]:.3g} vs {t_ref[m]:.3g}",
                     alt[m] <= t_ref[m]))
        if m == "fd":
            rows.append((f"alternating k=8 {m} within 1.2x of teacher {t_many}-step", f"{alt[m]:.3g} vs {1.2 * t_ref[m]:.3g}",
                         alt[m] <= 1.2 * t_ref[m]))
        for extra in ("mode_tv",):
            if extra in alt:
                rows.append((f"alternating k=8 {extra} <= teacher {t_many}-step {extra}", f"{alt[extra]:.3f} vs {t_ref[extra]:.3f}",
                             alt[extra] <= t_ref[extra]))
        if "acc" in alt:
            rows.append((f"alternating k=8 class accuracy >= teacher {t_many}-step", f"{alt['acc']:.3f} vs {t_ref['acc']:.3f}",
                         alt["acc"] >= t_ref["acc"]))
        rows.append((f"alternating k=8 sampling >= 100x faster than {t_many}-step teacher",
                     f"{t_ref['sample_seconds'] / alt['sample_seconds']:.0f}x", t_ref["sample_seconds"] >= 100 * alt["sample_seconds"]))
    if alt and t8:
        frac = 2 if m == "fd" else 3
        rows.append((f"alternating k=8 {m} <= 1/{frac} of teacher 8-step {m}", f"{alt[m]:.3g} vs {t8[m] / frac:.3g}",
                     alt[m] <= t8[m] / frac))
    if d1 and t_ref:
        rows.append((f"DMD2 k=1 {m} within 2x of teacher {t_many}-step", f"{d1[m]:.3g} vs {2 * t_ref[m]:.3g}",
                     d1[m] <= 2 * t_ref[m]))
    for n, r in results.items():
        if m == "mmd2" and not n.startswith("teacher") and r["k"] >= 4:
            rows.append((f"{n} MMD^2 within 2x of the noise floor (meaningful with --teacher exact)",
                         f"{r['mmd2']:.2e} vs {2 * max(floor['mmd2'], 0):.2e}", r["mmd2"] <= 2 * max(floor["mmd2"], 0)))
    return [{"target": a, "measured": b, "met": bool(c)} for a, b, c in rows]


def markdown(cfg, results, floor, phase_log, claim_rows, target_rows, batch):
    metrics = [k for k in next(iter(results.values())) if k not in ("k", "nfe", "sample_seconds")]
    fmt = {k: "{:.3g}" for k in metrics}
    fmt.update({"mmd2": "{:.2e}", "energy": "{:.2e}", "mode_precision": "{:.3f}", "mode_recall": "{:.2f}"})
    show = lambda r, m: fmt[m].format(r[m]) if m in r else "-"
    head = "| sampler | NFE | " + " | ".join(metrics) + f" | time for {cfg.n_samples} (s) |"
    lines = [f"# Report: {cfg.data}, teacher {cfg.teacher}, seed {cfg.seed}, guidance {cfg.guidance}", "", "## Samplers against the truth", "",
             head, "|" + "---|" * (len(metrics) + 3),
             "| *real vs real (noise floor)* | - | " + " | ".join(show(floor, m) for m in metrics) + " | - |"]
    for n, r in results.items():
        lines.append(f"| {n} | {r['nfe']} | " + " | ".join(show(r, m) for m in metrics) + f" | {r['sample_seconds']:.3f} |")
    lines += ["", "## Training phases", "", f"Global batch {batch['global_batch']} = {batch['per_device_batch']} per device"
              f" x {batch['devices']} {batch['platform']} device(s), {batch['processes']} process(es).", "",
              "| phase | time (s) | final losses |", "|---|---|---|"]
    for n, p in phase_log.items():
        lines.append(f"| {n} | {p['seconds']:.1f} | " + ", ".join(f"{k} {v:.4g}" for k, v in p["final"].items()) + " |")
    lines += ["", "## Claims of the papers, in this run", "", "| claim | measured | held |", "|---|---|---|"]
    for c in claim_rows:
        lines.append(f"| {c['claim']} | {c['measured']} | {'-' if c['held'] is None else 'yes' if c['held'] else 'no'} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in target_rows]
    return "\n".join(lines) + "\n"


def plot_samples(path, samples, data_samples, n_show=3000):
    t_many = max(int(n.rsplit("_k", 1)[1]) for n in samples if n.startswith("teacher_ancestral_k"))
    names = ["data"] + [n for n in samples if n in ("teacher_ancestral_k8", f"teacher_ancestral_k{t_many}") or not n.startswith("teacher")]
    if data_samples.ndim == 4:
        return plot_images(path, names, samples, data_samples)
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    lim = np.percentile(np.abs(data_samples[:, :2]), 99.5) * 1.3
    for ax, n in zip(axes.flat, names):
        x = data_samples if n == "data" else samples[n]
        ax.scatter(x[:n_show, 0], x[:n_show, 1], s=1, alpha=0.4)
        ax.set(title=n, xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


def plot_images(path, names, samples, data_samples, grid=6):
    """A grid of the first grid^2 images of each sampler (classes 0, 1, 2, ... for conditional samples)."""
    fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 2.5), squeeze=False)
    for ax, n in zip(axes.flat, names):
        x = np.clip(data_samples if n == "data" else samples[n], -1, 1)[: grid * grid]
        mosaic = einops.rearrange(x, "(r c) h w ch -> (r h) (c w) ch", r=grid)
        ax.imshow((mosaic[..., 0] if mosaic.shape[-1] == 1 else (mosaic + 1) / 2), cmap="gray", vmin=-1, vmax=1)
        ax.set(title=n, xticks=[], yticks=[])
        ax.title.set_fontsize(7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def plot_losses(path, histories):
    items = [(n, k, v) for n, h in histories.items() for k, v in h.items()]
    cols = min(len(items), 4)
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (n, k, v) in zip(axes.flat, items):
        v = np.asarray(v, np.float64)
        if k == "instant_loss":  # Sec. 5.4: informative; a noisy unbiased estimate, smoothed, on a log axis
            smooth = instant_decay({k: v})[2]
            ax.semilogy(np.arange(len(smooth)) + len(v) - len(smooth), np.clip(smooth, 1e-3 * np.abs(smooth).max(), None))
        else:
            w = max(len(v) // 50, 1)
            ax.plot(np.convolve(v, np.ones(w) / w, mode="valid"))
        ax.set_title(f"{n}: {k}", fontsize=8)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


def write_all(run, cfg, primary, results, floor, phase_log, histories, samples, data_samples, batch):
    import dataclasses  # noqa: PLC0415

    claim_rows = claims(results, histories, samples, primary)
    target_rows = targets(results, floor, primary)
    report = {"config": dataclasses.asdict(cfg), "batch": batch, "floor": floor, "samplers": results,
              "phases": phase_log, "claims": claim_rows, "targets": target_rows}
    run.write_text("report.json", json.dumps(report, indent=1))
    run.write_text("report.md", markdown(cfg, results, floor, phase_log, claim_rows, target_rows, batch))
    run.write("samples.png", lambda p: plot_samples(p, samples, data_samples))
    run.write("losses.png", lambda p: plot_losses(p, histories))
