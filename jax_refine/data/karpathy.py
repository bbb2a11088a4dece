"""Karpathy's split JSON (`dataset_{coco,flickr8k,flickr30k}.json`), read into `read_coco_json`'s records.

The format: {"images": [{"filename": str, "filepath": str (COCO only, e.g. "val2014"), "split":
"train"|"val"|"test"|"restval", "imgid": int, "sentences": [{"raw": str, "tokens": [...], "sentid": int}]}]}.
Photo paths are `<image dir>/<filepath>/<filename>` (or `<image dir>/<filename>` without filepath).
Captions of missing photos and photos without captions are skipped, counted and logged, never fatal.
"""
from __future__ import annotations

import logging
from pathlib import Path

from jax_refine.data.coco_format import read_json
from jax_refine.data.flickr import SKIP_COUNTS

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "restval")


def read_karpathy_json(path: str | Path, images: str | Path, split: str = "test", *,
                       counts: dict[str, int] | None = None) -> list[dict]:
    """One dict per photo of `split` ("test", "train+restval", ...): {"id", "file_name", "path",
    "captions": [(sentid, raw)]}, in file order. `counts` receives `SKIP_COUNTS` (also logged).

    Raises FileNotFoundError / ValueError naming the file, key or split at fault.
    """
    json_path, img_dir = Path(path), Path(images)
    if not json_path.is_file():
        raise FileNotFoundError(f"Karpathy split JSON not found: {json_path}")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image directory not found: {img_dir}")
    wanted = [s.strip() for s in split.split("+") if s.strip()]
    bad = [s for s in wanted if s not in SPLITS]
    if not wanted or bad:
        raise ValueError(f"{json_path}: unknown split {split!r}; use {'|'.join(SPLITS)} (joined with '+')")
    doc = read_json(json_path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{json_path}: missing list 'images' (Karpathy split format)")
    n = dict.fromkeys(SKIP_COUNTS, 0)
    records = []
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "filename" not in im or "split" not in im:
            raise ValueError(f"{json_path}: images[{i}] needs 'filename' and 'split', got {im!r:.100}")
        if im["split"] not in wanted:
            continue
        sentences = im.get("sentences") or []
        captions = []
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and s.get("tokens"):
                raw = " ".join(s["tokens"])
            if not isinstance(raw, str) or not raw.strip():
                n["skipped_malformed_line"] += 1
                continue
            captions.append((int(s.get("sentid", j)), raw.strip()))
        photo = img_dir / im.get("filepath", "") / im["filename"]
        if not photo.is_file():
            n["skipped_caption_missing_photo"] += len(captions)
            continue
        if not captions:
            n["skipped_photo_no_caption"] += 1
            continue
        records.append({"id": int(im.get("imgid", i)), "file_name": str(Path(im.get("filepath", "")) / im["filename"]),
                        "path": str(photo), "captions": captions})
    if any(n.values()):
        log.warning("%s [%s]: skipped %d captions of missing photos, %d photos without captions, %d empty "
                    "sentences", json_path, split, n["skipped_caption_missing_photo"],
                    n["skipped_photo_no_caption"], n["skipped_malformed_line"])
    if counts is not None:
        counts.update(n)
    if not records:
        raise ValueError(f"{json_path}: no captioned photo of split {split!r} found in {img_dir}")
    return records
