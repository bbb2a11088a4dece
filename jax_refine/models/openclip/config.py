"""open_clip model configs -> `transformers.CLIPConfig` for our HF-layout `CLIP`.

open_clip describes a model as `{"embed_dim", "quick_gelu"?, "vision_cfg": {...}, "text_cfg": {...}}`
(its packaged `model_configs/*.json`); the hub ships it inside `open_clip_config.json` as `"model_cfg"`,
next to `"preprocess_cfg"` (mean/std, resize mode). Our `CLIP` is HF `CLIPModel`'s architecture: a plain
pre-norm ViT with a class token, `ln_pre`, class-token pooling and a bias-free projection; a causal text
transformer pooled at the EOS token (argmax of the ids, or the first `eos_id`). Every config option
outside that is refused with a one-line `UnsupportedConfig` naming the key and value.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from jax_refine import hf

OPEN_CLIP_CONFIG = "open_clip_config.json"
# HF's default `logit_scale_init_value` (log(1/0.07)), also open_clip's `init_logit_scale` default.
DEFAULT_LOGIT_SCALE = math.log(1 / 0.07)

# The OpenCLIP / DFN models the reference refines: open_clip's model config (as in its packaged
# model_configs/<name>.json) and the hub repository of the weights. The LAION ones are also published in
# HF CLIPModel format (config.json + model.safetensors, loadable by jax_refine.models.registry.load); DFN5B
# only in open_clip's format.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "ViT-H-14": {
        "hub_id": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "model_cfg": {"embed_dim": 1024,
                      "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                                     "patch_size": 14},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                                   "layers": 24}},
    },
    "ViT-bigG-14": {
        "hub_id": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
        "model_cfg": {"embed_dim": 1280,
                      "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664, "head_width": 104,
                                     "mlp_ratio": 4.9231, "patch_size": 14},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20,
                                   "layers": 32}},
    },
    "ViT-H-14-378-quickgelu": {
        "hub_id": "apple/DFN5B-CLIP-ViT-H-14-378",
        "model_cfg": {"embed_dim": 1024, "quick_gelu": True,
                      "vision_cfg": {"image_size": 378, "layers": 32, "width": 1280, "head_width": 80,
                                     "patch_size": 14},
                      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                                   "layers": 24}},
    },
}

# Keys whose value must be this default (anything else changes the architecture or the text input).
_MUST_BE = {
    "model_cfg": {"init_logit_bias": None, "multimodal_cfg": None},
    "vision_cfg": {
        "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
        "pool_type": "tok", "act_kwargs": None, "block_type": (None, "default"), "qk_norm": False,
        "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
        "scale_fc": False, "timm_model_name": None,
    },
    "text_cfg": {
        "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_mode": None, "tokenizer_kwargs": None,
        "ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "proj_bias": False,
        "proj_type": "linear", "pool_type": ("argmax", "eos"), "act_kwargs": None,
        "block_type": (None, "default"), "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
        "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    },
}
# Keys read into the CLIPConfig, or that do not change the features: patch_dropout is a training-time
# regularizer (identity at inference; our trainer does not apply it), `final_ln_after_pool` is the same
# per-token LayerNorm before or after picking one token, the pooler/timm/hf sub-options only matter when
# their feature (refused above) is on, `pad_id`/`use_pad_mask` only with `no_causal_mask`.
_USED = {
    "model_cfg": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "custom_text",
                  "cast_dtype", "output_dict", "nonscalar_logit_scale"},
    "vision_cfg": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "norm_kwargs",
                   "patch_dropout", "output_tokens", "final_ln_after_pool", "attn_pooler_queries",
                   "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias",
                   "timm_drop", "timm_drop_path"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "norm_kwargs",
                 "eos_id", "pad_id", "use_pad_mask", "correct_cls_mask", "output_tokens", "final_ln_after_pool",
                 "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"},
}


class UnsupportedConfig(ValueError):
    """An open_clip model config our HF-layout CLIP cannot represent; the message names the key."""


def read_open_clip_config(source: Any) -> tuple[dict, dict, str]:
    """`(model_cfg, preprocess_cfg, where)` from a dict, a JSON file or a directory holding
    `open_clip_config.json`. Accepts the hub layout (`{"model_cfg": ..., "preprocess_cfg": ...}`) and a bare
    model config (`{"embed_dim", "vision_cfg", "text_cfg"}`); `where` names the source in errors.
    """
    source, where = hf.read_config(source, OPEN_CLIP_CONFIG, "open_clip config")
    if not isinstance(source, Mapping):
        raise TypeError(f"cannot read an open_clip config from {type(source).__name__}")
    model_cfg = source.get("model_cfg", source)
    if not isinstance(model_cfg, Mapping) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        keys = ", ".join(sorted(model_cfg)) if isinstance(model_cfg, Mapping) else type(model_cfg).__name__
        raise ValueError(f"{where}: not an open_clip model config (needs embed_dim, vision_cfg and text_cfg; "
                         f"found {keys or 'nothing'})")
    return dict(model_cfg), dict(source.get("preprocess_cfg") or {}), where


def _check_section(cfg: Mapping, section: str, where: str) -> None:
    for key, value in cfg.items():
        allowed = _MUST_BE[section].get(key, ...)
        name = section if section == "model_cfg" else f"model_cfg.{section}"
        if allowed is not ...:
            if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
                raise UnsupportedConfig(f"{where}: {name}.{key}={value!r} is not supported by jax_refine's CLIP "
                                        f"(HF CLIPModel layout; supported: {allowed!r})")
        elif key not in _USED[section]:
            raise UnsupportedConfig(f"{where}: {name}.{key}={value!r} is an open_clip option jax_refine does not "
                                    "know; refusing rather than ignoring it")


def _square(value: Any, key: str, where: str) -> int:
    """An int from open_clip's int-or-pair sizes; non-square pairs are refused."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UnsupportedConfig(f"{where}: model_cfg.vision_cfg.{key}={list(value)!r} is not square")
        value = value[0]
    return int(value)


