"""The offline demo pipeline (`./run.sh`) on a cut-down setting: a small world, a few steps per stage.

It runs the real stages -- the synthetic world, contrastive pre-training from scratch, CLIP-Refine and
contrastive fine-tuning from the pre-trained export, the four-model comparison -- twice, and the two tables
must be identical.
"""
from __future__ import annotations

import json

import pytest

from jax_refine import demo
from jax_refine.config import load_config

pytestmark = pytest.mark.slow  # the demo pipeline end to end: not in the fast tier

CUT_DOWN = ["--config.train.num_steps=2", "--config.train.batch_size=32", "--config.eval.max_examples=120",
            "--config.checkpoint.async_save=False"]


def test_demo_runs_end_to_end_and_repeats_exactly(tmp_path):
    world = [f"--config.world.cache_dir={tmp_path / 'world'}", "--config.world.pretrain=64",
             "--config.world.refine=64", "--config.world.test=120",
             '--config.world.zero_shot_tasks=("shape", "colour")']  # 2 of the 6 tasks, to keep it short
    config = load_config("demo", CUT_DOWN + world)
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
    # same seed -> the same table, to the last digit
    assert json.loads((tmp_path / "a" / "report" / "report.json").read_text())["results"] == \
        json.loads((tmp_path / "b" / "report" / "report.json").read_text())["results"]
    assert table == (tmp_path / "b" / "report" / "report.md").read_text().replace(str(tmp_path / "b"), str(tmp_path / "a"))
