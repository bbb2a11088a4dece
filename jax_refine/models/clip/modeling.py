"""CLIP in Flax NNX with the architecture and numerics of Hugging Face's `CLIPModel`, built from the shared
blocks of `jax_refine.models.layers`.

Image tower: patch conv (no bias) -> class token + learned positions -> `pre_layrnorm` -> pre-norm
blocks -> `post_layernorm` on the class token -> `visual_projection` (no bias).
Text tower: token + position embeddings -> causal pre-norm blocks (padding keys masked) ->
`final_layer_norm` -> EOS pooling (HF's two modes) -> `text_projection` (no bias).

Speed and memory options (defaults = HF numerics): `attention` ("xla" | "cudnn" | "xla_padded": cuDNN's fused
attention, GPU only, bf16/fp16, on tokens padded to an even length; "xla_padded" is that padded program with XLA's
attention, for CPU tests), `remat` per block ("none" | "full" | "save_dots") and `scan_layers` (one `lax.scan`
over each tower's blocks). Parameters stay one entry per layer (`vision/layers/0/...`) in every mode, so
checkpoints, HF names and freeze rules do not change.
"""
from __future__ import annotations

import copy
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import CLIPConfig

from jax_refine.models.layers import (Block, LayerNorm, apply_layers, check_options, create, drop_padding,
                                      embed_patches, embed_tokens, pad_for_attention, param)
from jax_refine.preprocess import CLIP_MEAN, CLIP_STD

Array = jax.Array


