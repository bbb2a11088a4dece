"""Exact gradient accumulation (issue 21): `train.grad_accum=k` against the un-accumulated step (k = 1).

On a tiny CLIP (SigLIP for `sigmoid`) with scan over layers and full remat, the loss and its terms, every
parameter's gradient and the parameters after one AdamW step with k in {2, 4} equal k = 1 on the same batch
and key: every method preset on one device (k = 4); on 8 fake devices (data 2 x fsdp 4) one objective with
every CLIP term at once (k = 2; a step compiles in about a CPU-minute here, so one compile covers six
terms), CLIP-Refine (logit scale frozen; k = 4) and SigLIP's sigmoid (scale and bias trained; k = 2). The k = 1 step is itself checked against
a PyTorch transcription in test_train_step.py. A last test shows that the old split into independent
micro-batches misses the bound by orders of magnitude.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hf_fixtures import TINY_SIGLIP
from train_helpers import synthetic_batch, tiny_config

from jax_refine import objectives, sharding as shd, step as step_lib, train

BATCH = 32  # 8 devices x micro-batches of >= 8 rows at k = 4 need B / k divisible by 8
ONE = ({"data": 1, "fsdp": 1, "tensor": 1}, 1)
EIGHT = ({"data": 2, "fsdp": 4, "tensor": 1}, 8)  # params FSDP-sharded over 4, batch over all 8
# fp32 accumulation: k partial sums of B/k rows instead of one sum of B rows reorder the float additions,
# an error of a few eps32 (1.2e-7) times the terms' condition; 2e-5 relative to the leaf's largest gradient
# leaves room for the logits' exp and the (B, B) softmax sums (measured: at most ~3e-6).
GRAD_RTOL = 2e-5
# docs/grad_accum.md's one-device table, batch 512 fp32 remat=full: the smallest k whose step fits 80 GB
GPU1_ACCUM = {"vitb32": 1, "vitl14": 1, "openclip_h14": 2, "siglip_so400m": 4}
LOSS_RTOL = 1e-6  # the loss is computed once on the same (B, D) features: only the features' own rounding


# every CLIP term at once (all but SigLIP's sigmoid), on top of the m2_mix preset (unit vectors)
ALL_CLIP_TERMS = {"contrastive": 1.0, "kd": 1.0, "rafa": 1.0, "feature": 1.0, "logit": 1.0, "m2": 0.5}


def _config(tmp_path, method: str):
    overrides = {"method.name": method, "train.batch_size": BATCH, "model.scan_layers": True,
                 "model.remat": "full"}
    if method == "all_terms":
        overrides = {**overrides, "method.name": "m2_mix", "method.normalize": False,
                     **{f"method.weights.{t}": w for t, w in ALL_CLIP_TERMS.items()}}
    if method == "sigmoid":  # SigLIP's own loss needs its logit bias
        overrides["model.random_init"] = {"model_type": "siglip", **copy.deepcopy(TINY_SIGLIP)}
    return tiny_config(tmp_path, **overrides)


def _batch(method: str) -> dict:
    b = synthetic_batch(0, BATCH)
    if method == "sigmoid":  # the tiny SigLIP's vocabulary has 64 ids
        b["input_ids"] = (b["input_ids"] % 64).astype(np.int32)
    return b


def _recording(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` whose state also keeps the last gradient it was given (the step's own gradient, unchanged)."""
    def init(params):
        return tx.init(params), jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        updates, inner = tx.update(grads, state[0], params)
        return updates, (inner, grads)

    return optax.GradientTransformation(init, update)


def _perturbed(tree, seed: int, scale: float = 0.05):
    """``tree`` + scale * N(0, 1) per leaf, in each leaf's sharding: a teacher that differs from the student
    (at the start they are equal and every distillation term and its gradient would be exactly 0)."""
    def add_noise(t):
        leaves, treedef = jax.tree.flatten(t)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                            for x, k in zip(leaves, keys)])

    return jax.jit(add_noise, out_shardings=jax.tree.map(lambda x: x.sharding, tree))(tree)


def _run(tmp_path, method: str, mesh_spec, ks=(1, 2, 4)) -> dict:
    """{k: (metrics, gradient, params after one AdamW step)} as NumPy, same batch, key and start state."""
    shape, n = mesh_spec
    config = _config(tmp_path, method)
    mesh = shd.make_mesh(shape, jax.devices()[:n])
    trainer = train.build_trainer(config, mesh, total_steps=1)
    tx = _recording(trainer.tx)
    state = trainer.init_state()
    if state.teacher is not None:
        state = state.replace(teacher=_perturbed(state.teacher, 1))
    batch = shd.host_to_global(_batch(method), mesh)
    results = {}
    for k in ks:
        step = step_lib.make_train_step(trainer.setup, config.method, tx, trainer.schedule, trainer.labels, mesh, k)
        start = state.replace(opt_state=tx.init(state.params))
        with jax.default_matmul_precision("highest"):
            new, m = jax.jit(step)(start, batch, jax.random.key(7))
        results[k] = (jax.tree.map(float, m), jax.tree.map(np.asarray, new.opt_state[1]),
                      jax.tree.map(np.asarray, new.params))
    return results


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _grad_errors(got, want) -> dict[str, float]:
    """Per parameter: max |got - want| / max |want| (the leaf's own scale; 0/0 counts as 0)."""
    out = {}
    for name, w in _leaves(want).items():
        g, scale = _leaves(got)[name], float(np.max(np.abs(w)))
        err = float(np.max(np.abs(g.astype(np.float64) - w)))
        out[name] = err / scale if scale > 0 else err
    return out


