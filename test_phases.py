"""Tests of single training phases: the weight averages (teacher and DMD2 generator) against their closed form, the
batches Algorithm 3 draws, which w(s) each algorithm gets, and the Config checks of their counts. Each runs a
phase of a few steps of the tiny configuration of `test_train.py`, with spies on what the phase saves or calls.
"""

import dataclasses
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import train
from test_train import TINY
from uvit import ImageDenoiser

# ----------------------------------------------------------------------------------------------
# The teacher's weight average (EMA).


def ema_closed_form(params, d):
    """`sum_i (1 - d) d^(n-i) p_i / (1 - d^n)` over the list `params` = [p_1, ..., p_n], in float64."""
    n = len(params)
    w = (1 - d) * d ** (n - 1 - np.arange(n)) / (1 - d**n)
    return np.tensordot(w, np.stack([np.asarray(p, np.float64) for p in params]), 1)


@pytest.mark.parametrize("d", [0.5, 0.99, 0.999])
def test_ema_update_equals_closed_form(d):
    """After n updates the running average is the bias-corrected EMA; non-float leaves follow the model. A plain
    EMA started from the initial weights (no bias correction) is measurably different when d^n is not negligible
    (d >= 0.99 with n = 50): the check bites."""
    rng = np.random.default_rng(0)
    params = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(50)]
    init = (jnp.full((3, 2), 3.0), jnp.int32(-1))  # the initial weights: no part of the average
    ema, plain = init, np.full((3, 2), 3.0)
    for n, p in enumerate(params, 1):
        ema = train.ema_update(ema, (jnp.asarray(p), jnp.int32(n)), d, jnp.int32(n))
        plain = d * plain + (1 - d) * p
    want = ema_closed_form(params, d)
    np.testing.assert_allclose(np.asarray(ema[0]), want, rtol=1e-4, atol=1e-5)
    assert int(ema[1]) == len(params)
    assert d < 0.9 or np.abs(plain - want).max() > 1e-2  # the wrong variant fails the same check
    one = train.ema_update(init, (jnp.asarray(params[0]), jnp.int32(1)), d, jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(one[0]), params[0])  # n = 1: the average is p_1 exactly


def test_teacher_phase_keeps_the_ema_of_its_weights(tmp_path):
    """`train_teacher` with teacher_ema = d: its `.model` is the closed-form EMA of the weights after each step, the
    optimiser state still holds exactly one Adam state (instant MM's preconditioner), and with d = 0 no average."""
    import tasks  # noqa: PLC0415

    cfg = dataclasses.replace(TINY, teacher_steps=6, chunk=1, teacher_ema=0.7)
    task, mesh = tasks.make_task(cfg), train.parallel.data_mesh()
    seen, real_save = [], train.Run.save_phase

    def spy(self, name, state, *args):
        seen.append(eqx.filter(state.player.model, eqx.is_inexact_array))
        return real_save(self, name, state, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Run, "save_phase", spy)
        state, history, _ = train.train_teacher(train.Run(tmp_path / "a"), cfg, task, mesh, jr.key(0))
    assert len(seen) == 6 and int(state.count) == 6 and len(history["loss"]) == 6
    got = jax.tree.leaves(eqx.filter(state.model, eqx.is_inexact_array))
    for i, leaf in enumerate(got):
        want = ema_closed_form([jax.tree.leaves(p)[i] for p in seen], 0.7)
        np.testing.assert_allclose(np.asarray(leaf), want, rtol=1e-4, atol=1e-6)
    assert not np.allclose(np.asarray(got[-1]), np.asarray(jax.tree.leaves(seen[-1])[-1]))  # not the last weights
    assert train.mmd.preconditioner_from_adam(state.player.opt_state, b2=train.mmd.TEACHER_B2) is not None

    off, _, _ = train.train_teacher(train.Run(tmp_path / "b"), dataclasses.replace(cfg, teacher_ema=0.0), task, mesh,
                                    jr.key(0))
    assert off.ema is None and off.model is off.player.model


