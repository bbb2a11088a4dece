"""Caption formats beside COCO JSON: the Flickr token format, Karpathy's split JSON and COCO JSON, read from
the real files in ../shared/data; expected counts are computed here from the raw text / files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import SHARED_DATA
from jax_refine.data import flickr, load_retrieval, sources

FLICKR = SHARED_DATA / "flickr8k"
COCO = SHARED_DATA / "coco_mini"
SPLITS = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


@pytest.fixture(scope="module")
def flickr_dir():
    if not (FLICKR / "Flickr8k.token.txt").is_file():
        pytest.skip(f"real Flickr8k not found at {FLICKR}")
    return FLICKR


def _raw_tokens(root):
    """{file name: [captions]} straight from the token file's lines, and the set of files on disk."""
    caps: dict[str, list[str]] = {}
    for line in (root / "Flickr8k.token.txt").read_text().splitlines():
        key, text = line.split("\t")
        caps.setdefault(key.split("#")[0], []).append(text.strip())
    return caps, set(p.name for p in (root / "images").iterdir())


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_flickr_split_counts_match_raw_text(flickr_dir, split):
    caps, on_disk = _raw_tokens(flickr_dir)
    names = (flickr_dir / SPLITS[split]).read_text().split()
    want = [n for n in names if n in on_disk and caps.get(n)]
    counts = {}
    recs = sources.read_captions(flickr_dir / "Flickr8k.token.txt", flickr_dir / "images", format="flickr",
                                 split=split, counts=counts)
    assert len(recs) == len(want) == {"train": 6000, "dev": 1000, "test": 1000}[split]
    assert [r["file_name"] for r in recs] == want
    assert sum(len(r["captions"]) for r in recs) == sum(len(caps[n]) for n in want) == 5 * len(want)
    assert all([t for _, t in r["captions"]] == caps[r["file_name"]] for r in recs)
    assert counts["skipped_photo_no_caption"] == 0 and counts["skipped_malformed_line"] == 0


def test_flickr_missing_photo_lines_are_skipped_and_counted(flickr_dir, caplog):
    caps, on_disk = _raw_tokens(flickr_dir)
    missing = {n: c for n, c in caps.items() if n not in on_disk}
    assert set(missing) == {"2258277193_586949ec62.jpg", "2258277193_586949ec62.jpg.1"}
    counts = {}
    recs = flickr.read_flickr_tokens(flickr_dir / "Flickr8k.token.txt", flickr_dir / "images", counts=counts)
    assert counts["skipped_caption_missing_photo"] == sum(len(c) for c in missing.values()) == 5
    assert len(recs) == len(caps) - 2 == 8091
    assert "2258277193_586949ec62.jpg" in caplog.text and "skipped 5 caption lines of 2 missing photos" in caplog.text


def test_flickr_bad_lines_and_uncaptioned_photos(tmp_path, flickr_dir):
    names = (flickr_dir / SPLITS["test"]).read_text().split()[:3]
    images = tmp_path / "img"
    images.mkdir()
    for n in names:
        shutil.copy(flickr_dir / "images" / n, images / n)
    token = tmp_path / "tok.txt"
    token.write_text(f"{names[0]}#0\tA dog .\n{names[0]}#1\tTwo dogs .\nno tab here\n{names[1]}#0\t  \n"
                     f"gone.jpg#0\tNothing .\n")
    (tmp_path / "split.txt").write_text("\n".join(names) + "\n")
    counts = {}
    recs = flickr.read_flickr_tokens(token, images, tmp_path / "split.txt", counts=counts)
    assert [(r["file_name"], r["captions"]) for r in recs] == [(names[0], [(0, "A dog ."), (1, "Two dogs .")])]
    assert counts == {"skipped_caption_missing_photo": 1, "skipped_photo_no_caption": 2, "skipped_malformed_line": 2}
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        flickr.read_flickr_tokens(token, images, tmp_path / "nope.txt")


def _write_karpathy(path, flickr_dir, per_split=4):
    """A dataset_flickr8k.json in Karpathy's layout built from the real Flickr8k files (first photos of
    each split list), plus one photo that does not exist and one without sentences."""
    caps, _ = _raw_tokens(flickr_dir)
    images, sid = [], 0
    for split, fname in SPLITS.items():
        for n in (flickr_dir / fname).read_text().split()[:per_split]:
            sents = []
            for c in caps[n]:
                sents.append({"raw": c, "tokens": c.lower().split(), "sentid": sid, "imgid": len(images)})
                sid += 1
            images.append({"filename": n, "imgid": len(images), "split": {"dev": "val"}.get(split, split),
                           "sentences": sents, "sentids": [s["sentid"] for s in sents]})
    images.append({"filename": "missing_0.jpg", "imgid": len(images), "split": "test",
                   "sentences": [{"raw": "x", "tokens": ["x"], "sentid": sid}]})
    images.append({"filename": images[0]["filename"], "imgid": len(images), "split": "restval", "sentences": []})
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return caps


