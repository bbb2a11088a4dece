"""Baseline: m^2-mix (preset `m2_mix`: CLIP's contrastive loss + 0.01 x m^2-mix, both on unit vectors,
lam ~ Beta(0.5, 0.5); Oh et al. NeurIPS 2023), ViT-B/32, COCO."""
from jax_refine.configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/m2_mix_vitb32_coco"
    c.method.name = "m2_mix"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
