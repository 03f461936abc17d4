"""EDM's weight at the data's scale (EXPERIMENTS.md, "sigma_data of EDM's weight"): ring8, Algorithm 2 and 3 at k = 8 as `python train.py --methods mm_alternating,mm_instant
--seed S` trains them (train.distil_setup, the same keys: phase i = fold_in(key_distil, i)), with the EDM weight's
sigma_data = 0.5 (the default) or the data's own sigma (what the toy networks precondition with, tasks.py).
Teacher: ablation_instant.setup (train.train_teacher, cached under runs/ablation/). Evaluation: ablation_instant.evaluate
(10,000 ancestral samples against 10,000 fresh true samples, train.py's report keys). One JSON line per run.

    python ablation_sigma_data.py SEEDS SIGMAS      e.g.  python ablation_sigma_data.py 0,1,2 0.5,data
"""
import dataclasses
import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import parallel
import train
from ablation_instant import evaluate, setup

METHODS = ("mm_alternating", "mm_instant")
seeds = [int(s) for s in sys.argv[1].split(",")]
sigmas = sys.argv[2].split(",")
for seed in seeds:
    t0 = time.time()
    cfg, task, state, kd, ke = setup(seed)
    cfg = dataclasses.replace(cfg, methods=METHODS, mm_steps=(8,))
    print(f"teacher seed {seed}: {time.time() - t0:.0f} s", flush=True)
    sd_data = float(np.sqrt(np.mean(np.diag(task.toy.cov()))))
    mesh = parallel.data_mesh(jax.devices()[:1])
    teacher, net, precond = train.frozen_teacher(cfg, task, state)
    for sd_name in sigmas:
        sd = sd_data if sd_name == "data" else float(sd_name)
        for i, method in enumerate(METHODS):  # train.phases order: the phase index i gives the key
            t0 = time.time()
            st, step, num = train.distil_setup(cfg, method, 8, {}, task, teacher, net, precond, mesh,
                                                sigma_data=sd)
            key = jr.fold_in(kd, i)
            st = eqx.filter_jit(lambda s: train.mmd.scan_steps(lambda s, j: step(s, jr.fold_in(key, j)), s,
                                                               jnp.arange(num)))(st)[0]
            secs = time.time() - t0
            res = evaluate(train.student(st), task, ke, 8)
            res.update(secs=round(secs, 1))
            print(json.dumps({"seed": seed, "method": method, "sigma_data": round(sd, 4), **res}), flush=True)
