"""open_clip's checkpoint format read into our `CLIP` through the Hugging Face name map (no temporary copy).

An open_clip checkpoint is a directory (or a weights file) with `open_clip_model.safetensors` or
`open_clip_pytorch_model.bin` (a torch state dict: `visual.conv1.weight`,
`visual.transformer.resblocks.N.attn.in_proj_weight`, `token_embedding.weight`, ...) and the model config
`open_clip_config.json` (`jax_refine.models.openclip.config`). `TABLE` maps each open_clip name to the
HF `CLIPModel` name(s) that `jax_refine.models.clip.params` reads; `OpenClipWeights` is a lazy reader that
serves the HF names (fused `in_proj_*` split into q/k/v, `visual.proj` / `text_projection` transposed to
`Linear` layout). `load_openclip` hands that reader and CLIP's name map to `jax_refine.hf.load_weights` (so
shardings, dtypes and key/shape checks are the HF path's own, and each tensor is read once, straight into
its sharding); `jax_refine.models.registry.save` exports the result as an HF `CLIPModel`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_refine import hf
from jax_refine.models.clip import params as clip_params
from jax_refine.models.clip.modeling import CLIP
from jax_refine.models.openclip import config as oc_config
from jax_refine.preprocess import CLIP_MEAN, CLIP_STD

SAFETENSORS = "open_clip_model.safetensors"
TORCH_BIN = "open_clip_pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS, TORCH_BIN)

_BLOCK = r"(visual\.)?transformer\.resblocks\.(\d+)\."
_LAYER = "{tower}.encoder.layers.\\2."
# (open_clip name, HF CLIPModel name template, layout). `{tower}` is vision_model for `visual.` blocks and
# text_model otherwise; `{x}` marks the three HF tensors (q, k, v) one fused open_clip tensor holds.
# Layouts: `copy`; `transpose` (open_clip's `x @ proj` (in, out) -> Linear (out, in)); `split` (rows
# [q; k; v] of `in_proj_weight (3D, D)` / `in_proj_bias (3D,)`); `scalar` (`logit_scale` () or (1,) -> ()).
TABLE: tuple[tuple[str, str, str], ...] = (
    (r"visual\.conv1\.weight", "vision_model.embeddings.patch_embedding.weight", "copy"),
    (r"visual\.class_embedding", "vision_model.embeddings.class_embedding", "copy"),
    (r"visual\.positional_embedding", "vision_model.embeddings.position_embedding.weight", "copy"),
    (r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1", "copy"),
    (r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1", "copy"),
    (r"visual\.proj", "visual_projection.weight", "transpose"),
    (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight", "copy"),
    (r"positional_embedding", "text_model.embeddings.position_embedding.weight", "copy"),
    (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1", "copy"),
    (r"text_projection", "text_projection.weight", "transpose"),
    (r"logit_scale", "logit_scale", "scalar"),
    (_BLOCK + r"ln_([12])\.(weight|bias)", _LAYER + r"layer_norm\3.\4", "copy"),
    (_BLOCK + r"attn\.in_proj_(weight|bias)", _LAYER + r"self_attn.{x}_proj.\3", "split"),
    (_BLOCK + r"attn\.out_proj\.(weight|bias)", _LAYER + r"self_attn.out_proj.\3", "copy"),
    (_BLOCK + r"mlp\.c_fc\.(weight|bias)", _LAYER + r"mlp.fc1.\3", "copy"),
    (_BLOCK + r"mlp\.c_proj\.(weight|bias)", _LAYER + r"mlp.fc2.\3", "copy"),
)
log = logging.getLogger(__name__)


def _canonical(key: str) -> str:
    """open_clip's name without a DDP `module.` prefix or the `text.` prefix of `CustomTextCLIP`."""
    key = key.removeprefix("module.")
    return key.removeprefix("text.")


