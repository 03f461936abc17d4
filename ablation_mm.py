"""Algorithm 2 or 3 on ring8 with arguments of its distiller that no Config field sets (EXPERIMENTS.md): the k = 8
student of `python train.py --seed S`, trained as train.py trains it (`train.distil_setup`, the phase's own key
`fold_in(key_distil, i)`) from the cached teacher of `ablation_instant.setup`, scored as `ablation_instant.evaluate`
scores it (10,000 ancestral samples against 10,000 true ones). One JSON line per seed.

    python ablation_mm.py METHOD SEEDS [name=value ...]
    e.g.  python ablation_mm.py mm_alternating 0,1,2 fresh_data=True
          python ablation_mm.py mm_instant 0,1,2 sigma_data=1.36 nu_decay=0.0

METHOD is mm_alternating or mm_instant; each value is a Python literal (`ast.literal_eval`).
"""
import ast
import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import parallel
import train
from ablation_instant import evaluate, setup


def main(method, seeds, kw):
    for seed in seeds:
        cfg, task, state, kd, ke = setup(seed)
        teacher, net, precond = train.frozen_teacher(cfg, task, state)
        mesh = parallel.data_mesh(jax.devices()[:1])
        phase = [p[0] for p in train.phases(cfg)].index(f"{method}_k8")
        t0 = time.time()
        st, step, num = train.distil_setup(cfg, method, 8, {}, task, teacher, net, precond, mesh, **kw)
        key = jr.fold_in(kd, phase)
        st = eqx.filter_jit(lambda s: train.mmd.scan_steps(lambda s, j: step(s, jr.fold_in(key, j)), s,
                                                           jnp.arange(num)))(st)[0]
        res = evaluate(train.student(st), task, ke, 8)
        print(json.dumps({"method": method, "seed": seed, **{k: str(v) for k, v in kw.items()}, **res,
                          "secs": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("mm_alternating", "mm_instant"):
        raise SystemExit(__doc__)
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")],
         {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])})
