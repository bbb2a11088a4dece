"""Our TFDS builder for caption sets in the COCO format, and the one-call `prepare_coco_json`.

The caption set is read by `coco_format.read_coco_json`. The prepared dataset has the features of the
catalog's `coco_captions` that the pipeline reads, so one reader serves both; photos are stored as their
original bytes or resized once (`image_size`), and bad or caption-less ones are stored as they are, to be
skipped and counted by the training pipeline (docs/data.md).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from jax_refine.data import decoding
from jax_refine.data.coco_format import check_trainable
from jax_refine.data.sources import caption_set_content, read_captions
from jax_refine.data.tf_runtime import tfds

BUILDER_NAME = "coco_captions_json"
log = logging.getLogger(__name__)


def content_key(annotations: str | Path, images: str | Path, paths: Sequence[str]) -> str:
    """12 hex digits over the annotations file's bytes and every photo the records use (``paths``, under
    ``images``, sub-folders included: name, size, mtime, inode; ``fingerprint.files_key``): a prepared dataset
    is reused only for the same content."""
    return hashlib.sha256(caption_set_content(annotations, images, list(paths)).encode()).hexdigest()[:12]


@dataclasses.dataclass(eq=False)
class CocoJsonConfig(tfds.core.BuilderConfig):
    """One caption set: `annotations` file + `images` dir, written as split `split`.

    `format` coco|flickr|karpathy (empty: detected) and `subset` (the split read from the file: a Flickr
    split list / train|dev|test, a Karpathy split) pick the reader (`sources.read_captions`)."""

    annotations: str = ""
    images: str = ""
    split: str = "train"
    format: str = ""
    subset: str = ""
    image_size: int = 0  # > 0: photos stored with the shortest side resized to this (decoding.resize_for_storage)
    image_format: str = "jpeg"  # of the resized photos: jpeg (quality 95) | png


class CocoCaptionsJson(tfds.core.GeneratorBasedBuilder):
    """COCO-format captions (annotations JSON + image directory) as a TFDS dataset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images stored as original bytes; all captions per image."}
    BUILDER_CONFIGS = [CocoJsonConfig(name="default")]
    # No downloads, hence no checksums file. Setting these keeps TFDS from resolving the module's
    # resource path, which needs the `importlib_resources` backport (not a dependency of ours).
    code_path = None
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-caption pairs from a COCO-format annotations JSON and an image directory.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "image/id": tfds.features.Scalar(dtype=np.int64),
                "image/filename": tfds.features.Text(),
                "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int64)}),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        records = read_captions(cfg.annotations, cfg.images, format=cfg.format or None, split=cfg.subset or None)
        return {cfg.split: self._generate_examples(records)}

    def _generate_examples(self, records):
        missing = 0
        for rec, data in zip(records, _stored_images(records, self.builder_config)):
            path = Path(rec["path"])
            if not data:
                missing += 1
                if missing <= 20:
                    log.warning("image file missing or empty: %s (stored empty; training skips and counts it)", path)
            yield rec["id"], {
                "image": data,
                "image/id": rec["id"],
                "image/filename": rec["file_name"],
                "captions": [{"text": t, "id": cid} for cid, t in rec["captions"]],
            }


def _stored_images(records, cfg: CocoJsonConfig):
    """Each record's image bytes in order: the file's bytes (b"" when missing), or with `cfg.image_size`
    resized on a thread per core (PIL releases the GIL); an unreadable file is stored as it is."""
    def load(rec) -> bytes:
        path = Path(rec["path"])
        data = path.read_bytes() if path.is_file() else b""  # missing file: skipped + counted later
        if data and cfg.image_size:
            try:
                return decoding.resize_for_storage(data, cfg.image_size, cfg.image_format)
            except Exception as e:  # noqa: BLE001 - stored as is: training skips and counts it
                log.warning("cannot resize %s (%s): stored as it is", path, e)
        return data

    with concurrent.futures.ThreadPoolExecutor(decoding.usable_cores()) as pool:
        for start in range(0, len(records), 256):  # in chunks: a bounded number of images held at a time
            yield from pool.map(load, records[start:start + 256])


