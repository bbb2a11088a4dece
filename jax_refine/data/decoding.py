"""Image decoding inside tf.data with the model's processor numerics, bad images flagged instead of raised.

Decode + resize (+ crop) run in `prep.decode` (PIL: the image processor's exact pixels) through
`tf.numpy_function` in a parallel, order-preserving `map`; normalization runs in TensorFlow on whole batches.
`fast=True` (`data.fast_decode`) and photos stored pre-resized (`resize_for_storage`) make training decode
less; their pixel errors and throughput: docs/data.md, "Throughput".
"""
from __future__ import annotations

import io
import logging
import os
import threading

import numpy as np

from PIL import Image

from jax_refine import preprocess
from jax_refine.data.tf_runtime import tf

log = logging.getLogger(__name__)

# Per-example status carried through the pipelines.
OK, NO_CAPTION, BAD_IMAGE, END = 0, 1, 2, 3
_MAX_WARNINGS = 20
_warned = {"n": 0}
_lock = threading.Lock()


def resize_for_storage(data: bytes, size: int, image_format: str = "jpeg", quality: int = 95) -> bytes:
    """Encoded image -> the same photo with its shortest side resized to `size` (`preprocess.resize_shortest`,
    the CLIPImageProcessor resize), encoded as JPEG (`quality`, 4:4:4) or PNG. Photos whose shortest side is
    already <= size are returned as they were (never upsampled at prepare time). Raises on unreadable bytes.
    """
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format={image_format!r}: use 'jpeg' or 'png'")
    with Image.open(io.BytesIO(data)) as img:
        if min(img.size) <= size:
            return data
        out = preprocess.resize_shortest(img, size)
    buf = io.BytesIO()
    if image_format == "jpeg":  # 4:4:4 (no chroma subsampling): 4:2:0 triples the largest pixel error
        out.save(buf, "JPEG", quality=quality, subsampling=0)
    else:
        out.save(buf, "PNG")
    return buf.getvalue()


def usable_cores() -> int:
    """The cores this process may run on (`os.sched_getaffinity`: `taskset` and container CPU sets count;
    `os.cpu_count()` where the platform has no affinity, e.g. macOS)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else (os.cpu_count() or 1)


def thread_options(num_threads: int | None = None) -> "tf.data.Options":
    """Deterministic tf.data options with a private threadpool of `num_threads` (default `usable_cores()`)."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = int(num_threads or usable_cores())
    return options


def _decode_np(data: bytes, status: np.int32, key: bytes, prep: preprocess.Preprocessing, fast: bool = False
               ) -> tuple[np.ndarray, np.int32]:
    size = prep.image_size
    if status != OK:
        return np.zeros((size, size, 3), np.uint8), np.int32(status)
    if not data:  # a photo that was missing (or empty) on disk: read as b"" by `read_image_files` / the builder
        _warn("skipping missing or empty image file %s", key.decode("utf-8", "replace"))
        return np.zeros((size, size, 3), np.uint8), np.int32(BAD_IMAGE)
    try:
        return prep.decode(data, fast), np.int32(OK)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this image"
        _warn("skipping unreadable image %s: %s", key.decode("utf-8", "replace"), e)
        return np.zeros((size, size, 3), np.uint8), np.int32(BAD_IMAGE)


def _warn(fmt: str, *args) -> None:
    with _lock:
        _warned["n"] += 1
        if _warned["n"] <= _MAX_WARNINGS:
            log.warning(fmt, *args)


