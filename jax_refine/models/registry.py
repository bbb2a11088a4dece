"""Which family a checkpoint belongs to: the one list of model families.

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

from jax_refine import hf
from jax_refine.models import clip, openclip, siglip
from jax_refine.models.interface import Family

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


def family_of(directory: str | os.PathLike) -> Family:
    """The family of a local checkpoint directory.

    One-line error naming what was found when no family recognises it: FileNotFoundError when there is no
    `config.json` (nor open_clip files), ValueError when `config.json` names another model (its model_type
    and architectures) -- both list the directory's weight files.
    """
    directory = Path(directory)
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