def _config_name(annotations: str | Path, images: str | Path, paths: Sequence[str], name: str | None = None,
                 subset: str | None = None, image_size: int = 0) -> str:
    """`<name or annotations stem[_subset]>-<content_key>[-<image_size>px]`: one prepared dataset per content."""
    stem = name or (Path(annotations).stem + (f"_{Path(subset).stem}" if subset else ""))
    base = re.sub(r"[^\w\-.]", "_", stem) or "default"
    return f"{base}-{content_key(annotations, images, paths)}" + (f"-{image_size}px" if image_size else "")


def prepare_coco_json(
    annotations: str | Path, images: str | Path, out_dir: str | Path, *, name: str | None = None,
    split: str = "train", format: str | None = None, subset: str | None = None, image_size: int | None = None,
    image_format: str = "jpeg",
) -> Path:
    """Write the caption set as a TFDS dataset under `out_dir` once; returns its dataset directory.

    The result (`out_dir/coco_captions_json/<name>/1.0.0`) opens with `tfds.builder_from_directory`
    (config `data.source="tfds_dir"`). `name` defaults to the annotations file's stem. A dataset already
    prepared there is reused only when it was prepared from the same content: the config name is
    `<name>-<content_key>` (hash of the annotations file and of every photo it uses) under the builder's version,
    so a changed file or image set with the same file name is prepared anew (and the log says so).
    `format` / `subset`: any caption format `sources.read_captions` reads (Flickr token file + split list,
    Karpathy JSON + split); the default is detected from the file. `image_size`: store each photo with its
    shortest side resized to it (the CLIPImageProcessor resize; JPEG quality 95 or `image_format="png"`), so
    training at that size decodes small images and skips the resize; default: the original bytes.
    """
    fmt = format or ""
    records = read_captions(annotations, images, format=fmt or None, split=subset)  # fail fast, before TFDS
    check_trainable(records, annotations)
    if image_size is not None and int(image_size) < 1:
        raise ValueError(f"image_size={image_size!r}: a positive number of pixels, or None for the original bytes")
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format={image_format!r}: use 'jpeg' or 'png'")
    size = int(image_size or 0)
    config_name = (_config_name(annotations, images, [r["path"] for r in records], name, subset, size)
                   + ("-png" if size and image_format == "png" else ""))
    cfg = CocoJsonConfig(name=config_name, annotations=str(annotations), images=str(images), split=split,
                         format=fmt, subset=subset or "", image_size=size, image_format=image_format)
    out_dir = Path(out_dir).absolute()  # relative to the caller's directory, printed in full
    with _prepare_lock(out_dir / BUILDER_NAME / f".{config_name}.lock"):  # a second run of the same set waits
        _remove_incomplete(out_dir / BUILDER_NAME / config_name)
        builder = CocoCaptionsJson(config=cfg, data_dir=str(out_dir))  # made under the lock: sees a finished one
        if not builder.is_prepared():
            base = config_name.rsplit("-", 1)[0]
            others = sorted(p.name for p in (Path(out_dir) / BUILDER_NAME).glob(f"{base}-*")
                            if p.name != config_name and not p.name.startswith("."))
            if others:
                print(f"[data] {annotations}: content differs from the prepared {', '.join(others)} in {out_dir}; "
                      f"preparing anew as {config_name}", flush=True)
        builder.download_and_prepare(download_dir=str(Path(out_dir) / "downloads"))
    return Path(builder.data_dir)


@contextlib.contextmanager
def _prepare_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for one preparation: two prepare-data runs of the same set into the
    same --out take turns (the second finds the dataset ready and reuses it). The kernel drops the lock when
    its process dies, so a killed run never blocks the next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[data] another prepare-data of the same set is writing {path.parent}: waiting for it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_incomplete(config_dir: Path) -> None:
    """Remove TFDS's ``incomplete.*`` directories of a killed earlier preparation (called under the lock, so no
    live run owns them); one line says so."""
    leftovers = sorted(config_dir.glob("incomplete.*")) if config_dir.is_dir() else []
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    if leftovers:
        print(f"[data] removed {len(leftovers)} leftover(s) of an earlier, killed prepare-data in {config_dir}: "
              f"{', '.join(p.name for p in leftovers)}", flush=True)
