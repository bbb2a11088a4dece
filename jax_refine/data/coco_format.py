"""COCO caption JSON, read and written without TensorFlow.

The format: an annotations JSON with
  "images":      [{"id": int, "file_name": str, ...}, ...]
  "annotations": [{"image_id": int, "caption": str, "id": int (optional)}, ...]
plus a directory holding the image files (`file_name` is relative to it, or absolute). Records, the form
every caption reader gives (`read_coco_json`, `flickr`, `karpathy`): one dict per image
{"id", "file_name", "path", "captions": [(caption_id, text), ...]}.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_json(path: Path) -> Any:
    """The JSON document in the file ``path``: UTF-8, with or without a byte-order mark (Windows editors add
    one). ValueError naming the file for bytes that are not UTF-8 (say, Latin-1) or for text that is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it "
                         "as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


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
    doc = read_json(ann_path)
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
    empty = 0
    for i, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
            raise ValueError(f"{ann_path}: annotations[{i}] needs 'image_id' and 'caption', got {a!r:.100}")
        if a["image_id"] not in by_id:
            raise ValueError(f"{ann_path}: annotations[{i}] refers to unknown image_id {a['image_id']!r}")
        if not isinstance(a["caption"], str) or not a["caption"].strip():  # null, "", "  ", a number: not text
            empty += 1
            continue
        by_id[a["image_id"]]["captions"].append((int(a.get("id", i)), a["caption"]))
    if empty:
        log.warning("%s: skipped %d empty or null captions (of %d)", ann_path, empty, len(doc["annotations"]))
    if not by_id:
        raise ValueError(f"{ann_path}: 'images' is empty")
    return list(by_id.values())


def check_trainable(records: list[dict], annotations: str | Path) -> None:
    """Raise ValueError naming `annotations` when no image has both a caption and a file on disk."""
    with_caption = [r for r in records if r["captions"]]
    usable = sum(Path(r["path"]).is_file() for r in with_caption)
    if not usable:
        raise ValueError(f"{annotations}: no usable image-caption pair ({len(records)} images, "
                         f"{len(with_caption)} with a caption, {usable} of those with an image file on disk)")


def write_coco_json(path: str | Path, images: Iterable[Mapping[str, Any]], *,
                    info: Mapping[str, Any] | None = None) -> Path:
    """Write `images` as a COCO captions JSON at `path` (parent folders made) -> `path`.

    Each image is {"file_name": str, "captions": Sequence[str], ...}: the other keys (width, height, ...) go
    into its "images" entry. Image ids are 0, 1, ... in order; caption ids count on across images.
    """
    doc: dict[str, Any] = {"info": dict(info)} if info is not None else {}
    doc.update(images=[], annotations=[])
    for i, image in enumerate(images):
        texts: Sequence[str] = image["captions"]
        doc["images"].append({"id": i, **{k: v for k, v in image.items() if k != "captions"}})
        first = len(doc["annotations"])
        doc["annotations"] += [{"id": first + j, "image_id": i, "caption": t} for j, t in enumerate(texts)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path
