"""Ablation: HyCD only (preset `hycd`: 1 x HyCD with alpha 0.5, no RaFA, no contrastive term: CLIP-Refine without
RaFA), ViT-B/32, COCO."""
from jax_refine.configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/hycd_vitb32_coco"
    c.method.name = "hycd"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