@pytest.mark.parametrize("method, k, field", [("dmd2", 1, "dmd2_ema"), ("mm_alternating", 2, "mm_ema"),
                                              ("mm_instant", 2, "mm_ema")])
def test_student_phase_returns_the_ema_of_its_weights(method, k, field, tmp_path):
    """A student phase with its weight average at decay d (DMD2: dmd2_ema, MM: mm_ema) returns the closed-form EMA
    of the student's weights after each update (not the last weights); with d = 0 it returns the last weights. The
    average does not change the training."""
    import tasks  # noqa: PLC0415

    cfg = dataclasses.replace(TINY, dmd2_train_steps=5, mm_train_steps=5, instant_train_steps=5, chunk=1, data_grad_batches=2, **{field: 0.7})
    task, mesh = tasks.make_task(cfg), train.parallel.data_mesh()
    net = train.teacher_setup(cfg, task, mesh)[0].model
    seen, real_save = [], train.Run.save_phase

    def spy(self, name, state, *args):
        inner = state.state if isinstance(state, train.Averaged) else state
        seen.append(eqx.filter(train.student(inner), eqx.is_inexact_array))
        return real_save(self, name, state, *args)

    name = f"{method}_k{k}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Run, "save_phase", spy)
        model, _, _ = train.distil(train.Run(tmp_path / "a"), cfg, name, method, k, {}, task, net, net, None,
                                   mesh, jr.key(1))
        last, _, _ = train.distil(train.Run(tmp_path / "b"), dataclasses.replace(cfg, **{field: 0.0}), name,
                                  method, k, {}, task, net, net, None, mesh, jr.key(1))
    averaged, plain = seen[:5], seen[5:]
    assert len(plain) == 5
    # the same training with and without it, to float32 rounding: the two runs are different compiled programs,
    # whose fusions may round an element one unit apart, and Adam's normalised steps carry that to a relative 2.4e-5
    # after five updates (measured on one device); an update drawn with another key is off by up to 6x
    for a, b in zip(jax.tree.leaves(averaged), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-9)
    got = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    for i, leaf in enumerate(got):
        np.testing.assert_allclose(np.asarray(leaf), ema_closed_form([jax.tree.leaves(p)[i] for p in averaged], 0.7),
                                   rtol=1e-4, atol=1e-6)
    last_leaves = [np.asarray(x) for x in jax.tree.leaves(eqx.filter(last, eqx.is_inexact_array))]
    for a, b in zip(last_leaves, jax.tree.leaves(plain[-1])):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert max(np.abs(np.asarray(g) - b).max() for g, b in zip(got, last_leaves)) > 1e-6  # the average is not the last


@pytest.mark.parametrize("mult", [1, 3])
def test_instant_phase_draws_b_and_b_prime(mult):
    """Algorithm 3's update gets a batch B and an independent batch B' = nu_batch_mult x B (which gives nu)."""
    import tasks  # noqa: PLC0415

    cfg = dataclasses.replace(TINY, nu_batch_mult=mult, data_grad_batches=2)
    task, mesh = tasks.make_task(cfg), train.parallel.data_mesh()
    net = train.teacher_setup(cfg, task, mesh)[0].model
    precond = jax.tree.map(jnp.ones_like, eqx.filter(net, eqx.is_inexact_array))
    sizes, real_step = [], train.mmd.instant_step

    def spy(state, teacher, precond, x, x_prime, *args, **kw):
        sizes.append((x.shape[0], x_prime.shape[0]))
        return real_step(state, teacher, precond, x, x_prime, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.mmd, "instant_step", spy)
        state, step, _ = train.distil_setup(cfg, "mm_instant", 2, {}, task, net, net, precond, mesh)
        step(state, jr.key(0))
    assert sizes == [(cfg.batch, mult * cfg.batch)]


