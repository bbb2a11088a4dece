"""Text and image preprocessing of every model family, shared by model users and the data pipelines.

`Preprocessing` is the one description training and evaluation read (built from a model with
`jax_refine.models.registry.preprocessing`, or `Preprocessing()` for CLIP's defaults): image size, mean/std,
resize mode ("crop": CLIPImageProcessor; "squash": SiglipImageProcessor), tokenizer, text length and padding. The
model families supply their settings and tokenizer; this module knows none of them. CLIP's:

- Text: `transformers.CLIPTokenizer` built from the checkpoint's own `vocab.json`/`merges.txt` when a
  checkpoint directory has them, else from the files packaged in `jax_refine/assets/tokenizer/` (derived
  from OpenAI's BPE by `tools/make_clip_vocab.py`), so it works offline. Ids equal HF's `CLIPTokenizer`
  exactly, and OpenAI/open_clip's tokenizer on every text that `ftfy.fix_text` + `html.unescape` leave
  unchanged (those two clean-ups run only in the OpenAI tokenizer; see docs/data.md).
- Image: the `CLIPImageProcessor` pipeline: convert to RGB, resize the shortest side to `size` with PIL
  bicubic on uint8 (long side `int(size * long / short)`), center crop `size x size`
  (top = (h - size) // 2), rescale by 1/255, normalize with the OpenAI CLIP mean/std. Output HWC float32.
SigLIP's (`jax_refine.models.siglip`): the whole image resized to size x size (bicubic, aspect not kept),
mean = std = 0.5; SentencePiece ids padded to the model's length with `</s>`, and no attention mask: SigLIP
attends to its pad tokens (transformers' `SiglipModel` is run without one), so `Preprocessing.tokenize`
gives an all-ones mask, which `encode_text` treats exactly as no mask.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any, Sequence

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


def normalize(pixels: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """uint8 (..., 3) -> float32 (..., 3): x / 255, then (x - mean) / std (default CLIP's, in float32)."""
    x = pixels.astype(np.float32) * np.float32(1 / 255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def preprocess_image(image: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
    """`CLIPImageProcessor` for one image: (size, size, 3) float32, normalized, HWC."""
    return normalize(resize_crop(image, size))


def resize_squash(image: Image.Image | np.ndarray, size: int = 224) -> np.ndarray:
    """The whole image bicubic-resized to (size, size, 3) uint8, aspect not kept (`SiglipImageProcessor`)."""
    img = to_rgb(image)
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(img, np.uint8)


RESIZES = {"crop": resize_crop, "squash": resize_squash}


def decode_resize_crop(data: bytes, size: int = 224, fast: bool = False, resize: str = "crop") -> np.ndarray:
    """Encoded image bytes (JPEG/PNG/...) -> (size, size, 3) uint8; raises OSError/ValueError if corrupt.

    `resize`: "crop" (`resize_crop`, CLIPImageProcessor) or "squash" (`resize_squash`, SiglipImageProcessor).
    `fast=False`: exactly the processor's pixels. `fast=True`: a JPEG is first decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (`Image.draft`: the largest that keeps both sides >= size; other formats
    as is), then resized the same way: close to, not equal to, those pixels (tests/test_data_decoding.py).
    """
    if resize not in RESIZES:
        raise ValueError(f"resize={resize!r}: use one of {sorted(RESIZES)}")
    with Image.open(io.BytesIO(data)) as img:
        if fast:
            img.draft("RGB", (size, size))
        img.load()
        return RESIZES[resize](img, size)


PADDINGS = ("longest", "max_length")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a model wants its inputs; the defaults are OpenAI CLIP's (224 px, CLIPImageProcessor, 77 tokens).

    image_size: square side in pixels; mean, std: per-channel, on pixels scaled to [0, 1];
    resize: "crop" (shortest side bicubic + center crop) | "squash" (bicubic to size x size);
    text_length: tokens per text; padding: "longest" (CLIP: pads masked, any pad length gives the same
    features; we pad to text_length) | "max_length" (SigLIP: pads are model input, attention mask all ones);
    tokenizer: the name of the model family whose tokenizer it is ("clip" BPE, "siglip" SentencePiece; part of
    embedding cache keys); tokenizer_source: the checkpoint directory (or hub id) holding the tokenizer files
    (None: the family's packaged one, CLIP's BPE; SigLIP has none); load_tokenizer: the family's
    `tokenizer_source -> tokenizer` reader (`jax_refine.models.interface.Family.tokenizer`; CLIP's
    `get_tokenizer` by default).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = tuple(float(x) for x in CLIP_MEAN)
    std: tuple[float, float, float] = tuple(float(x) for x in CLIP_STD)
    resize: str = "crop"
    text_length: int = 77
    padding: str = "longest"
    tokenizer: str = "clip"
    tokenizer_source: str | None = None
    load_tokenizer: Callable[[str | None], Any] = dataclasses.field(default=get_tokenizer, compare=False,
                                                                    repr=False)

    def __post_init__(self):
        for name, value, allowed in (("resize", self.resize, tuple(RESIZES)), ("padding", self.padding, PADDINGS)):
            if value not in allowed:
                raise ValueError(f"Preprocessing.{name}={value!r}: use one of {allowed}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"Preprocessing.{name}={getattr(self, name)!r}: need 3 channel values")
        if min(self.std) <= 0 or self.image_size < 1 or self.text_length < 1:
            raise ValueError(f"Preprocessing: std {self.std}, image_size {self.image_size} and text_length "
                             f"{self.text_length} must be positive")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if self.tokenizer_source is not None:
            object.__setattr__(self, "tokenizer_source", str(self.tokenizer_source))
        if self.tokenizer != "clip" and self.load_tokenizer is get_tokenizer:
            raise ValueError(f"Preprocessing(tokenizer={self.tokenizer!r}) needs that family's load_tokenizer "
                             "(jax_refine.models.registry.preprocessing(model) gives it); CLIP's is the default")

    def get_tokenizer(self) -> Any:
        """The family's tokenizer (`load_tokenizer`) read from `tokenizer_source` (None: its packaged one)."""
        return self.load_tokenizer(self.tokenizer_source)

    def tokenize(self, texts: str | Sequence[str], tokenizer: Any = None) -> dict[str, np.ndarray]:
        """{"input_ids", "attention_mask": (N, text_length) int32} (`tokenize`: every family's HF tokenizer pads
        to text_length and truncates); `tokenizer` overrides `get_tokenizer()`. With padding "max_length" the
        mask is all ones: the model attends to its pads (SigLIP, as transformers' SiglipModel runs unmasked)."""
        out = tokenize(texts, tokenizer if tokenizer is not None else self.get_tokenizer(), self.text_length)
        if self.padding == "max_length":
            out["attention_mask"] = np.ones_like(out["attention_mask"])
        return out

    def decode(self, data: bytes, fast: bool = False) -> np.ndarray:
        """Encoded image bytes -> (image_size, image_size, 3) uint8 (`decode_resize_crop` with `resize`)."""
        return decode_resize_crop(data, self.image_size, fast, self.resize)

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (..., 3) -> float32 (x / 255 - mean) / std."""
        return normalize(pixels, self.mean, self.std)

    def image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One PIL image / uint8 array -> (image_size, image_size, 3) float32, what `encode_image` takes."""
        return self.normalize(RESIZES[self.resize](image, self.image_size))


def preprocessing_arg(prep: Preprocessing | None, image_size: int | None = None,
                      text_length: int | None = None) -> Preprocessing:
    """`prep`, or, when None, CLIP's preprocessing at `image_size` / `text_length` (default 224 / 77): the
    shorthand the data loaders accept. Giving both `prep` and a size is an error (which would win?)."""
    if prep is None:
        return Preprocessing(image_size=int(image_size or 224), text_length=int(text_length or 77))
    if not isinstance(prep, Preprocessing):
        raise TypeError(f"prep must be a jax_refine.preprocess.Preprocessing, got {type(prep).__name__}")
    if image_size is not None or text_length is not None:
        raise ValueError(f"give prep (image_size {prep.image_size}) or image_size/max_length "
                         f"({image_size}/{text_length}), not both")
    return prep
