"""OpenCLIP / DFN checkpoints in open_clip's own format, read into our HF-layout `CLIP`.

`config.py`: open_clip model configs -> `transformers.CLIPConfig` (and what cannot be represented);
`params.py`: open_clip tensor names -> HF `CLIPModel` names, and loading. A checkpoint format of the CLIP
family: the models it loads are `CLIP`s (`family` "clip"), saved and tokenized as CLIP.
"""
from __future__ import annotations

from jax_refine.models.clip import modeling as clip_modeling, params as clip_params
from jax_refine.models.interface import Family
from jax_refine.models.openclip import config, params

FAMILY = Family(name="openclip", detect=params.detect, load=params.load_openclip, save=clip_params.save,
                tokenizer=clip_params.tokenizer, config_from=config.clip_config, create=clip_modeling.create_clip)
