"""Ablation: RaFA with the contrastive loss (no HyCD), ViT-B/32, COCO."""
from configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/rafa_vitb32_coco"
    c.method.name = "rafa"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
