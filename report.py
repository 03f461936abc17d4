"""The run's report: tables (report.md, report.json), the claims of both papers, and the plots.

A claim of either paper "held" in this run if the stated comparison of measured numbers holds; each verdict
names the numbers that decided it, and comparisons the run did not include are marked "not run" with the flag
that would include them. This implementation's own acceptance thresholds are not part of a run's report:
`python benchmarks.py targets RUN_DIR` reads report.json and checks them.
"""

import json

import einops
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
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


def _cmp(results, m, a, b):
    """'fd 5.27 (mm_alternating_k8) vs 43.4 (mm_alternating_marginal_k8)': the numbers a verdict used, named."""
    return f"{m} {results[a][m]:.3g} ({a}) vs {results[b][m]:.3g} ({b})"


def claims(results, histories, samples, m="mmd2", data_samples=None):
    """The papers' claims as comparisons of this run's numbers, judged on the primary metric `m` (lower is better).

    Each row: `claim`, `measured` (the numbers used, each named by its sampler), `held` (True / False, None if the
    run did not include the comparison). Posterior vs marginal z_s (Sec. 5.2) is judged on `m`, with the mean
    pairwise distance of the samples (`metrics.mean_pairwise_distance`, and the data's) beside it as a diversity figure.
    """
    from metrics import mean_pairwise_distance  # noqa: PLC0415

    rows = []
    t_many = max((int(n.rsplit("_k", 1)[1]) for n in results if n.startswith("teacher_ancestral_k")), default=None)

    def add(claim, measured, held):
        rows.append({"claim": claim, "measured": measured, "held": held})

    for method in ("mm_alternating", "mm_instant", "dmd2"):
        for k in _ks(results, method):
            if k >= 8 and t_many:
                s, t = f"{method}_k{k}", f"teacher_ancestral_k{t_many}"
                add(f"{method} with k = {k} at least as good as the teacher with {t_many} steps ({m})",
                    _cmp(results, m, s, t), bool(results[s][m] <= results[t][m]))
    for method in ("mm_alternating", "mm_instant", "dmd2"):
        ks = _ks(results, method)
        if 1 in ks and max(ks) > 1:
            many, one = f"{method}_k{max(ks)}", f"{method}_k1"
            add(f"{method}: multi-step (k = {max(ks)}) better than one step ({m})", _cmp(results, m, many, one),
                bool(results[many][m] < results[one][m]))
        elif ks:
            add(f"{method}: multi-step better than one step", "not run (needs k = 1 and k > 1: --steps 1,8)", None)
    common = sorted(set(_ks(results, "mm_alternating")) & set(_ks(results, "mm_instant")))
    for k in common:
        a, i = f"mm_alternating_k{k}", f"mm_instant_k{k}"
        add(f"alternating better than instant at k = {k} ({m})", _cmp(results, m, a, i), bool(results[a][m] < results[i][m]))
    marg = [n for n in results if n.startswith("mm_alternating_marginal_k")]
    for n in marg:
        k = int(n.rsplit("_k", 1)[1])
        post = f"mm_alternating_k{k}"
        if post in results:
            div = [mean_pairwise_distance(samples[x]) for x in (post, n) if x in samples]
            diversity = (f"; mean pairwise distance {div[0]:.3g} vs {div[1]:.3g}" if len(div) == 2 else "")
            if diversity and data_samples is not None:
                diversity += f" (data {mean_pairwise_distance(data_samples):.3g})"
            add(f"posterior z_s better than marginal z_s (alternating, k = {k}; {m}, diversity beside it)",
                _cmp(results, m, post, n) + diversity, bool(results[post][m] < results[n][m]))
    if not marg:
        add("posterior z_s better than marginal z_s", "not run (needs --preset full or ablations)", None)
    for n, h in histories.items():
        if "instant_loss" in h and len(h["instant_loss"]) > 40:
            ratio, rate, _ = instant_decay(h)
            add(f"the instant loss falls roughly exponentially ({n})",
                f"smoothed instant_loss of {n}: final/peak {ratio:.3f}, log-rate {rate:.2e}/step",
                bool(ratio < 0.25 and rate < 0))
    other = [n for n in results if n.startswith(("dmd2_nogan_k", "dmd2_gan_k"))]  # the ablation of the GAN term
    for n in other:
        k = n.rsplit("_k", 1)[1]
        if f"dmd2_k{k}" in results:
            g, ng = (f"dmd2_k{k}", n) if n.startswith("dmd2_nogan") else (n, f"dmd2_k{k}")
            add(f"DMD2 with GAN better than without (k = {k}, {m})", _cmp(results, m, g, ng),
                bool(results[g][m] < results[ng][m]))
    if not other:
        add("DMD2 with GAN better than without", "not run (needs --preset full or ablations)", None)
    return rows


