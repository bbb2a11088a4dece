"""TensorFlow for the input pipeline only: imported once here, with every GPU hidden from it.

TensorFlow must never grab accelerator memory (JAX owns the devices); `tf` from this module is the
CPU-only TensorFlow every `jax_refine.data` module uses.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices: nothing more we can do here
    pass

AUTOTUNE = tf.data.AUTOTUNE

__all__ = ["tf", "tfds", "AUTOTUNE"]