def _check(results: dict, lr: float) -> None:
    m1, g1, p1 = results[1]
    for k in (k for k in results if k != 1):
        mk, gk, pk = results[k]
        for name in ("loss", *objectives.TERMS):
            if name in m1:
                assert mk[name] == pytest.approx(m1[name], rel=LOSS_RTOL, abs=1e-7), (k, name)
        assert mk["grad_norm"] == pytest.approx(m1["grad_norm"], rel=GRAD_RTOL), k
        assert mk["modality_gap"] == pytest.approx(m1["modality_gap"], rel=1e-6, abs=1e-7), k
        errors = _grad_errors(gk, g1)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= GRAD_RTOL, (k, worst, errors[worst])
        # One AdamW step moves each entry by about lr * g / |g|: where |g| is above the accumulation error its
        # direction is fixed, so the step agrees to lr * GRAD_RTOL-ish; entries with a float-noise gradient
        # (e.g. the attention key bias, exactly 0 in exact arithmetic) are left out.
        for name, w in _leaves(p1).items():
            g = _leaves(g1)[name]
            firm = np.abs(g) > 1e3 * GRAD_RTOL * max(float(np.max(np.abs(g))), 1e-30)
            diff = np.abs(_leaves(pk)[name] - w)[firm]
            assert diff.size == 0 or float(np.max(diff)) <= 1e-2 * lr, (k, name, float(np.max(diff)))


# Each k is a compile of its own (about a CPU-minute each with scan + remat): k = 2 runs where every term is on.
@pytest.mark.slow  # a compiled step per method and k
@pytest.mark.parametrize("method", list(objectives.PRESETS))
def test_accumulated_step_equals_full_batch_one_device(tmp_path, method):
    _check(_run(tmp_path, method, ONE, ks=(1, 4)), lr=1e-3)


# k = 4 on 8 devices is CLIP-Refine's case; every term at k = 4 is checked on one device above (each k is a compile)
@pytest.mark.slow  # a compiled step per method and k on 8 devices
@pytest.mark.parametrize("method, ks", [("all_terms", (1, 2)), ("clip_refine", (1, 4)), ("sigmoid", (1, 2))])
def test_accumulated_step_equals_full_batch_8_devices_fsdp(tmp_path, method, ks):
    _check(_run(tmp_path, method, EIGHT, ks), lr=1e-3)


@pytest.mark.slow  # two compiled steps
@pytest.mark.parametrize("method", ["hycd"])
def test_independent_micro_batches_miss_the_bound(tmp_path, method):
    """What grad_accum=4 computed before: the mean of 4 separate batch-8 steps' gradients. For HyCD (the
    batch-coupled half of CLIP-Refine; its RaFA half is per-example) it is far outside
    GRAD_RTOL of the full batch's gradient, so the checks above fail on it; the exact accumulation passes."""
    config = _config(tmp_path, method)
    mesh = shd.make_mesh(ONE[0], jax.devices()[:1])
    trainer = train.build_trainer(config, mesh, total_steps=1)
    tx = _recording(trainer.tx)
    state = trainer.init_state()
    if state.teacher is not None:
        state = state.replace(teacher=_perturbed(state.teacher, 1))
    state = state.replace(opt_state=tx.init(state.params))
    step = jax.jit(step_lib.make_train_step(trainer.setup, config.method, tx, trainer.schedule, trainer.labels, mesh))
    full, key = _batch(method), jax.random.key(7)
    grad = lambda b: jax.tree.map(np.asarray, step(state, shd.host_to_global(b, mesh), key)[0].opt_state[1])  # noqa: E731
    want = grad(full)
    # the old split: micro-batch i = rows i, i+4, i+8, ..., each a batch of its own
    old = jax.tree.map(lambda *g: np.mean(np.stack(g), 0),
                       *[grad({k: v[i::4] for k, v in full.items()}) for i in range(4)])
    errors = _grad_errors(old, want)
    assert max(errors.values()) > 1e3 * GRAD_RTOL, max(errors.values())


@pytest.mark.parametrize("batch, accum, devices, message", [
    (4, 8, 1, r"config.train.batch_size=4 is not divisible by config.train.grad_accum=8: micro-batches must be "
              r"equal \(4/8 = 0.5 examples\)"),
    (32, 8, 8, r"config.train.batch_size=32 \(micro-batch 4\) is not divisible by the data axes data\*fsdp=8: "
               r"config.train.grad_accum=8 makes micro-batches of 4 examples, each spread over 8 devices"),
])
def test_uneven_micro_batch_is_a_one_line_error(tmp_path, batch, accum, devices, message):
    config = tiny_config(tmp_path, **{"train.batch_size": batch, "train.grad_accum": accum})
    shape = EIGHT[0] if devices == 8 else ONE[0]
    with pytest.raises(ValueError, match=message) as err:
        train.build_trainer(config, shd.make_mesh(shape, jax.devices()[:devices]), total_steps=1)
    assert "\n" not in str(err.value)


def test_paper_config_on_one_gpu_takes_the_measured_accumulation():
    """`clip_refine:model=vitl14,mesh=gpu1`: one device, remat=full + scan and docs/grad_accum.md's k for 80 GB;
    a model without a measurement keeps its own settings (only the mesh changes)."""
    from jax_refine.config import shipped_module

    clip_refine = shipped_module("clip_refine")

    for model, k in GPU1_ACCUM.items():
        c = clip_refine.get_config(f"model={model},mesh=gpu1")
        assert dict(c.mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
        assert (c.model.remat, c.model.scan_layers, c.train.batch_size, c.train.grad_accum) == ("full", True, 512, k)
    c = clip_refine.get_config("model=openclip_bigg14,mesh=gpu1")
    assert (c.model.remat, c.train.grad_accum) == ("full", 1)
