"""CLIP-Refine (HyCD + RaFA) on COCO Captions 2017 train with ViT-B/32: the paper's main setting.

1 epoch, one random caption per image, global batch 512, AdamW lr 1e-6, weight decay 0.1, constant lr,
fp32, alpha 0.5, T 1, lambda 1, RaFA prior N(0, I). Paper (ViT-B/32): 12-dataset zero-shot 54.69,
ImageNet 60.93, COCO R@1 T->I 37.64 / I->T 38.78."""
from jax_refine.configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/clip_refine_vitb32_coco"
    c.method.name = "clip_refine"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
