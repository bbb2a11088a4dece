"""The jitted train step against an independent PyTorch step, and sharded vs single-device training."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train_helpers import SyntheticIterator, synthetic_batch, tiny_config, torch_clip_refine_steps

from jax_refine import sharding as shd, step as step_lib, train
from jax_refine.models.clip.params import hf_state_dict


def _one_device_mesh():
    return shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _capture_grads_tx():
    """An 'optimizer' whose state is the last gradient and whose update is zero: the step's own gradient."""
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)  # noqa: E731
    return optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))


def _hf(trainer, tree) -> dict:
    """A parameter-shaped tree (params or gradients) under HF names, in HF layouts."""
    return hf_state_dict(nnx.merge(trainer.setup.graphdef, jax.tree.map(np.asarray, tree), trainer.setup.rest))


def test_clip_refine_gradients_and_three_adamw_steps_match_pytorch(tiny_hf_clip_dir, tmp_path):
    """The step's gradient itself (every parameter, so a scaled or missing term shows), then 3 AdamW steps
    at lr 1e-3, weight decay 0.1 (LayerNorm weights of 1 move by 1e-4 per step from the decay alone), then the
    loss of the first batch again: it must be lower than before training."""
    config = tiny_config(tmp_path, **{"model.random_init": None, "model.name_or_path": str(tiny_hf_clip_dir),
                                      "optimizer.lr": 1e-3, "train.batch_size": 8})
    trainer = train.build_trainer(config, _one_device_mesh(), total_steps=3)
    batches = [synthetic_batch(i, 8) for i in range(3)]
    keys = [jax.random.key(42 + i) for i in range(3)]
    zs = [np.asarray(step_lib.step_reference(k, (8, 24), config.method)) for k in keys]
    ref = torch_clip_refine_steps(tiny_hf_clip_dir, batches, zs, lr=1e-3, weight_decay=0.1, eval_batch=batches[0])

    # 1. the gradient of the real step (same loss_fn, labels and teacher), captured instead of applied
    state = trainer.init_state()
    start = _hf(trainer, state.params)
    capture = _capture_grads_tx()
    grad_step = jax.jit(step_lib.make_train_step(trainer.setup, config.method, capture, trainer.schedule,
                                              trainer.labels, trainer.mesh))
    probe = state.replace(opt_state=capture.init(state.params))
    glob = lambda b: shd.host_to_global(b, trainer.mesh)  # noqa: E731
    after_grad, m0 = grad_step(probe, glob(batches[0]), keys[0])
    grads = _hf(trainer, after_grad.opt_state)
    assert float(m0["loss"]) == pytest.approx(ref["losses"][0], rel=1e-5)
    scale = max(float(np.max(np.abs(g))) for g in ref["grads"].values())
    for k, g in grads.items():
        assert g.shape == ref["grads"][k].shape, k
        assert float(np.max(np.abs(g - ref["grads"][k]))) <= 1e-5 * scale + 1e-6 * float(np.max(np.abs(g))), k
    assert float(np.max(np.abs(grads["logit_scale"]))) == 0.0  # CLIP-Refine has no contrastive term
    ref_norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in ref["grads"].values()))
    assert float(m0["grad_norm"]) == pytest.approx(ref_norm, rel=1e-5)

    # 2. three AdamW steps
    losses = []
    for b, k in zip(batches, keys):
        state, m = trainer.step_fn(state, glob(b), k)
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses, ref["losses"], rtol=1e-5)
    ours = _hf(trainer, state.params)
    # The key bias has an exactly zero gradient (softmax is invariant to q.b_k): float noise ~1e-10 that Adam
    # divides by |g| + eps, so only its weight decay is determined.
    noise_only = [k for k in ours if k.endswith("self_attn.k_proj.bias")]
    diffs = {k: float(np.max(np.abs(ours[k] - ref["params"][k]))) for k in ours if k not in noise_only}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 2e-5, (worst, diffs[worst])
    ln = "text_model.final_layer_norm.weight"
    assert np.max(np.abs(ours[ln] - start[ln])) > 2e-4  # 3 x lr x wd x 1 of decay, plus the Adam steps
    assert ours["logit_scale"] == start["logit_scale"]  # frozen: no gradient, no weight decay

    # 3. it trains: the first batch's loss (with its reference z) at the end, against its loss at the start
    _, m_end = grad_step(state.replace(opt_state=capture.init(state.params)), glob(batches[0]), keys[0])
    assert float(m_end["loss"]) == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert float(m_end["loss"]) < losses[0]


def _losses(workdir) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two training runs (32 s); the fast tier's 8-device checks: sharded losses, a state restored into
# 8-device FSDP (test_checkpoint), the sharded weight load (test_hf)
def test_sharded_8_devices_match_1_device(tmp_path):
    """data=2 x fsdp=4 (params FSDP-sharded, batch over both axes) vs one device: same losses for 5 steps."""
    results = {}
    for name, shape, devices in (("one", {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                                 ("eight", {"data": 2, "fsdp": 4, "tensor": 1}, jax.devices())):
        config = tiny_config(tmp_path / name, **{"train.num_steps": 5, "checkpoint.every_steps": 100})
        mesh = shd.make_mesh(shape, devices)
        out = train.train(config, data_iter=SyntheticIterator(8), mesh=mesh, return_state=True)
        kernel = out["state"].params["vision"]["layers"][0]["mlp"]["fc1"]
        results[name] = (_losses(tmp_path / name), kernel)
    (one, k1), (eight, k8) = results["one"], results["eight"]
    assert len(one) == len(eight) == 5
    assert k8.sharding.spec[0] == "fsdp" and len(k8.sharding.device_set) == 8  # really FSDP-sharded
    np.testing.assert_allclose(eight, one, rtol=0, atol=1e-5)  # (that it trains: the same-batch check above)
