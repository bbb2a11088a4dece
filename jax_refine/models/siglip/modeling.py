"""SigLIP in Flax NNX with the architecture and numerics of transformers' `SiglipModel`.

Image tower: patch conv (with bias) -> learned positions (no class token) -> pre-norm blocks ->
`post_layernorm` -> attention-pooling head (MAP: a learned probe attends over the patches, then
LayerNorm + MLP with a residual) -> `(B, D_vision)`; there is no separate projection.
Text tower: token + position embeddings -> pre-norm blocks without a causal mask (padding keys masked
when an attention mask is given) -> `final_layer_norm` -> the LAST position's state (SigLIP pads every
text to the model's length, so this is a pad token) -> `head` linear (with bias) -> `(B, D)`.
`logit_scale` (log scale) and `logit_bias` are scalars: logits = exp(logit_scale) <x, y> + logit_bias on
L2-normalized features.

The blocks, LayerNorm (float32), attention, activations, parameter layouts and logical axis names and the
speed/memory options (`attention`, `remat`, `scan_layers`) are the shared ones of `jax_refine.models.layers`, as in
our CLIP. The padded attention modes pad both towers
(SigLIP's 729 patches -> 730) and drop the rows before the pooling head; the head always uses XLA attention
(one query; cuDNN buys nothing there) over the real patches only.

Random init (`SigLIP(config, rngs=...)`) draws CLIP's init scheme (as our CLIP does), not
SigLIP's lecun/xavier one: it is for tests and shapes; real use loads a checkpoint (`params.py`).
"""
from __future__ import annotations

import copy
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_refine.models.layers import (MLP, Block, LayerNorm, apply_layers, check_options, create, drop_padding,
                                      embed_patches, embed_tokens, pad_for_attention, param)

Array = jax.Array
PIXEL_MEAN = (0.5, 0.5, 0.5)  # SigLIP normalizes pixels in [0, 1] to [-1, 1]
PIXEL_STD = (0.5, 0.5, 0.5)