@pytest.mark.parametrize("decay", [True, False])
def test_dmd2_lr_decay_stops_the_generator_only(decay):
    """`Config.dmd2_lr_decay`: the DMD2 generator's rate falls along a cosine to 0 at its last scheduled update
    (`dmd2_train_steps`), so one update past it leaves the generator where it was while the critic, at its constant
    rate, still trains; without the decay the generator still moves. (Decaying the critic's rate, or both, fails.)"""
    import tasks  # noqa: PLC0415

    n = 5
    cfg = dataclasses.replace(TINY, dmd2_train_steps=n, dmd2_lr_decay=decay, dmd2_ema=0.0)
    task, mesh = tasks.make_task(cfg), train.parallel.data_mesh()
    net = train.teacher_setup(cfg, task, mesh)[0].model
    state, step, num = train.distil_setup(cfg, "dmd2", 1, {}, task, net, net, None, mesh)
    assert num == n
    step = eqx.filter_jit(step)
    for i in range(n):
        state = step(state, jr.key(i))[0]
    after = step(state, jr.key(n))[0]  # the update at schedule count n, where the cosine ends

    def moved(player):
        a, b = (jax.tree.leaves(eqx.filter(getattr(s, player).model, eqx.is_inexact_array)) for s in (state, after))
        return any(bool(jnp.any(u != v)) for u, v in zip(a, b))

    assert moved("critic")
    assert moved("generator") == (not decay)


@pytest.mark.parametrize("kw, want", [({}, "edm"), ({"weighting": "flat"}, "flat"), ({"weighting": "auto"}, "flat")])
def test_setup_keywords_override_the_config(kw, want):
    """A setup's keyword arguments (`train.distil_setup(..., **kw)`, what the ablation drivers pass) go to the
    distiller over the Config's values: `weighting` given to Algorithm 3 sets its w(s) and its data term's (auto:
    flat at k = 2); Algorithm 2 without them keeps `Config.weighting`."""
    import tasks  # noqa: PLC0415

    cfg = dataclasses.replace(TINY, weighting="edm", data_grad_batches=2)
    task, mesh = tasks.make_task(cfg), train.parallel.data_mesh()
    net = train.teacher_setup(cfg, task, mesh)[0].model
    precond = jax.tree.map(jnp.ones_like, eqx.filter(net, eqx.is_inexact_array))
    seen = {}

    def spy(name, real):
        def fn(*args, cfg, **kw):
            seen[name] = cfg.weighting
            return real(*args, cfg=cfg, **kw)
        return fn

    with pytest.MonkeyPatch.context() as mp:
        for name in ("instant_step", "alternating_step"):
            mp.setattr(train.mmd, name, spy(name, getattr(train.mmd, name)))
        mp.setattr(train, "data_moment", lambda cfg, task, teacher, w: seen.setdefault("data_moment", w) and None)
        for method, extra in (("mm_instant", kw), ("mm_alternating", {})):
            state, step, _ = train.distil_setup(cfg, method, 2, {}, task, net, net, precond, mesh, **extra)
            step(state, jr.key(0))
    assert seen == {"instant_step": want, "data_moment": want, "alternating_step": "edm"}
    with pytest.raises(ValueError, match="unknown weighting 'bogus'"):
        dataclasses.replace(TINY, weighting="bogus")


def test_sigma_data_reaches_every_mm_loss():
    """The distillers' `sigma_data` is the sigma_data of EDM's w(s) in every loss of Algorithm 2 and 3 and in Eq. 10's
    data term: a spy on `losses.loss_weight` sees `losses.EDMWeight(1.3)` and nothing else while both phases take a
    step; a value <= 0 is refused."""
    import tasks  # noqa: PLC0415

    cfg = dataclasses.replace(TINY, weighting="edm", data_grad_batches=2)
    task, mesh = tasks.make_task(cfg), train.parallel.data_mesh()
    net = train.teacher_setup(cfg, task, mesh)[0].model
    precond = jax.tree.map(jnp.ones_like, eqx.filter(net, eqx.is_inexact_array))
    seen, real = set(), train.L.loss_weight

    def spy(weighting, *args):
        seen.add(weighting)
        return real(weighting, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.L, "loss_weight", spy)
        for method in ("mm_alternating", "mm_instant"):
            state, step, _ = train.distil_setup(cfg, method, 2, {}, task, net, net, precond, mesh, sigma_data=1.3)
            eqx.filter_eval_shape(step, state, jr.key(0))
    assert seen == {train.L.EDMWeight(1.3)}, seen
    with pytest.raises(ValueError, match=r"sigma_data .* > 0; got -1.0"):
        train.mmd.alternating_distiller(net, k=2, steps=10, sigma_data=-1.0)


