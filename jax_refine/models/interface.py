"""The one model interface the trainer, checkpoints, evaluation and export use, and a family's record.

`Model` is what every family's NNX module provides (checked structurally, `typing.Protocol`); `Family` is
what a family folder registers in `jax_refine.models.registry`: how to recognise, load, save, tokenize and
randomly create its models.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import jax
from flax import nnx

Array = jax.Array
RESIZES = ("crop", "squash")
TEXT_PADDINGS = ("longest", "max_length")


@runtime_checkable
class Model(Protocol):
    """An image-text dual encoder.

    family: the registry name of the family whose format it saves to ("clip", "siglip").
    image_size: square input side in pixels. text_length: the token length texts are padded/truncated to.
    pixel_mean, pixel_std: per-channel (R, G, B) normalization of [0, 1] pixels.
    resize: "crop" (shortest side to `image_size`, bicubic, then center crop: `CLIPImageProcessor`) or
      "squash" (bicubic to (image_size, image_size), aspect ratio not kept: `SiglipImageProcessor`).
    text_padding: "longest" (pad to the longest text of the batch, pads masked: CLIP) or "max_length" (every
      text padded to `text_length`, the pads attended to: SigLIP).
    logit_scale: `nnx.Param` () holding log of the logit scale; logit_bias: `nnx.Param` () or None.
    feature_dim: width D of the features both encoders return.
    """

    family: str
    image_size: int
    text_length: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    resize: Literal["crop", "squash"]
    text_padding: Literal["longest", "max_length"]
    logit_scale: nnx.Param
    logit_bias: nnx.Param | None
    feature_dim: int
    config: Any

    def encode_image(self, pixel_values: Array) -> Array:
        """`pixel_values (B, H, W, 3)` normalized NHWC -> unnormalized features `(B, D)`."""

    def encode_text(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """`input_ids (B, L)` int, `attention_mask (B, L)` (1 = token; None = attend to all) -> `(B, D)`."""

    def __call__(self, pixel_values: Array, input_ids: Array, attention_mask: Array | None = None
                 ) -> tuple[Array, Array]:
        """-> `(image_features (B, D), text_features (B, D))`."""


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family as the registry knows it.

    name: registry name ("clip", "openclip", "siglip").
    detect(dir) -> bool: whether a local checkpoint directory is in this family's format (cheap: file names and
      `config.json`'s model_type only).
    load(dir, dtype, shardings, **options) -> Model: the checkpoint's model (options: `param_dtype`,
      `attention`, `remat`, `scan_layers`, the family's own).
    save(model, out_dir, *, tokenizer_dir=None, overwrite=True) -> Path: the model in the family's
      Hugging Face format.
    tokenizer(dir | None): the tokenizer of a checkpoint directory (None: the packaged one, where the family
      has one).
    config_from(obj) -> the family's transformers config from a dict, a `config.json` path or a directory.
    create(config, *, seed=0, dtype=float32, **options) -> Model: random init (also under `nnx.eval_shape`
      for an abstract model).
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., Model]
    save: Callable[..., Path]
    tokenizer: Callable[[str | os.PathLike | None], Any]
    config_from: Callable[[Any], Any]
    create: Callable[..., Model]
