"""The two faster training decodes against transformers' CLIPImageProcessor on the original real COCO photos:
JPEG draft decode (`fast=True`, `data.fast_decode`) and photos stored pre-resized by prepare-data
(`decoding.resize_for_storage`, `prepare_coco_json(image_size=)`). Errors are in normalized units (one grey
level is about 0.015); the bounds hold with margin on ../shared/data/coco_mini."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from jax_refine import preprocess
from jax_refine.data import decoding, make_train_iterator, prepare_coco_json


def _hf(image: Image.Image, size: int) -> np.ndarray:
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _photos(coco_mini_dir, n: int, *, min_short: int = 0, max_short: int = 10**9) -> list:
    paths = []
    for p in sorted((coco_mini_dir / "val2017").glob("*.jpg")):
        with Image.open(p) as im:
            if min_short <= min(im.size) <= max_short:
                paths.append(p)
        if len(paths) == n:
            return paths
    raise AssertionError(f"fewer than {n} photos with shortest side in [{min_short}, {max_short}]")


def test_draft_decode_stays_within_its_bound_of_clip_image_processor(coco_mini_dir):
    size = 224
    means = []
    for p in _photos(coco_mini_dir, 8, min_short=2 * size):  # 640x480: decoded at 1/2 scale
        with Image.open(p) as im:
            ref = _hf(im, size)
        fast = preprocess.normalize(preprocess.decode_resize_crop(p.read_bytes(), size, fast=True))
        err = np.abs(fast - ref)
        assert err.mean() <= 0.15 and np.percentile(err, 99) <= 1.2 and err.max() <= 2.5, p.name
        means.append(err.mean())
    assert 0.005 < np.mean(means) <= 0.06  # different pixels (the draft was used), about 2.5 grey levels on average
    for p in _photos(coco_mini_dir, 2, max_short=2 * size - 1):  # 640x427: no 1/2 scale keeps 224, exact decode
        with Image.open(p) as im:
            ref = _hf(im, size)
        fast = preprocess.normalize(preprocess.decode_resize_crop(p.read_bytes(), size, fast=True))
        assert np.abs(fast - ref).max() <= 1e-5


@pytest.mark.parametrize("image_format,max_err,mean_err", [("jpeg", 0.5, 0.035), ("png", 1e-5, 1e-6)])
def test_pre_resized_photo_through_the_exact_path_matches_the_original(coco_mini_dir, image_format, max_err,
                                                                        mean_err):
    size = 224
    means = []
    for p in _photos(coco_mini_dir, 6):
        with Image.open(p) as im:
            ref, (w, h) = _hf(im, size), im.size
        stored = decoding.resize_for_storage(p.read_bytes(), size, image_format)
        with Image.open(io.BytesIO(stored)) as small:
            assert small.format == image_format.upper() and min(small.size) == size
            assert max(small.size) == int(size * max(w, h) / min(w, h))  # the CLIPImageProcessor long side
        err = np.abs(preprocess.normalize(preprocess.decode_resize_crop(stored, size)) - ref)
        assert err.max() <= max_err, p.name
        means.append(err.mean())
    assert np.mean(means) <= mean_err
    small = decoding.resize_for_storage(p.read_bytes(), 1000, image_format)  # never upsampled: bytes kept
    assert small == p.read_bytes()
    with pytest.raises(ValueError, match="image_format='gif'"):
        decoding.resize_for_storage(p.read_bytes(), size, "gif")


def _rows_vs_originals(it, records, size, steps=2):
    """Each row's error against CLIPImageProcessor on its original photo (found from its caption's text)."""
    by_text = {re.sub(r"\W", "", t.lower()): path for path, caps in records for t in caps}
    tok = preprocess.get_tokenizer()
    errors = []
    for _ in range(steps):
        batch = next(it)
        for row, text in enumerate(tok.batch_decode(batch["input_ids"], skip_special_tokens=True)):
            with Image.open(by_text[re.sub(r"\W", "", text)]) as im:
                errors.append(np.abs(batch["image"][row] - _hf(im, size)))
    return np.stack(errors)


@pytest.mark.slow  # trains (prepare-data + two short training runs)
def test_training_with_fast_decode_and_from_a_pre_resized_prepared_set(coco_mini_dir, tmp_path):
    from jax_refine.data.sources import read_captions

    size = 64
    ann, images = coco_mini_dir / "annotations" / "captions_train2017.json", coco_mini_dir / "train2017"
    records = [(r["path"], [t for _, t in r["captions"]]) for r in read_captions(ann, images)]
    coco = {"source": "coco_json", "annotations": str(ann), "images": str(images), "train_fraction": 1.0}
    exact = _rows_vs_originals(make_train_iterator(coco, global_batch_size=16, image_size=size), records, size)
    assert exact.max() <= 1e-3
    fast = _rows_vs_originals(make_train_iterator({**coco, "fast_decode": True}, global_batch_size=16,
                                                  image_size=size), records, size)
    assert 0.005 < fast.mean() <= 0.06 and fast.max() <= 2.5

    from jax_refine import cli

    assert cli.main(["prepare-data", "--annotations", str(ann), "--images", str(images), "--out",
                     str(tmp_path / "tfds"), "--image-size", str(size)]) == 0
    (out,) = (tmp_path / "tfds" / "coco_captions_json").glob(f"captions_train2017-*-{size}px/1.0.0")  # its own set
    prepared = {"source": "tfds_dir", "data_dir": str(out), "shuffle_buffer": 16}
    resized = _rows_vs_originals(make_train_iterator(prepared, global_batch_size=16, image_size=size), records, size)
    assert resized.max() <= 0.5 and resized.mean() <= 0.035
    with pytest.raises(ValueError, match=f"prepared at {size} px but the model takes {2 * size} px"):
        make_train_iterator(prepared, global_batch_size=16, image_size=2 * size)  # would upsample: an error
    with pytest.raises(ValueError, match="image_size=0"):
        prepare_coco_json(ann, images, tmp_path / "tfds", image_size=0)
