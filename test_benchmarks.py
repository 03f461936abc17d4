"""Smoke test of `benchmarks.py` at toy size: the tables build and hold what they should; the ablation drivers'
pieces."""

import equinox as eqx
import jax.numpy as jnp

import benchmarks
from ablation_digits import Handover


def test_sampler_table_toy():
    table = benchmarks.sampler_table(n=500, num_steps=(2,), dims=(2,))
    lines = table.splitlines()
    assert "noise floor" in lines[0] and "k = 2" in table
    assert sum(line.startswith("| Gaussian d = 2") for line in lines) == 2  # ancestral, ddim
    assert sum(line.startswith("| mixture") for line in lines) == 2


def test_steps_table_toy():
    # Only the teacher step: each further step costs several seconds of XLA compilation.
    table = benchmarks.steps_table(batch=8, width=8, depth=1, scan=2, repeats=1, names=())
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and rows[1].startswith("| teacher")
    assert rows[1].split(" | ")[2] == "1.00" and "(3/3)" in rows[1]  # the teacher is its own unit


def test_handover_is_the_student_above_its_time_and_the_teacher_below():
    """ablation_digits --student-steps: the student's steps are those whose input time lies above `after`."""
    class Const(eqx.Module):
        c: float

        def __call__(self, z, t, label=None):
            return jnp.full_like(z, self.c)

    m = Handover(Const(1.0), Const(-1.0), 0.6875)  # K = 8, J = 3: between the input times 0.75 and 0.625
    z = jnp.zeros(3)
    got = [float(m(z, jnp.float32(1.0 - i / 8))[0]) for i in range(8)]
    assert got == [1.0, 1.0, 1.0] + [-1.0] * 5
