"""Image-text retrieval sets: every caption of every image, captions tokenized, images in per-host batches.

Specs: "coco_karpathy_test" (the TFDS catalog's `coco_captions` 'test' split = the Karpathy 5k test
images), "tfds:<name>:<split>" (a catalog caption set), "tfds_dir:<dataset dir>[:<split>]" (a prepared
caption set, e.g. from `prepare_coco_json`), "coco_json:<annotations.json>:<image dir>",
"flickr:<token.txt>:<split list or train|dev|test>:<image dir>" (Flickr8k/30k token format) or
"karpathy:<dataset_*.json>:<split>:<image dir>" (Karpathy's split JSON); the last three are read directly,
nothing prepared (captions of missing photos and photos without captions skipped and counted).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from jax_refine import preprocess
from jax_refine.data import decoding, hosts, sources
from jax_refine.data.tf_runtime import tf, tfds


@dataclasses.dataclass
class RetrievalSet:
    """Retrieval data on this host.

    `texts`: every caption of the whole set (same on all hosts): {"input_ids", "attention_mask": (T, L) i32,
    "caption_image_index": (T,) i32}. `image_batches()` yields `num_batches` batches of this host's
    images {"image": (b,S,S,3) f32, "image_index": (b,) i32, "mask": (b,) bool} (image_index is global,
    0..num_images-1; padding/unreadable rows have mask False).
    """

    name: str
    num_images: int
    texts: dict[str, np.ndarray]
    captions: list[str]
    batch_size: int
    num_batches: int
    prep: preprocess.Preprocessing  # the model's image size, resize mode, mean/std, tokenizer
    _records: Callable[[], "tf.data.Dataset"]
    _stats: dict = dataclasses.field(default_factory=lambda: {"skipped_bad_image": 0})

    def image_batches(self) -> Iterator[dict[str, np.ndarray]]:
        return decoding.eval_batches(self._records(), batch_size=self.batch_size, prep=self.prep,
                                     num_batches=self.num_batches, meta=("image_index",), stats=self._stats)

    def stats(self) -> dict[str, int]:
        return dict(self._stats)


def _from_tfds(builder, split, *, max_examples, process_index, process_count):
    sources.check_split(builder, split)
    if max_examples:
        split = f"{split}[:{max_examples}]"
    keys, captions, owner = [], [], []
    for rec in sources.caption_records(builder, split, add_tfds_id=True).as_numpy_iterator():
        for text in rec["captions"]:
            captions.append(text.decode("utf-8"))
            owner.append(len(keys))
        keys.append(rec["key"])
    splits = tfds.even_splits(split, process_count) if process_count > 1 else [split]
    per_host = max(sources.num_records(builder, s) for s in splits)
    keys_t = tf.constant(keys)

    def records():
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys_t, tf.range(len(keys), dtype=tf.int64)), default_value=-1)
        ds = sources.caption_records(builder, splits[process_index], add_tfds_id=True)
        return ds.map(lambda r: {"image": r["image"], "key": r["key"], "image_index": table.lookup(r["key"])})

    return len(keys), captions, owner, per_host, records


def _from_records(recs, *, max_examples, process_index, process_count):
    recs = recs[: max_examples or None]
    captions = [t for r in recs for _, t in r["captions"]]
    owner = [i for i, r in enumerate(recs) for _ in r["captions"]]
    bounds = [hosts.host_range(len(recs), i, process_count) for i in range(process_count)]
    start, stop = bounds[process_index]
    paths = [r["path"] for r in recs[start:stop]]

    def records():
        return decoding.read_image_files(paths, {"image_index": np.arange(start, stop, dtype=np.int64)})

    return len(recs), captions, owner, max(b - a for a, b in bounds), records


def load_retrieval(spec: str, *, batch_size: int, prep: preprocess.Preprocessing | None = None,
                   image_size: int | None = None, max_length: int | None = None, tokenizer=None,
                   data_dir: str | None = None, try_gcs: bool = False, process_index: int = 0,
                   process_count: int = 1, max_examples: int | None = None) -> RetrievalSet:
    """A retrieval set from `spec` (see the module docstring); `batch_size` is per host, `max_examples`
    keeps the first N images (with all their captions). `prep`: the model's preprocessing (or CLIP's at
    `image_size` / `max_length`, default 224 / 77); `tokenizer` overrides `prep.get_tokenizer()`."""
    prep = preprocess.preprocessing_arg(prep, image_size, max_length)
    hosts.check_process(process_index, process_count)
    kw = dict(max_examples=max_examples, process_index=process_index, process_count=process_count)
    kind, _, rest = spec.partition(":")
    if spec in ("coco_karpathy_test", "coco_captions"):
        builder = sources.open_catalog("coco_captions", data_dir=data_dir, try_gcs=try_gcs)
        parts = _from_tfds(builder, "test", **kw)
    elif kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        builder = sources.open_catalog(name, data_dir=data_dir, try_gcs=try_gcs)
        parts = _from_tfds(builder, split or "test", **kw)
    elif kind == "tfds_dir" and rest:
        path, _, split = rest.partition(":")
        parts = _from_tfds(sources.open_directory(path), split or "train", **kw)
    elif kind == "coco_json" and rest.count(":") == 1:
        ann, images = rest.split(":")
        parts = _from_records(sources.read_captions(ann, images, format="coco"), **kw)
    elif kind in ("flickr", "karpathy") and rest.count(":") == 2:
        ann, split, images = rest.split(":")
        parts = _from_records(sources.read_captions(ann, images, format=kind, split=split), **kw)
    else:
        raise ValueError(f"unknown retrieval spec {spec!r}: use coco_karpathy_test, tfds:<name>:<split>, "
                         "tfds_dir:<dir>[:<split>], coco_json:<annotations.json>:<image dir>, "
                         "flickr:<token.txt>:<split list>:<image dir> or karpathy:<json>:<split>:<image dir>")
    return _retrieval_set(spec, parts, prep, tokenizer, batch_size)


def load_caption_list(listed: sources.CaptionList, *, batch_size: int, prep: preprocess.Preprocessing | None = None,
                      tokenizer=None, process_index: int = 0, process_count: int = 1,
                      max_examples: int | None = None) -> RetrievalSet:
    """A retrieval set (every caption of every image) of a `sources.CaptionList`, e.g. a coco_json training
    split (`sources.coco_json_split`); arguments as `load_retrieval`."""
    prep = preprocess.preprocessing_arg(prep, None, None)
    hosts.check_process(process_index, process_count)
    recs = [{"path": p, "captions": [(None, t) for t in caps]} for p, caps in zip(listed.paths, listed.captions)]
    parts = _from_records(recs, max_examples=max_examples, process_index=process_index, process_count=process_count)
    return _retrieval_set(listed.name, parts, prep, tokenizer, batch_size)


def _retrieval_set(spec: str, parts: tuple, prep: preprocess.Preprocessing, tokenizer, batch_size: int
                   ) -> RetrievalSet:
    num_images, captions, owner, per_host, records = parts
    if not captions:
        raise ValueError(f"retrieval set {spec!r} has no captions")
    texts = prep.tokenize(captions, tokenizer)
    texts["caption_image_index"] = np.asarray(owner, np.int32)
    return RetrievalSet(name=spec, num_images=num_images, texts=texts, captions=captions, batch_size=batch_size,
                        num_batches=max(1, math.ceil(per_host / batch_size)), prep=prep,
                        _records=records)
