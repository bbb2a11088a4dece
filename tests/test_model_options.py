"""Speed/memory switches of the model (remat, scan over layers, attention implementation): same numbers.

The reference for scan and remat is the plain model, which tests/test_model.py checks against transformers'
PyTorch CLIPModel; one test here also compares the scanned + rematerialised path with PyTorch directly.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import assert_matches_torch, hf_clip_config, random_pixels
from train_helpers import synthetic_batch, tiny_config
from transformers import CLIPModel

from jax_refine import sharding as shd, train
from jax_refine.models import registry
from jax_refine.models.clip.modeling import create_clip
from jax_refine.models.clip.params import hf_state_dict
from jax_refine.models.layers import with_options

BATCH = synthetic_batch(0, 4)


def _features_and_grads(model):
    """(features, gradients of a scalar of both features, the forward's top-level primitive counts)."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        fi, ft = nnx.merge(graphdef, p)(BATCH["image"], BATCH["input_ids"], BATCH["attention_mask"])
        return jnp.sum(fi * ft) + jnp.sum(jnp.square(fi)) + jnp.sum(jnp.sin(ft)), (fi, ft)

    (_, feats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    forward = collections.Counter(e.primitive.name for e in jax.make_jaxpr(loss)(params).jaxpr.eqns)
    return [np.asarray(f) for f in feats], grads, forward


def _max_rel(a, b) -> float:
    """Largest |a - b| over all leaves, relative to each leaf's largest |b| (so tiny gradients count too)."""
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)), a, b)
    return max(jax.tree.leaves(diffs))


@pytest.fixture(scope="module")
def plain():
    model = create_clip(hf_clip_config("tiny"), seed=3)
    return model, _features_and_grads(model)


# the full suite; the fast tier has scan + remat against PyTorch (test_scan_remat_matches_pytorch)
@pytest.mark.slow
@pytest.mark.parametrize("options", [{"remat": "full"}, {"remat": "save_dots"}, {"scan_layers": True}])
def test_options_keep_features_and_gradients(plain, options):
    model, ((fi, ft), grads, prims) = plain
    (ofi, oft), ograds, oprims = _features_and_grads(with_options(model, **options))
    # the switch really changes the program: one scan per tower, or each of the 2 + 2 blocks rematerialised
    remat = oprims["remat2"] + oprims["checkpoint"]
    assert (oprims["scan"], remat) == ((2, 0) if options.get("scan_layers") else (0, 4))
    assert prims["scan"] + prims["remat2"] + prims["checkpoint"] == 0
    tol = 1e-6 if "scan_layers" not in options else 1e-5  # remat replays the same ops; scan fuses differently
    np.testing.assert_allclose(ofi, fi, rtol=0, atol=tol * np.abs(fi).max())
    np.testing.assert_allclose(oft, ft, rtol=0, atol=tol * np.abs(ft).max())
    assert jax.tree.structure(ograds) == jax.tree.structure(grads)
    assert _max_rel(ograds, grads) <= tol


def test_scan_remat_matches_pytorch(tiny_hf_clip_dir):
    """Checkpoint -> scanned, rematerialised model: features equal transformers' on the same weights (within 8x
    transformers' own fp32 error),
    and the parameters save back under the same HF names."""
    model = with_options(registry.load(tiny_hf_clip_dir), scan_layers=True, remat="full")
    ref = CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    pixels = random_pixels(3, 32, seed=4)
    ids, mask = BATCH["input_ids"], BATCH["attention_mask"]
    assert_matches_torch((model.encode_image(pixels), model.encode_text(ids, mask)), ref, pixels, ids, mask)
    assert set(hf_state_dict(model)) == {k for k in ref.state_dict() if not k.endswith("position_ids")}


@pytest.mark.slow  # two train-step compiles
def test_scanned_train_step_same_update(tmp_path):
    """One CLIP-Refine step (lr 1e-3) with scan + remat gives the plain step's loss and new parameters."""
    out = {}
    for name, opts in (("plain", {}), ("scan", {"model.scan_layers": True, "model.remat": "save_dots"})):
        config = tiny_config(tmp_path / name, **{"train.batch_size": 8, **opts})
        trainer = train.build_trainer(config, shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                                      total_steps=1)
        state = trainer.init_state()
        start = jax.tree.map(np.asarray, state.params)
        state, metrics = trainer.step_fn(state, shd.host_to_global(synthetic_batch(1, 8), trainer.mesh),
                                         jax.random.key(7))
        out[name] = (float(metrics["loss"]), jax.tree.map(np.asarray, state.params), start)
    (loss, params, start), (sloss, sparams, sstart) = out["plain"], out["scan"]
    assert jax.tree.all(jax.tree.map(np.array_equal, sstart, start))  # same start weights
    assert sloss == pytest.approx(loss, rel=1e-5)
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), sparams, params)))
    moved = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, start)))
    assert diff <= 1e-5 and moved > 1e-4


@pytest.mark.parametrize("kwargs,match", [({"remat": "some"}, "remat='some'"),
                                          ({"attention": "flash"}, "attention='flash'"),
                                          ({"attention": "cudnn"}, "bfloat16")])
def test_bad_options_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_clip(hf_clip_config("tiny"), **kwargs)


def test_activation_names_become_batch_constraints():
    """Inside `activation_sharding` the residual stream is pinned to the batch axes; outside it is untouched."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_refine.config_base import get_config
    from jax_refine.models.layers import ACT

    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    x = jax.device_put(jnp.ones((8, 5, 12)), NamedSharding(mesh, P(None, None, "fsdp")))  # FSDP-like layout

    def f(x):
        return shd.constrain(x * 2, ACT)

    # the context acts at trace time (as inside the train step), so each case traces a fresh function
    assert jax.jit(lambda x: f(x))(x).sharding.is_equivalent_to(x.sharding, 3)
    with shd.activation_sharding(mesh, get_config().mesh.rules):
        y = jax.jit(lambda x: f(x))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
    np.testing.assert_array_equal(np.asarray(y), 2.0)
