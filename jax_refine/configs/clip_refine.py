"""The paper's experiments: one method, one OpenAI CLIP, one caption set, the paper's hyper-parameters.

`--config clip_refine:ARG` with ARG = `model=vitb32,method=clip_refine,data=coco,mesh=cpu` (these are the
defaults; give only what differs, big_vision style):
- `model`: vitb32 | vitb16 | vitl14 (OpenAI's checkpoints; use mesh=gpu8 or tpu_pod for vitl14);
- `method`: a preset of `jax_refine.objectives.PRESETS` (clip_refine = HyCD + RaFA, the paper's method;
  contrastive, self_kd, feature_distill, logit_distill, m2_mix: the baselines; hycd, rafa: the ablations);
- `data`: coco (COCO Captions 2017 train read in place, the paper's set) | coco_karpathy (TFDS's
  coco_captions, COCO 2014 Karpathy train+restval, read through a shuffle buffer);
- `mesh`: a mesh preset of `jax_refine.configs.presets` (cpu, gpu1, gpu8, tpu_pod).
The workdir is `outputs/<method>_<model>_<data>`. Paper (ViT-B/32, CLIP-Refine): 12-dataset zero-shot 54.69,
ImageNet 60.93, COCO R@1 T->I 37.64 / I->T 38.78.
"""
from __future__ import annotations

import ml_collections

from jax_refine import config as config_lib
from jax_refine import objectives
from jax_refine.configs import default, presets

MODELS = {
    "vitb32": "openai/clip-vit-base-patch32",
    "vitb16": "openai/clip-vit-base-patch16",
    "vitl14": "openai/clip-vit-large-patch14",
}
# data choice -> the `c.data` fields it sets (the rest are default.py's)
DATA = {
    "coco": {},
    "coco_karpathy": {"source": "tfds", "name": "coco_captions", "split": "train+restval"},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of `arg` ("model=vitb16,method=contrastive"; unset keys take the first allowed value)."""
    a = config_lib.parse_arg(arg, "clip_refine", model=tuple(MODELS), method=tuple(objectives.PRESETS),
                             data=tuple(DATA), mesh=tuple(presets.MESH_PRESETS))
    c = default.get_config(a["mesh"])
    c.workdir = f"outputs/{a['method']}_{a['model']}_{a['data']}"
    c.method.name = a["method"]
    c.model.name_or_path = MODELS[a["model"]]
    c.data.update(DATA[a["data"]])
    return c
