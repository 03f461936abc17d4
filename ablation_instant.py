"""The instant-MM ablation of EXPERIMENTS.md: one change at a time to Algorithm 3 on ring8, several seeds.

    python ablation_instant.py VARIANT SEEDS      e.g.  python ablation_instant.py eq10=1_decay=0.99 0,1,2

VARIANT `teacher` or `alternating` gives the reference rows (the teacher's 8-step sampler; Algorithm 2).
VARIANT is `_`-joined `name=value` changes: `eq10` (0/1: subtract the teacher's expected gradient on real
data, Eq. 10), `decay` (EMA of nu over updates; 0 = one batch), `lr`, `steps`, `nbp` (B' as a multiple of
B), `peps` (preconditioner guard), `nbg` (real batches averaged for Eq. 10's data term), `flat` (1: flat
weighting w(s) = 1 instead of EDM's). Every instant row
and the alternating row is also printed for the student's weight averages 0.99 and 0.999 (`VARIANT+ema0.99`;
the training is unchanged). Each seed trains (and caches under runs/ablation/) the default ring8
teacher of `python train.py --seed S`, distils instant MM at k = 8 from it and prints one JSON line:
MMD^2, mode TV and mode precision of 10,000 samples against 10,000 fresh true samples (`metrics.evaluate`,
the same evaluation as train.py's report). Roughly 30-60 s per seed on a 2-core CPU after the teacher.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import losses as L
import metrics as M
import mmd
import parallel
import tasks
import train
from sampling import sample

EMAS = (0.99, 0.999)  # the student's weight averages printed beside each instant row


def setup(seed):
    cfg = dataclasses.replace(train.PRESETS["default"], seed=seed)
    task = tasks.make_task(cfg)
    mesh = parallel.data_mesh(jax.devices()[:1])
    run = train.Run(Path(f"runs/ablation/ring8_trained_s{seed}"))
    key_teacher, key_distil, key_eval = jr.split(jr.key(cfg.seed), 3)
    state = train.train_teacher(run, cfg, task, mesh, key_teacher)[0]
    return cfg, task, state, key_distil, key_eval


def evaluate(model, task, key_eval, k, n=10_000, step="ancestral", times=None):
    k_sample, k_ref, _ = jr.split(key_eval, 3)
    x = np.asarray(sample(model, task.schedule, k_sample, (n, *task.shape), k, step, times=times))
    r = M.evaluate(x, task.toy, k_ref, n)
    return {"mmd2": r["mmd2"], "mode_tv": r["mode_tv"], "prec": r["mode_precision"]}


def data_grad_of(task, teacher, key, nb=200, b=256, weighting="edm"):  # nb=200 is what EXPERIMENTS.md's table used
    xs = jnp.stack([task.draw(jr.fold_in(key, i), b)[0] for i in range(nb)])
    return eqx.filter_jit(mmd.data_moment)(teacher, task.schedule, xs, jr.fold_in(key, 10**6), weighting=weighting)


def run_instant(cfg, task, teacher, precond, key, *, steps=None, lr=None, data_grad=None, nbp=1, decay=0.0, k=8,
                weighting="edm"):
    """Algorithm 3 with an (optional) bias-corrected EMA of nu, written out step by step.

    The same maths as `mmd.instant_step` with `MMConfig.nu_decay` (which uses `optax.ema`); kept as written
    because its batch keys and operation order are the ones EXPERIMENTS.md's table was measured with.
    """
    steps, lr, b = steps or cfg.train_steps("mm_instant", k), lr or 3e-4, cfg.batch  # 3e-4: instant_distiller's rate
    opt = mmd.mm_optimiser(lr, steps, warmup=min(1000, steps // 10))
    sched = task.schedule

    def step(carry, kk):
        player, nu_avg, n, emas = carry
        kd, kd2, k1, k2 = jr.split(kk, 4)
        batch = L.noised_batch(sched, task.draw(kd, b)[0], k1, k)
        batch_p = L.noised_batch(sched, task.draw(kd2, b * nbp)[0], k2, k)
        nu = L.instant_nu(player.model, teacher, precond, sched, batch_p, weighting, "posterior", data_grad)
        nu_avg = jax.tree.map(lambda a, v: decay * a + (1 - decay) * v, nu_avg, nu)
        tangent = jax.tree.map(lambda a: a / (1 - decay ** (n + 1)), nu_avg)
        (_, mon), g = eqx.filter_value_and_grad(L.instant_loss, has_aux=True)(
            player.model, teacher, precond, sched, batch, batch_p, weighting, "posterior", nu=tangent)
        player = mmd.apply_grads(player, g, opt)
        emas = tuple(train.ema_update(e, player.model, d, n + 1) for e, d in zip(emas, EMAS))
        return (player, nu_avg, n + 1, emas), {"instant_loss": mon}

    carry = (mmd.init_player(teacher, opt), jax.tree.map(jnp.zeros_like, precond), jnp.int32(0), (teacher,) * len(EMAS))
    (player, _, _, emas), m = eqx.filter_jit(
        lambda c: mmd.scan_steps(lambda s, i: step(s, jr.fold_in(key, i)), c, jnp.arange(steps)))(carry)
    return player.model, np.asarray(m["instant_loss"]), emas


def run_alternating(cfg, task, teacher, key, k=8):
    """The reference row: Algorithm 2 from the same teacher (train.py's settings)."""
    n, mcfg = cfg.mm_train_steps, mmd.MMConfig(k=k, weighting="edm")
    opt = mmd.mm_optimiser(cfg.mm_lr, n, warmup=min(1000, n // 10))

    def step(carry, i):
        st, emas = carry
        kd, ks = jr.split(jr.fold_in(key, i))
        st, m = mmd.alternating_step(st, teacher, task.draw(kd, cfg.batch)[0], ks, cfg=mcfg, optimiser=opt,
                                     schedule=task.schedule)
        return (st, tuple(train.ema_update(e, st.generator.model, d, i + 1) for e, d in zip(emas, EMAS))), m

    state, emas = eqx.filter_jit(lambda c: mmd.scan_steps(step, c, jnp.arange(n)))(
        (mmd.init_alternating(teacher, opt), (teacher,) * len(EMAS)))[0]
    return state.generator.model, emas


def main(variant, seeds):
    if variant in ("teacher", "alternating"):  # the reference rows
        for seed in seeds:
            cfg, task, state, kd, ke = setup(seed)
            model, emas = (state.model, ()) if variant == "teacher" else run_alternating(cfg, task, state.model, jr.fold_in(kd, 2))
            for name, m in ((variant, model), *((f"{variant}+ema{d}", e) for d, e in zip(EMAS, emas))):
                print(name, seed, json.dumps(evaluate(m, task, ke, 8)), flush=True)
        return
    kw = {}
    for part in variant.split("_"):
        name, val = part.split("=")
        kw[name] = float(val) if name in ("lr", "decay", "peps") else int(val)
    eq10, peps, nbg = kw.pop("eq10", 1), kw.pop("peps", None), kw.pop("nbg", 200)
    kw["weighting"] = "flat" if kw.pop("flat", 0) else "edm"
    for seed in seeds:
        cfg, task, state, kd, ke = setup(seed)
        teacher = state.model
        eps = {} if peps is None else {"eps": peps}
        precond = mmd.preconditioner_from_adam(state.player.opt_state, b2=mmd.TEACHER_B2, **eps)
        g0 = data_grad_of(task, teacher, jr.fold_in(kd, 77), nb=nbg, weighting=kw["weighting"]) if eq10 else None
        t0 = time.time()
        model, hist, emas = run_instant(cfg, task, teacher, precond, jr.fold_in(kd, 1), data_grad=g0, **kw)
        secs = time.time() - t0
        for name, m in ((variant, model), *((f"{variant}+ema{d}", e) for d, e in zip(EMAS, emas))):
            res = evaluate(m, task, ke, 8)
            res.update(loss_end=float(hist[-300:].mean()), secs=secs)
            print(name, seed, json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")])
