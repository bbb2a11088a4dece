"""The map between Hugging Face `CLIPModel` tensor names and our `jax_refine.model.CLIP` parameters.

One regex table, read in both directions: each row maps our parameter path (`/`-joined, e.g.
`vision/layers/3/attn/qkv`) to the HF name(s) that hold it and a layout `kind`. `{x}` in an HF name
marks a fused parameter: our `qkv` / `qkv_bias` hold HF's `q_proj`, `k_proj`, `v_proj` at index 0, 1, 2
of their fused axis. Our LayerNorm `scale` is HF's `weight`.

Layouts (HF torch -> ours): `copy` same array; `linear` `(out, in)` -> `(in, out)`; `qkv` `(H*E, D)` ->
`(D, H, E)`; `qkv_bias` `(H*E,)` -> `(H, E)`; `out` `(D, H*E)` -> `(H, E, D)`; `patch` conv
`(D, C, P, P)` -> `(P*P*C, D)`.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

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
