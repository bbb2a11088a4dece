"""CLIP (OpenAI's and Hugging Face `CLIPModel` checkpoints): `modeling.CLIP` (the NNX module, from the shared
blocks of `jax_refine.models.layers`) and `params` (the HF name map, load and save)."""
from __future__ import annotations

from jax_refine.models.clip import modeling, params
from jax_refine.models.interface import Family

FAMILY = Family(name="clip", detect=params.detect, load=params.load, save=params.save,
                tokenizer=params.tokenizer, config_from=params.config_from, create=modeling.create_clip)
