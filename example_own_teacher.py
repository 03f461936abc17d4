"""Distil your own teacher: a v-prediction MLP trained here on two moons, then Algorithms 2 and 3 and DMD2.

    python example_own_teacher.py            # about 2 minutes on a 2-core CPU

It imports only the public API (`mmd`, `dmd2`, `teachers`, `sampling`, `metrics`), never `train.py`, and prints each
student's MMD^2 to fresh data beside the teacher's own ancestral sampler at the same number of steps.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import dmd2
import metrics
import mmd
import teachers
from sampling import Schedule, sample


def two_moons(n, seed):
    rng = np.random.default_rng(seed)
    a, up = rng.uniform(0, np.pi, n), rng.integers(0, 2, n)
    x = np.stack([np.cos(a) - up, np.where(up, 0.5 - np.sin(a), np.sin(a))], 1) + 0.05 * rng.normal(size=(n, 2))
    return jnp.asarray(2.0 * (x - [-0.5, 0.25]), jnp.float32)  # about unit variance per coordinate


class VNet(eqx.Module):
    """Your network: predicts v = alpha eps - sigma x from (z, t), t in [0, 1] of the cosine schedule."""

    layers: list
    freqs: tuple = eqx.field(static=True)  # fixed sinusoid frequencies: static, so not parameters

    def __init__(self, width, key):
        k = jr.split(key, 4)
        self.freqs = tuple(np.exp(np.linspace(0.0, 4.0, 8)).tolist())
        self.layers = [eqx.nn.Linear(2 + 16, width, key=k[0]), eqx.nn.Linear(width, width, key=k[1]),
                       eqx.nn.Linear(width, width, key=k[2]), eqx.nn.Linear(width, 2, key=k[3])]

    def __call__(self, z, t):
        f = t * jnp.asarray(self.freqs)
        h = jnp.concatenate([z, jnp.sin(f), jnp.cos(f)])
        h = jax.nn.silu(self.layers[0](h))
        for layer in self.layers[1:-1]:
            h = h + jax.nn.silu(layer(h))
        return self.layers[-1](h)


def train_teacher(data, key, steps, batch=256):
    """Your own training loop: the v-prediction loss on the cosine schedule alpha = cos(pi t / 2)."""
    net, opt = VNet(128, key), optax.adam(optax.cosine_decay_schedule(2e-3, steps))

    @eqx.filter_jit
    def step(net, state, key):
        kx, kt, ke = jr.split(key, 3)
        x, t = data[jr.randint(kx, (batch,), 0, len(data))], jr.uniform(kt, (batch,))
        eps, (a, s) = jr.normal(ke, x.shape), (jnp.cos(0.5 * jnp.pi * t)[:, None], jnp.sin(0.5 * jnp.pi * t)[:, None])
        loss = lambda n: jnp.mean((jax.vmap(n)(a * x + s * eps, t) - (a * eps - s * x)) ** 2)
        grads = eqx.filter_grad(loss)(net)
        updates, state = opt.update(grads, state)
        return eqx.apply_updates(net, updates), state

    state = opt.init(eqx.filter(net, eqx.is_inexact_array))
    for i in range(steps):
        net, state = step(net, state, jr.fold_in(key, i))
    return net


def distil(d: mmd.Distiller, data, key, batch=256):
    """Train a distiller's student on batches of your data (`d.step` is jitted once; keys by fold_in)."""
    state, n = d.init(), d.batch_multiple * batch
    for i in range(d.steps):
        kx, ks = jr.split(jr.fold_in(key, i))
        state, _ = d.step(state, data[jr.randint(kx, (n,), 0, len(data))], ks)
    return state


def main(teacher_steps=4000, mm_steps=600, dmd2_steps=600, k=4, n_eval=4000, seed=0):
    data, test = two_moons(20_000, seed), np.asarray(two_moons(n_eval, seed + 1))
    key_t, key_d, key_s = jr.split(jr.key(seed), 3)
    teacher = teachers.FromV(train_teacher(data, key_t, teacher_steps))  # now an x-prediction on our schedule
    teachers.check_teacher(teacher, data[0])
    schedule, var = Schedule(), float(data.var(0).mean())
    students = {
        "alternating": mmd.alternating_distiller(teacher, k=k, steps=mm_steps, lr=1e-3),
        "instant": mmd.instant_distiller(teacher, mmd.estimate_preconditioner(
            teacher, schedule, data[:2560].reshape(10, 256, 2), key_d), k=k, steps=mm_steps, lr=1e-3),
        "dmd2": dmd2.dmd2_distiller(teacher, k=k, steps=dmd2_steps, data_var=var, ema=0.99),
    }
    mmd2 = lambda x: metrics.mmd2(np.asarray(x), test)
    own = mmd2(sample(teacher, schedule, key_s, (n_eval, 2), k))
    rows = {}
    for name, d in students.items():
        rows[name] = (mmd2(d.sample(distil(d, data, jr.fold_in(key_d, len(rows))), key_s, (n_eval, 2))), own)
        print(f"{name:12s} k = {k}: MMD^2 {1e3 * rows[name][0]:7.2f} x 1e-3, teacher's own {k} steps {1e3 * own:7.2f}")
    return rows


if __name__ == "__main__":
    main()
