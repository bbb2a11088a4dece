"""CLIP-Refine on COCO Captions with ViT-B/16 (same hyper-parameters as ViT-B/32)."""
from jax_refine.configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/clip_refine_vitb16_coco"
    c.method.name = "clip_refine"
    c.model.name_or_path = "openai/clip-vit-base-patch16"
    return c
