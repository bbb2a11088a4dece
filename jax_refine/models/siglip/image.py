"""SigLIP's image pre-processing (transformers' `SiglipImageProcessor`): the whole image resized to
`size` x `size` (PIL bicubic on uint8, aspect ratio NOT kept, no crop), x / 255, (x - 0.5) / 0.5 -> [-1, 1]."""
from __future__ import annotations

import numpy as np
from PIL import Image

from jax_refine import preprocess
from jax_refine.models.siglip.modeling import PIXEL_MEAN, PIXEL_STD


def preprocess_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """`SiglipImageProcessor` for one image: `(size, size, 3)` float32 NHWC-ready (what `encode_image` takes)."""
    return preprocess.normalize(preprocess.resize_squash(image, size), PIXEL_MEAN, PIXEL_STD)
