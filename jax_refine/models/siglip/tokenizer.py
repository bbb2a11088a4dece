"""SigLIP's SentencePiece tokenizer, read from a checkpoint directory.

transformers' `SiglipTokenizer` does what big_vision's SigLIP text pre-processing does: lowercase (the
checkpoint's `do_lower_case`, default True), strip ASCII punctuation, collapse whitespace, SentencePiece
ids, one `</s>` appended (kept when truncating), and every text padded with `</s>` to the model's length
(`padding="max_length"`: SigLIP is trained on padded texts and pools the last position).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jax_refine import hf

SPIECE = "spiece.model"
TEXT_LENGTH = 64  # SigLIP's text_config.max_position_embeddings
HUB_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")


def get_tokenizer(path: str | os.PathLike | None) -> Any:
    """transformers' `SiglipTokenizer` on `path` (a checkpoint dir with `spiece.model`, and its
    `tokenizer_config.json` when present, the `.model` file itself, or a hub id fetched into the HF cache).

    One-line FileNotFoundError naming the directory and the files found when there is no `spiece.model`.
    """
    from transformers import SiglipTokenizer

    if path is None:
        raise ValueError("SigLIP has no packaged tokenizer: pass the checkpoint directory that holds spiece.model")
    name, path = str(path), Path(path).expanduser()
    if path.is_file():
        return SiglipTokenizer(str(path))
    if not path.is_dir():
        if not hf.is_hub_id(name):
            raise FileNotFoundError(f"{path}: no such tokenizer directory or SentencePiece file")
        path = Path(hf.hub_download(name, SPIECE, required=True)).parent  # a hub id: its cached snapshot
        for extra in HUB_EXTRAS:
            hf.hub_download(name, extra, required=False)
    if not (path / SPIECE).is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        raise FileNotFoundError(f"{path}: no {SPIECE} (SigLIP's SentencePiece tokenizer); found {found or 'nothing'}")
    if (path / "tokenizer_config.json").is_file():
        return SiglipTokenizer.from_pretrained(str(path))
    return SiglipTokenizer(str(path / SPIECE))


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int = TEXT_LENGTH) -> dict[str, np.ndarray]:
    """`texts` (N strings) -> `{"input_ids": (N, max_length) int32, "attention_mask": (N, max_length) int32}`,
    padded to `max_length` with `</s>` and truncated (the `</s>` kept). Pass `attention_mask` to the model
    only to reproduce HF runs that did; SigLIP itself attends to the pads (`encode_text(ids)`).
    """
    if isinstance(texts, str):
        raise TypeError("tokenize takes a sequence of strings, got one str")
    out = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length)
    return {k: np.asarray(out[k], np.int32).reshape(len(texts), max_length) for k in ("input_ids", "attention_mask")}
