"""Baseline: logit distillation (preset `logit_distill`: 1 x contrastive + 1 x MSE to the frozen teacher's
logits, as the reference's CLIPUpdater with distill_loss ld), ViT-B/32, COCO."""
from jax_refine.configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/logit_distill_vitb32_coco"
    c.method.name = "logit_distill"
    c.model.name_or_path = "openai/clip-vit-base-patch32"
    return c
