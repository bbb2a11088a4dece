"""A ``gs://`` workdir through the same code as a local one, on the local stand-in of ``gcs_standin.py``.

The trainer runs with ``workdir="gs://test-bucket/run"``: killed -9 while a checkpoint is being committed,
its newest committed step damaged, resumed (falling back a step), exported; every byte must land in the
stand-in's directory, the result must equal an uninterrupted local run, and nothing may reach the network.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from gcs_standin import ENV, WORKDIR, gcs_standin, hide_google_cloud_storage
from train_helpers import SyntheticIterator, kill_9, tiny_config, wait_until_blocked

from jax_refine import outputs, sharding as shd, train, workdir as workdir_lib

pytestmark = pytest.mark.slow  # training runs on the bucket stand-in: not in the fast tier

HERE = Path(__file__).resolve().parent


def _driver(*extra: str) -> list[str]:
    return [sys.executable, str(HERE / "train_driver.py"), WORKDIR, "--steps", "6", "--every", "2", *extra]


def _result(stdout: str) -> dict:
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_gs_workdir_killed_damaged_resumed_and_exported_lands_in_the_bucket(tmp_path):
    root = tmp_path / "bucket"
    run = root / "test-bucket" / "run"
    # the runs share their compiled step through the session's JAX compilation cache (tests/conftest.py)
    env = {**os.environ, ENV: str(root), "PYTHONPATH": str(HERE.parent),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    # 1. killed -9 while step 6 is being committed (its files are written, its commit marker never is)
    proc = subprocess.Popen(_driver("--block-finalize-at", "6", "--export"), env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until_blocked(proc, run)
    kill_9(proc)
    ckpts = run / "checkpoints"
    # in a bucket Orbax writes the step in place and commits it with a marker file (no rename there)
    assert (ckpts / "6" / "params").is_dir() and not (ckpts / "6" / "commit_success.txt").exists()
    assert (ckpts / "4" / "commit_success.txt").is_file() and (ckpts / "2" / "commit_success.txt").is_file()
    assert json.loads((run / "train.lock").read_text())["pid"] == proc.pid  # the killed run's lock is left
    assert json.loads((run / "config.resolved.json").read_text())["workdir"] == WORKDIR
    flushed = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert flushed[:4] == [1, 2, 3, 4]  # uploaded at each checkpoint

    # 2. the newest committed step is damaged: the resume moves it aside and starts from step 2
    meta = ckpts / "4" / "params" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    done = subprocess.run(_driver("--export"), env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout
    assert "taking over the stale lock" in said
    assert "skipping damaged checkpoint step 4: gs://test-bucket/run/checkpoints/4/params/_METADATA" in said
    assert f"resumed from {WORKDIR}/checkpoints/2" in said
    assert (run.parent / "run" / "checkpoints.skipped" / "4" / "params" / "_METADATA").is_file()
    for step in (4, 6):  # written again by the resumed run: 4 intact, the uncommitted 6 committed
        assert (ckpts / str(step) / "commit_success.txt").is_file()
        json.loads((ckpts / str(step) / "params" / "_METADATA").read_text())
    assert not (run / "train.lock").exists()
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # rows after step 2 dropped once, redone once
    assert any(f.name.startswith("events.out.tfevents") for f in (run / "tensorboard").iterdir())
    assert not (cwd / "gs:").exists() and list(cwd.iterdir()) == []  # nothing under a local "gs:" directory

    # 3. the same as an uninterrupted local run: losses and the exported weights
    config = tiny_config(tmp_path / "straight", **{"train.num_steps": 6, "checkpoint.every_steps": 2,
                                                    "train.export_hf": True})
    straight = train.train(config, data_iter=SyntheticIterator(8),
                           mesh=shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    want = [json.loads(ln) for ln in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in want], rtol=1e-5)
    ours = safetensors.numpy.load_file(run / "hf" / "model.safetensors")
    ref = safetensors.numpy.load_file(Path(straight["hf_dir"]) / "model.safetensors")
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=0, atol=1e-6, err_msg=k)
    assert (run / "hf" / "config.json").is_file() and (run / "hf" / "vocab.json").is_file()


def test_gs_lock_refuses_a_live_holder_and_a_simultaneous_taker(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lib, "REMOTE_LOCK_SETTLE_S", 0.0)
    with gcs_standin(tmp_path) as root:
        with workdir_lib.locked(WORKDIR) as lock:
            assert str(lock) == f"{WORKDIR}/train.lock"
            held = json.loads((root / "test-bucket/run/train.lock").read_text())
            assert held["pid"] == os.getpid() and held["token"]
            other = {**held, "host": "another-host", "token": "theirs"}
            (root / "test-bucket/run/train.lock").write_text(json.dumps(other))  # a run elsewhere holds it
            with pytest.raises(workdir_lib.WorkdirError, match="in use by pid .* on host another-host"):
                with workdir_lib.locked(WORKDIR):
                    pass
        assert (root / "test-bucket/run/train.lock").exists()  # not ours any more: left for its holder
        (root / "test-bucket/run/train.lock").unlink()

        # two runs saw no lock and both wrote one: the one that does not read its own token back gives way
        real_sleep = time.sleep

        def rival_writes_meanwhile(seconds):
            (root / "test-bucket/run/train.lock").write_text(json.dumps(
                {"host": "another-host", "pid": 7, "started": "now", "token": "rival"}))
            real_sleep(seconds)

        monkeypatch.setattr(workdir_lib.time, "sleep", rival_writes_meanwhile)
        with pytest.raises(workdir_lib.WorkdirError, match="locked at the same time by pid 7 on host another-host"):
            with workdir_lib.locked(WORKDIR):
                pass


def test_gs_config_record_refuses_a_changed_resume(tmp_path):
    with gcs_standin(tmp_path) as root:
        config = tiny_config(WORKDIR)
        path = workdir_lib.check_resume(WORKDIR, config, resuming=False).write()
        assert str(path) == f"{WORKDIR}/config.resolved.json"
        assert json.loads((root / "test-bucket/run/config.resolved.json").read_text())["seed"] == config.seed
        config.optimizer.learning_rate = 1.0
        with pytest.raises(workdir_lib.WorkdirError, match="resume of gs://test-bucket/run with a changed config: "
                                                           "optimizer.learning_rate"):
            workdir_lib.check_resume(WORKDIR, config, resuming=True).write()


def test_paths_and_out_urls():
    assert workdir_lib.is_remote("gs://b/x") and workdir_lib.is_remote("gs:/b/x")  # pathlib collapses //
    assert not workdir_lib.is_remote("/tmp/x") and not workdir_lib.is_remote("C:/x")
    assert str(workdir_lib.as_path("gs://b/run")) == "gs://b/run"
    assert str(workdir_lib.as_path("rel/dir")) == os.path.join(os.getcwd(), "rel", "dir")
    with pytest.raises(outputs.OutputError, match="report output gs://b/eval: a URL is not supported for a report"):
        outputs.check_target("gs://b/eval", kind="report", overwrite=False)


def test_gs_workdir_without_google_cloud_storage_fails_at_start(tmp_path, monkeypatch):
    hide_google_cloud_storage(monkeypatch)  # requirements.txt installs it: simulate a machine without it
    with pytest.raises(workdir_lib.WorkdirError, match="needs the google-cloud-storage package"):
        train.train(tiny_config(WORKDIR))


def test_standin_routes_orbax_arrays_to_files_and_closes_the_real_driver(tmp_path):
    """What the trainer test relies on: Orbax's TensorStore spec for a gs:// path becomes a file under the
    stand-in, and TensorStore's own GCS driver (anything not routed) fails at once instead of going online."""
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils

    with gcs_standin(tmp_path) as root:
        spec = tensorstore_utils.build_kvstore_tspec(f"{WORKDIR}/checkpoints/1/params", use_ocdbt=True)
        assert spec["base"]["driver"] == "file" and spec["base"]["path"].startswith(str(root / "test-bucket/run"))
        real = ts.KvStore.open({"driver": "gcs", "bucket": "test-bucket",
                                "gcs_request_retries": {"max_retries": 1}}).result()
        with pytest.raises(ValueError, match="127.0.0.1 port 9"):
            real.read("x").result()
