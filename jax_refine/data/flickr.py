"""Flickr8k / Flickr30k captions in their token format, read into the records `read_coco_json` gives.

The format (`Flickr8k.token.txt`, Flickr30k's `results_20130124.token`): one caption a line,
`<file>.jpg#<n>\t<caption>`, usually 5 captions per photo, plus optional split lists
(`Flickr_8k.{train,dev,test}Images.txt`: one file name a line). Real files are noisy: Flickr8k's holds 5
caption lines of 2 names without a photo (`2258277193_586949ec62.jpg` and `...jpg.1`). Such lines,
split-list photos without captions and malformed lines are skipped, counted and logged, never fatal.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Counts a reader reports (also the keys of the `counts` dict it fills).
SKIP_COUNTS = ("skipped_caption_missing_photo", "skipped_photo_no_caption", "skipped_malformed_line")
# Split names -> the split-list file name of the Flickr8k distribution.
FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                        "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def resolve_split_list(token_file: str | Path, split: str | None) -> Path | None:
    """A split-list path from `split`: a file, or train|dev|val|test (the Flickr8k list beside `token_file`)."""
    if not split:
        return None
    if split in FLICKR8K_SPLIT_FILES and not Path(split).is_file():
        return Path(token_file).parent / FLICKR8K_SPLIT_FILES[split]
    return Path(split)


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def read_flickr_tokens(token_file: str | Path, images: str | Path, split_list: str | Path | None = None, *,
                       counts: dict[str, int] | None = None) -> list[dict]:
    """Parse a Flickr token file: one dict per photo {"id", "file_name", "path", "captions"}, like
    `read_coco_json` (captions: list of (n, text), n the `#n` of the line).

    `split_list`: keep only the photos it names, in its order (None: every photo, in file order).
    `counts`, when given, receives the `SKIP_COUNTS` (also logged). Raises FileNotFoundError naming a
    missing token file / split list / image directory, ValueError when no photo is left.
    """
    token_path, img_dir = Path(token_file), Path(images)
    lines = _read_lines(token_path, "Flickr token file")
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image directory not found: {img_dir} (pass the Flickr image folder)")
    present = {p.name for p in img_dir.iterdir()}
    n = dict.fromkeys(SKIP_COUNTS, 0)
    by_name: dict[str, list[tuple[int, str]]] = {}
    missing_names: set[str] = set()
    for line in lines:
        if not line.strip():
            continue
        key, tab, text = line.partition("\t")
        name, hash_, num = key.strip().rpartition("#")
        if not tab or not hash_ or not name or not text.strip():
            n["skipped_malformed_line"] += 1
            continue
        if name not in present:
            n["skipped_caption_missing_photo"] += 1
            missing_names.add(name)
            continue
        by_name.setdefault(name, []).append((int(num) if num.isdigit() else len(by_name.get(name, ())),
                                             text.strip()))
    if split_list is not None:
        wanted = [s.strip() for s in _read_lines(Path(split_list), "Flickr split list") if s.strip()]
        n["skipped_photo_no_caption"] = sum(1 for s in wanted if s not in by_name)
        names = [s for s in wanted if s in by_name]
    else:
        names = list(by_name)
    if any(n.values()):
        log.warning("%s%s: skipped %d caption lines of %d missing photos (%s), %d photos without captions, "
                    "%d malformed lines", token_path, f" [{Path(split_list).name}]" if split_list else "",
                    n["skipped_caption_missing_photo"], len(missing_names), ", ".join(sorted(missing_names)[:3]),
                    n["skipped_photo_no_caption"], n["skipped_malformed_line"])
    if counts is not None:
        counts.update(n)
    if not names:
        raise ValueError(f"{token_path}: no captioned photo found in {img_dir}"
                         + (f" for split list {split_list}" if split_list else ""))
    return [{"id": i, "file_name": name, "path": str(img_dir / name), "captions": by_name[name]}
            for i, name in enumerate(names)]
