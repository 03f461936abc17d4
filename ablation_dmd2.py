"""The DMD2 ablation of the README: k steps, backward simulation, GAN, TTUR, a critic per step; ring8, seeds.

    python ablation_dmd2.py VARIANT SEEDS      e.g.  python ablation_dmd2.py k=4_per_step_critic=1 0,1,2

VARIANT is `_`-separated `name=value` overrides of `train.Config` (integers; 0/1 for booleans): `k`,
`per_step_critic`, `backward_sim`, `gan`, `ttur`, `dmd2_train_steps`. Each seed uses the cached default
ring8 teacher of `ablation_instant.py` (`python train.py --seed S`), trains DMD2 exactly as train.py
does (`train.distil_setup`), samples 10,000 points with marginal re-noising and prints one JSON line:
MMD^2, mode TV and the off-mode fraction (1 - mode precision).
"""

import dataclasses
import json
import re
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import parallel
import train
from ablation_instant import evaluate, setup

BOOLS = ("per_step_critic", "backward_sim", "gan", "dmd2_lr_decay")
FLOATS = ("dmd2_lr", "gan_gen_weight")


def main(variant, seeds):
    over = {}
    for name, val in re.findall(r"(?:^|_)([a-z][a-z0-9_]*?)=([0-9.:e-]+)", variant):
        if name == "times":  # times=1:0.89:0.74:0.49
            over["dmd2_times"] = (tuple(float(v) for v in val.split(":")),)
        else:
            over[name] = bool(int(val)) if name in BOOLS else float(val) if name in FLOATS else int(val)
    k = over.pop("k", 1)
    for seed in seeds:
        cfg, task, state, kd, ke = setup(seed)
        cfg = dataclasses.replace(cfg, **over)
        mesh = parallel.data_mesh(jax.devices()[:1])
        st, step, num = train.distil_setup(cfg, "dmd2", k, {}, task, state.model, state.model, None, mesh)
        key = jr.fold_in(kd, 3)
        t0 = time.time()
        st = eqx.filter_jit(lambda s0: train.mmd.scan_steps(lambda s, i: step(s, jr.fold_in(key, i)), s0,
                                                            jnp.arange(num)))(st)[0]
        res = evaluate(st.generator.model, task, ke, k, step="marginal", times=train.dmd2_times(cfg, k))
        res.update(off_mode=1.0 - res.pop("prec"), secs=time.time() - t0)
        print(variant, seed, json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")])
