"""Ablation: HyCD only (alpha 0.5, no RaFA), ViT-B/32, COCO."""
from configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/hycd_vitb32_coco"
    c.method.name = "hycd"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