def hf_names_for(key: str) -> tuple[str, list[str]]:
    """open_clip tensor name -> (layout, HF `CLIPModel` names: three for a fused q/k/v tensor, else one).

    KeyError for a name with no HF counterpart (e.g. `visual.attn_pool.*`, `text.cls_emb`)."""
    name = _canonical(key)
    for pattern, template, kind in TABLE:
        if match := re.fullmatch(pattern, name):
            tower = "vision_model" if match.re.groups and match.group(1) else "text_model"
            hf_name = match.expand(template).replace("{tower}", tower)
            return kind, [hf_name.replace("{x}", x) for x in clip_params.FUSED] if kind == "split" else [hf_name]
    raise KeyError(key)


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of one piece of an open_clip tensor of `shape` with layout `kind`."""
    if kind == "transpose":
        return shape[::-1]
    if kind == "split":
        return (shape[0] // 3, *shape[1:])
    if kind == "scalar":
        return ()
    return shape


def to_hf(kind: str, t: np.ndarray, index: int = 0) -> np.ndarray:
    """One open_clip tensor -> its HF piece `index` (q/k/v for `split`), C-contiguous."""
    if kind == "transpose":
        t = t.T
    elif kind == "split":
        t = np.split(t, 3, axis=0)[index]
    elif kind == "scalar":
        t = t.reshape(())
    return np.asarray(t, order="C")  # (ascontiguousarray would make a scalar 1-d)


def _short(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


class OpenClipWeights:
    """An open_clip state dict served under HF `CLIPModel` names: `shapes {hf_name: shape}`, `get(hf_name)`.

    `reader` is the HF path's lazy reader (`shapes`, `get(key)`) over the open_clip file. Raises ValueError
    naming the open_clip tensors that have no HF counterpart (nothing is dropped silently).
    """

    def __init__(self, reader: Any, source: Path):
        self.reader, self.source = reader, source
        self.pieces: dict[str, tuple[str, str, int]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        unknown, bad = [], []
        for key, shape in reader.shapes.items():
            try:
                kind, names = hf_names_for(key)
            except KeyError:
                unknown.append(key)
                continue
            if (kind == "split" and shape[0] % 3) or (kind == "scalar" and int(np.prod(shape)) != 1):
                bad.append(f"{key} {tuple(shape)}")
            if names[0] in self.pieces:  # e.g. `x` and `module.x` both present
                bad.append(f"{key} (the same tensor as {self.pieces[names[0]][0]})")
            for i, name in enumerate(names):
                self.pieces[name] = (key, kind, i)
                self.shapes[name] = hf_shape(kind, tuple(shape))
        if unknown or bad:
            what = [f"{len(v)} {w}: {_short(v)}" for w, v in (("tensors jax_refine's CLIP has no place for", unknown),
                                                            ("tensors of an unexpected shape or doubled", bad)) if v]
            raise ValueError(f"{source}: not a plain open_clip ViT CLIP checkpoint; " + "; ".join(what))

    def get(self, hf_name: str) -> np.ndarray:
        """The HF tensor `hf_name` (numpy, the checkpoint's dtype)."""
        key, kind, index = self.pieces[hf_name]
        return to_hf(kind, self.reader.get(key), index)


@dataclasses.dataclass(frozen=True)
class OpenClipCheckpoint:
    """An open_clip checkpoint seen as HF: `config` (transformers.CLIPConfig), `weights` (HF names),
    `preprocess_cfg` (open_clip's mean/std/resize settings, `{}` if the config has none), `source` (file)."""

    config: Any
    weights: OpenClipWeights
    preprocess_cfg: dict
    source: Path


def _weights_file(path: Path) -> Path:
    """The weights file of a checkpoint directory (safetensors first) or `path` itself if it is a file."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such open_clip checkpoint file or directory")
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.iterdir())
    hint = ""
    if (path / hf.CONFIG).is_file() and any((path / n).is_file() for n in (hf.SAFETENSORS, hf.SAFETENSORS_INDEX,
                                                                          hf.TORCH_BIN)):
        hint = "; it looks like a Hugging Face CLIPModel checkpoint: load it with jax_refine.models.registry.load"
    raise FileNotFoundError(f"{path}: no open_clip weights ({' or '.join(WEIGHT_FILES)}); found "
                            f"{_short(found) if found else 'an empty directory'}{hint}")


def open_checkpoint(path: str | os.PathLike, *, config: Any = None) -> OpenClipCheckpoint:
    """Read an open_clip checkpoint lazily: a directory with `open_clip_model.safetensors` or
    `open_clip_pytorch_model.bin` (+ `open_clip_config.json`), or one weights file (`.safetensors`, else a
    torch state dict). `config`: the open_clip model config (dict or JSON path) when the checkpoint has
    none beside it. Errors (one line): unknown weights, unsupported config options (`UnsupportedConfig`),
    tensors without an HF counterpart.
    """
    path = Path(path).expanduser()
    weights_file = _weights_file(path)
    if config is None:
        config = weights_file.parent / oc_config.OPEN_CLIP_CONFIG
        if not config.is_file():
            raise FileNotFoundError(f"{weights_file.parent}: no {oc_config.OPEN_CLIP_CONFIG} beside "
                                    f"{weights_file.name}; pass the open_clip model config (config=)")
    _, preprocess_cfg, _ = oc_config.read_open_clip_config(config)
    clip_config = oc_config.clip_config(config)
    if weights_file.suffix == ".safetensors":
        reader = hf.SafetensorsReader([weights_file])
    else:
        reader = hf.TorchBinReader(weights_file)
    if differences := preprocess_differences(preprocess_cfg):
        clip_config.image_preprocess = image_preprocess(preprocess_cfg)  # the model's mean/std/resize, saved too
        unsupported = [d for d in differences if not d.startswith(("mean=", "std=", "resize_mode='squash'"))]
        if unsupported:
            log.warning("%s: trained with preprocess_cfg %s; jax_refine's image pipeline has bicubic resizing "
                        "of the shortest side + center crop or a squash only", weights_file, ", ".join(unsupported))
    return OpenClipCheckpoint(clip_config, OpenClipWeights(reader, weights_file), preprocess_cfg, weights_file)


def preprocess_differences(preprocess_cfg: dict) -> list[str]:
    """The settings of open_clip's `preprocess_cfg` that differ from the image pipeline jax_refine uses
    (`jax_refine.preprocess`: CLIP mean/std, bicubic resize of the shortest side, center crop), as
    `key=value` strings; `[]` when the checkpoint was trained with ours (or says nothing)."""
    out = []
    for key, ours in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
        theirs = preprocess_cfg.get(key)
        if theirs is not None and not np.allclose(np.asarray(theirs, np.float64), np.asarray(ours), atol=1e-6):
            out.append(f"{key}={list(theirs)}")
    for key, ours in (("interpolation", "bicubic"), ("resize_mode", "shortest")):
        if preprocess_cfg.get(key, ours) != ours:
            out.append(f"{key}={preprocess_cfg[key]!r}")
    return out


def image_preprocess(preprocess_cfg: dict) -> dict:
    """Our `CLIPConfig.image_preprocess` (`{"mean", "std", "resize"}`, see `models.clip.modeling`) from open_clip's
    `preprocess_cfg`: its mean/std (OpenAI's when absent), `resize_mode` "squash" -> "squash", otherwise "crop"."""
    return {"mean": [float(x) for x in preprocess_cfg.get("mean", CLIP_MEAN)],
            "std": [float(x) for x in preprocess_cfg.get("std", CLIP_STD)],
            "resize": "squash" if preprocess_cfg.get("resize_mode") == "squash" else "crop"}


def detect(directory: Path) -> bool:
    """A directory in open_clip's format: `open_clip_config.json` or an `open_clip_*` weights file."""
    return any((Path(directory) / name).is_file() for name in (oc_config.OPEN_CLIP_CONFIG, *WEIGHT_FILES))


def load_openclip(path: str | os.PathLike, dtype: Any = jnp.float32, shardings: Any = None, *, config: Any = None,
                  param_dtype: Any = jnp.float32, **options: Any) -> CLIP:
    """A `jax_refine.models.clip.modeling.CLIP` with the weights of the open_clip checkpoint at `path` (see
    `open_checkpoint`). `dtype`, `shardings`, `param_dtype`, `options` (`attention`, `remat`, `scan_layers`):
    as `jax_refine.models.clip.params.load`. Missing or mis-shaped tensors are named against the user's file.
    """
    checkpoint = open_checkpoint(path, config=config)
    clip_config = checkpoint.config
    abstract = nnx.eval_shape(lambda: CLIP(clip_config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                           **options))
    names = clip_params.name_map(clip_config.vision_config.num_channels)
    return hf.load_weights(abstract, checkpoint.weights, names, f"{checkpoint.source} (read as HF names)",
                           shardings=shardings)
