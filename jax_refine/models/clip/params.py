"""Hugging Face `CLIPModel` checkpoints in and out of our NNX `CLIP`: the name map, config, load and save.

- `load(directory)`: `config.json` (model_type "clip") + `model.safetensors` (or a sharded index, or
  `pytorch_model.bin`) through `jax_refine.hf.load_weights`.
- `save(model, out_dir)`: `config.json` + `model.safetensors` + `preprocessor_config.json` +
  `vocab.json`/`merges.txt` that `transformers.CLIPModel.from_pretrained(out_dir)` opens with no missing or
  unexpected keys.

The name map:
One regex table, read in both directions: each row maps our parameter path (`/`-joined, e.g.
`vision/layers/3/attn/qkv`) to the HF name(s) that hold it and a layout `kind`. `{x}` in an HF name
marks a fused parameter: our `qkv` / `qkv_bias` hold HF's `q_proj`, `k_proj`, `v_proj` at index 0, 1, 2
of their fused axis. Our LayerNorm `scale` is HF's `weight`.

Layouts (HF torch -> ours): `copy` same array; `linear` `(out, in)` -> `(in, out)`; `qkv` `(H*E, D)` ->
`(D, H, E)`; `qkv_bias` `(H*E,)` -> `(H, E)`; `out` `(D, H*E)` -> `(H, E, D)`; `patch` conv
`(D, C, P, P)` -> `(P*P*C, D)`.
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
from transformers import CLIPConfig
from transformers.utils import logging as hf_logging

from jax_refine import hf, preprocess
from jax_refine.models.clip.modeling import CLIP

_L = r"(text|vision)/layers/(\d+)"
_HL = r"\1_model.encoder.layers.\2"
TABLE: tuple[tuple[str, str, str], ...] = (
    (r"logit_scale", "logit_scale", "copy"),
    (r"(text_projection|visual_projection)", r"\1.weight", "linear"),
    (r"text/token", "text_model.embeddings.token_embedding.weight", "copy"),
    (r"(text|vision)/position", r"\1_model.embeddings.position_embedding.weight", "copy"),
    (r"vision/class_embedding", "vision_model.embeddings.class_embedding", "copy"),
    (r"vision/patch", "vision_model.embeddings.patch_embedding.weight", "patch"),
    (r"text/final_ln/(scale|bias)", r"text_model.final_layer_norm.\1", "copy"),
    (r"vision/pre_ln/(scale|bias)", r"vision_model.pre_layrnorm.\1", "copy"),
    (r"vision/post_ln/(scale|bias)", r"vision_model.post_layernorm.\1", "copy"),
    (_L + r"/ln([12])/(scale|bias)", _HL + r".layer_norm\3.\4", "copy"),
    (_L + r"/attn/qkv", _HL + r".self_attn.{x}_proj.weight", "qkv"),
    (_L + r"/attn/qkv_bias", _HL + r".self_attn.{x}_proj.bias", "qkv_bias"),
    (_L + r"/attn/out", _HL + r".self_attn.out_proj.weight", "out"),
    (_L + r"/attn/out_bias", _HL + r".self_attn.out_proj.bias", "copy"),
    (_L + r"/mlp/(fc[12])", _HL + r".mlp.\3.weight", "linear"),
    (_L + r"/mlp/(fc[12])_bias", _HL + r".mlp.\3.bias", "copy"),
)
FUSED = ("q", "k", "v")
# Buffers older checkpoints saved (transformers < 4.31); never parameters, ignored on load.
IGNORED = re.compile(r"(text|vision)_model\.embeddings\.position_ids")


def hf_names(path: str) -> tuple[str, list[str]]:
    """Our parameter path -> (layout kind, HF names; three for fused q/k/v parameters, else one)."""
    for pattern, template, kind in TABLE:
        if re.fullmatch(pattern, path):
            name = re.sub(pattern, template, path).replace(".scale", ".weight")
            return kind, [name.format(x=x) for x in FUSED] if "{x}" in name else [name]
    raise KeyError(f"no Hugging Face name for parameter {path!r}")


def piece_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one HF piece of our parameter of `shape` (for fused kinds, one of q/k/v)."""
    if kind in ("qkv", "qkv_bias"):
        shape = shape[:1] + shape[2:] if kind == "qkv" else shape[1:]
    if kind == "copy":
        return shape
    if kind == "linear":
        return shape[::-1]
    if kind == "qkv":  # (D, H, E)
        return (shape[1] * shape[2], shape[0])
    if kind == "qkv_bias":  # (H, E)
        return (shape[0] * shape[1],)
    if kind == "out":  # (H, E, D)
        return (shape[2], shape[0] * shape[1])
    raise ValueError(f"unknown layout kind {kind!r}")


def hf_shapes(path: str, shape: tuple[int, ...], channels: int = 3) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every tensor our parameter `path` of `shape` is made of."""
    kind, names = hf_names(path)
    if kind == "patch":
        size = int(round((shape[0] // channels) ** 0.5))
        yield names[0], (shape[1], channels, size, size)
        return
    for name in names:
        yield name, piece_shape(kind, shape)


def to_ours(kind: str, t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor -> our layout; `shape` is our parameter's full shape."""
    if kind == "copy":
        return t
    if kind == "linear":
        return t.T
    if kind == "qkv":
        return t.T.reshape(shape[0], shape[2], shape[3])
    if kind == "qkv_bias":
        return t.reshape(shape[1:])
    if kind == "out":
        return t.T.reshape(shape)
    if kind == "patch":  # (D, C, P, P) -> (P, P, C, D) -> (P*P*C, D)
        return t.transpose(2, 3, 1, 0).reshape(shape)
    raise ValueError(f"unknown layout kind {kind!r}")


