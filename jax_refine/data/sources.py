"""Where examples come from: TFDS builders (catalog by name, a prepared directory, our COCO-JSON builder).

Every reader here returns raw records — encoded image bytes, never decoded — so the pipeline can skip
ahead cheaply on resume and flag corrupt images itself.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jax_refine import fingerprint
from jax_refine.data import flickr, karpathy
from jax_refine.data.coco_format import check_trainable, read_coco_json, read_json
from jax_refine.data.tf_runtime import tf, tfds

# Catalog aliases: names people use -> the TFDS catalog name.
CATALOG_ALIASES = {"stanford_cars": "cars196", "coco_karpathy": "coco_captions"}


def _field(cfg: Any, key: str, default=None):
    """`cfg.key` for a ConfigDict / dict / object, `default` if absent or None."""
    value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
    return default if value is None else value


def open_catalog(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
                 try_gcs: bool = False):
    """A prepared catalog builder by name; prepares it (download or `manual_dir`) when not there yet.

    Raises ValueError naming what to pass when the name is unknown or preparing fails.
    """
    name = CATALOG_ALIASES.get(name, name)
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=try_gcs)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown TFDS dataset {name!r}: pass a catalog name (e.g. coco_captions, cifar10), "
                         "or use source=tfds_dir / coco_json / folder:<dir> for local data") from None
    if not builder.is_prepared():
        how = (f"point to a prepared {name} (training: --config.data.data_dir=DIR; evaluation: TFDS_DATA_DIR=DIR), "
               f"or prepare it once online: python -c \"import tensorflow_datasets as tfds; "
               f"tfds.builder('{name}').download_and_prepare()\"")
        if not manual_dir and not download_reachable():
            raise ValueError(f"TFDS dataset {name!r} is not prepared under {builder.data_dir_root} and cannot be "
                             f"downloaded (offline: {DOWNLOAD_PROBE[0]}:{DOWNLOAD_PROBE[1]} unreachable); {how}")
        config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
        before = _tree(builder.data_dir_root)
        try:
            builder.download_and_prepare(download_config=config)
        except Exception as e:  # noqa: BLE001 - re-raised with what to pass
            _remove_new_empty_dirs(builder.data_dir_root, before)
            raise ValueError(
                f"TFDS dataset {name!r} is not prepared under data_dir={builder.data_dir_root!r} and preparing it "
                f"failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); "
                f"{how}, or pass manual_dir=<dir with the downloaded archives>"
            ) from None
    return builder


# A host every TFDS download goes through (the GCS mirror / most catalog URLs resolve and connect like it).
DOWNLOAD_PROBE = ("storage.googleapis.com", 443)


def download_reachable(timeout: float = 3.0) -> bool:
    """Whether DOWNLOAD_PROBE accepts a TCP connection within `timeout` seconds (False offline)."""
    try:
        with socket.create_connection(DOWNLOAD_PROBE, timeout=timeout):
            return True
    except OSError:
        return False


def _tree(root: str | Path) -> set[str]:
    """Every directory path under `root` (and root itself if it exists)."""
    root = str(root)
    return {d for d, _, _ in os.walk(root)} if os.path.isdir(root) else set()


def _remove_new_empty_dirs(root: str | Path, before: set[str]) -> None:
    """Remove directories under `root` that a failed prepare created and left empty (deepest first)."""
    for d in sorted(_tree(root) - before, key=len, reverse=True):
        try:
            os.rmdir(d)
        except OSError:
            pass  # not empty: it holds something (kept)
    if str(root) not in before and os.path.isdir(root):
        try:
            os.rmdir(root)
        except OSError:
            pass


def open_directory(path: str | Path):
    """A prepared TFDS dataset directory (holding dataset_info.json), e.g. `prepare_coco_json`'s output."""
    if not (Path(path) / "dataset_info.json").is_file():
        raise FileNotFoundError(f"no prepared TFDS dataset at {path} (dataset_info.json missing): pass the "
                                "<data_dir>/<name>/<config>/<version> directory or run prepare-data first")
    return tfds.builder_from_directory(str(path))


