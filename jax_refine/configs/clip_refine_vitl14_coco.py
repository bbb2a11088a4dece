"""CLIP-Refine on COCO Captions with ViT-L/14 (same hyper-parameters; FSDP recommended: use :gpu8 or :tpu_pod)."""
from jax_refine.configs import default


def get_config(preset: str | None = None):
    c = default.get_config(preset)
    c.workdir = "outputs/clip_refine_vitl14_coco"
    c.method.name = "clip_refine"
    c.model.name_or_path = "openai/clip-vit-large-patch14"
    return c
