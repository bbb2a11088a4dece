"""The command line: help, typos, config overrides and their errors (no training here)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, slow
from jax_refine import cli, commands
from jax_refine.config import ConfigError, apply_overrides, load_config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jax_refine", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("train", "evaluate", "compare", "export", "prepare-data", "feature-stats", "demo"):
        assert command in out.stdout


def test_train_help_explains_overrides():
    out = run_cli("train", "--help")
    assert out.returncode == 0 and "--config.KEY=VALUE" in out.stdout and "--workdir" in out.stdout


def test_command_typo_is_a_clear_error():
    out = run_cli("trian")
    assert out.returncode == 2
    assert "invalid choice: 'trian'" in out.stderr and "train" in out.stderr


def test_unknown_config_key_is_one_line_with_suggestion():
    out = run_cli("train", "--config", "clip_refine:model=vitb32", "--config.train.batchsize=3")
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
    c = load_config("clip_refine:mesh=gpu8", [
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
        load_config("default:tpu")


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown config 'nope' (shipped configs: clip_refine, default, demo, study, tiny_test; "),
    slow("clip_refine:model=vitb33", "config clip_refine: model='vitb33' is not one of vitb32, vitb16, vitl14"),
    slow("clip_refine:method=clip-refine", "config clip_refine: method='clip-refine' is not one of clip_refine, "),
    slow("clip_refine:modle=vitb32", "config clip_refine: unknown argument 'modle=vitb32'; expected KEY=VALUE with KEY "
                                 "one of model, method, data, mesh"),
    slow("clip_refine_vitb32_coco:tpu", "config clip_refine: mesh='tpu' is not one of default, cpu, gpu1, gpu8, tpu_pod"),
])
def test_bad_config_names_and_arguments_are_one_line(spec, message):
    out = run_cli("config", spec)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {message}") and len(out.stderr.strip().splitlines()) == 2


def test_a_users_config_file_starts_from_the_base_config(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text("from jax_refine import config_base\n\n\ndef get_config(arg=None):\n"
                    "    c = config_base.get_config(arg)\n    c.train.batch_size = 7\n    return c\n")
    c = load_config(f"{mine}:gpu8")
    assert c.train.batch_size == 7 and dict(c.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    old = tmp_path / "old.py"  # written while the configs lived inside the package
    old.write_text("from jax_refine.configs import default\n\n\ndef get_config():\n    return default.get_config()\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(old))
    assert str(info.value).startswith(f"cannot load config file {old}: ")
    assert str(info.value).endswith("(the base config is `from jax_refine import config_base`, "
                                    "`config_base.get_config()`)")


def test_a_bug_keeps_its_traceback_and_an_input_error_stays_one_line(monkeypatch, capsys):
    def bug(args, overrides):
        return json.loads("{")  # a ValueError raised inside a library: not an input error

    monkeypatch.setattr(commands, "config", bug)
    with pytest.raises(json.JSONDecodeError):
        cli.main(["config", "default"])
    monkeypatch.setattr(commands, "config", lambda args, overrides: {}["missing"])
    with pytest.raises(KeyError):
        cli.main(["config", "default"])
    monkeypatch.undo()
    assert cli.main(["config", "default", "--config.train.batch_size=0"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "error: config.train.batch_size=0 is invalid: must be an integer >= 1")


def test_default_study_is_the_regime_question_and_full_adds_every_method():
    """`./run.sh study` runs CLIP-Refine and contrastive FT in every regime (the ~30-minute default);
    `--full` adds HyCD only and RaFA only in every regime and all 8 methods in the reference's regime."""
    from jax_refine import cli
    from jax_refine.config import load_config

    default, full = load_config("study"), load_config("study:full")
    assert set(default.study.ablation.regimes) == set(full.study.ablation.regimes) == {
        "teacher", "unit", "raw", "teacher_prior"}
    assert tuple(default.study.ablation.methods) == tuple(default.study.methods) == ("clip_refine", "contrastive")
    assert tuple(full.study.ablation.methods) == ("clip_refine", "contrastive", "hycd", "rafa")
    assert len(full.study.methods) == 8 and full.study.regime == default.study.regime == "teacher"
    assert default.study.seeds == full.study.seeds == (0, 1, 2)
    assert cli._parser().parse_args(["study", "--full"]).full
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["study", "--full", "--quick"])
