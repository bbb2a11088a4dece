"""SigLIP's image pre-processing (transformers' `SiglipImageProcessor`): the whole image resized to
`size` x `size` (PIL bicubic on uint8, aspect ratio NOT kept, no crop), x / 255, (x - 0.5) / 0.5 -> [-1, 1]."""
from __future__ import annotations

import numpy as np
from PIL import Image

from jax_refine.models.siglip.modeling import PIXEL_MEAN, PIXEL_STD
from jax_refine.preprocess import to_rgb


def resize(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Any PIL image / uint8 HWC array -> `(size, size, 3)` uint8, squashed to a square (bicubic)."""
    img = to_rgb(image)
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.asarray(img, np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 `(..., 3)` -> float32 `(..., 3)` in [-1, 1]: (x / 255 - mean) / std with SigLIP's 0.5 / 0.5."""
    x = pixels.astype(np.float32) * np.float32(1 / 255)
    return (x - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)


def preprocess_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """`SiglipImageProcessor` for one image: `(size, size, 3)` float32 NHWC-ready (what `encode_image` takes)."""
    return normalize(resize(image, size))
