"""Text and image preprocessing with Hugging Face CLIP numerics, shared by model users and the data pipeline.

- Text: `transformers.CLIPTokenizer` built from the checkpoint's own `vocab.json`/`merges.txt` when a
  checkpoint directory has them, else from the files packaged in `jax_refine/assets/tokenizer/` (derived
  from OpenAI's BPE by `tools/make_clip_vocab.py`), so it works offline. Ids equal HF's `CLIPTokenizer`
  exactly, and OpenAI/open_clip's tokenizer on every text that `ftfy.fix_text` + `html.unescape` leave
  unchanged (those two clean-ups run only in the OpenAI tokenizer; see docs/data.md).
- Image: the `CLIPImageProcessor` pipeline: convert to RGB, resize the shortest side to `size` with PIL
  bicubic on uint8 (long side `int(size * long / short)`), center crop `size x size`
  (top = (h - size) // 2), rescale by 1/255, normalize with the OpenAI CLIP mean/std. Output HWC float32.
"""
from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from transformers import CLIPTokenizer

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def _tokenizer_dir(path: str | Path | None) -> Path:
    """The checkpoint dir if it holds both tokenizer files, else the packaged files' dir."""
    if path is not None and all((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        return Path(path)
    missing = [f for f in _TOKENIZER_FILES if not (TOKENIZER_DIR / f).is_file()]
    if missing:
        raise FileNotFoundError(f"packaged tokenizer file(s) {missing} missing from {TOKENIZER_DIR}")
    return TOKENIZER_DIR


@functools.lru_cache(maxsize=8)
def _load_tokenizer(directory: str):
    d = Path(directory)
    return CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))


def get_tokenizer(path: str | Path | None = None):
    """`transformers.CLIPTokenizer` from `path`'s vocab.json/merges.txt if present, else the packaged ones.

    `path` is a local checkpoint directory (or None). Cached per directory; never touches the network.
    """
    return _load_tokenizer(str(_tokenizer_dir(path)))


def tokenize(texts: str | Sequence[str], tokenizer=None, max_length: int = 77) -> dict[str, np.ndarray]:
    """Tokenize with HF semantics: BOS + tokens + EOS, truncated to `max_length` (EOS kept last), padded.

    Returns {"input_ids": (N, max_length) int32, "attention_mask": (N, max_length) int32}; padding uses
    the tokenizer's pad token (`<|endoftext|>` for CLIP) with attention_mask 0.
    """
    if isinstance(texts, str):
        texts = [texts]
    tok = tokenizer if tokenizer is not None else get_tokenizer()
    out = tok(
        [str(t) for t in texts], padding="max_length", truncation=True, max_length=max_length,
        return_tensors="np",
    )
    return {k: np.asarray(out[k], np.int32) for k in ("input_ids", "attention_mask")}


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL RGB image from a PIL image (any mode) or a uint8 array (H,W), (H,W,1), (H,W,3) or (H,W,4)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 HWC, got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"image array must be (H,W), (H,W,1), (H,W,3) or (H,W,4); got {image.shape}")
        image = Image.fromarray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shortest(image: Image.Image | np.ndarray, size: int = 224) -> Image.Image:
    """RGB image with its shortest side resized to `size` (PIL bicubic on uint8; long side
    `int(size * long / short)`), the `CLIPImageProcessor` resize; returned as is when already that size."""
    img = to_rgb(image)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    return img


def resize_crop(image: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
    """Shortest side -> `size` (`resize_shortest`), center crop: (size, size, 3) uint8."""
    img = resize_shortest(image, size)
    new_w, new_h = img.size
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.asarray(img, np.uint8)[top : top + size, left : left + size]


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 (..., 3): x / 255, then (x - CLIP_MEAN) / CLIP_STD."""
    x = pixels.astype(np.float32) * np.float32(1 / 255)
    return (x - CLIP_MEAN) / CLIP_STD


def preprocess_image(image: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
    """`CLIPImageProcessor` for one image: (size, size, 3) float32, normalized, HWC."""
    return normalize(resize_crop(image, size))


def decode_resize_crop(data: bytes, size: int = 224, fast: bool = False) -> np.ndarray:
    """Encoded image bytes (JPEG/PNG/...) -> (size, size, 3) uint8; raises OSError/ValueError if corrupt.

    `fast=False`: exactly `CLIPImageProcessor`'s pixels. `fast=True`: a JPEG is first decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (`Image.draft`: the largest that keeps both sides >= size; other formats
    as is), then resized the same way: close to, not equal to, those pixels (tests/test_data_decoding.py).
    """
    with Image.open(io.BytesIO(data)) as img:
        if fast:
            img.draft("RGB", (size, size))
        img.load()
        return resize_crop(img, size)
