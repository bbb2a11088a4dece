"""Baseline: self-distillation (preset `self_kd`: 1 x contrastive + 1 x KD with alpha 0, the teacher's soft
targets only, as the reference's CLIPUpdater with distill_loss kd), ViT-B/32, COCO."""
from jax_refine.configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/self_kd_vitb32_coco"
    c.method.name = "self_kd"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
