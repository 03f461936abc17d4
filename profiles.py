"""Where the time goes: the test suite's profile and the default runs' phases.

    MMD_PROFILE=prof.json python -m pytest -q -m "not slow" -n 2    # conftest writes prof.json.gw0, prof.json.gw1
    python profiles.py suite prof.json*        # the 30 slowest tests: wall, compile, run, compilations
    python profiles.py digits [--steps 20]     # each phase of the digits default: compile, ms per update, GFLOP/s
    python profiles.py ring8 [--steps 20]      # the same for `python train.py` (ring8)

`suite` reads conftest's per-test records (JAX's trace, lowering and compile seconds, from its monitoring events).
`digits` and `ring8` build each phase of `python train.py --data digits` and `python train.py` exactly as train.py
does (untrained networks: the cost of an update does not depend on the weights), compile a `--steps`-update chunk
ahead of time, time it, and take the FLOPs of one update from XLA's cost analysis (which counts a loop's body once).
The peak is `cores x GHz x flops per cycle per core`, with 64 flops per cycle for AVX-512 (two FMA units x 16
float32 lanes x 2) and 32 for AVX2, from /proc/cpuinfo; AMD's family 25 (Zen 4; Zen 3 has no AVX-512) runs AVX-512
on 256-bit units, so 32 there.
"""

import argparse
import json
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import mmd
import parallel
import tasks
import train


def suite_table(paths, top=30):
    tests = {}
    for path in paths:
        with open(path) as f:
            tests.update(json.load(f))
    total = {k: sum(r[k] for r in tests.values()) for k in ("wall", "trace", "lower", "compile", "compiles")}
    compiling = lambda r: r["trace"] + r["lower"] + r["compile"]
    lines = [f"{len(tests)} tests, {total['wall']:.0f} s of test time (summed over processes), "
             f"{total['trace'] + total['lower'] + total['compile']:.0f} s of it compiling "
             f"(trace {total['trace']:.0f}, lower {total['lower']:.0f}, XLA {total['compile']:.0f}), "
             f"{total['compiles']} XLA compilations. Subprocesses (train.py runs) are counted as run time.", "",
             "| test | wall (s) | compiling (s) | running (s) | compilations |", "|---|---|---|---|---|"]
    for name, r in sorted(tests.items(), key=lambda kv: -kv[1]["wall"])[:top]:
        c = compiling(r)
        lines.append(f"| {name} | {r['wall']:.1f} | {c:.1f} | {r['wall'] - c:.1f} | {r['compiles']} |")
    return "\n".join(lines)


def cpu_peak_gflops():
    """`(GFLOP/s, how)`: cores x GHz x float32 flops per cycle per core (AVX-512: 64, Zen 4 and AVX2: 32, else 16)."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    field = lambda name: next(line for line in info.splitlines() if line.startswith(name)).split(":")[1].split()
    flags, ghz = field("flags"), float(field("cpu MHz")[0]) / 1000
    half_width = field("vendor_id") == ["AuthenticAMD"] and field("cpu family") == ["25"]  # AVX-512 on 256-bit units
    per_cycle = 64 if "avx512f" in flags and not half_width else 32 if "avx2" in flags else 16
    cores = os.cpu_count()
    return cores * ghz * per_cycle, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} flops per cycle"


def phase_cost(state, step, steps, key=jr.key(0)):
    """`(compile s, ms per update, flops per update)` of `steps` updates of `step(state, key)` in one lax.scan."""
    dynamic, static = eqx.partition(state, eqx.is_array)

    def chunk(dynamic, key, n):
        out, _ = mmd.scan_steps(lambda s, i: step(s, jr.fold_in(key, i)), eqx.combine(dynamic, static), jnp.arange(n))
        return eqx.partition(out, eqx.is_array)[0]

    one = jax.jit(chunk, static_argnums=2).lower(dynamic, key, 1).compile()
    cost = one.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))
    t0 = time.perf_counter()
    many = jax.jit(chunk, static_argnums=2).lower(dynamic, key, steps).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(many(dynamic, key))  # warm
    t0 = time.perf_counter()
    jax.block_until_ready(many(dynamic, jr.fold_in(key, 1)))
    return compile_s, 1e3 * (time.perf_counter() - t0) / steps, flops


def phases_table(data="digits", steps=20):
    cfg = (train.IMAGE_PRESETS if data == "digits" else train.PRESETS)["default"]
    task, mesh = tasks.make_task(cfg), parallel.data_mesh()
    peak, how = cpu_peak_gflops()
    state, step = train.teacher_setup(cfg, task, mesh)
    net = state.model
    rows = [("teacher", cfg.teacher_steps, *phase_cost(state, step, steps))]
    for name, method, k, over in train.phases(cfg):
        st, fn, num = train.distil_setup(cfg, method, k, over, task, net, net, None, mesh)
        rows.append((name, num, *phase_cost(st, fn, steps)))
    lines = [f"{data} default, {steps}-update chunks; peak {peak:.0f} GFLOP/s ({how})", "",
             "| phase | updates | compile (s) | ms per update | GFLOP per update | GFLOP/s | % of peak | est. phase (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, num, comp, ms, flops in rows:
        rate = flops / ms / 1e6
        lines.append(f"| {name} | {num} | {comp:.1f} | {ms:.1f} | {flops / 1e9:.3f} | {rate:.1f} | "
                     f"{100 * rate / peak:.1f} | {comp + num * ms / 1e3:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", choices=("suite", "digits", "ring8"))
    p.add_argument("files", nargs="*", help="suite: conftest's profile files (MMD_PROFILE=FILE; FILE.gw0, ...)")
    p.add_argument("--steps", type=int, default=20, help="digits, ring8: updates per timed chunk")
    p.add_argument("--top", type=int, default=30, help="suite: the slowest tests shown")
    a = p.parse_args(argv)
    if a.name == "suite":
        if not a.files:
            p.error("suite needs the profile files conftest wrote (MMD_PROFILE=FILE pytest ...)")
        print(suite_table(a.files, a.top))
    else:
        print(phases_table(a.name, a.steps))


if __name__ == "__main__":
    main()