def open_caption_builder(data_config: Any, *, process_count: int = 1):
    """The TFDS builder for a training `data_config` (fields of jax_refine/config_base.py `c.data`).

    source: "tfds" (catalog `name`) or "tfds_dir" (`data_dir` is the prepared dataset dir). A "coco_json"
    source is not a builder: `coco_json_split` reads it in place (see data/training.py).
    """
    del process_count  # every host opens the same prepared builder and reads its own slice
    source = _field(data_config, "source", "tfds")
    if source == "tfds":
        return open_catalog(_field(data_config, "name", "coco_captions"), data_dir=_field(data_config, "data_dir"),
                            manual_dir=_field(data_config, "manual_dir"),
                            try_gcs=bool(_field(data_config, "try_gcs", False)))
    if source == "tfds_dir":
        path = _field(data_config, "data_dir")
        if path is None:
            raise ValueError("source=tfds_dir needs data.data_dir=<prepared TFDS dataset directory>")
        return open_directory(path)
    if source == "coco_json":
        raise ValueError("data.source=coco_json is read in place by make_train_iterator, not opened as a builder")
    raise ValueError(f"unknown data.source={source!r}: use coco_json, tfds or tfds_dir")


def builder_content(builder) -> str:
    """The content key of a prepared TFDS dataset: every file of its directory (record shards,
    dataset_info.json; ``fingerprint.files_key`` by stat). A dataset in a bucket keys by name and version."""
    root = str(builder.data_dir)
    if "://" in root:  # no cheap stat of every object there; a prepared version is not rewritten in place
        return f"{builder.name}:{builder.version}"
    return fingerprint.files_key(fingerprint.tree_files(root), root=root)


def caption_set_content(annotations: str | Path, images: str | Path, paths: list[str]) -> str:
    """The content key of a caption set read in place: the caption file's bytes and every photo it uses
    (``paths``, under ``images``: name, size, mtime, inode), as ``<captions key>:<photos key>``."""
    captions = fingerprint.files_key([annotations], root=Path(annotations).parent, content=True)
    return f"{captions}:{fingerprint.files_key(paths, root=images)}"


def check_split(builder, split: str) -> None:
    """Raise ValueError if a split named in `split` ("train", "train[:10%]+restval", ...) does not exist."""
    known = list(builder.info.splits.keys()) if builder.info.splits else []
    if not known:  # no split metadata (e.g. mocked builders): the reader will complain itself
        return
    for part in split.split("+"):
        base = part.split("[")[0].strip()
        if base not in known:
            raise ValueError(f"split {base!r} not in {builder.name}: available {known} (pass data.split=...)")


def caption_records(builder, split: str, *, shuffle_files: bool = False, seed: int | None = None,
                    add_tfds_id: bool = False) -> "tf.data.Dataset":
    """Raw caption records {"image": bytes, "captions": (n,) string, "key": string} of `split`.

    Works for the catalog's coco_captions and our COCO-JSON builder (same feature names). `key` is the
    image id (or the tfds_id when `add_tfds_id`) for logs and lookups.
    """
    features = builder.info.features
    for need in ("image", "captions"):
        if need not in features:
            raise ValueError(f"{builder.name} has no '{need}' feature: not an image-caption dataset")
    read_config = tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=add_tfds_id)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                            decoders={"image": tfds.decode.SkipDecoding()})
    has_id = "image/id" in features

    def to_record(ex):
        if add_tfds_id:
            key = ex["tfds_id"]
        elif has_id:
            key = tf.strings.as_string(ex["image/id"])
        else:
            key = tf.constant("?")
        return {"image": ex["image"], "captions": ex["captions"]["text"], "key": key}

    return ds.map(to_record, num_parallel_calls=tf.data.AUTOTUNE)


def num_records(builder, split: str) -> int:
    """Number of records in `split` (from TFDS metadata via the dataset's cardinality)."""
    skip = {k: tfds.decode.SkipDecoding() for k in ("image", "video") if k in builder.info.features}
    n = int(builder.as_dataset(split=split, decoders=skip).cardinality())
    if n < 0:
        raise ValueError(f"{builder.name}[{split}]: number of examples unknown")
    return n


