"""The commands as a user types them: prepare-data -> train -> export -> evaluate, in subprocesses.

A tiny random CLIP trains 2 steps on 40 real CIFAR-10 photos prepared from a COCO-format JSON; the
export must open in transformers' PyTorch CLIPModel with the trained checkpoint's features.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from train_helpers import xla_flags

pytestmark = pytest.mark.slow  # the commands in subprocesses: not in the fast tier


def run_cli(*args: str, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    out = subprocess.run([sys.executable, "-m", "jax_refine", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def caption_set(tmp_path_factory, cifar10_dir):
    """40 real photos (4 per class) in an image dir and a COCO captions JSON with 2 captions each."""
    root = tmp_path_factory.mktemp("coco")
    images, annotations = [], []
    for c in sorted(p.name for p in (cifar10_dir / "test").iterdir()):
        (root / "images" / c).mkdir(parents=True)
        for k in range(4):
            name = f"{c}/{k:04d}.jpg"
            shutil.copy(cifar10_dir / "test" / name, root / "images" / name)
            images.append({"id": len(images), "file_name": name})
            for caption in (f"a photo of a {c}.", f"a small {c}."):
                annotations.append({"id": len(annotations), "image_id": images[-1]["id"], "caption": caption})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def test_prepare_train_export_evaluate(tmp_path, caption_set):
    out = run_cli("prepare-data", "--annotations", str(caption_set / "captions.json"), "--images",
                  str(caption_set / "images"), "--out", str(tmp_path / "tfds"))
    (dataset_dir,) = (tmp_path / "tfds" / "coco_captions_json").glob("captions-*/1.0.0")  # keyed by content
    assert (dataset_dir / "dataset_info.json").is_file() and str(dataset_dir) in out.stdout
    assert "--config.data.split=train" in out.stdout  # the printed hint is complete

    workdir = tmp_path / "run"
    run_cli("train", "--config", "tiny_test", "--workdir", str(workdir),
            "--config.data.source=tfds_dir", f"--config.data.data_dir={dataset_dir}", "--config.data.split=train",
            "--config.train.num_steps=2", "--config.train.export_hf=True", "--config.method.name=clip_refine")
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:  # CLIP-Refine = HyCD + 1.0 x RaFA (the paper's lambda = 1; no contrastive term), both > 0
        assert m["kd"] > 0 and m["rafa"] > 0, m  # a KL to a target that differs from the student; z != f
        # the fp32 sum of two positive terms: within a few ulps of the loss
        assert abs(m["loss"] - (m["kd"] + m["rafa"])) <= 4 * 2.0**-24 * m["loss"], m
        assert m["lr"] == pytest.approx(1e-3, rel=1e-6) and m["grad_norm"] > 0  # tiny_test's constant lr, float32

    run_cli("export", "--checkpoint", str(workdir), "--out", str(tmp_path / "exported"))
    from safetensors.numpy import load_file

    exported = load_file(tmp_path / "exported" / "model.safetensors")
    at_end = load_file(workdir / "hf" / "model.safetensors")  # written by train at its last step
    assert exported.keys() == at_end.keys()
    assert all(np.array_equal(exported[k], at_end[k]) for k in exported)

    from transformers import CLIPModel

    torch_model = CLIPModel.from_pretrained(tmp_path / "exported").eval()
    assert torch_model.config.vision_config.hidden_size == 48
    # the export's features in PyTorch = the trained checkpoint's features in our model
    from hf_fixtures import assert_matches_torch, clip_tokenizer, random_pixels

    from jax_refine import checkpoint as ckpt

    ours = ckpt.load_model(workdir)
    pixels = random_pixels(3, 32, seed=5)
    tok = clip_tokenizer()(["a photo of a cat.", "two dogs on a red sofa", "x"], padding="max_length",
                           max_length=16, return_tensors="np")
    got = ours(pixels, tok["input_ids"].astype(np.int32), tok["attention_mask"].astype(np.int32))
    assert_matches_torch(got, torch_model, pixels, tok["input_ids"], tok["attention_mask"])

    report_dir = tmp_path / "eval"
    out = run_cli("evaluate", "--config", "tiny_test", "--model", str(tmp_path / "exported"),
                  "--out", str(report_dir), f"--config.eval.zero_shot=('folder:{caption_set / 'images'}',)",
                  f"--config.eval.retrieval=('coco_json:{caption_set / 'captions.json'}:{caption_set / 'images'}',)",
                  "--config.eval.batch_size=16")
    result = json.loads((report_dir / "report.json").read_text())["results"][0]
    (zs,) = result["zero_shot"].values()
    assert zs["n"] == 40 and zs["num_classes"] == 10
    (rt,) = result["retrieval"].values()
    assert rt["n_images"] == 40 and rt["n_captions"] == 80
    assert "report:" in out.stdout
