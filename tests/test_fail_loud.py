"""Fail loud, early and cleanly (issue 25): each case of the fault trial, reproduced as the trial met it.

Through the command line (in this process with `cli.main`, or by subprocess where the process must end on
its own: a hang, a second Ctrl-C): every input checked before the first step with one line per missing
piece; an evaluation failure mid-run ends the process with one line after saving the step; the divergence
guard stops before a bad step is saved and names a step that really resumes; config values (inf, repeated
keys, bools) refused in one line; Ctrl-C saves like SIGTERM; a full disk is one line. Models are tiny random
CLIPs; real photos come from ../shared/data (copied into temporary directories by test_faults' fixtures).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import CIFAR10_DIR, REPO_ROOT, require_shared_data
from test_faults import coco_json, trained, untouched  # noqa: F401 (fixtures)
from train_helpers import SyntheticIterator, tiny_config, xla_flags

from jax_refine import checkpoint as ckpt, cli, failures, hooks, objectives, train
from jax_refine.config import ConfigError, apply_overrides, load_config, load_config_file

pytestmark = pytest.mark.slow  # training runs, subprocesses, signals and a tmpfs: not in the fast tier

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def data_flags(coco: Path, tmp: Path) -> list[str]:
    """CLI overrides: train on the copied COCO captions set (`coco_json` fixture), tiny shuffle buffer."""
    return ["--config.data.source=coco_json", f"--config.data.annotations={coco / 'captions_val2017.json'}",
            f"--config.data.images={coco / 'images'}", f"--config.data.data_dir={tmp / 'tfds'}",
            "--config.data.split=train"]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def strict_rows(path: Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (a bare NaN/Infinity token fails)."""
    def refuse(token):
        raise AssertionError(f"{path}: non-JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def class_folder(root: Path, per_class: int = 2) -> Path:
    """A 2-class folder set of real CIFAR-10 test photos (copied)."""
    src = require_shared_data(CIFAR10_DIR) / "test"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for f in sorted((src / name).iterdir())[:per_class]:
            shutil.copy(f, root / name / f.name)
    return root


# ------------------------------------------------------------- 1. every input checked before step 1
def test_every_missing_input_is_one_line_before_the_first_step(tmp_path, capsys, monkeypatch, untouched):
    from jax_refine.data import sources

    monkeypatch.setattr(sources, "DOWNLOAD_PROBE", ("127.0.0.1", 9))  # nothing listens there: as if offline
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    work = tmp_path / "run"
    rc = cli.main(["train", "--config", "tiny_test", "--workdir", str(work), "--config.eval.every_steps=2",
                   "--config.data.source=coco_json", f"--config.data.annotations={tmp_path / 'no.json'}",
                   f"--config.eval.zero_shot=('folder:{tmp_path / 'aircraft'}', 'cifar10')",
                   f"--config.eval.retrieval=('coco_json:{tmp_path / 'val.json'}:{tmp_path / 'img'}',)"])
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert rc == 2 and "Traceback" not in captured.err, captured.err
    assert len(lines) == 4, lines  # training data + three evaluation sets, one line each
    assert lines[0].startswith("error: training data (config.data.source='coco_json'): annotations JSON not found: "
                               f"{tmp_path / 'no.json'}")
    assert lines[1].startswith(f"error: evaluation set 'folder:{tmp_path / 'aircraft'}' of config.eval.zero_shot: "
                               f"class-folder directory not found: {tmp_path / 'aircraft'}")
    assert lines[2].startswith("error: evaluation set 'cifar10' of config.eval.zero_shot: TFDS dataset 'cifar10' is "
                               "not prepared")
    assert "coco_json:" in lines[3] and "config.eval.retrieval" in lines[3]
    assert all(line.endswith("(eval.every_steps=2)") for line in lines[1:])
    assert not (work / "checkpoints").exists() and not (work / "metrics.jsonl").exists()  # no step ran


def test_a_missing_start_checkpoint_and_a_short_vocabulary_are_named_at_set_up(tmp_path):
    missing = tiny_config(tmp_path / "a", **{"model.random_init": None, "model.name_or_path": str(tmp_path / "nope")})
    with pytest.raises(failures.MissingInputs) as info:
        train.train(missing, data_iter=SyntheticIterator(8))
    assert info.value.problems == [f"start checkpoint / tokenizer (config.model.name_or_path="
                                   f"'{tmp_path / 'nope'}'): {tmp_path / 'nope'}: no such checkpoint directory (and not "
                                   "a Hugging Face hub id)"]
    short = tiny_config(tmp_path / "b", **{"model.random_init.text_config.vocab_size": 1000})
    with pytest.raises(failures.MissingInputs) as info:  # was: NaN at step 1, reported as a non-finite loss
        train.train(short, data_iter=SyntheticIterator(8))
    assert info.value.problems == ["config.model.random_init.text_config.vocab_size=1000 is smaller than the "
                                   "tokenizer's 49408 token ids: set it to at least 49408"]
    assert not (tmp_path / "b" / "checkpoints").exists()


EVAL_FAILS_MID_RUN = textwrap.dedent("""
    import shutil, sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from jax_refine import cli, train

    real = train.make_data_iterator

    class Vanishing:  # the real training iterator; the evaluation set is deleted before step 2's batch
        def __init__(self, inner):
            self.inner, self.n = inner, 0
        def __iter__(self):
            return self
        def __next__(self):
            self.n += 1
            if self.n == 2:
                shutil.rmtree({folder!r})
            return next(self.inner)
        def __getattr__(self, name):
            return getattr(self.inner, name)

    train.make_data_iterator = lambda config, prep: Vanishing(real(config, prep))
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_an_evaluation_failing_mid_run_ends_the_process_in_one_line_after_saving_the_step(coco_json, tmp_path,
                                                                                         untouched):
    folder = class_folder(tmp_path / "zs")
    script = EVAL_FAILS_MID_RUN.format(tests=str(REPO_ROOT / "tests"), repo=str(REPO_ROOT), folder=str(folder))
    work = tmp_path / "run"
    argv = ["train", "--config", "tiny_test", "--workdir", str(work), *data_flags(coco_json, tmp_path),
            "--config.data.shuffle_buffer=16", "--config.train.num_steps=6", "--config.checkpoint.every_steps=100",
            "--config.eval.every_steps=2", f"--config.eval.zero_shot=('folder:{folder}',)", "--config.eval.retrieval=()"]
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    # was: the error line, then asleep forever with tf.data threads alive; the timeout is the hang detector
    proc = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=500)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines == [f"error: evaluation at step 2 failed: class-folder directory not found: {folder} (pass "
                     "folder:<dir with one folder per class>); training stopped, checkpoint step 2 in "
                     f"{work / 'checkpoints'} is saved (a rerun resumes there)"], lines
    # the step's checkpoint was written before its evaluation (checkpoint.every_steps=100: only for the eval)
    assert sorted(d.name for d in (work / "checkpoints").iterdir()) == ["2"]


# ------------------------------------------------------------------------------ 2. divergence guard
def test_guard_trips_on_its_own_history_and_on_non_finite_values():
    guard = hooks.DivergenceGuard(factor=100.0, window=3)
    for step, (loss, grad) in enumerate([(5.6, 97.0), (5.4, 90.0), (5.2, 120.0), (5.0, 80.0)], start=1):
        assert guard.reason(step, {"loss": loss, "grad_norm": grad}) is None
    # median of the last 3 losses (5.4, 5.2, 5.0) is 5.2: 519 passes (< 520), 521 trips
    assert guard.reason(5, {"loss": 519.0, "grad_norm": 80.0}) is None
    guard = hooks.DivergenceGuard(factor=100.0, window=3)
    for step, grad in enumerate([97.0, 90.0, 120.0], start=1):
        guard.reason(step, {"loss": 5.0, "grad_norm": grad})
    assert guard.reason(4, {"loss": 521.0, "grad_norm": 80.0}).startswith("exploding loss (521, 104x the median 5")
    # a lone gradient spike at a normal loss is no divergence under Adam (the demo's pre-training has 101x
    # ones): the gradient norm's own factor (1e4 by default) trips only on a blow-up; median 97 -> 970,000
    assert guard.reason(4, {"loss": 5.0, "grad_norm": 970_200.0}).startswith(
        "exploding grad_norm (9.7e+05, 1e+04x the median 97 of the last 3 steps; "
        "train.divergence_grad_norm_factor=10000) at step 4")
    assert guard.reason(4, {"loss": 5.0, "grad_norm": 9701.0}) is None  # 100x: passes (and joins the history)
    assert hooks.DivergenceGuard(100.0, 3, grad_norm_factor=100.0).reason(1, {"grad_norm": 1.0}) is None
    small = hooks.DivergenceGuard(100.0, 3, grad_norm_factor=100.0)
    small.reason(1, {"grad_norm": 1.0})
    assert small.reason(2, {"grad_norm": 101.0}).startswith("exploding grad_norm (101, 101x")
    assert guard.reason(4, {"loss": float("nan"), "grad_norm": 1.0}) == "non-finite loss (nan) at step 4"
    assert guard.reason(4, {"loss": 1.0, "grad_norm": float("inf")}) == "non-finite grad_norm (inf) at step 4"
    # a distillation starting at its teacher: loss 0, then small values are no blow-up (floor 1e-3)
    zero = hooks.DivergenceGuard(factor=100.0, window=3)
    assert zero.reason(1, {"loss": 0.0}) is None and zero.reason(2, {"loss": 0.05}) is None
    assert hooks.DivergenceGuard(factor=0.0, window=3).reason(2, {"loss": 1e30}) is None  # 0: non-finite only


def test_guard_without_an_earlier_checkpoint_says_so_and_never_step_none(tmp_path):
    mngr = ckpt.make_manager(tmp_path / "checkpoints", async_save=False)
    err = hooks.DivergenceGuard(100.0, 20, lr=float("1e30")).stop(2, "non-finite loss (nan) at step 2", mngr)
    mngr.close()
    assert isinstance(err, hooks.NonFiniteLossError) and "None" not in str(err)
    assert str(err) == ("non-finite loss (nan) at step 2; training stopped, no checkpoint from before it; rerun the "
                        "same train command with a lower learning rate --config.optimizer.lr=1e+29 (now 1e+30) to "
                        "start again")


@pytest.mark.parametrize("lr, lower, features, reason", [
    # the trial's lr: step 6's loss is NaN
    ("1e3", "100", [], "error: non-finite loss (nan) at step 6"),
    # raw features at lr 10: step 6's loss is finite and ~1e5x its median (the ratio test, train.divergence_factor)
    ("10", "1", ["--config.method.normalize=False"], "error: exploding loss ("),
], ids=["lr_1e3_nan", "lr_10_raw_finite"])
def test_divergence_stops_before_saving_and_names_a_step_that_really_resumes(coco_json, tmp_path, capsys, untouched,
                                                                             lr, lower, features, reason):
    work = tmp_path / "run"
    base = ["train", "--config", "tiny_test", "--workdir", str(work), *data_flags(coco_json, tmp_path),
            "--config.data.shuffle_buffer=16", "--config.checkpoint.every_steps=1", "--config.checkpoint.max_to_keep=5",
            "--config.checkpoint.async_save=False", *features]
    assert cli.main(base + ["--config.train.num_steps=4"]) == 0
    capsys.readouterr()
    rc = cli.main(base + ["--config.train.num_steps=8", f"--config.optimizer.lr={lr}", "--allow-config-change"])
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert rc == 1 and "Traceback" not in captured.err and len(lines) == 1, captured.err[-3000:]
    # step 5's loss (at step 4's weights) is sane; step 5's update at this lr blows step 6 up
    assert lines[0].startswith(reason), lines
    assert " at step 6; training stopped, the last good checkpoint is step 4 in " in lines[0], lines
    now = f"{float(lr):.3g}"
    assert (f"(step 5 moved to {work / 'checkpoints.diverged'}: its weights gave this loss); to resume from it, rerun "
            f"the same train command with --allow-config-change and a lower learning rate --config.optimizer.lr={lower} "
            f"(now {now})") in lines[0], lines
    assert sorted(int(d.name) for d in (work / "checkpoints").iterdir()) == [1, 2, 3, 4]  # 6 never saved
    rows = strict_rows(work / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # the diverged step 6 is not logged
    # the named step resumes, with the suggested lower learning rate, and trains on sanely
    assert cli.main(base + ["--config.train.num_steps=8", "--config.optimizer.lr=1e-3", "--allow-config-change"]) == 0
    out = capsys.readouterr().out
    assert f"[train] resumed from {work / 'checkpoints'}/4" in out
    rows = strict_rows(work / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(np.isfinite(r["loss"]) for r in rows)


def test_metrics_rows_are_strict_json_with_null_for_non_finite_values(tmp_path):
    writer = hooks.MetricWriter(tmp_path, tensorboard=False, enabled=True)
    writer.write(3, "eval", {"a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 1.5})
    writer.close()
    assert strict_rows(tmp_path / "metrics.jsonl") == [{"step": 3, "kind": "eval", "a": None, "b": None, "c": None,
                                                        "d": 1.5}]


# ------------------------------------------------------------------------------ 3. config values
@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=inf", "config.optimizer.lr=inf is invalid: must be a finite number, > 0"),
    ("optimizer.lr=nan", "config.optimizer.lr=nan is invalid: must be a finite number, > 0"),
    ("method.temperature=inf", "config.method.temperature=inf is invalid: must be a finite number, > 0"),
    ("train.clip_norm=inf", "config.train.clip_norm=inf is invalid: must be a finite number, None or > 0"),
    ("train.divergence_factor=-1.0", "config.train.divergence_factor=-1.0 is invalid: must be >= 0 (0: stop on "
                                     "non-finite values only)"),
])
def test_non_finite_numbers_are_refused_in_one_line(override, message, tmp_path, capsys, untouched):
    err = cli.main(["train", "--config", "tiny_test", "--workdir", str(tmp_path / "w"), f"--config.{override}"])
    lines = capsys.readouterr().err.splitlines()
    assert err == 2 and lines[0] == f"error: {message}" and len(lines) == 2 and not (tmp_path / "w").exists()


def test_lr_inf_from_a_config_file_is_refused_before_training(tmp_path, capsys, untouched):
    path = tmp_path / "mine.py"
    path.write_text("from jax_refine.config import shipped_module\n\nbase = shipped_module('tiny_test').get_config\n\n\n"
                    "def get_config():\n"
                    "    c = base()\n    c.optimizer.lr = float('inf')\n    return c\n")
    assert cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "error: config.optimizer.lr=inf is invalid: must be a finite " \
                                                     "number, > 0"


def test_an_infinite_loss_weight_is_refused(untouched):
    config = load_config("tiny_test", ["--config.method.weights.kd=inf"])
    with pytest.raises(ValueError, match=r"^config.method.weights.kd=inf must be a finite number >= 0$"):
        objectives.resolve_method(config.method)


def test_a_repeated_spec_key_or_config_flag_is_refused(tmp_path, capsys, untouched):
    with pytest.raises(ConfigError, match=r"^config clip_refine: model is given twice \(model=vitb32, "
                                          r"model=siglip_so400m\); give it once$"):
        load_config_file("clip_refine:model=vitb32,model=siglip_so400m")
    rc = cli.main(["train", "--config", "tiny_test", "--config", "clip_refine", "--workdir", str(tmp_path / "w")])
    assert rc == 2 and capsys.readouterr().err.splitlines() == [
        "error: --config is given twice (tiny_test and clip_refine); give it once", "(see `python -m jax_refine --help`)"]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("text, value", [("false", False), ("FALSE", False), ("False", False), ("true", True),
                                         ("TRUE", True), ("True", True)])
def test_bools_in_any_case(text, value):
    config = load_config("tiny_test", [f"--config.train.export_hf={text}", f"--config.method.normalize={text}"])
    assert config.train.export_hf is value and config.method.normalize is value  # normalize: placeholder(bool)


def test_a_bool_field_still_refuses_other_words():
    with pytest.raises(ConfigError, match="bad value for config key 'train.export_hf'"):
        apply_overrides(load_config("tiny_test"), ["train.export_hf=nope"])


# ------------------------------------------------------------------------------ 4. Ctrl-C, full disk
def test_ctrl_c_saves_the_step_and_exits_130_in_one_line(coco_json, tmp_path, capsys, untouched):
    work = tmp_path / "run"
    metrics = work / "metrics.jsonl"

    def interrupt():
        deadline = time.time() + 400
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    rc = cli.main(["train", "--config", "tiny_test", "--workdir", str(work), *data_flags(coco_json, tmp_path),
                   "--config.train.num_steps=100000", "--config.checkpoint.every_steps=100000",
                   "--config.data.shuffle_buffer=16"])
    captured = capsys.readouterr()
    assert rc == 130 and "Traceback" not in captured.err, captured.err[-2000:]
    saved = [int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit()]
    assert len(saved) == 1 and 1 <= saved[0] < 100000  # was: nothing saved, a traceback
    assert f"[train] SIGINT: saved step {saved[0]} and stopped" in captured.out


SLOW_STEP = textwrap.dedent("""
    import pathlib, sys, time
    sys.path[:0] = [{tests!r}, {repo!r}]
    from jax_refine import cli, train

    real = train.make_data_iterator

    class Slow:  # the real training iterator; the batch of step 3 takes a minute (a slow disk, say)
        def __init__(self, inner):
            self.inner, self.n = inner, 0
        def __iter__(self):
            return self
        def __next__(self):
            self.n += 1
            if self.n == 3:
                pathlib.Path({marker!r}).write_text("waiting")
                time.sleep(300)
            return next(self.inner)
        def __getattr__(self, name):
            return getattr(self.inner, name)

    train.make_data_iterator = lambda config, prep: Slow(real(config, prep))
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_second_ctrl_c_stops_at_once(coco_json, tmp_path, untouched):
    work, marker = tmp_path / "run", tmp_path / "slow_step"
    script = SLOW_STEP.format(tests=str(REPO_ROOT / "tests"), repo=str(REPO_ROOT), marker=str(marker))
    argv = ["train", "--config", "tiny_test", "--workdir", str(work), *data_flags(coco_json, tmp_path),
            "--config.train.num_steps=100000", "--config.checkpoint.every_steps=100000",
            "--config.data.shuffle_buffer=16"]
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the first: save after this step and stop ...
    time.sleep(1.0)  # (two signals at once reach Python as one)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)  # ... the second: the user will not wait for the slow step
    out, err = proc.communicate(timeout=300)
    assert time.time() - t0 < 120  # not the 5 minutes the step still takes
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "[train] second SIGINT: stopped at once, nothing saved" in out, out[-2000:]
    assert not [d for d in (work / "checkpoints").iterdir() if d.name.isdigit()]


@pytest.fixture
def small_disk(tmp_path):
    """A 10 MB tmpfs (root only; skipped where it cannot be mounted): room for one tiny checkpoint."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {e}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(coco_json, small_disk, tmp_path, capsys, untouched):
    work = small_disk / "run"
    rc = cli.main(["train", "--config", "tiny_test", "--workdir", str(work), *data_flags(coco_json, tmp_path),
                   "--config.train.num_steps=8", "--config.data.shuffle_buffer=16"])
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert rc == 1 and "Traceback" not in captured.err and len(lines) == 1, captured.err[-3000:]  # was: 2,162 lines
    step2 = sum(f.stat().st_size for f in (work / "checkpoints" / "2").rglob("*") if f.is_file())
    # the save of step 4 fills the disk; the metrics row written meanwhile may be what fails first
    assert lines[0].startswith("error: no space left on device writing ") and str(work) in lines[0], lines
    assert f": a checkpoint step needs about {step2} bytes (" in lines[0] and " free there" in lines[0], lines
    assert "the last intact checkpoint, step 2, is kept" in lines[0]
    assert sorted(d.name for d in (work / "checkpoints").iterdir()) == ["2"]  # the unfinished step 4 removed
    ckpt.check_step_files(work / "checkpoints" / "2")


# ------------------------------------------------------------------------------ 5. losses
def _normalize_grad_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """d/dx sum(w * x/||x||) in float64, row by row: (w - y (y.w)) / ||x||; 0 for an all-zero row (the
    subgradient l2_normalize takes there)."""
    out = np.zeros_like(x, np.float64)
    for i, (row, wi) in enumerate(zip(x.astype(np.float64), w.astype(np.float64))):
        n = np.linalg.norm(row)
        if n > 0:
            y = row / n
            out[i] = (wi - y * (y @ wi)) / n
    return out


def test_l2_normalize_of_a_zero_row_has_a_finite_bounded_gradient():
    from jax_refine import losses

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    x[2] = 0.0
    w = rng.normal(size=(4, 8)).astype(np.float32)
    y = np.asarray(losses.l2_normalize(x))
    grad = np.asarray(jax.grad(lambda a: (losses.l2_normalize(a) * w).sum())(x))
    x64 = x.astype(np.float64)
    norms = np.linalg.norm(x64, axis=1, keepdims=True)
    expected_y = x64 / np.where(norms > 0, norms, 1.0)  # the zero row stays zero
    np.testing.assert_allclose(y, expected_y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, _normalize_grad_reference(x, w), rtol=1e-5, atol=1e-6)  # was ~1e12 at row 2
    # through a whole loss: HyCD on normalized features, one student image row all zero
    fi, ft, gi, gt = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(4))
    fi[1] = 0.0
    g = jax.grad(lambda a: losses.hycd_loss(a, ft, gi, gt, alpha=0.5, temperature=1.0, normalize=True))(fi)
    assert np.all(np.isfinite(g)) and np.abs(g).max() < 10.0, np.abs(g).max()


def test_complex_features_are_refused_in_one_line():
    from jax_refine import losses, metrics

    z = np.ones((4, 8), np.complex64)
    r = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match=r"^hycd_loss: image_features is complex64; features must be real"):
        losses.hycd_loss(z, r, r, r, alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match=r"^l2_normalize: x is complex64; features must be real"):
        losses.l2_normalize(z)
    with pytest.raises(ValueError, match=r"complex64; features must be real"):
        metrics.modality_gap(z, r)
    with pytest.raises(ValueError, match=r"^hycd_loss: temperature=inf is outside \(0.0, inf\]$"):
        losses.hycd_loss(r, r, r, r, alpha=0.5, temperature=float("inf"))


# ------------------------------------------------------------------------------ 5. the small ones
def _dead_pid() -> int:
    """A process id that no process has now."""
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_export_through_a_symlink_replaces_its_directory_and_cleans_its_own_leftovers(trained, tmp_path, capsys,
                                                                                     untouched):
    real, link = tmp_path / "exports" / "v1", tmp_path / "latest"
    assert cli.main(["export", "--checkpoint", str(trained), "--out", str(real)]) == 0
    link.symlink_to(real, target_is_directory=True)
    dead = _dead_pid()
    for name in (f".v1.tmp-{dead}-abc123", f".v1.old-{dead}"):  # what a killed export leaves
        (real.parent / name).mkdir()
        (real.parent / name / "model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    rc = cli.main(["export", "--checkpoint", str(trained), "--out", str(link), "--overwrite"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err  # was: the export written, then exit 1 (rmtree on a symbolic link)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in real.parent.iterdir()) == ["v1"]  # the leftovers are gone, nothing else is left
    files = sorted(p.name for p in real.iterdir() if p.is_file() and not p.name.startswith("."))
    assert {"config.json", "model.safetensors"} <= set(files)
    assert f"[output] removed 2 leftover(s) of an earlier, killed write of {real}" in captured.out
    closing = [line for line in captured.out.splitlines() if line.startswith("exported ")]
    size = sum(p.stat().st_size for p in real.iterdir() if p.is_file() and not p.name.startswith("."))
    assert len(closing) == 1 and f"-> {real}: {len(files)} files, {size / 1e6:.1f} MB: " in closing[0], closing
    assert all(name in closing[0] for name in files)


def _bom_and_latin1(coco: Path, tmp: Path) -> tuple[Path, Path]:
    text = (coco / "captions_val2017.json").read_text(encoding="utf-8")
    bom = tmp / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    doc = json.loads(text)
    doc["annotations"][0]["caption"] = "un caf\u00e9 cr\u00e8me"  # written as Latin-1 below
    latin1 = tmp / "latin1.json"
    latin1.write_bytes(json.dumps(doc, ensure_ascii=False).encode("latin-1"))
    return bom, latin1


def test_a_caption_json_with_a_bom_is_read_and_a_latin1_one_is_one_line(coco_json, tmp_path, capsys, untouched):
    from jax_refine.data import read_coco_json

    bom, latin1 = _bom_and_latin1(coco_json, tmp_path)
    plain = read_coco_json(coco_json / "captions_val2017.json", coco_json / "images")
    assert read_coco_json(bom, coco_json / "images") == plain  # was: refused as not valid JSON
    rc = cli.main(["prepare-data", "--annotations", str(latin1), "--images", str(coco_json / "images"),
                   "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.splitlines()
    offset = latin1.read_bytes().index(b"caf\xe9") + 3
    assert rc == 2 and lines[0] == f"error: {latin1}: not UTF-8 text (byte 0xe9 at offset {offset}); save it as UTF-8"
    assert len(lines) == 2 and not (tmp_path / "out").exists()


def test_prepare_data_skips_symlink_cycles_with_a_count_and_quotes_its_hint(coco_json, tmp_path, capsys, caplog,
                                                                            untouched):
    images = tmp_path / "images"
    shutil.copytree(coco_json / "images", images)
    (images / "a.jpg").symlink_to(images / "b.jpg")
    (images / "b.jpg").symlink_to(images / "a.jpg")  # a <-> b: "too many levels of symbolic links"
    out = tmp_path / "my prepared data"
    rc = cli.main(["prepare-data", "--annotations", str(coco_json / "captions_val2017.json"), "--images", str(images),
                   "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]  # was: a traceback (OSError ELOOP) from listing the folder for the key
    # the prepared-data key reads only the photos the captions name (fingerprint.files_key): the loop is never read
    hint = next(line for line in captured.out.splitlines() if line.startswith("prepared "))
    flags = dict(a.split("=", 1) for a in shlex.split(hint.split("train from it with ")[1]))
    assert Path(flags["--config.data.data_dir"]).is_dir() and " " in flags["--config.data.data_dir"]


PREPARE = ["-m", "jax_refine", "prepare-data"]


def test_two_prepare_data_runs_of_one_set_into_one_out_both_succeed_and_leftovers_go(coco_json, tmp_path, capsys,
                                                                                    untouched):
    out = tmp_path / "out"
    argv = [*PREPARE, "--annotations", str(coco_json / "captions_val2017.json"), "--images", str(coco_json / "images"),
            "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=500) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):  # was: one of them died with a TFDS traceback
        assert p.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    dirs = {line.split()[1].rstrip(";") for stdout, _ in results for line in stdout.splitlines()
            if line.startswith("prepared ")}
    assert len(dirs) == 1
    prepared = Path(dirs.pop())  # .../coco_captions_json/<config>/<version>; the builder also keeps a hidden .config
    assert prepared.is_dir()
    config_dir = prepared.parent
    assert not list(config_dir.glob("incomplete.*"))
    (config_dir / "incomplete.K1LL3D_1.0.0").mkdir()  # what a killed preparation leaves
    (config_dir / "incomplete.K1LL3D_1.0.0" / "part.tfrecord").write_bytes(b"x")
    assert cli.main(argv[2:]) == 0
    assert f"[data] removed 1 leftover(s) of an earlier, killed prepare-data in {config_dir}: incomplete.K1LL3D_1.0.0" \
        in capsys.readouterr().out
    assert not list(config_dir.glob("incomplete.*"))
