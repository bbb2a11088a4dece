"""Baseline: feature distillation (MSE to the frozen teacher's features), ViT-B/32, COCO."""
from configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/feature_distill_vitb32_coco"
    c.method.name = "feature_distill"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