@pytest.mark.parametrize("per_k", [(), ((1, 11),)])
def test_train_steps_per_algorithm_and_k(per_k):
    """`Config.instant_train_steps` is Algorithm 3's number of updates, `mm_train_steps` Algorithm 2's, replaced for
    the k that `mm_train_steps_per_k` names (and only for Algorithm 2); bad pairs are rejected by value."""
    import tasks  # noqa: PLC0415

    cfg = dataclasses.replace(TINY, mm_train_steps=30, mm_train_steps_per_k=per_k, instant_train_steps=7,
                              data_grad_batches=2)
    task, mesh = tasks.make_task(cfg), train.parallel.data_mesh()
    net = train.teacher_setup(cfg, task, mesh)[0].model
    precond = jax.tree.map(jnp.ones_like, eqx.filter(net, eqx.is_inexact_array))
    steps = {(m, k): train.distil_setup(cfg, m, k, {}, task, net, net, precond, mesh)[2]
             for m in ("mm_instant", "mm_alternating") for k in (1, 2)}
    assert steps == {("mm_instant", 1): 7, ("mm_instant", 2): 7, ("mm_alternating", 1): 11 if per_k else 30,
                     ("mm_alternating", 2): 30}
    for bad in (((1, 0),), ((0, 5),), ((1,),), ((1, 5.0),), ([1, 5],), 5):
        with pytest.raises(ValueError, match=re.escape(f"(k, updates) pairs of integers >= 1; got {bad!r}")):
            dataclasses.replace(TINY, mm_train_steps_per_k=bad)
    with pytest.raises(ValueError, match=r"names a k twice: \(\(1, 5\), \(1, 6\)\)"):
        dataclasses.replace(TINY, mm_train_steps_per_k=((1, 5), (1, 6)))


def test_resume_reads_nested_tuples_back(tmp_path):
    """config.json stores tuples of tuples (mm_train_steps_per_k, mm_aux_lr_per_k) as lists of lists; `--resume`
    gives them back as the tuples they were, so the resumed Config equals the saved one."""
    import json  # noqa: PLC0415

    cfg = dataclasses.replace(TINY, mm_train_steps_per_k=((1, 11), (2, 5)), mm_aux_lr_per_k=((2, 1e-3),))
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    assert train.parse(["--resume", str(tmp_path)])[0] == cfg


def _update_count(player):
    """How many updates a player's optimiser (`mmd.mm_optimiser`'s chain) has applied: Adam's step count."""
    counts = [int(v) for p, v in jax.tree_util.tree_flatten_with_path(player.opt_state)[0] if "count" in jax.tree_util.keystr(p)]
    assert counts and len(set(counts)) == 1, counts
    return counts[0]


@pytest.mark.parametrize("aux_steps, per_k", [(1, ()), (3, ()), (1, ((2, 5e-3),)), (3, ((2, 5e-3),)),
                                            (1, ((1, 5e-3),))])
