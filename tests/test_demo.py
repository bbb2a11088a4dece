"""The offline demo pipeline (`./run.sh`) on a cut-down setting: a small world, a few steps per stage.

It runs the real stages -- the synthetic world, contrastive pre-training from scratch, CLIP-Refine and
contrastive fine-tuning from the pre-trained export, the four-model comparison -- twice, and the two tables
must be identical.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tolerances as tol
from hf_fixtures import hf_reference_features

import pytest

from jax_refine import demo
from jax_refine.config import load_config

pytestmark = pytest.mark.slow  # the demo pipeline end to end: not in the fast tier

CUT_DOWN = ["--config.train.num_steps=2", "--config.train.batch_size=32", "--config.eval.max_examples=120",
            "--config.checkpoint.async_save=False"]
# A smaller CLIP than the demo's (1 layer per tower, width 64, not 3 and 128): the pipeline, the evaluation and
# the repeat are the same, and each stage's step compile (most of the test's time on CPU) shrinks with the layers.
SMALL_MODEL = [f"--config.model.random_init.{tower}_config.{key}={value}" for tower in ("vision", "text")
               for key, value in (("num_hidden_layers", 1), ("hidden_size", 64), ("intermediate_size", 128))
               ] + ["--config.model.random_init.projection_dim=64"]


def _torch_gap(hf_dir: Path, world: Path) -> tuple[float, float]:
    """(modality gap, its fp32 error bound) of the test split (every picture, every caption), computed
    independently: transformers' CLIPModel, image processor and tokenizer from the exported `hf_dir`, NumPy for
    ||mean unit(img) - mean unit(txt)||. The bound: the centroid distance is 1-Lipschitz in each unit vector,
    a unit vector moves by <= 2 |df| / |f|, and our features are within 8x torch's own fp32 error of its."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    ann = json.loads((world / "captions_test.json").read_text())
    model = CLIPModel.from_pretrained(hf_dir).eval()
    images = [Image.open(world / "images" / "test" / im["file_name"]).convert("RGB") for im in ann["images"]]
    pixels = CLIPImageProcessor.from_pretrained(hf_dir)(images=images, return_tensors="np")["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(hf_dir)([a["caption"] for a in ann["annotations"]], padding=True,
                                                   return_tensors="np")
    call = lambda m, dtype: hf_reference_features(m, pixels.transpose(0, 2, 3, 1), tokens["input_ids"],  # noqa: E731
                                                  tokens["attention_mask"], dtype)
    fi, ft = (np.asarray(f, np.float64) for f in call(model, np.float32))
    errors = tol.torch_fp32_errors(model, call)
    unit = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in (fi, ft)]
    gap = float(np.linalg.norm(unit[0].mean(0) - unit[1].mean(0)))
    bound = sum(2 * tol.PARITY_FACTOR * e / np.linalg.norm(f, axis=1).min() for e, f in zip(errors, (fi, ft)))
    return gap, bound + tol.sum_error(len(ft), 2.0)  # + the rounding of the two centroids' sums


def test_demo_runs_end_to_end_and_repeats_exactly(tmp_path):
    world = [f"--config.world.cache_dir={tmp_path / 'world'}", "--config.world.pretrain=64",
             "--config.world.refine=64", "--config.world.test=120",
             '--config.world.zero_shot_tasks=("shape", "colour")']  # 2 of the 6 tasks, to keep it short
    config = load_config("demo", CUT_DOWN + SMALL_MODEL + world)
    first = demo.run_demo(config, tmp_path / "a")
    second = demo.run_demo(config, tmp_path / "b")

    names = [r["model"] for r in first["results"]]
    assert names == ["pre-trained", "CLIP-Refine", "CLIP-Refine (unnormalized)", "contrastive FT"]
    for stage in config.demo.stages:  # each stage trained 2 steps and exported a HF model
        assert (tmp_path / "a" / stage / "hf" / "model.safetensors").is_file()
        lines = (tmp_path / "a" / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["step"] == 2
    table = (tmp_path / "a" / "report" / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in table
    assert len(first["pictures"]) == 2 and all(p.stat().st_size > 10_000 for p in first["pictures"])

    assert first["world"] == second["world"] and "seed0" in first["world"]  # generated once, then reused
    for r in first["results"]:  # the numbers the table shows are real evaluations of the 120 test pictures
        assert [n.rsplit("/", 1)[1] for n in r["zero_shot"]] == ["shape", "colour"]
        for zs in r["zero_shot"].values():
            assert zs["n"] == 120
        (rt,) = r["retrieval"].values()
        assert rt["n_images"] == 120 and rt["n_captions"] == 600
    torch_gaps = {}
    for r in first["results"]:  # the gap each row shows is the one transformers computes from the export
        stage = config.demo.stages[names.index(r["model"])]
        spec = next(k for k in r["features"] if k.startswith("coco_json:"))
        gap, bound = _torch_gap(tmp_path / "a" / stage / "hf", Path(first["world"]))
        tol.assert_fp32_close(r["features"][spec]["modality_gap"], gap, bound, f"{r['model']} gap")
        torch_gaps[r["model"]] = (gap, bound)
    # the demo's point, in transformers' numbers: two CLIP-Refine steps close the gap by more than both gaps'
    # fp32 bounds (RaFA pulls image and text features towards the same random draws), contrastive FT does not
    (base, base_bound), (refined, refined_bound) = torch_gaps["pre-trained"], torch_gaps["CLIP-Refine"]
    assert refined < base - (base_bound + refined_bound), torch_gaps
    assert torch_gaps["contrastive FT"][0] > refined + base_bound + refined_bound, torch_gaps
    # same seed -> the same table, to the last digit
    assert json.loads((tmp_path / "a" / "report" / "report.json").read_text())["results"] == \
        json.loads((tmp_path / "b" / "report" / "report.json").read_text())["results"]
    assert table == (tmp_path / "b" / "report" / "report.md").read_text().replace(str(tmp_path / "b"), str(tmp_path / "a"))
