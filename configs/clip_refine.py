"""The paper's experiments: one method, one model of the reference's list, one caption set, the paper's
hyper-parameters (global batch 512, AdamW lr 1e-6, 1 epoch, fp32).

`--config clip_refine:ARG` with ARG = `model=vitb32,method=clip_refine,data=coco` (these are the defaults;
give only what differs, big_vision style; `mesh=` too):
- `model`: the models the reference refines (`MODELS`): vitb32, vitb16, vitl14 (OpenAI CLIP); openclip_h14,
  openclip_bigg14 (OpenCLIP, LAION-2B, HF CLIPModel format); dfn_h14_378 (Apple DFN5B, open_clip format,
  quick_gelu); siglip_so400m (SigLIP ViT-SO400M/14-384);
- `method`: a preset of `jax_refine.objectives.PRESETS` (clip_refine = HyCD + RaFA, the paper's method;
  contrastive, self_kd, feature_distill, logit_distill, m2_mix: the baselines; hycd, rafa: the ablations).
  On siglip_so400m `method=contrastive` means SigLIP's own contrastive loss, the `sigmoid` preset (pairwise
  sigmoid with the learned logit scale and bias); `sigmoid` on a CLIP (no logit bias) is an error;
- `data`: coco (COCO Captions 2017 train read in place, the paper's set) | coco_karpathy (TFDS's
  coco_captions, COCO 2014 Karpathy train+restval, read through a shuffle buffer);
- `mesh`: a mesh preset of `jax_refine.config_base.MESH_PRESETS` (cpu, gpu1, gpu8, tpu_pod), or `default`:
  the model's own (`MODELS[model].mesh`), with its remat / scan settings.

Each model's default mesh and memory settings (`MODELS`) and what they measured: docs/memory.md.
The workdir is `outputs/<method>_<model>_<data>`. Paper (ViT-B/32, CLIP-Refine): 12-dataset zero-shot 54.69,
ImageNet 60.93, COCO R@1 T->I 37.64 / I->T 38.78.
"""
from __future__ import annotations

from typing import NamedTuple

import ml_collections

from jax_refine import config_base, objectives


class ModelChoice(NamedTuple):
    """A model of the reference's list: its checkpoint, family and the mesh / memory settings of batch 512."""

    checkpoint: str  # hub id (HF CLIPModel / SiglipModel format, or open_clip's own)
    family: str  # "clip" | "siglip"
    mesh: str  # default mesh preset (config_base.MESH_PRESETS)
    remat: str = "none"  # config.model.remat
    scan_layers: bool = False  # config.model.scan_layers
    gpu1_accum: int | None = None  # mesh=gpu1: train.grad_accum fitting 80 GB (remat=full); None: not measured


MODELS = {
    "vitb32": ModelChoice("openai/clip-vit-base-patch32", "clip", "cpu", gpu1_accum=1),
    "vitb16": ModelChoice("openai/clip-vit-base-patch16", "clip", "cpu"),
    "vitl14": ModelChoice("openai/clip-vit-large-patch14", "clip", "gpu8", "save_dots", True, gpu1_accum=1),
    "openclip_h14": ModelChoice("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "clip", "gpu8", "full", True, gpu1_accum=2),
    "openclip_bigg14": ModelChoice("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "clip", "gpu8", "full", True),
    "dfn_h14_378": ModelChoice("apple/DFN5B-CLIP-ViT-H-14-378", "clip", "gpu8", "full", True),
    "siglip_so400m": ModelChoice("google/siglip-so400m-patch14-384", "siglip", "gpu8", "full", True, gpu1_accum=4),
}
# data choice -> the `c.data` fields it sets (the rest are the base config's)
DATA = {
    "coco": {},
    "coco_karpathy": {"source": "tfds", "name": "coco_captions", "split": "train+restval"},
}


def method_for(method: str, family: str) -> str:
    """The preset `method` means on a model of `family`: SigLIP's contrastive baseline is its sigmoid loss."""
    if family == "siglip" and method == "contrastive":
        return "sigmoid"
    if family != "siglip" and method == "sigmoid":
        raise config_base.ConfigError(f"config clip_refine: method=sigmoid needs a model with a logit bias (SigLIP); "
                                     f"this is a {family} model: use method=contrastive")
    return method


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of `arg` ("model=vitb16,method=contrastive"; unset keys take the first allowed value,
    mesh the model's own)."""
    a = config_base.parse_arg(arg, "clip_refine", model=tuple(MODELS), method=tuple(objectives.PRESETS),
                             data=tuple(DATA), mesh=("default", *config_base.MESH_PRESETS))
    m = MODELS[a["model"]]
    c = config_base.get_config(m.mesh if a["mesh"] == "default" else a["mesh"])
    c.workdir = f"outputs/{a['method']}_{a['model']}_{a['data']}"
    c.method.name = method_for(a["method"], m.family)
    c.model.name_or_path = m.checkpoint
    c.model.remat, c.model.scan_layers = m.remat, m.scan_layers
    if a["mesh"] == "gpu1" and m.gpu1_accum is not None:  # batch 512 on one 80 GB GPU, as measured
        c.model.remat, c.model.scan_layers, c.train.grad_accum = "full", True, m.gpu1_accum
    c.data.update(DATA[a["data"]])
    return c
