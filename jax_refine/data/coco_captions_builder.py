"""Our TFDS builder for caption sets in the COCO format, and the one-call `prepare_coco_json`.

The COCO caption format: an annotations JSON with
  "images":      [{"id": int, "file_name": str}, ...]
  "annotations": [{"image_id": int, "caption": str, "id": int (optional)}, ...]
plus a directory holding the image files (`file_name` is relative to it). COCO 2017
(`captions_train2017.json` + `train2017/`) and any caption set written in that format work.

The prepared dataset has the features of the catalog's `coco_captions` that the pipeline reads
("image" encoded bytes, "image/id", "image/filename", "captions" {"text", "id"}), so one reader serves
both. Images are stored as their original bytes (never decoded at prepare time): a corrupt or missing
file is stored as-is / empty and skipped-and-counted by the training pipeline; an image without
captions is stored with an empty caption list and skipped-and-counted the same way.
"""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
from pathlib import Path

from jax_refine.data.tf_runtime import tfds

BUILDER_NAME = "coco_captions_json"


def read_coco_json(annotations: str | Path, images: str | Path) -> list[dict]:
    """Parse a COCO-format captions JSON: one dict per image {"id", "file_name", "path", "captions"}.

    `captions` is a list of (caption_id, text), possibly empty. Raises FileNotFoundError /
    ValueError naming the file and key at fault.
    """
    ann_path, img_dir = Path(annotations), Path(images)
    if not ann_path.is_file():
        raise FileNotFoundError(f"annotations JSON not found: {ann_path} (pass data.annotations=<captions.json>)")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image directory not found: {img_dir} (pass data.images=<image dir>)")
    try:
        doc = json.loads(ann_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_path}: not valid JSON ({e})") from None
    for key in ("images", "annotations"):
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise ValueError(f"{ann_path}: missing list '{key}' (COCO caption format: images + annotations)")
    by_id: dict[int, dict] = {}
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise ValueError(f"{ann_path}: images[{i}] needs 'id' and 'file_name', got {im!r:.100}")
        if im["id"] in by_id:
            raise ValueError(f"{ann_path}: duplicate image id {im['id']!r} at images[{i}]")
        by_id[im["id"]] = {"id": int(im["id"]), "file_name": str(im["file_name"]),
                           "path": str(img_dir / im["file_name"]), "captions": []}
    for i, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise ValueError(f"{ann_path}: annotations[{i}] needs 'image_id' and 'caption', got {a!r:.100}")
        if a["image_id"] not in by_id:
            raise ValueError(f"{ann_path}: annotations[{i}] refers to unknown image_id {a['image_id']!r}")
        by_id[a["image_id"]]["captions"].append((int(a.get("id", i)), str(a["caption"])))
    if not by_id:
        raise ValueError(f"{ann_path}: 'images' is empty")
    return list(by_id.values())


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
        from jax_refine.data.sources import read_captions

        records = read_captions(cfg.annotations, cfg.images, format=cfg.format or None, split=cfg.subset or None)
        return {cfg.split: self._generate_examples(records)}

    def _generate_examples(self, records):
        for rec in records:
            path = Path(rec["path"])
            data = path.read_bytes() if path.is_file() else b""  # missing file: skipped + counted later
            yield rec["id"], {
                "image": data,
                "image/id": rec["id"],
                "image/filename": rec["file_name"],
                "captions": [{"text": t, "id": cid} for cid, t in rec["captions"]],
            }


def _config_name(annotations: str | Path, subset: str | None = None) -> str:
    stem = Path(annotations).stem + (f"_{Path(subset).stem}" if subset else "")
    return re.sub(r"[^\w\-.]", "_", stem) or "default"


def prepare_coco_json(
    annotations: str | Path, images: str | Path, out_dir: str | Path, *, name: str | None = None,
    split: str = "train", format: str | None = None, subset: str | None = None,
) -> Path:
    """Write the caption set as a TFDS dataset under `out_dir` once; returns its dataset directory.

    The result (`out_dir/coco_captions_json/<name>/1.0.0`) opens with `tfds.builder_from_directory`
    (config `data.source="tfds_dir"`). `name` defaults to the annotations file's stem. A dataset already
    prepared there is reused as it is (delete the directory to re-prepare after changing the JSON).
    `format` / `subset`: any caption format `sources.read_captions` reads (Flickr token file + split list,
    Karpathy JSON + split); the default is a COCO JSON.
    """
    from jax_refine.data.sources import read_captions

    fmt = format or ""
    read_captions(annotations, images, format=fmt or None, split=subset)  # fail fast, before TFDS starts
    cfg = CocoJsonConfig(name=name or _config_name(annotations, subset), annotations=str(annotations),
                         images=str(images), split=split, format=fmt, subset=subset or "")
    builder = CocoCaptionsJson(config=cfg, data_dir=str(out_dir))
    builder.download_and_prepare(download_dir=str(Path(out_dir) / "downloads"))
    return Path(builder.data_dir)