def markdown(cfg, results, floor, phase_log, claim_rows, batch):
    jobs = max(p.get("jobs", 1) for p in phase_log.values())
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
    lines += ["", "Time: the wall time of drawing the samples, compilation excluded." + (
        f" The teacher's rows are drawn as the last job of the queue that trains the distillation phases {jobs} at a"
        " time, beside the phases still training, so their times include that sharing (`--jobs 1`: each alone)." if jobs > 1 else
        " One sampler at a time.")]
    lines += ["", "## Training phases", "", f"Global batch {batch['global_batch']} = {batch['per_device_batch']} per device"
              f" x {batch['devices']} {batch['platform']} device(s), {batch['processes']} process(es).", "",
              "Training: the wall time of the phase's update chunks (the first one's compilation included); compiling: all "
              "the tracing and compilation during the phase, its set-up included."
              + (f" The distillation phases trained {jobs} at a time, sharing the devices, so their seconds overlap."
                 if jobs > 1 else ""), "",
              "| phase | training (s) | compiling (s) | final losses |", "|---|---|---|---|"]
    for n, p in phase_log.items():
        compiling = f"{p['compile_seconds']:.1f}" if "compile_seconds" in p else "-"
        lines.append(f"| {n} | {p['seconds']:.1f} | {compiling} | "
                     + ", ".join(f"{k} {v:.4g}" for k, v in p["final"].items()) + " |")
    lines += ["", "## Claims of the papers, in this run", "", "| claim | measured | held |", "|---|---|---|"]
    for c in claim_rows:
        lines.append(f"| {c['claim']} | {c['measured']} | {'-' if c['held'] is None else 'yes' if c['held'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _title(name, results, m):
    r = results.get(name)
    return name if r is None else f"{name}\nNFE {r['nfe']}, {m} {r[m]:.3g}"


def plot_samples(path, samples, data_samples, results=None, m="mmd2", floor=None, labels=None, data_labels=None,
                 n_show=3000):
    """samples.png: the data, the teacher's ancestral sampler at 8 and at its most steps, and every student, each
    titled with its NFE and primary metric `m`. Toys: scatter plots of the first two coordinates. Images:
    `plot_images` (a row per class when `labels` are given)."""
    results, floor = results or {}, floor or {}
    t_many = max(int(n.rsplit("_k", 1)[1]) for n in samples if n.startswith("teacher_ancestral_k"))
    names = ["data"] + [n for n in samples if n in ("teacher_ancestral_k8", f"teacher_ancestral_k{t_many}") or not n.startswith("teacher")]
    data_title = f"data (real)\n{m} floor {floor[m]:.3g}" if m in floor else "data (real)"
    titles = [data_title] + [_title(n, results, m) for n in names[1:]]
    if data_samples.ndim == 4:
        images = [data_samples] + [samples[n] for n in names[1:]]
        return plot_images(path, titles, images, [data_labels] + [labels] * (len(names) - 1))
    cols = min(len(names), 4)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    lim = np.percentile(np.abs(data_samples[:, :2]), 99.5) * 1.3
    for ax, n, title in zip(axes.flat, names, titles):
        x = data_samples if n == "data" else samples[n]
        ax.scatter(x[:n_show, 0], x[:n_show, 1], s=1, alpha=0.4)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


GAP_RGB = (0.25, 0.45, 0.8)  # the lines between images: a colour no grey-scale sample can take


def image_grid(x, labels=None, per_row=10, min_px=32, gap=2):
    """One mosaic `(H, W, C)` in [-1, 1]: a row per class (the first `per_row` images of each label, in class
    order), or the first `per_row`^2 images without labels; each image upscaled by the integer factor that makes
    it >= `min_px` pixels (nearest neighbour), images separated by `gap` pixels of NaN (drawn in `GAP_RGB`)."""
    x = np.clip(np.asarray(x, np.float32), -1, 1)  # (N, h, w, c)
    if labels is None:
        rows = [x[i * per_row:(i + 1) * per_row] for i in range(min(per_row, -(-len(x) // per_row)))]
    else:
        labels = np.asarray(labels)
        rows = [x[labels == c][:per_row] for c in np.unique(labels)]
    f = -(-min_px // x.shape[1])
    blank = np.zeros((1, *x.shape[1:]), np.float32)
    rows = np.stack([np.concatenate([r, np.repeat(blank, per_row - len(r), 0)]) for r in rows])  # (R, per_row, h, w, c)
    big = einops.repeat(rows, "r n h w c -> r n (h a) (w b) c", a=f, b=f)
    big = np.pad(big, ((0, 0), (0, 0), (gap // 2, gap - gap // 2), (gap // 2, gap - gap // 2), (0, 0)),
                 constant_values=np.nan)
    return einops.rearrange(big, "r n h w c -> (r h) (n w) c")


def plot_images(path, titles, images, labels, cols=4, dpi=100, title_px=36, margin_px=20):
    """One panel per sampler (`titles[i]` above `image_grid(images[i], labels[i])`), drawn at one screen pixel per
    mosaic pixel: axes placed in pixels, nearest-neighbour, so an 8x8 digit shows as 32x32 pixels."""
    grids = [image_grid(x, lab) for x, lab in zip(images, labels)]
    gap_cmap = plt.get_cmap("gray").with_extremes(bad=GAP_RGB)
    gh, gw = max(g.shape[0] for g in grids), max(g.shape[1] for g in grids)
    cols = min(cols, len(grids))
    rows = -(-len(grids) // cols)
    cell_w, cell_h = gw + 2 * margin_px, gh + title_px + margin_px
    fig = plt.figure(figsize=(cols * cell_w / dpi, rows * cell_h / dpi), dpi=dpi)
    W, H = cols * cell_w, rows * cell_h
    for i, (g, title, lab) in enumerate(zip(grids, titles, labels)):
        r, c = divmod(i, cols)
        left, top = c * cell_w + margin_px, r * cell_h + title_px
        ax = fig.add_axes([left / W, 1 - (top + g.shape[0]) / H, g.shape[1] / W, g.shape[0] / H])
        if g.shape[-1] == 1:
            ax.imshow(np.ma.masked_invalid(g[..., 0]), cmap=gap_cmap, vmin=-1, vmax=1, interpolation="nearest", aspect="auto")
        else:
            ax.imshow(np.where(np.isnan(g[..., :3]), GAP_RGB, (g[..., :3] + 1) / 2), interpolation="nearest", aspect="auto")
        ax.set_xticks([])
        classes = [] if lab is None else np.unique(lab)
        pitch = g.shape[0] / max(len(classes), 1)
        ax.set_yticks((np.arange(len(classes)) + 0.5) * pitch, [str(c) for c in classes], fontsize=7)  # class per row
        ax.tick_params(length=0, pad=2)
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)


def plot_metric_vs_nfe(path, results, floor, m="mmd2"):
    """metric_vs_nfe.png: the primary metric `m` against network evaluations per sample (log-log), the teacher's
    samplers (ancestral, DDIM: those of `Config.teacher_samplers`) as lines, each student as a marked point (its
    method's points joined by a dotted line), the real-vs-real floor dashed. Values <= 0 (MMD^2 is unbiased, so it can dip below 0) sit on the bottom."""
    vals = [r[m] for r in results.values() if m in r]
    bottom = 0.5 * min([v for v in vals if v > 0] + ([floor[m]] if floor.get(m, 0) > 0 else []), default=1e-6)
    y = lambda v: max(v, bottom)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for step, style in (("ancestral", "o-"), ("ddim", "s--")):
        pts = sorted((r["nfe"], y(r[m])) for n, r in results.items() if n.startswith(f"teacher_{step}_k"))
        if pts:
            ax.plot(*zip(*pts), style, color="0.35" if step == "ancestral" else "0.6", label=f"teacher, {step}")
    markers = {"mm_alternating": "*", "mm_instant": "D", "dmd2": "^"}
    families = {}
    for n, r in results.items():
        if not n.startswith("teacher"):
            families.setdefault(n.rsplit("_k", 1)[0], []).append((r["nfe"], y(r[m])))
    for i, (fam, pts) in enumerate(families.items()):
        pts = sorted(pts)
        base = next((k for k in markers if fam.startswith(k)), None)
        ax.plot(*zip(*pts), ls=":" if len(pts) > 1 else "none", marker=markers.get(base, "x") if fam == base else "x",
                ms=11 if fam == base else 8, mfc="none", mew=1.8, color=f"C{i}", zorder=3,  # hollow: overlaps stay visible
                label=fam if fam == base else f"{fam} (ablation)")
    if floor.get(m, 0) > 0:
        ax.axhline(floor[m], ls="--", color="k", lw=0.8, label="real vs real (floor)")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample (NFE)", ylabel=m,
           xticks=sorted({r["nfe"] for r in results.values()}),
           title=f"{m} against NFE: teacher samplers and students")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    lo, hi = ax.get_ylim()  # label minor ticks only when the axis spans less than two decades
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g") if hi / lo < 100
                                 else matplotlib.ticker.NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
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


def write_all(run, cfg, primary, results, floor, phase_log, histories, samples, data_samples, batch, labels=None,
              data_labels=None):
    """report.json, report.md, samples.png, metric_vs_nfe.png, losses.png. `labels`: the classes the samples were
    conditioned on (the same for every sampler), `data_labels` those of `data_samples` (None: unconditional)."""
    import dataclasses  # noqa: PLC0415

    claim_rows = claims(results, histories, samples, primary, data_samples)
    report = {"config": dataclasses.asdict(cfg), "batch": batch, "primary": primary, "floor": floor,
              "samplers": results, "phases": phase_log, "claims": claim_rows}
    run.write_text("report.json", json.dumps(report, indent=1))
    run.write_text("report.md", markdown(cfg, results, floor, phase_log, claim_rows, batch))
    run.write("samples.png", lambda p: plot_samples(p, samples, data_samples, results, primary, floor, labels, data_labels))
    run.write("metric_vs_nfe.png", lambda p: plot_metric_vs_nfe(p, results, floor, primary))
    run.write("losses.png", lambda p: plot_losses(p, histories))
