"""The one list of model families, and what goes through it: which family a checkpoint is, loading and saving
a model of any family (`load`, `save`), and a model's input preprocessing (`preprocessing`).

`FAMILIES` is tried in order; the first whose `detect(dir)` says yes loads the directory (a hub repo that
ships both HF `config.json` weights and open_clip files loads as HF CLIP). Adding a family is one folder
under `jax_refine/models/` with a `FAMILY` record (`jax_refine.models.interface.Family`) and one line here.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jax_refine import hf, preprocess
from jax_refine.models import clip, openclip, siglip
from jax_refine.models.interface import Family, Model

FAMILIES: tuple[Family, ...] = (
    clip.FAMILY,
    openclip.FAMILY,
    siglip.FAMILY,
)


def names() -> list[str]:
    """The registered family names, in detection order."""
    return [f.name for f in FAMILIES]


def family_named(name: str) -> Family:
    """The family registered as `name` (a model's `family` attribute or a checkpoint's recorded family)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(names())}")


def family_of(directory: Path) -> Family:
    """The family of a local checkpoint directory (a `Path`: `hf.resolve_checkpoint` gives one).

    One-line error naming what was found when no family recognises it: FileNotFoundError when there is no
    `config.json` (nor open_clip files), ValueError when `config.json` names another model (its model_type
    and architectures) -- both list the directory's weight files.
    """
    for family in FAMILIES:
        if family.detect(directory):
            return family
    files = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".index.json", ".pt", ".pth", ".npz"))]
    found = f"weight files: {', '.join(weights) if weights else 'none'}"
    config_file = directory / hf.CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found, and no open_clip checkpoint files either ({found}); "
                                f"known model families: {', '.join(names())}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    config = config if isinstance(config, Mapping) else {}
    arch = ", ".join(config.get("architectures") or []) or "none listed"
    raise ValueError(f"{directory}: not a checkpoint of a known model family: config.json has model_type "
                     f"{config.get('model_type')!r} (architectures: {arch}); {found}; known model families: "
                     f"{', '.join(names())}")


def family_of_config(config: Any) -> Family:
    """The family of a transformers config or a config dict (its `model_type`; a dict without one is CLIP)."""
    model_type = config.get("model_type", "clip") if isinstance(config, Mapping) else getattr(config, "model_type")
    return family_named(model_type)


def load(name_or_path: str | os.PathLike, dtype: Any = jnp.float32, *, shardings: Any = None, **options: Any
         ) -> Model:
    """The model of a checkpoint of any registered family (a local directory or a hub id), e.g. a `CLIP` or a
    `SigLIP`.

    `dtype`: compute dtype; `shardings` as in `jax_refine.hf.load_weights`; `options`: `param_dtype`,
    `attention`, `remat`, `scan_layers`, and the family's own (open_clip: `config`). An unknown family is a
    one-line error naming what the directory holds (`family_of`).
    """
    directory = hf.resolve_checkpoint(name_or_path)
    return family_of(directory).load(directory, dtype, shardings, **options)


def save(model: Model, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
         overwrite: bool = True) -> Path:
    """Write `model` in its family's Hugging Face format (`model.family`: a CLIP opens in
    `transformers.CLIPModel.from_pretrained`, a SigLIP in `SiglipModel`) with its tokenizer files (from
    `tokenizer_dir` when given, else the family's packaged ones, if any). See `jax_refine.hf.write_checkpoint`."""
    return family_named(model.family).save(model, out_dir, tokenizer_dir=tokenizer_dir, overwrite=overwrite)


def preprocessing(model: Model, tokenizer_source: str | os.PathLike | None = None) -> preprocess.Preprocessing:
    """How `model` wants its inputs (its interface attributes; an abstract model is enough) with its family's
    tokenizer read from `tokenizer_source`, the checkpoint it came from (needed for SigLIP, whose tokenizer ships
    with the checkpoint; None: the family's packaged one)."""
    return preprocess.Preprocessing(
        image_size=int(model.image_size), mean=tuple(model.pixel_mean), std=tuple(model.pixel_std),
        resize=model.resize, text_length=int(model.text_length), padding=model.text_padding,
        tokenizer=model.family, tokenizer_source=tokenizer_source,
        load_tokenizer=family_named(model.family).tokenizer)
