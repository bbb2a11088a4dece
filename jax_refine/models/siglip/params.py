"""Hugging Face `SiglipModel` checkpoints in and out of our NNX `SigLIP`.

- `load(directory)`: `config.json` (model_type "siglip") and `model.safetensors` (or a sharded index, or
  `pytorch_model.bin`) through `jax_refine.hf.load_weights`; every tensor goes straight into its sharding.
- `save(model, out_dir)`: `config.json` + `model.safetensors` + `preprocessor_config.json`
  (+ the SentencePiece tokenizer files of `tokenizer_dir`) that `transformers.SiglipModel.from_pretrained`
  opens with no missing or unexpected keys.

The name map is one regex table (ours -> HF, read both ways) that extends CLIP's (`jax_refine.models.clip.params.TABLE`):
embeddings, LayerNorms and encoder layers have HF CLIP's names and layouts; SigLIP adds `reshape`
(HF `(1,)` logit scale/bias and `(1, 1, D)` probe <-> our `()` / `(D,)`; the fused `(3D,)` in-proj bias of
the pooling head <-> `(3, H, E)`) and `in_proj` (torch MultiheadAttention's fused `(3D, D)` weight ->
`(D, 3, H, E)`).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers.utils import logging as hf_logging

from jax_refine import hf
from jax_refine.models.clip import params as clip_params
from jax_refine.models.siglip.modeling import SigLIP

TOKENIZER_FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json")

_HEAD = "vision_model.head"
# SigLIP's own rows first; then CLIP's (first match wins): token and position embeddings, the patch conv,
# final/post LayerNorms and every encoder-layer tensor have the same names and layouts in both families.
TABLE: tuple[tuple[str, str, str], ...] = (
    (r"logit_(scale|bias)", r"logit_\1", "reshape"),
    (r"vision/patch_bias", "vision_model.embeddings.patch_embedding.bias", "copy"),
    (r"text/head", "text_model.head.weight", "linear"),
    (r"text/head_bias", "text_model.head.bias", "copy"),
    (r"vision/head/probe", _HEAD + ".probe", "reshape"),
    (r"vision/head/qkv", _HEAD + ".attention.in_proj_weight", "in_proj"),
    (r"vision/head/qkv_bias", _HEAD + ".attention.in_proj_bias", "reshape"),
    (r"vision/head/out", _HEAD + ".attention.out_proj.weight", "out"),
    (r"vision/head/out_bias", _HEAD + ".attention.out_proj.bias", "copy"),
    (r"vision/head/ln/(scale|bias)", _HEAD + r".layernorm.\1", "copy"),
    (r"vision/head/mlp/(fc[12])", _HEAD + r".mlp.\1.weight", "linear"),
    (r"vision/head/mlp/(fc[12])_bias", _HEAD + r".mlp.\1.bias", "copy"),
    *clip_params.TABLE,
)


# --------------------------------------------------------------------------------------- config
def siglip_config_from(obj: Any):
    """A `transformers.SiglipConfig` from a SiglipConfig, a dict, a `config.json` path or a checkpoint dir.

    One-line ValueError naming the file and the model_type found for anything that is not a SigLIP
    (e.g. a CLIP checkpoint), FileNotFoundError for a missing config.
    """
    from transformers import SiglipConfig

    if isinstance(obj, SiglipConfig):
        return obj
    obj, source = hf.read_config(obj)
    if not isinstance(obj, Mapping):
        raise TypeError(f"cannot make a SiglipConfig from {type(obj).__name__}")
    model_type = obj.get("model_type")
    if model_type != "siglip":
        arch = ", ".join(obj.get("architectures") or []) or "none listed"
        raise ValueError(f"{source}: model_type is {model_type!r} (architectures: {arch}), not 'siglip' "
                         "(transformers.SiglipModel)")
    return SiglipConfig.from_dict(dict(obj))


# ---------------------------------------------------------------------------------------- names
def hf_names_of(path: str) -> tuple[str, list[str]]:
    """Our parameter path -> (layout kind, HF names; three for the fused q/k/v of encoder layers)."""
    for pattern, template, kind in TABLE:
        if re.fullmatch(pattern, path):
            name = re.sub(pattern, template, path).replace(".scale", ".weight")
            return kind, [name.format(x=x) for x in clip_params.FUSED] if "{x}" in name else [name]
    raise KeyError(f"no Hugging Face SigLIP name for parameter {path!r}")


def _reshape_target(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF shape of a `reshape`-kind tensor: `(1,)` logit scale/bias, `(1, 1, D)` probe, `(3D,)` in-proj bias."""
    if name.endswith("probe"):
        return (1, 1, *shape)
    return (max(int(np.prod(shape)), 1),)