def test_karpathy_json_splits_and_skips(tmp_path, flickr_dir):
    path = tmp_path / "dataset_flickr8k.json"
    caps = _write_karpathy(path, flickr_dir)
    assert sources.detect_format(path) == "karpathy"
    counts = {}
    test = sources.read_captions(path, flickr_dir / "images", split="test", counts=counts)
    want = (flickr_dir / SPLITS["test"]).read_text().split()[:4]
    assert [r["file_name"] for r in test] == want
    assert [[t for _, t in r["captions"]] for r in test] == [caps[n] for n in want]
    assert counts["skipped_caption_missing_photo"] == 1
    counts = {}
    train = sources.read_captions(path, flickr_dir / "images", format="karpathy", split="train+restval",
                                  counts=counts)
    assert len(train) == 4 and counts["skipped_photo_no_caption"] == 1
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        sources.read_captions(path, flickr_dir / "images", split="dev")


def test_formats_as_retrieval_sets(tmp_path, flickr_dir):
    path = tmp_path / "dataset_flickr8k.json"
    caps = _write_karpathy(path, flickr_dir)
    want = (flickr_dir / SPLITS["test"]).read_text().split()[:4]
    k = load_retrieval(f"karpathy:{path}:test:{flickr_dir / 'images'}", batch_size=3, image_size=32)
    f = load_retrieval(f"flickr:{flickr_dir / 'Flickr8k.token.txt'}:test:{flickr_dir / 'images'}", batch_size=3,
                       image_size=32, max_examples=4)
    for s in (k, f):
        assert s.num_images == 4 and s.captions == [c for n in want for c in caps[n]]
        assert s.texts["caption_image_index"].tolist() == [i for i in range(4) for _ in range(5)]
        got = np.concatenate([b["image_index"][b["mask"]] for b in s.image_batches()])
        assert got.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown retrieval spec"):
        load_retrieval("flickr:onlyone", batch_size=2)


def test_coco_mini_counts():
    ann = COCO / "annotations" / "captions_val2017.json"
    if not ann.is_file():
        pytest.skip("coco_mini not found")
    doc = json.loads(ann.read_text())
    n_caps = {}
    for a in doc["annotations"]:
        n_caps[a["image_id"]] = n_caps.get(a["image_id"], 0) + 1
    assert sources.detect_format(ann) == "coco"
    recs = sources.read_captions(ann, COCO / "val2017")
    assert len(recs) == len(doc["images"]) == 79
    assert sum(len(r["captions"]) for r in recs) == len(doc["annotations"]) == sum(n_caps.values())
    s = load_retrieval(f"coco_json:{ann}:{COCO / 'val2017'}", batch_size=32, image_size=32)
    assert s.num_images == 79 and len(s.captions) == len(doc["annotations"])


def test_prepare_data_flickr_split(tmp_path, flickr_dir):
    from jax_refine.cli import main

    images = tmp_path / "img"
    images.mkdir()
    names = (flickr_dir / SPLITS["dev"]).read_text().split()
    for n in names[:5]:
        shutil.copy(flickr_dir / "images" / n, images / n)
    (images / names[2]).write_bytes(b"not a jpeg")  # corrupt: stored, skipped by the training pipeline
    shutil.copy(flickr_dir / "Flickr8k.token.txt", tmp_path / "Flickr8k.token.txt")
    shutil.copy(flickr_dir / SPLITS["dev"], tmp_path / SPLITS["dev"])
    assert main(["prepare-data", "--annotations", str(tmp_path / "Flickr8k.token.txt"), "--images", str(images),
                 "--split", "dev", "--out", str(tmp_path / "tfds")]) == 0
    from jax_refine.data.tf_runtime import tfds

    out = next((tmp_path / "tfds").glob("coco_captions_json/*/1.0.0"))
    builder = tfds.builder_from_directory(str(out))
    assert builder.info.splits["train"].num_examples == 5  # 995 split photos not in the image dir: skipped
    recs = list(builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()}).as_numpy_iterator())
    assert sorted(r["image/filename"].decode() for r in recs) == sorted(names[:5])
    assert all(len(r["captions"]["text"]) == 5 for r in recs)
