"""The real-data study's quick mode end to end (tiny model, a few steps) on ../shared/data, and its table."""
from __future__ import annotations

import json
import statistics

import numpy as np
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


def test_selection_noise_is_the_spread_of_the_score_over_resampled_queries():
    """The lr-selection score's noise against a simulation: queries hit with the measured rates, the score's
    standard deviation over many draws (photos for I->T, captions for T->I)."""
    from jax_refine.study import selection_score

    n_images, n_captions, p_i2t, p_t2i = 500, 2500, 0.024, 0.0116
    recalls = {"i2t": {"R@1": 100 * p_i2t}, "t2i": {"R@1": 100 * p_t2i}, "n_images": n_images,
               "n_captions": n_captions}
    score, noise = selection_score(recalls)
    assert score == pytest.approx(100 * (p_i2t + p_t2i) / 2)
    rng = np.random.default_rng(0)
    draws = 100 * (rng.binomial(n_images, p_i2t, 200_000) / n_images
                   + rng.binomial(n_captions, p_t2i, 200_000) / n_captions) / 2
    assert noise == pytest.approx(draws.std(), rel=0.02)


@pytest.mark.parametrize("method, uses_prior", [("clip_refine", True), ("rafa", True), ("hycd", False),
                                                ("contrastive", False), ("self_kd", False), ("m2_mix", False)])
def test_a_method_without_rafa_ignores_the_prior(method, uses_prior):
    """The reference's methods: only CLIP-Refine and RaFA alone have a RaFA term (lambda_rand > 0), so only
    their runs differ between N(0, I) and the precomputed prior; the others share one run (one cache entry)."""
    from jax_refine.study import _regime_for

    regime = {"normalize": True, "feature_scale": "teacher", "prior": "precomputed",
              "prior_params": {"path": "stats.npz"}}
    got = _regime_for(method, regime)
    assert got == (regime if uses_prior else {"normalize": True, "feature_scale": "teacher"})


def _file_stems(path: str) -> list[str]:
    doc = json.loads(open(path).read())
    return [im["file_name"].rsplit("/", 1)[-1].rsplit(".", 1)[0] for im in doc["images"]]


def test_study_quick_end_to_end(tmp_path, capsys):
    if not (SHARED_DATA / "flickr8k" / "Flickr8k.token.txt").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    from jax_refine.cli import main

    argv = ["study", "--quick", "--data-dir", str(SHARED_DATA), "--out", str(tmp_path / "study")]
    assert main(argv) == 0
    report = tmp_path / "study" / "report"
    md, doc = (report / "study.md").read_text(), json.loads((report / "study.json").read_text())
    assert "| Pre-trained |" in md and "| CLIP-Refine |" in md and "| Contrastive FT |" in md
    assert "| unit / CLIP-Refine |" in md and "| teacher_prior / CLIP-Refine |" in md
    assert set(doc["methods"]) == {"clip_refine", "contrastive"}
    cells = {"unit/clip_refine", "teacher_prior/clip_refine", "teacher_prior/contrastive"}
    assert set(doc["selection"]) == cells and set(doc["ablation"]) == cells - {"teacher_prior/contrastive"}
    for cell, sel in doc["selection"].items():  # each cell at its own best lr of the grid, with the noise
        assert set(sel["scores"]) == set(sel["noise"]) == {"0.0001", "0.001"}
        assert sel["scores"][f"{sel['lr']:g}"] == max(sel["scores"].values())
    # the precomputed prior: a feature-stats file of the teacher, in the regime's space, that the regime reads
    stats = doc["regimes"]["teacher_prior"]["prior_params"]["path"]
    assert stats.endswith(".npz") and np.load(stats)["mean"].shape == (32,)
    # the cut sets: the first 48 photos of each split list, 5 captions each; the first 32 train photos
    # pre-train (every caption an entry), the other 16 and the 32 dev photos outside the 16-photo validation
    # slice refine: disjoint from pre-training
    names = {s: (SHARED_DATA / "flickr8k" / f"Flickr_8k.{s}Images.txt").read_text().split()[:48]
             for s in ("train", "dev")}
    stem = [n.rsplit(".", 1)[0] for n in names["train"]]
    dev = [n.rsplit(".", 1)[0] for n in names["dev"]]
    assert doc["data"]["flickr8k_train"]["photos"] == 48 and doc["data"]["flickr8k_train"]["captions"] == 240
    assert doc["data"]["pretrain_entries"] == {"flickr8k": 160, "cifar10": 40}
    pre, ref, val = (_file_stems(doc["files"][k]) for k in ("pretrain", "refine", "val"))
    assert pre[:160] == [s for s in stem[:32] for _ in range(5)]
    assert ref == stem[32:] + dev[:32] and val == dev[32:]
    assert not set(ref) & set(pre) and doc["data"]["refine_photos"] == 48
    assert doc["data"]["flickr8k_train"]["skipped_caption_missing_photo"] == 5
    base = doc["pretrained"]
    for key in ("cifar_single", "cifar_ensemble", "flickr8k_test/t2i/R@1", "coco_val/i2t/R@10", "gap"):
        run = doc["runs"]["teacher_prior/clip_refine"][0][key]
        assert doc["methods"]["clip_refine"][key]["delta"] == pytest.approx(run - base[key])
    assert 0 <= base["flickr8k_test/t2i/R@1"] <= base["flickr8k_test/t2i/R@5"] <= base["flickr8k_test/t2i/R@10"] <= 100
    assert base["norm_image"] > 0 and base["norm_text"] > 0
    assert len(list(report.glob("flickr8k_test_*.png"))) == 2
    # a rerun trains nothing again (every stage is cached) and writes the same table
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "training (" not in out and out.count(": cached (") == 4  # pre-train and the 3 cells' seed-0 runs
    assert json.loads((report / "study.json").read_text())["methods"] == doc["methods"]