def hf_shapes(path: str, shape: tuple[int, ...], channels: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every tensor our parameter `path` of `shape` is made of."""
    kind, names = hf_names_of(path)
    if kind == "patch":  # ours (P*P*C, D) -> HF conv (D, C, P, P)
        size = int(round((shape[0] // channels) ** 0.5))
        yield names[0], (shape[1], channels, size, size)
    elif kind == "reshape":
        yield names[0], _reshape_target(names[0], shape)
    elif kind == "in_proj":  # ours (D, 3, H, E) -> HF (3D, D)
        yield names[0], (3 * shape[2] * shape[3], shape[0])
    else:
        for name in names:
            yield name, clip_params.piece_shape(kind, shape)


def to_ours(kind: str, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor -> our layout of `shape`."""
    if kind == "reshape":
        return t.reshape(shape)
    if kind == "in_proj":
        return t.T.reshape(shape)
    return clip_params.to_ours(kind, t, shape)


def to_hf(kind: str, a: np.ndarray, hf_shape: tuple[int, ...], index: int = 0) -> np.ndarray:
    """Our parameter `a` -> HF piece `index` of `hf_shape`, C-contiguous."""
    if kind == "reshape":
        return np.ascontiguousarray(a).reshape(hf_shape)
    if kind == "in_proj":
        return np.ascontiguousarray(a.reshape(a.shape[0], -1).T)
    return clip_params.to_hf(kind, a, hf_shape, index)


def name_map(channels: int = 3) -> hf.NameMap:
    """The `hf.NameMap` of a `SigLIP` with `channels` image channels."""
    return hf.NameMap(hf_names_of, functools.partial(hf_shapes, channels=channels), to_ours, to_hf,
                      clip_params.piece_index, clip_params.IGNORED)


def detect(directory: Path) -> bool:
    """A Hugging Face `SiglipModel` directory: `config.json` with model_type "siglip"."""
    try:
        return json.loads((Path(directory) / hf.CONFIG).read_text()).get("model_type") == "siglip"
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------------------- loading
def load(directory: str | os.PathLike, dtype: Any = jnp.float32, shardings: Any = None, *,
         param_dtype: Any = jnp.float32, **options: Any) -> SigLIP:
    """A `SigLIP` with the weights of the HF `SiglipModel` checkpoint `directory`.

    `dtype`: compute dtype; `shardings` as in `jax_refine.hf.load_weights`; `options`: `attention`,
    `remat`, `scan_layers` (see `SigLIP`).
    """
    directory = Path(directory)
    config = siglip_config_from(directory)
    reader = hf.open_weights(directory)
    abstract = nnx.eval_shape(lambda: SigLIP(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                             **options))
    return hf.load_weights(abstract, reader, name_map(config.vision_config.num_channels), directory,
                           shardings=shardings)


# ---------------------------------------------------------------------------------------- saving
def hf_state_dict(model: SigLIP) -> dict[str, np.ndarray]:
    """The model's parameters as HF `SiglipModel` tensors {name: numpy} (C-contiguous)."""
    return hf.state_dict(model, name_map(model.config.vision_config.num_channels))


def save(model: SigLIP, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
         overwrite: bool = True) -> Path:
    """`config.json` + `model.safetensors` + `preprocessor_config.json` (+ `spiece.model` and the tokenizer
    configs found in `tokenizer_dir`) in `out_dir`; see `hf.write_checkpoint`. SigLIP has no packaged
    tokenizer: without `tokenizer_dir` no tokenizer files are written."""

    def extras(tmp: Path) -> None:
        size = model.image_size
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            from transformers import SiglipImageProcessor

            processor = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=list(model.pixel_mean),
                                             image_std=list(model.pixel_std))
        finally:
            hf_logging.set_verbosity(verbosity)
        processor.save_pretrained(tmp)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)

    return hf.write_checkpoint(model, out_dir, lambda: hf_state_dict(model), extras, overwrite=overwrite)
