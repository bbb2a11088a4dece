"""The command line: help, typos, config overrides and their errors (no training here)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from jax_refine.config import ConfigError, apply_overrides, load_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jax_refine", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("train", "evaluate", "compare", "export", "prepare-data", "demo"):
        assert command in out.stdout


def test_train_help_explains_overrides():
    out = run_cli("train", "--help")
    assert out.returncode == 0 and "--config.KEY=VALUE" in out.stdout and "--workdir" in out.stdout


def test_command_typo_is_a_clear_error():
    out = run_cli("trian")
    assert out.returncode == 2
    assert "invalid choice: 'trian'" in out.stderr and "train" in out.stderr


def test_unknown_config_key_is_one_line_with_suggestion():
    out = run_cli("train", "--config", "configs/clip_refine_vitb32_coco.py", "--config.train.batchsize=3")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[0] == ("error: unknown config key 'train.batchsize' in override '--config.train.batchsize=3'; "
                        "did you mean 'batch_size'?")
    assert "--help" in lines[1] and "Traceback" not in out.stderr


def test_missing_config_file_and_stray_argument():
    out = run_cli("evaluate", "--config", "configs/nope.py")
    assert out.returncode == 2 and "config file not found: configs/nope.py" in out.stderr
    out = run_cli("export", "--checkpoint", "x", "--out", "y", "--bogus")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr and "--bogus" in out.stderr


def test_overrides_are_typed():
    c = load_config("configs/clip_refine_vitb32_coco.py:gpu8", [
        "--config.train.batch_size=256", "--config.optimizer.lr=3e-6", "--config.train.freeze=^vision/",
        "--config.train.num_steps=7", "--config.method.normalize=True", "--config.workdir=run1"])
    assert (c.train.batch_size, c.optimizer.lr, c.train.num_steps) == (256, 3e-6, 7)
    assert c.train.freeze == ("^vision/",) and c.method.normalize is True and c.workdir == "run1"
    assert dict(c.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("override, message", [
    ("--config.trian.batch_size=1", "unknown config key 'trian'"),
    ("--config.train.batch_size=abc", "bad value for config key 'train.batch_size'"),
    ("train.batch_size", "is not of the form --config.KEY=VALUE"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_config("default"), [override])


def test_unknown_mesh_preset():
    with pytest.raises(ConfigError, match="unknown mesh preset 'tpu'"):
        load_config("configs/default.py:tpu")


def test_every_shipped_config_loads():
    for path in sorted((REPO_ROOT / "configs").glob("*.py")):
        if path.stem in ("__init__", "presets"):
            continue
        c = load_config(path)
        assert c.method.name and c.train.batch_size > 0, path
