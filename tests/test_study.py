"""The real-data study's quick mode end to end (tiny model, a few steps) on ../shared/data, and its table."""
from __future__ import annotations

import json
import statistics

import pytest

from conftest import SHARED_DATA

pytestmark = pytest.mark.slow  # the study pipeline end to end: not in the fast tier


def test_summary_statistics_against_statistics_module():
    from jax_refine.study import summarize

    runs = {"clip_refine": [{"gap": 0.5, "r": 10.0}, {"gap": 0.7, "r": 12.0}, {"gap": 0.4, "r": 11.5}],
            "contrastive": [{"gap": 0.9, "r": 9.0}]}
    base = {"gap": 0.8, "r": 10.5}
    t = summarize(runs, base)
    for m, seeds in runs.items():
        for k in base:
            vals = [s[k] for s in seeds]
            assert t[m][k]["mean"] == pytest.approx(statistics.fmean(vals))
            assert t[m][k]["std"] == pytest.approx(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            assert t[m][k]["delta"] == pytest.approx(statistics.fmean(vals) - base[k])
            assert t[m][k]["n"] == len(vals)


def test_study_quick_end_to_end(tmp_path, capsys):
    if not (SHARED_DATA / "flickr8k" / "Flickr8k.token.txt").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    from jax_refine.cli import main

    argv = ["study", "--quick", "--data-dir", str(SHARED_DATA), "--out", str(tmp_path / "study")]
    assert main(argv) == 0
    report = tmp_path / "study" / "report"
    md, doc = (report / "study.md").read_text(), json.loads((report / "study.json").read_text())
    assert "| Pre-trained |" in md and "| CLIP-Refine |" in md and "| Contrastive FT |" in md
    assert set(doc["methods"]) == {"clip_refine", "contrastive"} and doc["lr"] in (1e-4, 1e-3)
    assert set(doc["selection"]["scores"]) == {"0.0001", "0.001"}
    # the cut sets: the first 48 photos of each split list, 5 captions each; 16 dev photos held out
    train_names = (SHARED_DATA / "flickr8k" / "Flickr_8k.trainImages.txt").read_text().split()[:48]
    assert doc["data"]["flickr8k_train"]["photos"] == len(train_names) == 48
    assert doc["data"]["flickr8k_train"]["captions"] == 240 and doc["data"]["refine_photos"] == 32
    assert doc["data"]["flickr8k_train"]["skipped_caption_missing_photo"] == 5
    base = doc["pretrained"]
    for key in ("cifar_single", "cifar_ensemble", "flickr8k_test/t2i/R@1", "coco_val/i2t/R@10", "gap"):
        run = doc["runs"]["clip_refine"][0][key]
        assert doc["methods"]["clip_refine"][key]["delta"] == pytest.approx(run - base[key])
    assert 0 <= base["flickr8k_test/t2i/R@1"] <= base["flickr8k_test/t2i/R@5"] <= base["flickr8k_test/t2i/R@10"] <= 100
    assert len(list(report.glob("flickr8k_test_*.png"))) == 2
    # a rerun trains nothing again (every stage is cached) and writes the same table
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "training (" not in out and out.count(": cached (") == 3  # pre-train, clip_refine, contrastive
    assert json.loads((report / "study.json").read_text())["methods"] == doc["methods"]