def to_hf(kind: str, a: np.ndarray, hf_shape: tuple[int, ...], index: int = 0) -> np.ndarray:
    """Our parameter `a` -> HF piece `index` (q/k/v for fused kinds) of `hf_shape`, C-contiguous."""
    if kind == "copy":
        out = a
    elif kind == "linear":
        out = a.T
    elif kind == "qkv":
        out = a[:, index].reshape(a.shape[0], -1).T
    elif kind == "qkv_bias":
        out = a[index].reshape(-1)
    elif kind == "out":
        out = a.reshape(-1, a.shape[-1]).T
    elif kind == "patch":
        d, c, p, _ = hf_shape
        out = a.reshape(p, p, c, d).transpose(3, 2, 0, 1)
    else:
        raise ValueError(f"unknown layout kind {kind!r}")
    return np.ascontiguousarray(out).reshape(hf_shape)


def piece_index(kind: str, index: int) -> tuple:
    """Where HF piece `index` sits inside our fused parameter (`()` = the whole parameter)."""
    if kind == "qkv":
        return (slice(None), index)
    if kind == "qkv_bias":
        return (index,)
    return ()


def name_map(channels: int = 3) -> hf.NameMap:
    """The `hf.NameMap` of a `CLIP` with `channels` image channels."""
    return hf.NameMap(hf_names, functools.partial(hf_shapes, channels=channels), to_ours, to_hf, piece_index, IGNORED)


# --------------------------------------------------------------------------------------- config
def config_from(obj: Any) -> CLIPConfig:
    """A `transformers.CLIPConfig` from a CLIPConfig, a dict, a `config.json` path or a checkpoint dir.

    Raises ValueError for a non-CLIP config (e.g. model_type 'siglip' or 'bert') and FileNotFoundError
    for a missing file.
    """
    if isinstance(obj, CLIPConfig):
        return obj
    obj, source = hf.read_config(obj)
    if not isinstance(obj, Mapping):
        raise TypeError(f"cannot make a CLIPConfig from {type(obj).__name__}")
    model_type = obj.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(f"{source}: model_type is {model_type!r}, not 'clip' (transformers.CLIPModel)")
    return CLIPConfig.from_dict(dict(obj))


def detect(directory: Path) -> bool:
    """A Hugging Face `CLIPModel` directory: `config.json` with model_type "clip"."""
    return _model_type(directory) == "clip"


def _model_type(directory: Path) -> str | None:
    try:
        return json.loads((Path(directory) / hf.CONFIG).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------------------- loading
def load(directory: str | os.PathLike, dtype: Any = jnp.float32, shardings: Any = None, *,
         param_dtype: Any = jnp.float32, **options: Any) -> CLIP:
    """A `CLIP` with the weights of the HF checkpoint `directory`. `dtype`: compute dtype; `shardings` as in
    `jax_refine.hf.load_weights`; `options`: `attention`, `remat`, `scan_layers` (see `CLIP`)."""
    directory = Path(directory)
    config = config_from(directory)
    reader = hf.open_weights(directory)
    abstract = nnx.eval_shape(lambda: CLIP(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                           **options))
    return hf.load_weights(abstract, reader, name_map(config.vision_config.num_channels), directory,
                           shardings=shardings)


# ---------------------------------------------------------------------------------------- saving
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def hf_state_dict(model: CLIP) -> dict[str, np.ndarray]:
    """The model's parameters as HF `CLIPModel` tensors {name: numpy} (C-contiguous)."""
    return hf.state_dict(model, name_map(model.config.vision_config.num_channels))


def tokenizer(directory: str | os.PathLike | None = None) -> Any:
    """CLIP's BPE tokenizer (`transformers.CLIPTokenizer`) of a checkpoint directory, else the packaged one."""
    return preprocess.get_tokenizer(directory)


def save(model: CLIP, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
         overwrite: bool = True) -> Path:
    """`config.json` + `model.safetensors` + `preprocessor_config.json` + `vocab.json`/`merges.txt` (from
    `tokenizer_dir` when it holds both, else the packaged ones) in `out_dir`; see `hf.write_checkpoint`."""
    given = tokenizer_dir is not None and all((Path(tokenizer_dir) / f).is_file() for f in TOKENIZER_FILES)
    source = Path(tokenizer_dir) if given else preprocess.TOKENIZER_DIR

    def extras(tmp: Path) -> None:
        size = int(model.image_size)  # resize-shortest-edge + center crop at this size, or squash to it
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # not its "torchvision not installed, using the PIL backend" warning
        try:  # imported here, under the raised verbosity: looking the class up is what warns
            from transformers import CLIPImageProcessor

            mean, std = list(model.pixel_mean), list(model.pixel_std)
            if model.resize == "squash":
                processor = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                               image_mean=mean, image_std=std)
            else:
                processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                               image_mean=mean, image_std=std)
        finally:
            hf_logging.set_verbosity(verbosity)
        processor.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)

    return hf.write_checkpoint(model, out_dir, lambda: hf_state_dict(model), extras, overwrite=overwrite)
