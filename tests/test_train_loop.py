"""The training loop: SIGTERM, NaN stop, bad-input errors, every method, freeze, accumulation, bf16."""
from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_helpers import SyntheticIterator, synthetic_batch, tiny_config

from jax_refine import checkpoint as ckpt, hooks, objectives, sharding as shd, train

pytestmark = pytest.mark.slow  # training runs: not in the fast tier


def _mesh():
    return shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


class _SigtermAt(SyntheticIterator):
    """Sends SIGTERM to this process when batch ``at`` is fetched (a preemption notice mid-run)."""

    def __init__(self, batch: int, at: int):
        super().__init__(batch)
        self.at = at

    def __next__(self):
        if self.index == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__next__()


def test_sigterm_saves_and_stops_then_resumes(tmp_path):
    config = tiny_config(tmp_path, **{"train.num_steps": 6, "checkpoint.every_steps": 100})
    out = train.train(config, data_iter=_SigtermAt(8, at=2), mesh=_mesh())
    assert out["preempted"] and out["steps"] == 3
    mngr = ckpt.make_manager(tmp_path / "checkpoints", read_only=True)
    assert mngr.all_steps() == [3]
    mngr.close()
    out = train.train(config, data_iter=SyntheticIterator(8), mesh=_mesh())
    assert not out["preempted"] and out["steps"] == 6
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, **{"train.num_steps": 8, "checkpoint.every_steps": 2, "log.every_steps": 100})
    with pytest.raises(hooks.NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4; .*last good checkpoint is step 2"):
        train.train(config, data_iter=SyntheticIterator(8, nan_at=3), mesh=_mesh())
    mngr = ckpt.make_manager(tmp_path / "checkpoints", read_only=True)
    assert mngr.all_steps() == [2]
    mngr.close()


@pytest.mark.parametrize("override, message", [
    ({"train.batch_size": 6}, r"config.train.batch_size=6 .*not divisible by the data axes data\*fsdp=4"),
    ({"train.batch_size": 8, "train.grad_accum": 3}, r"batch_size=8 is not divisible by config.train.grad_accum=3"),
    ({"method.name": "simclr"}, r"config.method.name='simclr' is unknown"),
    ({"train.freeze": ("^vision_model/",)}, r"config.train.freeze: '\^vision_model/' matches no parameter"),
    ({"optimizer.schedule": "linear"}, r"config.optimizer.schedule='linear' is unknown"),
    ({"model.dtype": "float16"}, r"config.model.dtype='float16' is unknown"),
    ({"method.prior": "laplace"}, r"unknown prior 'laplace'"),
])
def test_bad_config_is_a_one_line_error(tmp_path, override, message):
    config = tiny_config(tmp_path, **override)
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, jax.devices()[:4])
    with pytest.raises(ValueError, match=message) as e:
        train.build_trainer(config, mesh, total_steps=2)
    assert "\n" not in str(e.value)


def _one_step(config, batch_size=4, key=0):
    trainer = train.build_trainer(config, _mesh(), total_steps=2)
    state = trainer.init_state()
    start = jax.tree.map(np.asarray, state.params)
    batch = shd.host_to_global(synthetic_batch(0, batch_size), trainer.mesh)
    state, metrics = trainer.step_fn(state, batch, jax.random.key(key))
    return start, state, {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("method, parts", [
    ("clip_refine", {"kd", "rafa"}), ("hycd", {"kd"}), ("rafa", {"rafa"}),
    ("contrastive", {"contrastive"}), ("self_kd", {"contrastive", "kd"}), ("feature_distill", {"contrastive", "feature"}),
    ("logit_distill", {"contrastive", "logit"}), ("m2_mix", {"contrastive", "m2"}),
])
def test_every_method_trains_one_step(tmp_path, method, parts):
    config = tiny_config(tmp_path, **{"method.name": method})
    for tower in ("text_config", "vision_config"):  # one layer: these tests are about the wiring
        config.model.random_init[tower]["num_hidden_layers"] = 1
    start, state, m = _one_step(config)
    assert parts == set(m) & set(objectives.TERMS) and {"loss", "grad_norm", "lr", "modality_gap"} <= set(m)
    assert all(np.isfinite(v) for v in m.values())
    assert m["lr"] == pytest.approx(1e-3)
    moved = float(jnp.max(jnp.abs(state.params["text_projection"] - start["text_projection"])))
    assert moved > 0
    scale_moved = float(state.params["logit_scale"]) != float(start["logit_scale"])
    assert scale_moved == ("contrastive" in parts)  # learnable only with a term that uses it
    if method == "feature_distill":  # student == teacher at step 0: the distillation term is exactly 0
        assert m["feature"] == 0.0 and m["loss"] == pytest.approx(m["contrastive"])


def test_freeze_by_regex_keeps_params_exactly(tmp_path):
    start, state, _ = _one_step(tiny_config(tmp_path, **{"train.freeze": ("^vision/", "^visual_projection$")}))
    after = jax.tree.map(np.asarray, state.params)
    for p, a in jax.tree_util.tree_leaves_with_path(after["vision"]):
        np.testing.assert_array_equal(a, _get(start["vision"], p))
    np.testing.assert_array_equal(after["visual_projection"], start["visual_projection"])
    assert np.max(np.abs(after["text_projection"] - start["text_projection"])) > 5e-4


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_grad_accumulation_equals_big_batch_for_per_example_losses(tmp_path):
    """RaFA alone (the `rafa` preset: no contrastive term) is a mean over examples: 4 micro-batches of 2 give the big batch's
    gradient (each example keeps its reference vector z)."""
    runs = {}
    for accum in (1, 4):
        config = tiny_config(tmp_path / str(accum), **{"method.name": "rafa",
                                                        "train.grad_accum": accum})
        trainer = train.build_trainer(config, _mesh(), total_steps=3)
        state, losses = trainer.init_state(), []
        batch = shd.host_to_global(synthetic_batch(0, 8), trainer.mesh)
        for _ in range(3):  # one batch and one reference z: the losses are comparable step to step
            state, m = trainer.step_fn(state, batch, jax.random.key(0))
            losses.append(float(m["loss"]))
        runs[accum] = (losses, jax.tree.map(np.asarray, state.params))
    assert runs[1][0][2] < runs[1][0][0]  # it trains: the same batch's loss, before and after
    np.testing.assert_allclose(runs[4][0], runs[1][0], rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(runs[4][1]), jax.tree.leaves(runs[1][1])):
        if path[-1].key == "qkv_bias":  # the key bias has an exactly zero gradient: Adam amplifies float noise
            a, b = a[[0, 2]], b[[0, 2]]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_bfloat16_compute_is_close_to_float32(tmp_path):
    _, _, m32 = _one_step(tiny_config(tmp_path / "f32"))
    _, s16, m16 = _one_step(tiny_config(tmp_path / "bf16", **{"model.dtype": "bfloat16"}))
    assert s16.params["text_projection"].dtype == jnp.float32  # params stay fp32
    assert m16["loss"] == pytest.approx(m32["loss"], rel=5e-2)
    assert m16["loss"] != m32["loss"]
