"""The commands that read a workdir (evaluate, compare, export) on a ``gs://`` run, through the stand-in of
``gcs_standin.py``: the same numbers and tensors as the same commands on a local copy of that workdir.

The reference is the local code path (which tests/test_cli_commands.py and others check against transformers'
PyTorch CLIP); each command runs in-process through ``cli.main`` on both paths.
"""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from gcs_standin import WORKDIR, gcs_standin, hide_google_cloud_storage
from train_helpers import SyntheticIterator, tiny_config

from jax_refine import checkpoint, cli, sharding as shd, train

pytestmark = pytest.mark.slow  # training runs and the commands on the bucket stand-in: not in the fast tier

BUCKET_RUN = ("test-bucket", "run")  # WORKDIR under the stand-in's root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf_clip_dir):
    """``(bucket root, local copy)``: a tiny run of 4 steps (checkpoints 2 and 4) from a Hugging Face start
    checkpoint trained on WORKDIR, and its workdir copied out of the stand-in to a local ``run`` directory."""
    root = tmp_path_factory.mktemp("bucket")
    config = tiny_config(WORKDIR, **{"model.random_init": None, "model.name_or_path": str(tiny_hf_clip_dir),
                                     "train.num_steps": 4, "checkpoint.every_steps": 2})
    with gcs_standin(root):
        train.train(config, data_iter=SyntheticIterator(8),
                    mesh=shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    local = tmp_path_factory.mktemp("local") / "run"
    shutil.copytree(root.joinpath(*BUCKET_RUN), local)
    return root, local


def _cli(root, *argv: str) -> int:
    with gcs_standin(root):
        return cli.main(list(argv))


def _eval_args(cifar10_dir, coco_mini_dir) -> list[str]:
    coco = coco_mini_dir
    return ["--config", "tiny_test", f"--config.eval.zero_shot=('folder:{cifar10_dir / 'test'}',)",
            f"--config.eval.retrieval=('coco_json:{coco / 'annotations/captions_val2017.json'}:{coco / 'val2017'}',)",
            "--config.eval.max_examples=24", "--config.eval.batch_size=8", "--config.eval.plots=False",
            "--config.eval.progress=False"]


def _results(report_dir) -> list[dict]:
    return json.loads((report_dir / "report.json").read_text())["results"]


def test_evaluate_and_compare_on_gs_give_the_local_numbers(runs, tmp_path, monkeypatch, cifar10_dir,
                                                           coco_mini_dir):
    root, local = runs
    monkeypatch.chdir(tmp_path)
    args = _eval_args(cifar10_dir, coco_mini_dir)
    assert _cli(root, "evaluate", "--model", WORKDIR, "--out", str(tmp_path / "gs_eval"), *args) == 0
    assert _cli(root, "evaluate", "--model", str(local), "--out", str(tmp_path / "local_eval"), *args) == 0
    got, want = _results(tmp_path / "gs_eval"), _results(tmp_path / "local_eval")
    assert got == want  # every number, the table name ("run") too
    (result,) = got
    assert result["zero_shot"] and result["retrieval"]  # the suite ran: not an empty report on both sides

    step2 = f"{WORKDIR}/checkpoints/2"
    assert _cli(root, "compare", WORKDIR, f"step2={step2}", "--out", str(tmp_path / "gs_cmp"), *args) == 0
    assert _cli(root, "compare", str(local), f"step2={local / 'checkpoints/2'}", "--out",
                str(tmp_path / "local_cmp"), *args) == 0
    got, want = _results(tmp_path / "gs_cmp"), _results(tmp_path / "local_cmp")
    assert got == want
    assert got[0] == result and got[1] != got[0]  # step 4 (the workdir's newest) and step 2 really differ
    assert not (tmp_path / "gs:").exists()  # nothing read or written under a local "gs:" directory


def test_tokenizer_source_and_config_record_read_from_the_bucket(runs, tiny_hf_clip_dir):
    root, local = runs
    with gcs_standin(root):
        for suffix in ("", "/checkpoints", "/checkpoints/2"):
            assert checkpoint.tokenizer_source(WORKDIR + suffix) == str(tiny_hf_clip_dir)  # the run's start
            assert checkpoint.tokenizer_source(str(local) + suffix) == str(tiny_hf_clip_dir)


def test_export_from_gs_to_gs_and_local_gives_the_local_tensors(runs, tmp_path, monkeypatch, capsys):
    root, local = runs
    monkeypatch.chdir(tmp_path)
    step2 = f"{WORKDIR}/checkpoints/2"
    assert _cli(root, "export", "--checkpoint", step2, "--out", "gs://test-bucket/exports/step2") == 0
    assert _cli(root, "export", "--checkpoint", WORKDIR, "--out", str(tmp_path / "gs_to_local")) == 0
    assert _cli(root, "export", "--checkpoint", str(local / "checkpoints/2"), "--out", str(tmp_path / "local2")) == 0
    assert _cli(root, "export", "--checkpoint", str(local), "--out", str(tmp_path / "local4")) == 0
    in_bucket = root / "test-bucket/exports/step2"
    for got_dir, want_dir in ((in_bucket, tmp_path / "local2"), (tmp_path / "gs_to_local", tmp_path / "local4")):
        assert sorted(p.name for p in got_dir.iterdir()) == sorted(p.name for p in want_dir.iterdir())
        assert (got_dir / "config.json").read_text() == (want_dir / "config.json").read_text()
        got = safetensors.numpy.load_file(got_dir / "model.safetensors")
        want = safetensors.numpy.load_file(want_dir / "model.safetensors")
        assert sorted(got) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    a = safetensors.numpy.load_file(in_bucket / "model.safetensors")
    b = safetensors.numpy.load_file(tmp_path / "local4" / "model.safetensors")
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # steps 2 and 4 differ: the step was honoured

    # a non-empty bucket target needs --overwrite; a training workdir there is never replaced
    capsys.readouterr()
    assert _cli(root, "export", "--checkpoint", step2, "--out", "gs://test-bucket/exports/step2") == 2
    assert capsys.readouterr().err.startswith("error: gs://test-bucket/exports/step2 already exists and is not empty")
    assert _cli(root, "export", "--checkpoint", step2, "--out", "gs://test-bucket/exports/step2", "--overwrite") == 0
    assert _cli(root, "export", "--checkpoint", step2, "--out", WORKDIR, "--overwrite") == 2
    assert capsys.readouterr().err.startswith(f"error: refusing to write export output to {WORKDIR}: it is or holds "
                                              "a training workdir; choose another --out")
    assert (root / "test-bucket/run/checkpoints/4/commit_success.txt").is_file()
    assert not (tmp_path / "gs:").exists()


@pytest.mark.parametrize("argv, message", [
    (["export", "--checkpoint", "gs://test-bucket/nothing", "--out", "OUT"],
     "error: model gs://test-bucket/nothing: no such training workdir or checkpoint step in the bucket"),
    (["export", "--checkpoint", f"{WORKDIR}/checkpoints/9", "--out", "OUT"],
     f"error: model {WORKDIR}/checkpoints/9: no such training workdir or checkpoint step in the bucket"),
    (["evaluate", "--config", "tiny_test", "--model", "gs://test-bucket/nothing", "--out", "OUT"],
     "error: model gs://test-bucket/nothing: no such training workdir or checkpoint step in the bucket"),
    (["compare", "gs://test-bucket/nothing", "--config", "tiny_test", "--config.eval.zero_shot=()",
      "--config.eval.retrieval=()", "--out", "OUT"],
     "error: model gs://test-bucket/nothing: no such training workdir or checkpoint step in the bucket"),
    (["evaluate", "--config", "tiny_test", "--model", f"{WORKDIR}/checkpoints/2/params", "--out", "OUT"],
     f"error: model {WORKDIR}/checkpoints/2/params: not a training workdir or checkpoint step; a model directory in "
     "a bucket is not read in place"),
    (["evaluate", "--config", "tiny_test", "--model", WORKDIR, "--out", "gs://test-bucket/eval"],
     "error: report output gs://test-bucket/eval: a URL is not supported for a report"),
    (["evaluate", "--config", "tiny_test", f"--config.workdir={WORKDIR}", "--model", WORKDIR],
     "error: report output gs://test-bucket/run/eval: a URL is not supported for a report"),
])
def test_missing_gs_workdir_or_step_and_gs_reports_are_one_line_errors(runs, tmp_path, capsys, argv, message):
    root, _ = runs
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert _cli(root, *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(message), err
    assert len(err) == 2 and err[1].startswith("(see `python -m jax_refine")
    assert not (tmp_path / "out").exists()


def test_reading_a_gs_workdir_without_google_cloud_storage_fails_in_one_line(tmp_path, monkeypatch, capsys):
    hide_google_cloud_storage(monkeypatch)  # no stand-in: the probe (workdir.get_bucket) fails at the import
    assert cli.main(["export", "--checkpoint", WORKDIR, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[0]
    assert err == (f"error: workdir {WORKDIR}: Orbax needs the google-cloud-storage package for gs:// checkpoints "
                   "(pip install 'jax_refine[gcs]')")


def test_an_uncommitted_step_in_the_bucket_is_not_read(runs, tmp_path, capsys):
    """In a bucket Orbax commits a step with ``commit_success.txt`` (no rename there): a step without it (a save
    cut short; all its other files written) is skipped when a workdir is read, and refused when named."""
    root = tmp_path / "bucket"
    shutil.copytree(runs[0], root)
    ckpts = root.joinpath(*BUCKET_RUN, "checkpoints")
    shutil.copytree(ckpts / "2", ckpts / "8")
    (ckpts / "8" / "commit_success.txt").unlink()
    with gcs_standin(root):
        assert checkpoint._resolve(WORKDIR) == (checkpoint.workdir_lib.as_path(f"{WORKDIR}/checkpoints"), 4)
    assert _cli(root, "export", "--checkpoint", f"{WORKDIR}/checkpoints/8", "--out", str(tmp_path / "out")) == 2
    assert capsys.readouterr().err.startswith(f"error: {WORKDIR}/checkpoints/8: an unfinished checkpoint step "
                                              "(no commit_success.txt")