class SigLIP(nnx.Module):
    """HF `SiglipModel` in NNX. `dtype`: compute dtype (default float32); `param_dtype`: storage (float32);
    `attention` ("xla" | "cudnn" | "xla_padded"), `remat` ("none" | "full" | "save_dots"), `scan_layers`: as in
    `jax_refine.models.clip.modeling.CLIP`. `config` returns a copy of the `transformers.SiglipConfig`.
    The `jax_refine.models.interface.Model` attributes: pixels normalized to [-1, 1], squash resize, every
    text padded to `text_length` (64) and attended to, a learned logit bias.
    """

    family = "siglip"
    resize = "squash"
    text_padding = "max_length"

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs, attention: str = "xla", remat: str = "none", scan_layers: bool = False):
        from transformers import SiglipConfig

        if not isinstance(config, SiglipConfig):
            raise TypeError(f"SigLIP needs a transformers.SiglipConfig, got {type(config).__name__}")
        check_options(attention, remat, dtype)
        text_dim, image_dim = config.text_config.projection_size, config.vision_config.hidden_size
        if text_dim != image_dim:
            raise ValueError(f"text_config.projection_size={text_dim} != vision_config.hidden_size={image_dim}: "
                             "SigLIP compares text and image features of one width")
        opts = dict(attention=attention, remat=remat, scan_layers=bool(scan_layers))
        self._config_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
        self.dtype = dtype
        factor = config.initializer_factor
        self.vision = VisionTower(config.vision_config, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                  **opts)
        self.text = TextTower(config.text_config, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **opts)
        self.logit_scale = param(None, (), (), None, param_dtype, fill=0.0)
        self.logit_bias = param(None, (), (), None, param_dtype, fill=0.0)

    @property
    def config(self):
        """The `transformers.SiglipConfig` this model was built from (a fresh copy)."""
        return copy.deepcopy(_config_from_json(self._config_json))

    @property
    def image_size(self) -> int:
        """Square input side in pixels (`vision_config.image_size`)."""
        return self.vision.image_size

    @property
    def text_length(self) -> int:
        """Token length every text is padded to (`text_config.max_position_embeddings`, 64 for SigLIP)."""
        return int(self.text.position.shape[0])

    @property
    def feature_dim(self) -> int:
        """Width of both towers' features (`vision_config.hidden_size` = `text_config.projection_size`)."""
        return int(self.text.head.shape[1])

    @property
    def pixel_mean(self) -> tuple[float, float, float]:
        return PIXEL_MEAN

    @property
    def pixel_std(self) -> tuple[float, float, float]:
        return PIXEL_STD

    def encode_image(self, pixel_values: Array) -> Array:
        """`pixel_values (B, H, W, 3)` normalized NHWC -> pooled, unnormalized features `(B, D)`."""
        return self.vision(pixel_values)

    def encode_text(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """`input_ids (B, L)` int, `attention_mask (B, L)` (1 = token, 0 = pad; None = attend to all, as SigLIP
        is trained and as HF runs it without a mask) -> `(B, D)`."""
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        return self.text(jnp.asarray(input_ids), mask)

    def __call__(self, pixel_values: Array, input_ids: Array, attention_mask: Array | None = None
                 ) -> tuple[Array, Array]:
        """-> `(image_features (B, D), text_features (B, D))`, unnormalized."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)


class VisionTower(nnx.Module):
    """`(B, H, W, C)` normalized pixels -> attention-pooled features `(B, D_vision)`."""

    def __init__(self, cfg: Any, factor: float, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 attention: str = "xla", remat: str = "none", scan_layers: bool = False):
        if not getattr(cfg, "vision_use_head", True):
            raise ValueError("vision_config.vision_use_head=False: SiglipModel's image features need the "
                             "attention-pooling head")
        d, c = cfg.hidden_size, cfg.num_channels
        p = square_image_size(cfg.patch_size, "vision_config.patch_size")
        self.image_size, self.patch_size, self.channels, self.dtype = square_image_size(cfg.image_size), p, c, dtype
        self.remat, self.scan_layers, self.attention = remat, scan_layers, attention
        std = cfg.hidden_size**-0.5 * factor
        self.patch = param(rngs, (p * p * c, d), ("patch", "embed"), std, param_dtype)
        self.patch_bias = param(None, (d,), ("embed",), None, param_dtype)
        self.position = param(rngs, (num_patches(self.image_size, p), d), ("pos", "embed"), std, param_dtype)
        self.layers = nnx.List([Block(cfg, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                      attention=attention) for _ in range(cfg.num_hidden_layers)])
        self.post_ln = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.head = PoolingHead(cfg, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: Array) -> Array:
        x = embed_patches(pixel_values, self.patch[...], self.patch_size, self.image_size, self.dtype)
        x = x + self.patch_bias[...].astype(self.dtype)
        x = x + self.position[...].astype(self.dtype)
        length = x.shape[1]
        x, kwargs = pad_for_attention(x, self.attention)
        x = apply_layers(self.layers, x, remat=self.remat, scan=self.scan_layers, **kwargs)
        return self.head(self.post_ln(drop_padding(x, length)))


class TextTower(nnx.Module):
    """Bidirectional text transformer: `(B, L)` ids -> `head(final_ln(x)[:, -1])` `(B, D)`."""

    def __init__(self, cfg: Any, factor: float, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 attention: str = "xla", remat: str = "none", scan_layers: bool = False):
        d = cfg.hidden_size
        self.remat, self.scan_layers, self.attention, self.dtype = remat, scan_layers, attention, dtype
        self.token = param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), 0.02 * factor, param_dtype)
        self.position = param(rngs, (cfg.max_position_embeddings, d), ("pos", "embed"), 0.02 * factor, param_dtype)
        self.layers = nnx.List([Block(cfg, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                      attention=attention) for _ in range(cfg.num_hidden_layers)])
        self.final_ln = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.head = param(rngs, (d, cfg.projection_size), ("embed", "proj"), d**-0.5 * factor, param_dtype)
        self.head_bias = param(None, (cfg.projection_size,), ("proj",), None, param_dtype)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        x = embed_tokens(self.token[...], self.position[...], input_ids, self.dtype)
        x, kwargs = pad_for_attention(x, self.attention, attention_mask)
        x = apply_layers(self.layers, x, remat=self.remat, scan=self.scan_layers, is_causal=False, **kwargs)
        pooled = self.final_ln(drop_padding(x, input_ids.shape[1]))[:, -1]
        return pooled @ self.head[...].astype(self.dtype) + self.head_bias[...].astype(self.dtype)


class PoolingHead(nnx.Module):
    """Multihead attention pooling (HF `SiglipMultiheadAttentionPoolingHead`, torch `nn.MultiheadAttention`).

    `h = MHA(probe, x, x)`; `h + mlp(layernorm(h))`; `(B, T, D) -> (B, D)`.
    """

    def __init__(self, cfg: Any, factor: float, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, heads = cfg.hidden_size, cfg.num_attention_heads
        if d % heads:
            raise ValueError(f"hidden_size={d} is not divisible by num_attention_heads={heads}")
        self.heads, self.head_dim, self.dtype = heads, d // heads, dtype
        std = d**-0.5 * factor
        self.probe = param(rngs, (d,), ("embed",), std, param_dtype)
        self.qkv = param(rngs, (d, 3, heads, self.head_dim), ("embed", None, "heads", None), std, param_dtype)
        self.qkv_bias = param(None, (3, heads, self.head_dim), (None, "heads", None), None, param_dtype)
        self.out = param(rngs, (heads, self.head_dim, d), ("heads", None, "embed"), std, param_dtype)
        self.out_bias = param(None, (d,), ("embed",), None, param_dtype)
        self.ln = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act, cfg.num_hidden_layers, factor, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """`x (B, T, D)` -> pooled `(B, D)`."""
        w = self.qkv[...].astype(self.dtype)
        bias = self.qkv_bias[...].astype(self.dtype)
        q = jnp.einsum("d,dhe->he", self.probe[...].astype(self.dtype), w[:, 0]) + bias[0]
        q = jnp.broadcast_to(q, (x.shape[0], 1, *q.shape))
        k = jnp.einsum("btd,dhe->bthe", x, w[:, 1]) + bias[1]
        v = jnp.einsum("btd,dhe->bthe", x, w[:, 2]) + bias[2]
        y = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        h = jnp.einsum("bthe,hed->btd", y, self.out[...].astype(self.dtype)) + self.out_bias[...].astype(self.dtype)
        h = h + self.mlp(self.ln(h))
        return h[:, 0]


def num_patches(image_size: int, patch_size: int) -> int:
    """Patches per image (= vision positions; SigLIP has no class token)."""
    return (image_size // patch_size) ** 2


@functools.lru_cache(maxsize=16)
def _config_from_json(text: str):
    from transformers import SiglipConfig

    return SiglipConfig.from_dict(json.loads(text))


def square_image_size(value: Any, what: str = "vision_config.image_size") -> int:
    """`image_size` / `patch_size` as one int (SigLIP configs allow an int or a square pair)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{what}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def create_siglip(config: Any, *, seed: int = 0, dtype: Any = jnp.float32, **options: Any) -> SigLIP:
    """A randomly initialised `SigLIP` (CLIP's init scheme, one draw; see `jax_refine.models.layers.create`)."""
    return create(SigLIP, config, seed=seed, dtype=dtype, **options)
