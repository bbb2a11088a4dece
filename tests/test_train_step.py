"""The jitted train step against an independent PyTorch step, and sharded vs single-device training."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from train_helpers import SyntheticIterator, synthetic_batch, tiny_config, torch_clip_refine_step

from jax_refine import hf, sharding as shd, train


def _one_device_mesh():
    return shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def test_clip_refine_step_matches_pytorch(tiny_hf_clip_dir, tmp_path):
    config = tiny_config(tmp_path, **{"model.random_init": None, "model.name_or_path": str(tiny_hf_clip_dir),
                                      "optimizer.lr": 1e-3, "train.batch_size": 8})
    trainer = train.build_trainer(config, _one_device_mesh(), total_steps=1)
    state = trainer.init_state()
    batch = synthetic_batch(0, 8)
    key = jax.random.key(42)
    z = np.asarray(train.step_reference(key, (8, 24), config.method))
    global_batch = shd.host_to_global(batch, trainer.mesh)
    state, metrics = trainer.step_fn(state, global_batch, key)

    ref_loss, ref_params = torch_clip_refine_step(tiny_hf_clip_dir, batch, z, lr=1e-3)
    assert float(metrics["loss"]) == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    model = jax.tree.map(np.asarray, state["params"])
    from flax import nnx

    ours = hf.hf_state_dict(nnx.merge(trainer.setup.graphdef, model, trainer.setup.rest))
    start = hf.hf_state_dict(hf.load_pretrained(tiny_hf_clip_dir))
    assert set(ours) <= set(ref_params)
    # The key bias has an exactly zero gradient (softmax is invariant to q.b_k), so both frameworks see
    # float noise ~1e-10 that Adam divides by |g| + eps: only its weight decay is determined.
    noise_only = [k for k in ours if k.endswith("self_attn.k_proj.bias")]
    for k in noise_only:
        decayed = start[k] * (1 - 1e-3 * 0.1)
        assert np.max(np.abs(ours[k] - decayed)) <= 1e-3 and np.max(np.abs(ref_params[k] - decayed)) <= 1e-3
    diffs = {k: float(np.max(np.abs(ours[k] - ref_params[k]))) for k in ours if k not in noise_only}
    moved = {k: float(np.max(np.abs(ours[k] - start[k]))) for k in ours}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-5, (worst, diffs[worst])
    assert moved["visual_projection.weight"] > 5e-4  # the update is visible at lr 1e-3
    assert moved["logit_scale"] == 0.0  # unused by CLIP-Refine: no grad, no weight decay (as torch)


def _losses(workdir) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_sharded_8_devices_match_1_device(tmp_path):
    """data=2 x fsdp=4 (params FSDP-sharded, batch over both axes) vs one device: same losses for 5 steps."""
    results = {}
    for name, shape, devices in (("one", {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                                 ("eight", {"data": 2, "fsdp": 4, "tensor": 1}, jax.devices())):
        config = tiny_config(tmp_path / name, **{"train.num_steps": 5, "checkpoint.every_steps": 100})
        mesh = shd.make_mesh(shape, devices)
        out = train.train(config, data_iter=SyntheticIterator(8), mesh=mesh, return_state=True)
        kernel = out["state"]["params"]["vision"]["layers"][0]["mlp"]["fc1"]
        results[name] = (_losses(tmp_path / name), kernel)
    (one, k1), (eight, k8) = results["one"], results["eight"]
    assert len(one) == len(eight) == 5
    assert k8.sharding.spec[0] == "fsdp" and len(k8.sharding.device_set) == 8  # really FSDP-sharded
    np.testing.assert_allclose(eight, one, rtol=0, atol=1e-5)
    assert one[-1] < one[0]  # it trains