class CLIP(nnx.Module):
    """HF `CLIPModel` in NNX. `dtype`: compute dtype (default float32); `param_dtype`: storage (float32);
    `attention` ("xla" | "cudnn" | "xla_padded"), `remat` ("none" | "full" | "save_dots"), `scan_layers`: see the
    module doc.

    `config` returns a copy of the `transformers.CLIPConfig`; the module itself only holds its JSON text,
    so `nnx.split` gives a hashable graphdef. The `jax_refine.models.interface.Model` attributes: OpenAI's
    pixel mean/std, shortest-side resize + center crop, texts padded to the longest (pads masked), no
    logit bias.
    """

    family = "clip"
    text_padding = "longest"
    logit_bias = None

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs, attention: str = "xla", remat: str = "none", scan_layers: bool = False):
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"CLIP needs a transformers.CLIPConfig, got {type(config).__name__}")
        check_options(attention, remat, dtype)
        opts = dict(attention=attention, remat=remat, scan_layers=bool(scan_layers))
        self._config_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
        # what the checkpoint was trained with, when not OpenAI's (an open_clip `preprocess_cfg`, e.g. DFN's squash)
        self._preprocess = image_preprocess_of(config)
        self.dtype = dtype
        factor = config.initializer_factor
        tc, vc = config.text_config, config.vision_config
        self.vision = VisionTower(vc, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **opts)
        self.text = TextTower(tc, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **opts)
        self.visual_projection = param(rngs, (vc.hidden_size, config.projection_dim), ("embed", "proj"),
                                       vc.hidden_size**-0.5 * factor, param_dtype)
        self.text_projection = param(rngs, (tc.hidden_size, config.projection_dim), ("embed", "proj"),
                                     tc.hidden_size**-0.5 * factor, param_dtype)
        self.logit_scale = param(None, (), (), None, param_dtype, fill=config.logit_scale_init_value)

    @property
    def config(self):
        """The `transformers.CLIPConfig` this model was built from (a fresh copy)."""
        return copy.deepcopy(_config_from_json(self._config_json))

    @property
    def image_size(self) -> int:
        """Square input side in pixels (`vision_config.image_size`)."""
        return int(self.vision.image_size)

    @property
    def text_length(self) -> int:
        """The longest token sequence (`text_config.max_position_embeddings`, 77 for OpenAI's CLIP)."""
        return int(self.text.position.shape[0])

    @property
    def feature_dim(self) -> int:
        """Width of the projected features (`projection_dim`)."""
        return int(self.visual_projection.shape[1])

    @property
    def pixel_mean(self) -> tuple[float, float, float]:
        """RGB mean in [0, 1] units (OpenAI's unless the config's `image_preprocess` says otherwise)."""
        return self._preprocess[0]

    @property
    def pixel_std(self) -> tuple[float, float, float]:
        return self._preprocess[1]

    @property
    def resize(self) -> str:
        """"crop" (shortest side + center crop, OpenAI's) or "squash" (to (size, size), e.g. DFN5B)."""
        return self._preprocess[2]

    def encode_image(self, pixel_values: Array) -> Array:
        """`pixel_values (B, H, W, 3)` normalized NHWC -> projected, unnormalized features `(B, D)`."""
        pooled = self.vision(pixel_values)
        return pooled @ self.visual_projection[...].astype(self.dtype)

    def encode_text(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """`input_ids (B, L)` int, `attention_mask (B, L)` (1 = token, 0 = pad; None = all) -> `(B, D)`."""
        pooled = self.text(jnp.asarray(input_ids), None if attention_mask is None else jnp.asarray(attention_mask))
        return pooled @ self.text_projection[...].astype(self.dtype)

    def __call__(self, pixel_values: Array, input_ids: Array, attention_mask: Array | None = None
                 ) -> tuple[Array, Array]:
        """-> `(image_features (B, D), text_features (B, D))`."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)


class VisionTower(nnx.Module):
    """ViT: `(B, H, W, C)` normalized pixels -> pooled class token `(B, D_vision)` after `post_layernorm`."""

    def __init__(self, cfg: Any, factor: float, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 attention: str = "xla", remat: str = "none", scan_layers: bool = False):
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        self.remat, self.scan_layers, self.attention = remat, scan_layers, attention
        self.image_size, self.patch_size, self.channels, self.dtype = cfg.image_size, p, c, dtype
        num_pos = (cfg.image_size // p) ** 2 + 1
        std = cfg.initializer_range * factor
        self.patch = param(rngs, (p * p * c, d), ("patch", "embed"), std, param_dtype)
        self.class_embedding = param(rngs, (d,), ("embed",), d**-0.5 * factor, param_dtype)
        self.position = param(rngs, (num_pos, d), ("pos", "embed"), std, param_dtype)
        self.pre_ln = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.layers = nnx.List([Block(cfg, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                      attention=attention) for _ in range(cfg.num_hidden_layers)])
        self.post_ln = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, pixel_values: Array) -> Array:
        x = embed_patches(pixel_values, self.patch[...], self.patch_size, self.image_size, self.dtype)
        b = x.shape[0]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position[...].astype(self.dtype)
        x = self.pre_ln(x)
        length = x.shape[1]
        x, kwargs = pad_for_attention(x, self.attention)
        x = apply_layers(self.layers, x, remat=self.remat, scan=self.scan_layers, **kwargs)
        return self.post_ln(drop_padding(x, length)[:, 0])


class TextTower(nnx.Module):
    """Causal text transformer: `(B, L)` ids -> pooled EOS state `(B, D_text)` after `final_layer_norm`."""

    def __init__(self, cfg: Any, factor: float, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 attention: str = "xla", remat: str = "none", scan_layers: bool = False):
        d = cfg.hidden_size
        self.remat, self.scan_layers, self.attention = remat, scan_layers, attention
        self.eos_token_id, self.dtype = int(cfg.eos_token_id), dtype
        self.token = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), 0.02 * factor, param_dtype)
        self.position = param(rngs, (cfg.max_position_embeddings, d), ("pos", "embed"), 0.02 * factor, param_dtype)
        self.layers = nnx.List([Block(cfg, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                      attention=attention) for _ in range(cfg.num_hidden_layers)])
        self.final_ln = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        x = embed_tokens(self.token[...], self.position[...], input_ids, self.dtype)
        x, kwargs = pad_for_attention(x, self.attention, attention_mask)
        x = apply_layers(self.layers, x, remat=self.remat, scan=self.scan_layers, is_causal=True, **kwargs)
        x = self.final_ln(drop_padding(x, input_ids.shape[1]))
        if self.eos_token_id == 2:  # older CLIP configs say eos_token_id 2, not the real EOS: take the highest id
            pos = jnp.argmax(input_ids, axis=-1)
        else:  # first position of eos_token_id (pad may equal eos)
            pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]


def image_preprocess_of(config: Any) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """`(mean, std, resize)` of a `CLIPConfig`: its `image_preprocess` entry (`{"mean": [3], "std": [3],
    "resize": "crop" | "squash"}`, set when a checkpoint was trained with other settings than OpenAI's and
    saved in its `config.json`), else OpenAI's mean/std and "crop". A bad entry is a one-line ValueError."""
    spec = getattr(config, "image_preprocess", None) or {}
    mean, std = tuple(spec.get("mean", CLIP_MEAN)), tuple(spec.get("std", CLIP_STD))
    resize = spec.get("resize", "crop")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or resize not in ("crop", "squash"):
        raise ValueError(f"config image_preprocess={spec!r}: needs 3 means, 3 positive stds and resize crop|squash")
    return tuple(float(x) for x in mean), tuple(float(x) for x in std), str(resize)


@functools.lru_cache(maxsize=16)
def _config_from_json(text: str):
    return CLIPConfig.from_dict(json.loads(text))


def create_clip(config: Any, *, seed: int = 0, dtype: Any = jnp.float32, **options: Any) -> CLIP:
    """A randomly initialised `CLIP` (HF's init scheme); see `jax_refine.models.layers.create`."""
    return create(CLIP, config, seed=seed, dtype=dtype, **options)
