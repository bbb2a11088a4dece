"""Ablation: RaFA only (preset `rafa`: 1 x RaFA, no HyCD, no contrastive term: CLIP-Refine without HyCD;
add `--config.method.weights.contrastive=1` for RaFA + contrastive), ViT-B/32, COCO."""
from jax_refine.configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/rafa_vitb32_coco"
    c.method.name = "rafa"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