def test_aux_steps_and_lr_give_the_auxiliary_model_its_own_updates_and_schedule(aux_steps, per_k):
    """`aux_steps` auxiliary updates per generator update (Algorithm 2; the distiller's argument), each counted by
    the auxiliary model's own optimiser; with more than one, or with an auxiliary rate for this k
    (`Config.mm_aux_lr_per_k`), that optimiser's schedule runs over the auxiliary model's own number of updates
    (mm_train_steps x aux_steps) at its own peak rate, so its learning rate is not spent before the generator's.
    The defaults (1, none) keep the one shared optimiser of the paper; an entry for another k changes nothing."""
    import tasks  # noqa: PLC0415

    cfg = dataclasses.replace(TINY, mm_train_steps=20, mm_aux_lr_per_k=per_k)
    aux_lr = dict(per_k).get(2)  # the student below has k = 2
    task, mesh = tasks.make_task(cfg), train.parallel.data_mesh()
    net = train.teacher_setup(cfg, task, mesh)[0].model
    made = []
    real = train.mmd.mm_optimiser
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.mmd, "mm_optimiser",
                   lambda lr, n, warmup, b1: made.append((lr, n, warmup, b1)) or real(lr, n, warmup, b1=b1))
        state, step, num = train.distil_setup(cfg, "mm_alternating", 2, {}, task, net, net, None, mesh,
                                              aux_steps=aux_steps)
    for i in range(2):
        state, metrics = step(state, jr.key(i))
    inner = state.state if isinstance(state, train.Averaged) else state
    assert (_update_count(inner.generator), _update_count(inner.aux)) == (2, 2 * aux_steps)
    assert num == 20 and bool(jnp.isfinite(metrics["aux_loss"])) and bool(jnp.isfinite(metrics["gen_loss"]))
    own = [] if (aux_steps, aux_lr) == (1, None) else [(aux_lr or cfg.mm_lr, 20 * aux_steps, 2 * aux_steps, 0.0)]
    assert made == [(cfg.mm_lr, 20, 2, 0.0)] + own
    for bad in (((2, -1e-3),), ((2, 0.0),), ((0, 1e-3),), ((2,),), ((2, float("nan")),), ((2.0, 1e-3),),
                ((2, True),), 5):
        with pytest.raises(ValueError, match=re.escape(f"(k, lr) pairs, k an integer >= 1 and lr a finite number > 0; "
                                                       f"got {bad!r}")):
            dataclasses.replace(TINY, mm_aux_lr_per_k=bad)
    with pytest.raises(ValueError, match=r"mm_aux_lr_per_k names a k twice: \(\(1, 0.001\), \(1, 0.002\)\)"):
        dataclasses.replace(TINY, mm_aux_lr_per_k=((1, 1e-3), (1, 2e-3)))
    with pytest.raises(ValueError, match=r"aux_steps \(auxiliary updates per generator update\) must be an integer >= 1; got 0"):
        train.mmd.MMConfig(aux_steps=0)


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_mm_optimiser_b1_is_adams_momentum(b1):
    """`mm_optimiser(b1=...)` (the distillers' `b1`) is Adam's first-moment decay. With gradients g, then -g: the first
    update is 0 (warm-up from 0), the second moves every coordinate by lr (1 - b1) / (1 + b1) along sign(g),
    since Adam's bias-corrected moments are then m = -(1 - b1) / (1 + b1) g and v = g^2. Without momentum (the
    paper's b1 = 0) that is a full step of lr; with b1 = 0.9 one of 0.053 lr: the noise of successive gradients
    averages out. Clipping (norm 1) rescales g, which Adam ignores."""
    lr = 1e-2
    opt = train.mmd.mm_optimiser(lr, 1000, warmup=1, b1=b1)
    g = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = opt.init(g)
    u1, state = opt.update(g, state, g)
    u2, state = opt.update(jax.tree.map(jnp.negative, g), state, g)
    np.testing.assert_allclose(u1["w"], 0.0, atol=1e-12)
    np.testing.assert_allclose(u2["w"], lr * (1 - b1) / (1 + b1) * jnp.sign(g["w"]), rtol=1e-5)


