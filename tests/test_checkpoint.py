"""Orbax checkpoints: cross-mesh restore, load_model, model-size mismatch, kill -9 and exact resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from train_helpers import SyntheticIterator, kill_9, tiny_config, wait_until_blocked

from jax_refine import checkpoint as ckpt, sharding as shd, train

HERE = Path(__file__).resolve().parent
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
EIGHT = {"data": 2, "fsdp": 4, "tensor": 1}


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _assert_trees_equal(a, b, atol=0.0):
    la, lb = jax.tree_util.tree_leaves_with_path(_np(a)), jax.tree.leaves(_np(b))
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_a_saved_state_restores_exactly_into_another_mesh(tmp_path):
    """The fast tier's round trip (no training): a fresh train state saved from one device restores bit for bit,
    with its data-iterator state, into the FSDP shardings of 8 devices."""
    config = tiny_config(tmp_path / "run")
    state = train.build_trainer(config, shd.make_mesh(ONE, jax.devices()[:1]), total_steps=2).init_state()
    saved = state.without_unsaved()
    mngr = ckpt.make_manager(tmp_path / "ckpt", async_save=False)
    ckpt.save(mngr, 3, saved, {"index": 3}, {"clip_config": {}, "method": "clip_refine"}, force=True)
    eight = train.build_trainer(config, shd.make_mesh(EIGHT), total_steps=2)
    restored, data_state = ckpt.restore(mngr, 3, eight.abstract_saved())
    mngr.close()
    assert data_state == {"index": 3}
    _assert_trees_equal(restored, saved)
    fc1 = restored.params["vision"]["layers"][0]["mlp"]["fc1"]
    assert fc1.sharding.spec[0] == "fsdp" and len(fc1.sharding.device_set) == 8


@pytest.mark.slow  # a training run on 8 devices
def test_checkpoint_restores_across_meshes_and_loads_model(tmp_path):
    config = tiny_config(tmp_path / "run", **{"train.num_steps": 2})
    eight = train.train(config, data_iter=SyntheticIterator(8), mesh=shd.make_mesh(EIGHT), return_state=True)
    saved8 = eight["state"].without_unsaved()

    # 8 devices -> 1 device
    one = train.build_trainer(config, shd.make_mesh(ONE, jax.devices()[:1]), total_steps=2)
    mngr = ckpt.make_manager(tmp_path / "run" / "checkpoints")
    assert mngr.all_steps() == [2]
    restored1, data_state = ckpt.restore(mngr, 2, one.abstract_saved())
    mngr.close()
    assert data_state == {"index": 2}
    _assert_trees_equal(restored1, saved8)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(restored1))

    # 1 device -> 8 devices (FSDP-sharded)
    mngr1 = ckpt.make_manager(tmp_path / "one", async_save=False)
    ckpt.save(mngr1, 2, restored1, data_state, {"clip_config": {}, "method": "clip_refine"}, force=True)
    eight_tr = train.build_trainer(config, shd.make_mesh(EIGHT), total_steps=2)
    restored8, _ = ckpt.restore(mngr1, 2, eight_tr.abstract_saved())
    mngr1.close()
    _assert_trees_equal(restored8, saved8)
    fc1 = restored8.params["vision"]["layers"][0]["mlp"]["fc1"]
    assert fc1.sharding.spec[0] == "fsdp" and len(fc1.sharding.device_set) == 8

    # the evaluation entry point: a CLIP with the student params, from the workdir or a step dir
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "2"):
        model = ckpt.load_model(where)
        _assert_trees_equal(nnx.state(model, nnx.Param).to_pure_dict(), saved8.params)


@pytest.mark.slow  # training runs
def test_checkpoint_of_another_model_size_is_a_clear_error(tmp_path):
    config = tiny_config(tmp_path / "run", **{"train.num_steps": 2})
    mesh = shd.make_mesh(ONE, jax.devices()[:1])
    train.train(config, data_iter=SyntheticIterator(8), mesh=mesh)
    bigger = tiny_config(tmp_path / "run", **{"train.num_steps": 4})
    bigger.model.random_init["text_config"]["hidden_size"] = 64
    with pytest.raises(ValueError, match=r"changed config: model.random_init.text_config.hidden_size: 32 -> 64"):
        train.train(bigger, data_iter=SyntheticIterator(8), mesh=mesh)  # the workdir's saved config says so
    with pytest.raises(ValueError, match=r"checkpoints/2 is from another model size .*\(32,\) vs \(64,\)"):
        train.train(bigger, data_iter=SyntheticIterator(8), mesh=mesh, allow_config_change=True)


def _driver(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(HERE / "train_driver.py"), str(workdir), *extra]


def _result(stdout: str) -> dict:
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow  # training runs in subprocesses and kill -9
def test_kill_9_mid_save_then_resume_equals_uninterrupted(tmp_path):
    """kill -9 while step 4's checkpoint is being written: the half-written step is never picked up, the
    restart resumes from step 2 and ends with the parameters of an uninterrupted run."""
    steps = 6
    # both driver runs compile the same step: they share it through the session's JAX compilation cache
    # (tests/conftest.py sets JAX_COMPILATION_CACHE_DIR; the subprocesses inherit it)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    work = tmp_path / "killed"
    proc = subprocess.Popen(_driver(work, "--steps", str(steps), "--block-finalize-at", "4"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = wait_until_blocked(proc, work)
    kill_9(proc)
    tmp_dir = Path(marker.read_text())
    assert tmp_dir.is_dir() and not (work / "checkpoints" / "4").exists()  # written, never renamed
    mngr = ckpt.make_manager(work / "checkpoints", read_only=True)
    assert mngr.latest_step() == 2
    mngr.close()

    done = subprocess.run(_driver(work, "--steps", str(steps)), env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {work / 'checkpoints'}/2" in done.stdout
    assert _result(done.stdout)["steps"] == steps
    assert not tmp_dir.exists()  # the stale temporary directory was cleaned up

    config = tiny_config(tmp_path / "straight", **{"train.num_steps": steps, "checkpoint.every_steps": 2})
    straight = train.train(config, data_iter=SyntheticIterator(8), mesh=shd.make_mesh(ONE, jax.devices()[:1]),
                           return_state=True)
    resumed = nnx.state(ckpt.load_model(work), nnx.Param).to_pure_dict()
    _assert_trees_equal(resumed, straight["state"].params, atol=1e-6)