def read_image_files(paths: list[str], extra: dict[str, np.ndarray]) -> "tf.data.Dataset":
    """{"image": file bytes (b"" for a file missing now), "key": path, **extra} per path, in order.

    A missing photo is then skipped and counted by `decode_images` (a warning names its path) instead of
    stopping the pipeline with TensorFlow's NotFoundError. `extra`: per-path int arrays (labels, indices).
    """
    exists = np.array([os.path.isfile(p) for p in paths], bool)
    ds = tf.data.Dataset.from_tensor_slices({"key": tf.constant(paths, tf.string), "exists": exists, **extra})

    def read(ex):
        data = tf.cond(ex["exists"], lambda: tf.io.read_file(ex["key"]), lambda: tf.constant(b""))
        return {"image": data, "key": ex["key"], **{k: ex[k] for k in extra}}

    return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def decode_images(ds: "tf.data.Dataset", prep: preprocess.Preprocessing, num_parallel_calls: int = -1,
                  fast: bool = False) -> "tf.data.Dataset":
    """Map {"image": encoded bytes, "status", "key", ...} -> "image" (S,S,3) uint8 (S = prep.image_size, resized
    by `prep.resize`); status BAD_IMAGE if corrupt.

    Order-preserving (deterministic) and parallel. Elements whose status is not OK are not decoded.
    `fast`: `preprocess.decode_resize_crop`'s JPEG draft decode (training only; evaluation keeps the exact pixels).
    """
    image_size = prep.image_size

    def fn(ex):
        pixels, status = tf.numpy_function(
            lambda d, s, k: _decode_np(d, s, k, prep, fast), [ex["image"], ex["status"], ex["key"]],
            [tf.uint8, tf.int32], stateful=False,
        )
        pixels.set_shape((image_size, image_size, 3))
        status.set_shape(())
        return {**ex, "image": pixels, "status": status}

    calls = tf.data.AUTOTUNE if num_parallel_calls in (None, -1) else num_parallel_calls
    return ds.map(fn, num_parallel_calls=calls, deterministic=True)


def normalize(pixels: "tf.Tensor", prep: preprocess.Preprocessing) -> "tf.Tensor":
    """uint8 (..., 3) -> float32: x / 255 then (x - mean) / std (`prep`'s), in the image processors' order of
    float32 operations, so the pipeline's pixels are bit-identical to `preprocess.normalize`'s. (A fused
    `x * scale - shift` saves 0.2 ms of CPU per 224 px image but moves pixels by ~1e-7, enough to flip a
    borderline zero-shot prediction; exactness wins.)"""
    x = tf.cast(pixels, tf.float32) * tf.constant(1 / 255, tf.float32)
    return (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)


def tokenize_batch(captions: "tf.Tensor", prep: preprocess.Preprocessing, tokenizer=None
                   ) -> tuple["tf.Tensor", "tf.Tensor"]:
    """(b,) tf.string -> input_ids, attention_mask (b, prep.text_length) int32 (`prep.tokenize`; `tokenizer`
    overrides `prep.get_tokenizer()`)."""
    tokenizer = tokenizer if tokenizer is not None else prep.get_tokenizer()
    max_length = prep.text_length

    def fn(texts: np.ndarray):
        out = prep.tokenize([t.decode("utf-8", "replace") for t in texts], tokenizer)
        return out["input_ids"], out["attention_mask"]

    ids, mask = tf.numpy_function(fn, [captions], [tf.int32, tf.int32], stateful=False)
    ids.set_shape((None, max_length))
    mask.set_shape((None, max_length))
    return ids, mask


def eval_batches(ds: "tf.data.Dataset", *, batch_size: int, prep: preprocess.Preprocessing, num_batches: int,
                 meta: tuple[str, ...], stats: dict[str, int], num_parallel_calls: int = -1, prefetch: int = 2):
    """Fixed-size evaluation batches {"image": (b,S,S,3) f32, **meta: (b,) i32, "mask": (b,) bool}.

    `ds` holds {"image": encoded bytes, "key": string, **meta ints}. Every host yields exactly
    `num_batches` batches (the last ones padded, mask False) so that hosts stay in step; unreadable
    images get mask False and are counted in `stats["skipped_bad_image"]`.
    """
    ds = ds.map(lambda ex: {**ex, "status": tf.constant(OK, tf.int32)})
    image_size = prep.image_size
    ds = decode_images(ds, prep, num_parallel_calls).batch(batch_size)
    ds = ds.map(lambda b: {"image": normalize(b["image"], prep), "ok": b["status"] == OK,
                           **{k: tf.cast(b[k], tf.int32) for k in meta}}, num_parallel_calls=tf.data.AUTOTUNE)
    produced = 0
    for b in ds.prefetch(prefetch).as_numpy_iterator():
        n = len(b["ok"])
        stats["skipped_bad_image"] = stats.get("skipped_bad_image", 0) + int((~b["ok"]).sum())
        pad = batch_size - n
        out = {"image": np.pad(b["image"], ((0, pad), (0, 0), (0, 0), (0, 0))),
               "mask": np.pad(b["ok"], (0, pad)), **{k: np.pad(b[k], (0, pad)) for k in meta}}
        produced += 1
        yield out
    for _ in range(num_batches - produced):
        yield {"image": np.zeros((batch_size, image_size, image_size, 3), np.float32),
               "mask": np.zeros((batch_size,), bool), **{k: np.zeros((batch_size,), np.int32) for k in meta}}