class CaptionList(NamedTuple):
    """Image files with their captions in a fixed order: random access, so an epoch can be any permutation.

    `paths[i]` (str), `captions[i]` (tuple of str, possibly empty), `keys[i]` (the image id as str).
    """

    name: str
    paths: tuple[str, ...]
    captions: tuple[tuple[str, ...], ...]
    keys: tuple[str, ...]


def coco_json_split(annotations: str | Path, images: str | Path, split: str = "train", *,
                    train_fraction: float = 1.0, split_seed: int = 42) -> CaptionList:
    """A COCO-format caption set (read by `coco_format.read_coco_json`), split at random as the reference
    does: images in id order, permuted with `np.random.default_rng(split_seed)`; the first
    `int(train_fraction * N)` are "train", the rest "val" (the paper: COCO 2017 train, 0.99, seed 42)."""
    if split not in ("train", "val"):
        raise ValueError(f"data.split={split!r}: a coco_json source has the splits 'train' and 'val' "
                         f"(data.train_fraction={train_fraction} of the images in train)")
    if not 0.0 < float(train_fraction) <= 1.0:
        raise ValueError(f"data.train_fraction={train_fraction!r} must be in (0, 1]")
    records = sorted(read_coco_json(annotations, images), key=lambda r: r["id"])
    check_trainable(records, annotations)  # no usable image-caption pair: an error now, not an endless epoch
    order = np.random.default_rng(int(split_seed)).permutation(len(records))
    n_train = int(float(train_fraction) * len(records))
    chosen = np.sort(order[:n_train] if split == "train" else order[n_train:])
    if not len(chosen):
        raise ValueError(f"{annotations}: split {split!r} is empty ({len(records)} images, train_fraction "
                         f"{train_fraction})")
    picked = [records[i] for i in chosen]
    if n_train < len(records):  # the other split's images are left out of this one: say how many
        print(f"[data] {annotations}: {len(picked)} of {len(records)} images in split {split!r} "
              f"(data.train_fraction={train_fraction}, data.split_seed={split_seed})", flush=True)
    return CaptionList(f"{Path(annotations).stem}[{split}]", tuple(r["path"] for r in picked),
                       tuple(tuple(t for _, t in r["captions"]) for r in picked),
                       tuple(str(r["id"]) for r in picked))


# ------------------------------------------------------------------------------ caption files on disk
CAPTION_FORMATS = ("coco", "flickr", "karpathy")


def detect_format(annotations: str | Path) -> str:
    """The caption format of a file: "flickr" (token text), "karpathy" (JSON whose images carry
    "sentences") or "coco" (JSON with "annotations"). Raises ValueError naming the file otherwise."""
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    if path.suffix.lower() != ".json":
        return "flickr"
    doc = read_json(path)
    if isinstance(doc, dict) and "annotations" in doc:
        return "coco"
    images = doc.get("images") if isinstance(doc, dict) else None
    if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
        return "karpathy"
    raise ValueError(f"{path}: neither COCO captions (images + annotations) nor Karpathy split JSON "
                     "(images with sentences); pass --format")


def read_captions(annotations: str | Path, images: str | Path, *, format: str | None = None,
                  split: str | None = None, counts: dict[str, int] | None = None) -> list[dict]:
    """Records {"id", "file_name", "path", "captions": [(id, text)]} of a caption file in any format.

    `format`: coco | flickr | karpathy (None: `detect_format`). `split`: flickr: a split-list file or
    train|dev|test (the Flickr8k list beside the token file), None for every photo; karpathy: the split
    ("test", "train+restval"; default test); coco: must be None. `counts` receives the skip counts.
    """
    fmt = format or detect_format(annotations)
    if fmt == "coco":
        if split:
            raise ValueError(f"format coco takes no split (got {split!r}): a COCO JSON is one split")
        return read_coco_json(annotations, images)
    if fmt == "flickr":
        return flickr.read_flickr_tokens(annotations, images, flickr.resolve_split_list(annotations, split),
                                         counts=counts)
    if fmt == "karpathy":
        return karpathy.read_karpathy_json(annotations, images, split or "test", counts=counts)
    raise ValueError(f"unknown caption format {fmt!r}: use one of {', '.join(CAPTION_FORMATS)}")
