"""SigLIP (Zhai et al. 2023) in Flax NNX with the numerics of transformers' `SiglipModel`.

`modeling.SigLIP` (the module), `params.load` / `save` (HF checkpoints), `tokenizer.get_tokenizer` /
`tokenize` (SigLIP's SentencePiece tokenizer, max-length padding), `image.preprocess_image`
(SiglipImageProcessor: squash-resize, [-1, 1]).
"""
from __future__ import annotations

from jax_refine.models.interface import Family
from jax_refine.models.siglip import modeling, params, tokenizer

FAMILY = Family(name="siglip", detect=params.detect, load=params.load, save=params.save,
                tokenizer=tokenizer.get_tokenizer, config_from=params.siglip_config_from,
                create=modeling.create_siglip)
