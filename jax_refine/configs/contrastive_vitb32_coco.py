"""Baseline: contrastive fine-tuning (preset `contrastive`: 1 x symmetric InfoNCE on unnormalized features,
learnable logit scale from the checkpoint; the reference's contrastive.yaml), ViT-B/32, COCO."""
from jax_refine.configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/contrastive_vitb32_coco"
    c.method.name = "contrastive"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
