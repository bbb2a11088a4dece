"""Image-caption training batches: per host, deterministic, resumable, bad examples skipped and counted.

Epoch e's order is a function of (seed, e): a full permutation for a `CaptionList` source (COCO JSON read in
place), a seeded shuffle buffer for a TFDS builder. State `{"epoch", "position", "seed", ...}` is small JSON:
`set_state` rebuilds epoch e and skips `position` raw records, so a resumed run sees exactly the batches of
an uninterrupted one. The sources and the tf.data pipeline stage by stage: docs/data.md, "Training data".
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jax_refine import preprocess
from jax_refine.data import decoding, hosts, sources
from jax_refine.data.tf_runtime import tf, tfds

log = logging.getLogger(__name__)
_COUNTS = ("skipped_no_caption", "skipped_bad_image")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**31 - 1)


class TrainIterator:
    """Endless iterator of per-host numpy batches {"image": (b,H,W,3) f32, "input_ids", "attention_mask": (b,L) i32}.

    `num_examples` (whole split, image-caption pairs), `steps_per_epoch` (global batches per epoch),
    `get_state()/set_state()`, `stats()` (skipped counts, examples seen).
    """

    def __init__(self, builder, split: str | None, *, global_batch_size: int, prep: preprocess.Preprocessing,
                 seed: int, process_index: int, process_count: int, tokenizer=None, caption_mode: str = "random",
                 shuffle_buffer: int = 10_000, num_parallel_calls: int = -1, prefetch: int = 2,
                 fast_decode: bool = False):
        if caption_mode not in ("random", "all"):
            raise ValueError(f"caption_mode={caption_mode!r}: use 'random' or 'all'")
        hosts.check_process(process_index, process_count)
        self.listed = isinstance(builder, sources.CaptionList)  # random access: a full permutation per epoch
        if not self.listed:
            sources.check_split(builder, split)
        self.builder, self.split = builder, split
        self.batch_size = hosts.per_host_batch_size(global_batch_size, process_count)
        self.prep = prep  # the model's image size, resize, mean/std, tokenizer, text length
        self.tokenizer = tokenizer if tokenizer is not None else prep.get_tokenizer()
        self.seed, self.caption_mode = int(seed), caption_mode
        self.process_index, self.process_count = process_index, process_count
        self.shuffle_buffer, self.num_parallel_calls, self.prefetch = shuffle_buffer, num_parallel_calls, prefetch
        self.fast_decode = bool(fast_decode)
        self.host_split = (tfds.even_splits(split, process_count)[process_index]
                           if process_count > 1 and not self.listed else split)
        self.num_examples = self._count_examples()
        self.steps_per_epoch = (self.num_examples // process_count) // self.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{builder.name}[{split or ''}] has {self.num_examples} examples ({caption_mode} captions), fewer than one "
                f"global batch of {global_batch_size} ({self.batch_size} per host x {process_count}): lower the batch size"
            )
        self.epoch, self.position, self.batches = 0, 0, 0
        self.counts = dict.fromkeys(_COUNTS, 0)
        self.epoch_start = dict(self.counts)  # counts when the current epoch began
        self.last_epoch: dict[str, int] = {}  # skipped in the last finished epoch
        self._it: Iterator | None = None
        self._base = dict(self.counts)
        self._epoch_batches = 0  # self.batches when the current epoch began
        self.identity: dict[str, Any] | None = None  # what it reads (data_identity), set by make_train_iterator

    # -- sizes -------------------------------------------------------------------------------------
    def _count_examples(self) -> int:
        if self.listed:
            return len(self.builder.paths) if self.caption_mode == "random" else sum(
                max(len(c), 1) for c in self.builder.captions)
        if self.caption_mode == "random":
            return sources.num_records(self.builder, self.split)
        ds = sources.caption_records(self.builder, self.split)  # one pass over the records, images not decoded
        sizes = ds.map(lambda r: tf.size(r["captions"], out_type=tf.int64))
        return int(sizes.reduce(tf.constant(0, tf.int64), lambda a, n: a + n))

    # -- the per-epoch tf.data pipeline --------------------------------------------------------------
    def epoch_examples(self, epoch: int) -> dict[str, np.ndarray]:
        """A `CaptionList` epoch's order on this host: {"path", "caption", "key", "exists", "status"} (n,).

        The whole split is permuted by `default_rng([seed, epoch])` (examples = images, or (image, caption)
        pairs in "all" mode) and this host takes its contiguous slice, so the order does not depend on the
        host layout except through the slicing.
        """
        src = self.builder
        if self.caption_mode == "random":
            draw = np.random.default_rng([self.seed, epoch, 1]).integers(0, 2**31 - 1, len(src.paths))
            image = np.arange(len(src.paths))
            caption = [c[d % len(c)] if c else "" for c, d in zip(src.captions, draw)]
        else:
            pairs = [(i, t) for i, c in enumerate(src.captions) for t in (c or ("",))]
            image = np.asarray([i for i, _ in pairs], np.int64)
            caption = [t for _, t in pairs]
        order = np.random.default_rng([self.seed, epoch]).permutation(len(image))
        start, stop = hosts.host_range(len(order), self.process_index, self.process_count)
        order = order[start:stop]
        img = image[order]
        exists = np.asarray([Path(src.paths[i]).is_file() for i in img], bool)
        status = np.asarray([decoding.OK if src.captions[i] else decoding.NO_CAPTION for i in img], np.int32)
        return {"path": np.asarray([src.paths[i] for i in img], object).astype(str),
                "caption": np.asarray([caption[j] for j in order], object).astype(str),
                "key": np.asarray([src.keys[i] for i in img], object).astype(str), "exists": exists, "status": status}

    def _listed_records(self, epoch: int, position: int) -> "tf.data.Dataset":
        ex = self.epoch_examples(epoch)
        ds = tf.data.Dataset.from_tensor_slices(ex).enumerate().skip(position)

        def read(i, r):  # a missing file becomes empty bytes: skipped and counted as a bad image
            image = tf.cond(r["exists"], lambda: tf.io.read_file(r["path"]), lambda: tf.constant(b""))
            return {"image": image, "caption": r["caption"], "key": r["key"], "status": r["status"], "index": i}

        return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def _dataset(self, epoch: int, position: int) -> "tf.data.Dataset":
        eseed = _epoch_seed(self.seed, epoch)
        if self.listed:
            ds = self._listed_records(epoch, position)
        else:
            ds = sources.caption_records(self.builder, self.host_split, shuffle_files=True, seed=eseed)
            if self.shuffle_buffer > 1:
                ds = ds.shuffle(self.shuffle_buffer, seed=eseed, reshuffle_each_iteration=False)
            ds = (ds.flat_map(self._pairs) if self.caption_mode == "all"
                  else ds.map(lambda r: self._one_caption(r, eseed)))
            ds = ds.enumerate().map(lambda i, ex: {**ex, "index": i}).skip(position)
        end = {"image": tf.constant(b""), "caption": tf.constant(b""), "key": tf.constant(b"<end>"),
               "status": tf.constant(decoding.END, tf.int32), "index": tf.constant(-1, tf.int64)}
        ds = ds.concatenate(tf.data.Dataset.from_tensors(end))
        ds = decoding.decode_images(ds, self.prep, self.num_parallel_calls, fast=self.fast_decode)

        def count(totals, ex):
            totals = totals + tf.cast(tf.stack([ex["status"] == decoding.NO_CAPTION,
                                                ex["status"] == decoding.BAD_IMAGE]), tf.int64)
            return totals, {**ex, "skipped": totals}

        ds = ds.scan(tf.zeros([2], tf.int64), count)
        ds = ds.filter(lambda ex: (ex["status"] == decoding.OK) | (ex["status"] == decoding.END))
        ds = ds.batch(self.batch_size)

        def finish(b):
            ids, mask = decoding.tokenize_batch(b["caption"], self.prep, self.tokenizer)
            return {"image": decoding.normalize(b["image"], self.prep), "input_ids": ids, "attention_mask": mask,
                    "status": b["status"], "index": b["index"], "skipped": b["skipped"]}

        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.with_options(decoding.thread_options()).prefetch(self.prefetch or tf.data.AUTOTUNE)

    @staticmethod
    def _one_caption(rec, eseed: int):
        n = tf.size(rec["captions"])
        key_hash = tf.strings.to_hash_bucket_fast(rec["key"], 2**31 - 1)
        pick = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(eseed, tf.int64), key_hash]),
                                           minval=0, maxval=tf.maximum(n, 1), dtype=tf.int32)
        caption = tf.concat([rec["captions"], [""]], 0)[tf.minimum(pick, n)]
        status = tf.where(n > 0, decoding.OK, decoding.NO_CAPTION)
        return {"image": rec["image"], "caption": caption, "key": rec["key"], "status": tf.cast(status, tf.int32)}

    @staticmethod
    def _pairs(rec):
        n = tf.size(rec["captions"])
        captions = tf.cond(n > 0, lambda: rec["captions"], lambda: tf.constant([""]))
        m = tf.size(captions)
        status = tf.fill([m], tf.where(n > 0, decoding.OK, decoding.NO_CAPTION))
        return tf.data.Dataset.from_tensor_slices({
            "image": tf.fill([m], rec["image"]), "caption": captions, "key": tf.fill([m], rec["key"]),
            "status": tf.cast(status, tf.int32),
        })

    # -- iteration -----------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self._it is None:
                self._base = dict(self.counts)
                self._it = self._dataset(self.epoch, self.position).as_numpy_iterator()
            batch = next(self._it)
            ended = batch["status"] == decoding.END
            self.counts = {k: self._base[k] + int(v) for k, v in zip(_COUNTS, batch["skipped"][-1])}
            if ended.any():  # the sentinel: this epoch is over (its partial tail batch is dropped)
                self.last_epoch = {k: self.counts[k] - self.epoch_start[k] for k in _COUNTS}
                if self.batches == self._epoch_batches and self.position == 0:  # a whole epoch, not one batch
                    raise ValueError(
                        f"{self.builder.name}[{self.split}] cannot make one batch of {self.batch_size}: a whole "
                        f"epoch skipped {self.last_epoch['skipped_no_caption']} examples without a caption and "
                        f"{self.last_epoch['skipped_bad_image']} with a missing or unreadable image "
                        f"(from {getattr(self.builder, 'data_dir', None) or self.builder.name})")
                self._epoch_batches = self.batches
                log.info("epoch %d done on process %d (%d batches in total): skipped %s", self.epoch,
                         self.process_index, self.batches, self.last_epoch)
                self.epoch, self.position, self._it = self.epoch + 1, 0, None
                self.epoch_start = dict(self.counts)
                continue
            self.position = int(batch["index"][-1]) + 1
            self.batches += 1
            return {k: batch[k] for k in ("image", "input_ids", "attention_mask")}

    # -- checkpointing and metrics -------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-able position: epoch, raw records consumed in it, seed, host layout, counters."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batches": self.batches,
                "caption_mode": self.caption_mode, "process_index": self.process_index,
                "process_count": self.process_count, **self.counts,
                "epoch_start": dict(self.epoch_start), "last_epoch": dict(self.last_epoch)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at `state` (from `get_state`); the host layout, seed and caption mode must match."""
        for key in ("seed", "caption_mode", "process_count", "process_index"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data state has {key}={state[key]!r} but this run has {getattr(self, key)!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.batches = int(state.get("batches", 0))
        self.counts = {k: int(state.get(k, 0)) for k in _COUNTS}
        self.epoch_start = {k: int(state.get("epoch_start", {}).get(k, 0)) for k in _COUNTS}
        self.last_epoch = {k: int(v) for k, v in state.get("last_epoch", {}).items()}
        self._it = None
        self._epoch_batches = self.batches

    def close(self) -> None:
        """Drop the tf.data iterator, so its prefetch and parallel-map threads end with the run (the trainer
        calls this however the run ends); a later ``next`` starts again at the current position."""
        self._it = None

    def stats(self) -> dict[str, int]:
        """Counters for the metrics: skipped examples (no caption / unreadable image) in total and in the
        last finished epoch (`last_epoch_skipped_*`), batches, epoch."""
        last = {f"last_epoch_{k}": v for k, v in self.last_epoch.items()}
        return {**self.counts, **last, "batches": self.batches, "epoch": self.epoch}


def make_train_iterator(data_config: Any, *, global_batch_size: int, prep: preprocess.Preprocessing | None = None,
                        image_size: int | None = None, max_length: int | None = None, seed: int = 0,
                        process_index: int = 0, process_count: int = 1, tokenizer=None) -> TrainIterator:
    """The training iterator for `data_config` (jax_refine/config_base.py `c.data`); see `TrainIterator`.

    `prep`: the model's preprocessing (`models.registry.preprocessing`); or CLIP's at `image_size` / `max_length`
    (default 224 / 77). `tokenizer`: overrides `prep.get_tokenizer()`.
    """
    prep = preprocess.preprocessing_arg(prep, image_size, max_length)
    image_size = prep.image_size
    f = sources._field
    if f(data_config, "source", "tfds") == "coco_json":  # read in place: a full permutation per epoch
        ann, images = f(data_config, "annotations"), f(data_config, "images")
        if ann is None or images is None:
            raise ValueError("source=coco_json needs data.annotations=<captions.json> and data.images=<image dir>")
        builder = sources.coco_json_split(ann, images, f(data_config, "split", "train"),
                                          train_fraction=float(f(data_config, "train_fraction", 1.0)),
                                          split_seed=int(f(data_config, "split_seed", 42)))
    else:
        builder = sources.open_caption_builder(data_config, process_count=process_count)
        stored = re.search(r"-(\d+)px(-png)?$", Path(str(f(data_config, "data_dir", ""))).parent.name)
        if stored and int(stored.group(1)) < image_size:  # prepare-data --image-size smaller than the model's
            raise ValueError(f"data.data_dir={f(data_config, 'data_dir')} holds photos prepared at {stored.group(1)} px "
                             f"but the model takes {image_size} px: prepare again with --image-size {image_size}")
    it = TrainIterator(
        builder, f(data_config, "split", "train"), global_batch_size=global_batch_size, prep=prep, seed=seed, process_index=process_index, process_count=process_count,
        tokenizer=tokenizer, caption_mode=f(data_config, "caption_mode", "random"),
        shuffle_buffer=int(f(data_config, "shuffle_buffer", 10_000)),
        num_parallel_calls=int(f(data_config, "num_parallel_calls", -1)), prefetch=int(f(data_config, "prefetch", 2)),
        fast_decode=bool(f(data_config, "fast_decode", False)),
    )
    it.identity = data_identity(data_config, builder)
    return it


def data_identity(data_config: Any, builder) -> dict[str, Any]:
    """What the run reads, as its workdir records it (``workdir.RunRecord``): the resolved paths and the
    content keys (``fingerprint.files_key``) of the caption file (bytes) and of the photos of the split
    (size, mtime, inode); for a prepared TFDS set its directory and every file in it."""
    f = sources._field
    if isinstance(builder, sources.CaptionList):
        ann, images = f(data_config, "annotations"), f(data_config, "images")
        captions, photos = sources.caption_set_content(ann, images, list(builder.paths)).split(":")
        return {"annotations": os.path.realpath(ann), "captions_key": captions, "images": os.path.realpath(images),
                "photos_key": photos, "num_photos": len(builder.paths)}
    root = str(builder.data_dir)
    return {"dataset": root if "://" in root else os.path.realpath(root), "files_key": sources.builder_content(builder)}
