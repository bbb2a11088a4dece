"""Mesh construction and logical -> mesh sharding rules (8 fake CPU devices)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from jax_refine.config_base import get_config
from jax_refine import sharding as shd

RULES = get_config().mesh.rules


def test_make_mesh_resolves_minus_one_and_uses_auto_axes():
    mesh = shd.make_mesh({"data": -1, "fsdp": 4, "tensor": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert shd.batch_divisor(mesh) == 8


@pytest.mark.parametrize("shape, message", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, r"needs 3 devices, have 8"),
    ({"data": -1, "fsdp": -1}, r"at most one -1"),
    ({"data": -1, "fsdp": 3}, r"8 devices not divisible by 3"),
    ({"data": 8, "pipeline": 1}, r"unknown axis 'pipeline'"),
])
def test_bad_mesh_shape_is_a_clear_error(shape, message):
    with pytest.raises(ValueError, match=message):
        shd.make_mesh(shape)


def test_rules_map_logical_names_like_the_config_table():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert shd.logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", None, "heads", None), RULES) == P("fsdp", None, "tensor", None)
    assert shd.logical_to_spec(("vocab", "embed"), RULES) == P(None, "fsdp")
    assert shd.logical_to_spec(("mlp", "heads"), RULES) == P("tensor", None)  # a mesh axis at most once
    assert shd.logical_to_spec(("batch", None), RULES) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec((), RULES) == P()
    # a dimension that does not divide its mesh axes stays replicated (tiny models)
    assert shd.logical_to_spec(("embed", "mlp"), RULES, shape=(6, 5), mesh=mesh) == P("fsdp", None)
    with pytest.raises(ValueError, match=r"logical axis 'experts' has no entry in config.mesh.rules"):
        shd.logical_to_spec(("experts",), RULES)


def test_batch_divisibility_errors():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    shd.check_batch_size(16, mesh, grad_accum=2)
    with pytest.raises(ValueError, match=r"batch_size=12 \(micro-batch 12\) is not divisible by the data axes data\*fsdp=8"):
        shd.check_batch_size(12, mesh)


def test_host_batch_becomes_a_global_array_split_over_data_axes():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    image = np.random.default_rng(0).random((16, 4, 4, 3), dtype=np.float32)
    out = shd.host_to_global({"x": x, "image": image}, mesh)
    g = out["x"]
    assert g.sharding.spec == P(("data", "fsdp"), None)
    assert {tuple(s.data.shape) for s in g.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(g), x)
    assert out["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
    assert len(out["image"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(out["image"]), image)


def test_pretrained_params_are_loaded_directly_into_fsdp_shardings(tiny_hf_clip_dir, tmp_path):
    from train_helpers import tiny_config

    from jax_refine import train

    config = tiny_config(tmp_path, **{"model.random_init": None, "model.name_or_path": str(tiny_hf_clip_dir)})
    setup = train.setup_model(config, shd.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    params = setup.load()
    qkv = params["vision"]["layers"][0]["attn"]["qkv"]  # (48, 3, 4, 12): embed -> fsdp
    assert qkv.sharding.spec == P("fsdp", None, "tensor", None) and len(qkv.sharding.device_set) == 8
    assert {tuple(s.data.shape) for s in qkv.addressable_shards} == {(12, 3, 4, 12)}
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(setup.param_shardings)):
        assert p.sharding == s