def test_config_step_grid():
    cos = dataclasses.replace(TINY, data="digits", step_grid="cosine")
    assert cos.grid_shift == 0.0 and TINY.grid_shift is None
    task = train.tasks.make_task(cos)  # 8x8 images: a shifted schedule, so the grids differ
    want = train.sampling.grid_times(task.schedule, 4, 0.0)
    assert train.step_times(cos, "mm_alternating", 4, task) == want == train.step_times(cos, "teacher", 4, task)
    assert want != tuple(1.0 - i / 4 for i in range(4))
    assert train.step_times(dataclasses.replace(cos, step_grid="schedule"), "mm_instant", 4, task) is None
    assert train.step_times(cos, "dmd2", 4, task) == train.dmd2_times(4, task)
    with pytest.raises(ValueError, match="unknown step_grid 'karras'; choose 'schedule' or 'cosine'"):
        dataclasses.replace(TINY, step_grid="karras")


@pytest.mark.parametrize("samplers", [(), ("euler",), ("ancestral", "ancestral"), ("marginal",)])
def test_config_rejects_unknown_or_repeated_teacher_samplers(samplers):
    with pytest.raises(ValueError, match=re.escape(f"teacher_samplers must list 'ancestral' and / or 'ddim', each "
                                                   f"once; got {samplers!r}")):
        dataclasses.replace(TINY, teacher_samplers=samplers)


@pytest.mark.parametrize("field", ["data_grad_batches", "nu_batch_mult", "mm_train_steps", "instant_train_steps"])
def test_config_rejects_counts_below_one(field):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1; got 0"):
        dataclasses.replace(TINY, **{field: 0})


@pytest.mark.parametrize("field", ["teacher_ema", "dmd2_ema", "mm_ema"])
@pytest.mark.parametrize("decay", [-0.1, 1.0, float("nan")])
def test_config_rejects_ema_decay_outside_0_1(field, decay):
    with pytest.raises(ValueError, match=rf"{field} \(EMA decay\) must be in \[0, 1\); got {decay}"):
        dataclasses.replace(TINY, **{field: decay})


# ----------------------------------------------------------------------------------------------
# Guidance: what `train.guided` hands to the losses.


def test_guided_guides_teacher_and_preconditioner_only_at_a_positive_scale():

    @eqx.filter_jit  # one compiled program each, not one per operation
    def perturbed(net, key):  # off its zero-initialised layers, so labels matter
        leaves, tree = jax.tree.flatten(eqx.filter(net, eqx.is_inexact_array))
        noise = [0.1 * jr.normal(k, p.shape, p.dtype) for k, p in zip(jr.split(key, len(leaves)), leaves)]
        return eqx.apply_updates(net, jax.tree.unflatten(tree, noise))

    call = eqx.filter_jit(lambda model, z, t, label: model(z, t, label))
    net = perturbed(ImageDenoiser(8, 1, num_classes=10, width=16, depth=1, key=jr.key(0)), jr.key(2))
    precond = eqx.filter_jit(lambda m: jax.tree.map(jnp.ones_like, eqx.filter(m, eqx.is_inexact_array)))(net)
    cfg = dataclasses.replace(train.IMAGE_PRESETS["default"], guidance=0.0)
    assert train.guided(cfg, net, precond) == (net, precond)  # scale 0: the objects themselves
    assert train.guided(cfg, net) == (net, None)
    teacher, pre = train.guided(dataclasses.replace(cfg, guidance=0.5), net, precond)
    assert teacher.scale == pre.scale == 0.5 and teacher.model is net and pre.model is precond
    assert train.guided(dataclasses.replace(cfg, guidance=0.5), net)[1] is None
    z, t, label = jr.normal(jr.key(1), (8, 8, 1)), jnp.float32(0.7), jnp.int32(3)
    x_c, x_u = call(net, z, t, label), call(net, z, t, None)
    np.testing.assert_allclose(call(teacher, z, t, label), x_c + 0.5 * (x_c - x_u), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(x_c - x_u))) > 1e-3  # the two predictions differ, so the check above can fail