def _layer_norm_eps(cfg: Mapping, section: str, where: str) -> float:
    kwargs = dict(cfg.get("norm_kwargs") or {})
    eps = kwargs.pop("eps", 1e-5)  # torch.nn.LayerNorm's default, as open_clip uses it
    if kwargs:
        raise UnsupportedConfig(f"{where}: model_cfg.{section}.norm_kwargs={cfg['norm_kwargs']!r} is not "
                                "supported (only eps)")
    return float(eps)


def clip_config(source: Any):
    """A `transformers.CLIPConfig` equal in architecture to the open_clip model config `source` (anything
    `read_open_clip_config` takes). Raises `UnsupportedConfig` naming the first option our CLIP cannot
    represent (attentional pooler, no class token / average pool, layer scale, no ln_pre, hf text tower or
    tokenizer, no causal mask, text projection bias, ...).

    Heads: vision `width // head_width`, text `heads`; MLP `int(width * mlp_ratio)` (open_clip's rounding);
    `quick_gelu` -> `hidden_act="quick_gelu"`, else exact `gelu`. Text pooling `argmax` -> HF's legacy
    `eos_token_id=2` (argmax of the ids); `eos` -> `eos_token_id=eos_id` (its first position).
    """
    from transformers import CLIPConfig

    model_cfg, _, where = read_open_clip_config(source)
    vision, text = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    _check_section(model_cfg, "model_cfg", where)
    _check_section(vision, "vision_cfg", where)
    _check_section(text, "text_cfg", where)
    if isinstance(vision.get("layers", 12), (list, tuple)):
        raise UnsupportedConfig(f"{where}: model_cfg.vision_cfg.layers={vision['layers']!r} is a ModifiedResNet "
                                "image tower; jax_refine's CLIP is a ViT")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    v_width, head_width = int(vision.get("width", 768)), int(vision.get("head_width", 64))
    if v_width % head_width:
        raise UnsupportedConfig(f"{where}: model_cfg.vision_cfg.width={v_width} is not a multiple of "
                                f"head_width={head_width}")
    t_width = int(text.get("width", 512))
    pool, eos_id = text.get("pool_type", "argmax"), int(text.get("eos_id", 2))
    if pool == "eos" and eos_id == 2:
        raise UnsupportedConfig(f"{where}: model_cfg.text_cfg.eos_id=2 with pool_type='eos' cannot be told "
                                "apart from HF's legacy argmax pooling (eos_token_id=2)")
    embed_dim = int(model_cfg["embed_dim"])
    vision_config = dict(
        hidden_size=v_width, intermediate_size=int(v_width * float(vision.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(vision.get("layers", 12)), num_attention_heads=v_width // head_width,
        image_size=_square(vision.get("image_size", 224), "image_size", where),
        patch_size=_square(vision.get("patch_size", 16), "patch_size", where), num_channels=3,
        hidden_act=act, layer_norm_eps=_layer_norm_eps(vision, "vision_cfg", where), projection_dim=embed_dim)
    text_config = dict(
        vocab_size=int(text.get("vocab_size", 49408)), hidden_size=t_width,
        intermediate_size=int(t_width * float(text.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(text.get("layers", 12)), num_attention_heads=int(text.get("heads", 8)),
        max_position_embeddings=int(text.get("context_length", 77)), hidden_act=act,
        layer_norm_eps=_layer_norm_eps(text, "text_cfg", where), projection_dim=embed_dim,
        bos_token_id=49406 if pool == "eos" else 0, pad_token_id=int(text.get("pad_id", 0)),
        eos_token_id=eos_id if pool == "eos" else 2)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim,
                      logit_scale_init_value=float(model_cfg.get("init_logit_scale", DEFAULT_LOGIT_SCALE)))


def known_model_config(name: str) -> dict:
    """The open_clip model config of a model in `KNOWN_MODELS` (a copy); KeyError names the known ones."""
    if name not in KNOWN_MODELS:
        raise KeyError(f"unknown open_clip model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return json.loads(json.dumps(KNOWN_MODELS[name]["model_cfg"]))
