"""The paper configs, as `python -m jax_refine config` resolves them, pinned to the reference's values.

Reference: yshinya6/clip-refine, config/01_post-pre-training/clip-refine.yaml (epoch 1, batchsize 512,
train_val_split_ratio 0.99; AdamW lr 1.0e-6, weight_decay 0.1, torch's default betas (0.9, 0.999) and eps
1e-8; RandRegUpdater strategy std_sample (N(0, I)), lambda_cont 0, lambda_rand 1, lambda_kd 1, distill_loss
kd, alpha_blending 0.5, temperature 1 (default)), fp32 (its model converts every weight to float32), no
scheduler (a constant lr), all parameters trained, unnormalized features; zero-shot prompt "a photo of {c}".
The values are written out here, not read from configs/default.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from jax_refine.commands import resolved_config

PAPER = {
    "train": {"batch_size": 512, "epochs": 1, "num_steps": None, "grad_accum": 1, "clip_norm": None, "freeze": []},
    "optimizer": {"lr": 1e-6, "weight_decay": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "schedule": "constant",
                  "warmup_steps": 0},
    "model": {"dtype": "float32"},
    "method": {"name": "clip_refine", "alpha": 0.5, "temperature": 1.0, "prior": "normal",
               "prior_params": {"mean": 0.0, "std": 1.0}, "normalize": False,
               "weights": {"contrastive": 0.0, "kd": 1.0, "rafa": 1.0, "feature": 0.0, "logit": 0.0, "m2": 0.0}},
    "data": {"source": "coco_json", "split": "train", "train_fraction": 0.99, "split_seed": 42,
             "caption_mode": "random", "annotations": "data/coco/annotations/captions_train2017.json"},
    "eval": {"templates": "reference",
             "zero_shot": ["folder:data/fgvc_aircraft/test", "caltech_birds2011", "stanford_cars", "caltech101", "dtd",
                           "eurosat", "oxford_flowers102", "food101", "imagenet2012", "oxford_iiit_pet", "sun397",
                           "ucf101"],
             "retrieval": ["coco_karpathy_test", "karpathy:data/dataset_flickr8k.json:test:data/flickr8k/images",
                           "karpathy:data/dataset_flickr30k.json:test:data/flickr30k/images"]},
}
MODELS = {"clip_refine_vitb32_coco": "openai/clip-vit-base-patch32",
          "clip_refine_vitb16_coco": "openai/clip-vit-base-patch16",
          "clip_refine_vitl14_coco": "openai/clip-vit-large-patch14"}


def _subset(got: dict, want: dict, where: str = "") -> list[str]:
    """Every key of `want` with a different value in `got` (recursively), as 'path: got != want'."""
    bad = []
    for k, v in want.items():
        g = got.get(k, "<missing>")
        if isinstance(v, dict) and isinstance(g, dict):
            bad += _subset(g, v, f"{where}{k}.")
        elif g != v:
            bad.append(f"{where}{k}: {g!r} != {v!r}")
    return bad


@pytest.mark.parametrize("name", list(MODELS))
def test_paper_configs_are_the_reference_hyper_parameters(name):
    c = json.loads(json.dumps(resolved_config(name, [])))  # as the config command prints it
    assert _subset(c, PAPER) == []
    assert c["model"]["name_or_path"] == MODELS[name]


def test_config_command_prints_the_resolved_config_and_overrides():
    out = subprocess.run([sys.executable, "-m", "jax_refine", "config", "configs/self_kd_vitb32_coco.py",
                          "--config.method.weights.kd=2.5", "--config.optimizer.lr=2e-6"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    c = json.loads(out.stdout)
    # Self-KD as the reference's CLIPUpdater builds it: contrastive 1 + KD (alpha 0); kd overridden to 2.5
    assert c["method"]["weights"] == {"contrastive": 1.0, "kd": 2.5, "rafa": 0.0, "feature": 0.0, "logit": 0.0,
                                      "m2": 0.0}
    assert c["method"]["alpha"] == 0.0 and c["optimizer"]["lr"] == 2e-6 and c["optimizer"]["weight_decay"] == 0.1
