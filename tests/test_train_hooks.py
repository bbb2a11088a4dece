"""The loop's hooks and the typed train state: evaluation during training, a state with extra fields."""
from __future__ import annotations

import json
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from train_helpers import SyntheticIterator, tiny_config

from jax_refine import checkpoint as ckpt, evaluate, hooks, sharding as shd, train, train_state as ts

pytestmark = pytest.mark.slow  # training runs with evaluation: not in the fast tier

ONE = {"data": 1, "fsdp": 1, "tensor": 1}
EIGHT = {"data": 2, "fsdp": 4, "tensor": 1}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def cifar_folders(cifar10_dir, tmp_path_factory):
    """3 real CIFAR-10 test photos per class as class folders (a copy: the shared data stays read-only)."""
    root = tmp_path_factory.mktemp("cifar_folders")
    for name in CLASSES:
        (root / name).mkdir()
        for k in range(3):
            shutil.copy(cifar10_dir / "test" / name / f"{k:04d}.jpg", root / name)
    return root


def _eval_settings(config, cifar_folders, coco_mini_dir):
    config.eval.zero_shot = (f"folder:{cifar_folders}",)
    coco = coco_mini_dir
    config.eval.retrieval = (f"coco_json:{coco / 'annotations' / 'captions_val2017.json'}:{coco / 'val2017'}",)
    config.eval.templates = "single"
    config.eval.batch_size = 16
    config.eval.max_examples = 12
    config.eval.progress = False
    return config


def test_eval_every_n_steps_logs_the_suite_of_that_steps_checkpoint(tmp_path, cifar_folders, coco_mini_dir):
    """``eval.every_steps=2`` over 5 steps: eval rows at steps 2, 4 and 5 (the end), each equal to
    ``evaluate.run_suite`` run afresh on the Orbax checkpoint of that step (loaded by ``checkpoint.load_model``)."""
    config = tiny_config(tmp_path / "run", **{"train.num_steps": 5, "checkpoint.every_steps": 1,
                                              "checkpoint.max_to_keep": 10, "eval.every_steps": 2})
    _eval_settings(config, cifar_folders, coco_mini_dir)
    train.train(config, data_iter=SyntheticIterator(8), mesh=shd.make_mesh(ONE, jax.devices()[:1]))

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if r["kind"] == "eval"}
    assert sorted(evals) == [2, 4, 5]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    zs, rt = f"folder:{cifar_folders}", config.eval.retrieval[0]
    fresh = dict(config.eval.to_dict(), cache_dir=None)
    for step, row in evals.items():
        model = ckpt.load_model(tmp_path / "run" / "checkpoints" / str(step))
        result, _ = evaluate.run_suite(model, fresh)
        assert row[f"zero_shot/{zs}/top1"] == result["zero_shot"][zs]["top1"]
        assert row["zero_shot_mean/top1"] == result["zero_shot_mean"]["top1"]
        assert row[f"zero_shot/{zs}/n"] == 12
        for direction in ("i2t", "t2i"):
            assert row[f"retrieval/{rt}/{direction}/R@1"] == result["retrieval"][rt][direction]["R@1"]
        assert row[f"features/{rt}/modality_gap"] == pytest.approx(result["features"][rt]["modality_gap"], rel=1e-5)
    # the model changes between evaluations (otherwise equal rows would prove little)
    assert evals[2][f"features/{rt}/modality_gap"] != evals[5][f"features/{rt}/modality_gap"]


def test_flatten_result_keeps_numbers_only():
    result = {"model": "m", "templates": "single", "zero_shot": {"c": {"top1": 50.0, "top5": 90.0, "n": 4}},
              "zero_shot_mean": None, "retrieval": {"r": {"i2t": {"R@1": 25.0}, "n_images": 4}},
              "features": {"r": {"modality_gap": 0.5}}}
    assert hooks.flatten_result(result) == {"zero_shot/c/top1": 50.0, "zero_shot/c/top5": 90.0, "zero_shot/c/n": 4.0,
                                            "retrieval/r/i2t/R@1": 25.0, "retrieval/r/n_images": 4.0,
                                            "features/r/modality_gap": 0.5}


@struct.dataclass
class EmaState(ts.TrainState):
    """A method's own state: an EMA of the params and a counter, beside the standard fields."""
    ema: Any = None
    count: Any = None


def _extended(state: ts.TrainState, **extra) -> EmaState:
    return EmaState(step=state.step, params=state.params, opt_state=state.opt_state, rng=state.rng,
                    teacher=state.teacher, **extra)


def test_train_state_subclass_fields_are_saved_and_restored_across_meshes(tmp_path):
    """A ``TrainState`` subclass with two more fields goes through ``checkpoint.save`` / ``restore_latest_good``
    unchanged: saved on 1 device, restored onto 8 (data 2 x fsdp 4) into shardings built from the same class."""
    config = tiny_config(tmp_path / "run")
    one = train.build_trainer(config, shd.make_mesh(ONE, jax.devices()[:1]), total_steps=2)
    base = one.init_state()
    ema = jax.tree.map(lambda p: 0.5 * p + 1.0, base.params)
    state = _extended(base, ema=ema, count=jnp.int32(7))
    expected = jax.tree.map(np.asarray, jax.device_get(state.without_unsaved()))

    mngr = ckpt.make_manager(tmp_path / "ckpt", async_save=False)
    ckpt.save(mngr, 3, state, {"index": 3}, {"clip_config": {}, "method": "clip_refine"}, force=True)
    mngr.close()

    eight = train.build_trainer(config, shd.make_mesh(EIGHT), total_steps=2)
    sh = eight.state_sh
    shardings = _extended(sh, ema=sh.params, count=shd.replicated(eight.mesh))
    abstract = ts.abstract_state(jax.eval_shape(lambda: state), shardings)
    mngr, step, restored, data_state = ckpt.restore_latest_good(tmp_path / "ckpt", abstract,
                                                                lambda d: ckpt.make_manager(d, async_save=False))
    mngr.close()
    assert step == 3 and data_state == {"index": 3}
    assert type(restored) is EmaState and restored.teacher is None
    assert int(restored.count) == 7
    got = jax.tree.map(np.asarray, jax.device_get(restored))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    fc1 = restored.ema["vision"]["layers"][0]["mlp"]["fc1"]
    assert fc1.sharding == sh.params["vision"]["layers"][0]["mlp"]["fc1"] and len(fc1.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(fc1), 0.5 * np.asarray(base.params["vision"]["layers"][0]["mlp"]["fc1"]) + 1.0)
