"""The paper configs, as `python -m jax_refine config` resolves them, pinned to the reference's values.

Reference: yshinya6/clip-refine, config/01_post-pre-training/clip-refine.yaml (epoch 1, batchsize 512,
train_val_split_ratio 0.99; AdamW lr 1.0e-6, weight_decay 0.1, torch's default betas (0.9, 0.999) and eps
1e-8; RandRegUpdater strategy std_sample (N(0, I)), lambda_cont 0, lambda_rand 1, lambda_kd 1, distill_loss
kd, alpha_blending 0.5, temperature 1 (default)), fp32 (its model converts every weight to float32), no
scheduler (a constant lr), all parameters trained, unnormalized features; zero-shot prompt "a photo of {c}".
The values are written out here, not read from configs/.
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
HUB = {"vitb32": "openai/clip-vit-base-patch32", "vitb16": "openai/clip-vit-base-patch16",
       "vitl14": "openai/clip-vit-large-patch14"}
# method -> (nonzero weights, alpha, normalize), from the reference's configs (README's table of methods)
METHODS = {
    "clip_refine": ({"kd": 1.0, "rafa": 1.0}, 0.5, False),
    "contrastive": ({"contrastive": 1.0}, 0.5, False),
    "self_kd": ({"contrastive": 1.0, "kd": 1.0}, 0.0, False),
    "feature_distill": ({"contrastive": 1.0, "feature": 1.0}, 0.5, False),
    "logit_distill": ({"contrastive": 1.0, "logit": 1.0}, 0.5, False),
    "hycd": ({"kd": 1.0}, 0.5, False),
    "rafa": ({"rafa": 1.0}, 0.5, False),
    "m2_mix": ({"contrastive": 1.0, "m2": 0.01}, 0.5, True),
}
# The ten per-experiment config files the parameterised `clip_refine` config replaced: (method, model).
OLD_NAMES = {"clip_refine_vitb32_coco": ("clip_refine", "vitb32"), "clip_refine_vitb16_coco": ("clip_refine", "vitb16"),
             "clip_refine_vitl14_coco": ("clip_refine", "vitl14"), "contrastive_vitb32_coco": ("contrastive", "vitb32"),
             "self_kd_vitb32_coco": ("self_kd", "vitb32"), "feature_distill_vitb32_coco": ("feature_distill", "vitb32"),
             "logit_distill_vitb32_coco": ("logit_distill", "vitb32"), "hycd_vitb32_coco": ("hycd", "vitb32"),
             "rafa_vitb32_coco": ("rafa", "vitb32"), "m2_mix_vitb32_coco": ("m2_mix", "vitb32")}
NO_WEIGHTS = {"contrastive": 0.0, "sigmoid": 0.0, "kd": 0.0, "rafa": 0.0, "feature": 0.0, "logit": 0.0, "m2": 0.0}


def _resolved(spec: str, *overrides: str) -> dict:
    return json.loads(json.dumps(resolved_config(spec, list(overrides))))  # as the config command prints it


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


@pytest.mark.parametrize("old_name", list(OLD_NAMES))
def test_every_old_config_name_is_the_paper_setting_of_its_method_and_model(old_name):
    method, model = OLD_NAMES[old_name]
    new = _resolved(f"clip_refine:method={method},model={model}")
    assert _resolved(old_name) == new  # the old name is an alias of the parameterised config
    assert _subset(new, {k: v for k, v in PAPER.items() if k != "method"}) == []
    weights, alpha, normalize = METHODS[method]
    assert new["method"]["name"] == method and new["method"]["weights"] == {**NO_WEIGHTS, **weights}
    assert (new["method"]["alpha"], new["method"]["normalize"]) == (alpha, normalize)
    assert new["model"]["name_or_path"] == HUB[model] and new["workdir"] == f"outputs/{old_name}"
    if method == "clip_refine":
        assert _subset(new, PAPER) == []


def test_the_paper_config_defaults_and_its_other_choices():
    assert _resolved("clip_refine") == _resolved("clip_refine:model=vitb32,method=clip_refine,data=coco,mesh=cpu")
    assert _subset(_resolved("clip_refine"), PAPER) == []
    c = _resolved("clip_refine:data=coco_karpathy,mesh=tpu_pod,model=vitl14")
    assert (c["data"]["source"], c["data"]["name"], c["data"]["split"]) == ("tfds", "coco_captions", "train+restval")
    assert c["workdir"] == "outputs/clip_refine_vitl14_coco_karpathy" and c["model"]["name_or_path"] == HUB["vitl14"]
    assert c["mesh"]["shape"] == {"data": -1, "fsdp": 4, "tensor": 1}
    assert _resolved("clip_refine_vitl14_coco:gpu8")["mesh"]["shape"] == {"data": 1, "fsdp": 8, "tensor": 1}


def test_config_command_prints_the_resolved_config_and_overrides():
    out = subprocess.run([sys.executable, "-m", "jax_refine", "config", "clip_refine:method=self_kd",
                          "--config.method.weights.kd=2.5", "--config.optimizer.lr=2e-6"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    c = json.loads(out.stdout)
    # Self-KD as the reference's CLIPUpdater builds it: contrastive 1 + KD (alpha 0); kd overridden to 2.5
    assert c["method"]["weights"] == {"contrastive": 1.0, "sigmoid": 0.0, "kd": 2.5, "rafa": 0.0, "feature": 0.0, "logit": 0.0,
                                      "m2": 0.0}
    assert c["method"]["alpha"] == 0.0 and c["optimizer"]["lr"] == 2e-6 and c["optimizer"]["weight_decay"] == 0.1


# The reference's model list (its loader's checkpoints; issue 13), written out here, not read from the configs.
REFERENCE_MODELS = {
    "vitb32": "openai/clip-vit-base-patch32", "vitb16": "openai/clip-vit-base-patch16",
    "vitl14": "openai/clip-vit-large-patch14", "openclip_h14": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "openclip_bigg14": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "dfn_h14_378": "apple/DFN5B-CLIP-ViT-H-14-378",
    "siglip_so400m": "google/siglip-so400m-patch14-384",
}
DATA_PARALLEL, FSDP8 = {"data": -1, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 8, "tensor": 1}
# batch 512 on 8 x 80 GB (README's AOT table: L/14-336 needs remat on fsdp 8, bigG/14 remat=full)
FITS = {"vitb32": (DATA_PARALLEL, "none"), "vitb16": (DATA_PARALLEL, "none"), "vitl14": (FSDP8, "save_dots"),
        **{m: (FSDP8, "full") for m in ("openclip_h14", "openclip_bigg14", "dfn_h14_378", "siglip_so400m")}}


@pytest.mark.parametrize("model", list(REFERENCE_MODELS))
def test_each_reference_model_resolves_to_its_checkpoint_and_a_mesh_that_fits(model):
    c = _resolved(f"clip_refine:model={model}")
    mesh, remat = FITS[model]
    assert c["model"]["name_or_path"] == REFERENCE_MODELS[model]
    assert (c["mesh"]["shape"], c["model"]["remat"]) == (mesh, remat)
    assert c["model"]["scan_layers"] == (remat != "none")
    assert _subset(c, PAPER) == [] and c["workdir"] == f"outputs/clip_refine_{model}_coco"
    pod = _resolved(f"clip_refine:model={model},mesh=tpu_pod")  # an explicit mesh wins, the memory settings stay
    assert pod["mesh"]["shape"] == {"data": -1, "fsdp": 4, "tensor": 1} and pod["model"]["remat"] == remat


def test_siglip_contrastive_baseline_is_its_sigmoid_loss_and_clip_has_none():
    c = _resolved("clip_refine:model=siglip_so400m,method=contrastive")
    assert c["method"]["name"] == "sigmoid" and c["method"]["weights"] == {**NO_WEIGHTS, "sigmoid": 1.0}
    assert _resolved("clip_refine:model=siglip_so400m")["method"]["weights"] == {**NO_WEIGHTS, "kd": 1.0, "rafa": 1.0}
    with pytest.raises(ValueError, match="method=sigmoid needs a model with a logit bias"):
        _resolved("clip_refine:model=vitb32,method=sigmoid")
