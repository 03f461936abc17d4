"""The DMD2 ablation of EXPERIMENTS.md: k steps, backward simulation, GAN, TTUR, a critic per step; ring8, seeds.

    python ablation_dmd2.py VARIANT SEEDS      e.g.  python ablation_dmd2.py k=4_per_step_critic=0_grid=0 0,1,2

VARIANT is `_`-separated `name=value` changes to `train.PRESETS["default"]` (3,000 updates at lr 6e-4, the generator's
rate decayed to 0, no GAN: `k=4` is train.py's DMD2 k = 4; EXPERIMENTS.md's rows spell out every setting they
changed): `k`, the Config fields `backward_sim`, `gan`, `dmd2_lr_decay` (0/1), `ttur`, `dmd2_train_steps`, `batch`
(integers), `dmd2_lr` (a float), and arguments of `dmd2.dmd2_distiller` that no Config field sets: `per_step_critic`
(0/1), `gan_gen_weight` (a float), `times` (the generator's step times, `times=1:0.89:0.74:0.49`), `grid=0` (uniform)
/ `grid=1` (official, train.py's). Each seed uses the cached default ring8 teacher of `ablation_instant.py` (`python
train.py --seed S`), trains DMD2 exactly as train.py does (`train.distil_setup`), keeping beside it weight averages of
the generator (`train.ema_update`, decays 0.99, 0.995, 0.998 and 0.999; they do not change the training), samples
10,000 points with marginal re-noising from the last weights and from each average, and prints one JSON line each:
MMD^2, mode TV, off-mode fraction. The `ema0.99` line is what train.py samples on toy data (`TOY_DMD2`); `last` is
`dmd2_ema = 0`."""

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
# Config fields; the other names are arguments of dmd2_distiller
CONFIG = ("backward_sim", "gan", "dmd2_lr_decay", "ttur", "dmd2_train_steps", "dmd2_lr", "batch")
DECAYS = (0.99, 0.995, 0.998, 0.999)


def parse(variant):
    """`(k, Config overrides, dmd2_distiller arguments)` of a VARIANT; no `times` in them: train.py's grid."""
    over, kw = {}, {}
    for name, val in re.findall(r"(?:^|_)([a-z][a-z0-9_]*?)=([0-9.:e-]+)", variant):
        if name == "grid":
            if not int(val):  # grid=1 is train.py's own (official) grid
                kw["times"] = None
        elif name == "times":
            kw["times"] = tuple(float(v) for v in val.split(":"))
        else:
            v = bool(int(val)) if name in BOOLS else float(val) if name in FLOATS else int(val)
            (over if name in CONFIG or name == "k" else kw)[name] = v
    return over.pop("k", 1), over, kw


def main(variant, seeds):
    k, over, kw = parse(variant)
    for seed in seeds:
        cfg, task, state, kd, ke = setup(seed)
        cfg = dataclasses.replace(cfg, **over, dmd2_ema=0.0)  # the averages are kept here, beside the run
        mesh = parallel.data_mesh(jax.devices()[:1])
        st, step, num = train.distil_setup(cfg, "dmd2", k, {}, task, state.model, state.model, None, mesh, **kw)
        key = jr.fold_in(kd, 3)

        def body(carry, i):
            s, emas = carry
            s, _ = step(s, jr.fold_in(key, i))
            return (s, [train.ema_update(e, s.generator.model, d, i + 1) for e, d in zip(emas, DECAYS)]), None

        t0 = time.time()
        init = (st, [st.generator.model] * len(DECAYS))
        st, emas = eqx.filter_jit(lambda c: train.mmd.scan_steps(body, c, jnp.arange(num)))(init)[0]
        secs = time.time() - t0
        for name, model in [("last", st.generator.model)] + [(f"ema{d}", e) for d, e in zip(DECAYS, emas)]:
            res = evaluate(model, task, ke, k, step="marginal", times=kw.get("times", train.dmd2_times(k, task)))
            res.update(off_mode=1.0 - res.pop("prec"), secs=secs)
            print(variant, seed, name, json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")])
