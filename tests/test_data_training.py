"""Training pipeline: our COCO-JSON builder on real CIFAR-10 photos, the catalog coco_captions (mocked),
per-host slices, resume, bad input. References: transformers' CLIPTokenizer and CLIPImageProcessor."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from jax_refine.data import make_train_iterator, prepare_coco_json
from jax_refine.data.tf_runtime import tf, tfds

SIZE = 64


def _write_coco(root, cifar10_dir, per_class, *, extra_captions=0):
    """COCO-format captions for real photos: image k's first caption is 'a photo of a <class> number k.'."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    images, anns, classes = [], [], sorted(p.name for p in (cifar10_dir / "train").iterdir())
    for c in classes:
        for j in range(per_class):
            k = len(images)
            shutil.copy(cifar10_dir / "train" / c / f"{j:04d}.jpg", img_dir / f"{k:05d}.jpg")
            images.append({"id": 1000 + k, "file_name": f"{k:05d}.jpg"})
            anns.append({"image_id": 1000 + k, "caption": f"a photo of a {c} number {k}."})
            anns += [{"image_id": 1000 + k, "caption": f"another {c} photo number {k}, variant {v}!"}
                     for v in range(extra_captions)]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root / "captions.json", img_dir


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory, cifar10_dir):
    """40 real photos (4 per class), 2 captions each, prepared once with our builder."""
    root = tmp_path_factory.mktemp("coco")
    ann, images = _write_coco(root, cifar10_dir, per_class=4, extra_captions=1)
    return {"source": "coco_json", "annotations": str(ann), "images": str(images), "data_dir": str(root / "tfds"),
            "split": "train", "shuffle_buffer": 16, "caption_mode": "random"}


def _ids(batch):
    """Image number k of every row, from its caption's tokens (digits decode one per token: '3 1' = 31)."""
    from jax_refine.preprocess import get_tokenizer

    texts = get_tokenizer().batch_decode(batch["input_ids"], skip_special_tokens=True)
    return [int(re.search(r"number ([\d ]+)", t).group(1).replace(" ", "")) for t in texts], texts


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_match_clip_tokenizer_and_image_processor(coco_set):
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from jax_refine.preprocess import TOKENIZER_DIR

    it = make_train_iterator(coco_set, global_batch_size=8, image_size=SIZE, max_length=24, seed=0)
    assert it.num_examples == 40 and it.steps_per_epoch == 5
    hf_tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    proc = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    images = json.loads(open(coco_set["annotations"]).read())["annotations"]
    for batch in _take(it, 2):
        assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["input_ids"].shape == (8, 24) and batch["input_ids"].dtype == np.int32
        assert batch["attention_mask"].dtype == np.int32
        assert -1.8 < batch["image"].min() < 0 < batch["image"].max() < 2.2
        ks, texts = _ids(batch)
        for row, k in enumerate(ks):
            caption = next(a["caption"] for a in images if a["image_id"] == 1000 + k and a["caption"].lower()
                           .replace(" ", "") == texts[row].replace(" ", ""))
            want = hf_tok(caption, padding="max_length", max_length=24, truncation=True)
            np.testing.assert_array_equal(batch["input_ids"][row], want["input_ids"])
            np.testing.assert_array_equal(batch["attention_mask"][row], want["attention_mask"])
            with Image.open(f"{coco_set['images']}/{k:05d}.jpg") as img:
                ref = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            assert np.abs(batch["image"][row] - ref).max() <= 1e-3


def test_same_seed_same_order_and_resume_is_exact(coco_set):
    kw = dict(global_batch_size=8, image_size=SIZE, seed=3)
    full = [_ids(b)[0] for b in _take(make_train_iterator(coco_set, **kw), 8)]  # crosses into epoch 2
    again = [_ids(b)[0] for b in _take(make_train_iterator(coco_set, **kw), 8)]
    assert full == again
    assert sorted(sum(full[:5], [])) == list(range(40))  # epoch 1: each image exactly once
    assert full[:5] != full[5:8] + full[:2]  # epoch 2 reshuffled
    other = [_ids(b)[0] for b in _take(make_train_iterator(coco_set, **{**kw, "seed": 4}), 5)]
    assert other != full[:5]
    for k in (3, 6):  # mid-epoch and in the second epoch
        first = make_train_iterator(coco_set, **kw)
        _take(first, k)
        state = json.loads(json.dumps(first.get_state()))
        resumed = make_train_iterator(coco_set, **kw)
        resumed.set_state(state)
        assert [_ids(b)[0] for b in _take(resumed, 8 - k)] == full[k:]
    with pytest.raises(ValueError, match="seed"):
        make_train_iterator(coco_set, **{**kw, "seed": 5}).set_state(state)


def test_random_caption_per_epoch_and_all_mode(coco_set):
    it = make_train_iterator(coco_set, global_batch_size=8, image_size=SIZE, seed=0)
    epochs = [sum((_ids(b)[1] for b in _take(it, 5)), []) for _ in range(2)]
    assert all(len(e) == 40 for e in epochs)
    variants = [sum("variant" in t for t in e) for e in epochs]
    assert all(5 < v < 35 for v in variants)  # both captions drawn, about half each
    assert sorted(epochs[0]) != sorted(epochs[1])  # drawn again each epoch
    it_all = make_train_iterator({**coco_set, "caption_mode": "all"}, global_batch_size=8, image_size=SIZE, seed=0)
    assert it_all.num_examples == 80 and it_all.steps_per_epoch == 10
    texts = sum((_ids(b)[1] for b in _take(it_all, 10)), [])
    assert len(set(texts)) == 80


def test_two_processes_read_disjoint_slices_covering_the_split(coco_set):
    seen = []
    for p in range(2):
        it = make_train_iterator(coco_set, global_batch_size=8, image_size=SIZE, seed=0, process_index=p,
                                 process_count=2)
        assert it.steps_per_epoch == 5 and it.batch_size == 4
        seen.append(sum((_ids(b)[0] for b in _take(it, 5)), []))
    assert len(set(seen[0])) == 20 and len(set(seen[1])) == 20
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(40))


def test_truncated_jpeg_and_captionless_image_are_skipped_and_counted(tmp_path, cifar10_dir):
    ann, images = _write_coco(tmp_path, cifar10_dir, per_class=1)
    data = (images / "00003.jpg").read_bytes()
    (images / "00003.jpg").write_bytes(data[: len(data) // 3])  # truncated JPEG
    doc = json.loads(ann.read_text())
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != 1007]  # image 7: no caption
    ann.write_text(json.dumps(doc))
    cfg = {"source": "coco_json", "annotations": str(ann), "images": str(images), "data_dir": str(tmp_path / "t"),
           "shuffle_buffer": 1}
    it = make_train_iterator(cfg, global_batch_size=2, image_size=SIZE, seed=0)
    seen = sum((_ids(b)[0] for b in _take(it, 4)), [])  # 8 good images = 4 full batches
    assert sorted(seen) == [0, 1, 2, 4, 5, 6, 8, 9]
    next(it)  # first batch of epoch 2: epoch 1 has been fully read
    stats = it.stats()
    assert stats["epoch"] == 1
    assert stats["last_epoch_skipped_bad_image"] == 1 and stats["last_epoch_skipped_no_caption"] == 1
    assert stats["skipped_bad_image"] >= 1 and stats["skipped_no_caption"] >= 1  # running totals


def test_errors_at_start(tmp_path, coco_set):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_train_iterator(coco_set, global_batch_size=64, image_size=SIZE)
    with pytest.raises(FileNotFoundError, match="annotations"):
        make_train_iterator({**coco_set, "annotations": str(tmp_path / "nope.json")}, global_batch_size=8)
    with pytest.raises(FileNotFoundError, match="image directory"):
        make_train_iterator({**coco_set, "images": str(tmp_path / "none")}, global_batch_size=8)
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        make_train_iterator({"source": "tfds_dir", "data_dir": str(tmp_path)}, global_batch_size=8)
    with pytest.raises(ValueError, match="unknown TFDS dataset"):
        make_train_iterator({"source": "tfds", "name": "no_such_set_xyz"}, global_batch_size=8)
    prepared = prepare_coco_json(coco_set["annotations"], coco_set["images"], coco_set["data_dir"])
    with pytest.raises(ValueError, match="split 'validation' not in"):
        make_train_iterator({"source": "tfds_dir", "data_dir": str(prepared), "split": "validation"},
                            global_batch_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        make_train_iterator(coco_set, global_batch_size=9, process_count=2, process_index=0)


def _mock_coco_as_dataset(cifar10_dir, n=12):
    """`as_dataset_fn` for tfds.testing.mock_data: real JPEGs + captions through coco_captions' own features."""
    paths = sorted((cifar10_dir / "test" / "dog").glob("*.jpg"))[:n]

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        del split, shuffle_files
        features = self.info.features
        serialized = [features.serialize_example({
            "image": p.read_bytes(), "image/filename": p.name, "image/id": k,
            "objects": {"area": [], "bbox": np.zeros((0, 4), np.float32), "id": [], "is_crowd": [], "label": []},
            "captions": [{"text": f"a photo of a dog number {k}.", "id": k}]}) for k, p in enumerate(paths)]
        ds = tf.data.Dataset.from_tensor_slices(serialized)
        ds = ds.map(lambda s: features.deserialize_example(s, decoders=decoders))
        if read_config is not None and read_config.add_tfds_id:
            ds = ds.enumerate().map(lambda i, ex: {**ex, "tfds_id": tf.strings.as_string(i)})
        return ds

    return as_dataset, paths


@pytest.mark.usefixtures("tfds_online")
def test_catalog_coco_captions_mocked(cifar10_dir):
    from transformers import CLIPImageProcessor

    as_dataset, paths = _mock_coco_as_dataset(cifar10_dir)
    proc = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset):
        it = make_train_iterator({"source": "tfds", "name": "coco_captions", "split": "train", "shuffle_buffer": 4},
                                 global_batch_size=4, image_size=SIZE, seed=0)
        assert it.num_examples == 12 and it.steps_per_epoch == 3
        batches = _take(it, 3)
    ks = sum((_ids(b)[0] for b in batches), [])
    assert sorted(ks) == list(range(12))
    for b in batches:
        for row, k in enumerate(_ids(b)[0]):
            with Image.open(paths[k]) as img:
                ref = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            assert np.abs(b["image"][row] - ref).max() <= 1e-3


# ------------------------------------------------------------------------------------------------
# the paper's training order and split (coco_json source): checked against NumPy written here
# ------------------------------------------------------------------------------------------------
def test_each_epoch_is_the_full_permutation_of_seed_and_epoch(coco_set, tmp_path, cifar10_dir):
    """Epoch e reads image k at position np.random.default_rng([seed, e]).permutation(N)^-1[k]; the last
    partial batch is dropped (42 images, batch 8: 5 batches, the 2 left over are not carried into epoch 2)."""
    ann, images = _write_coco(tmp_path, cifar10_dir, per_class=4)
    extra = json.loads(ann.read_text())
    for k in (40, 41):  # 42 images: not a multiple of the batch
        shutil.copy(images / "00000.jpg", images / f"{k:05d}.jpg")
        extra["images"].append({"id": 1000 + k, "file_name": f"{k:05d}.jpg"})
        extra["annotations"].append({"image_id": 1000 + k, "caption": f"a photo of a copy number {k}."})
    ann.write_text(json.dumps(extra))
    cfg = {"source": "coco_json", "annotations": str(ann), "images": str(images), "caption_mode": "random"}
    it = make_train_iterator(cfg, global_batch_size=8, image_size=SIZE, seed=7)
    assert it.num_examples == 42 and it.steps_per_epoch == 5
    got = [sum((_ids(b)[0] for b in _take(it, 5)), []) for _ in range(2)]
    for epoch in range(2):
        want = np.random.default_rng([7, epoch]).permutation(42)[:40].tolist()
        assert got[epoch] == want, epoch
    assert got[0] != got[1]


def test_coco_json_random_99_1_split_with_seed_42(coco_mini_dir):
    """The reference's split of COCO 2017 train: 99% / 1% of the images at random (seed 42), disjoint, covering
    the file; on the real coco_mini captions (80 photos): 79 / 1."""
    from jax_refine.data import read_coco_json
    from jax_refine.data.sources import coco_json_split

    ann, img = coco_mini_dir / "annotations" / "captions_train2017.json", coco_mini_dir / "train2017"
    ids = sorted(r["id"] for r in read_coco_json(ann, img))
    train = coco_json_split(ann, img, "train", train_fraction=0.99, split_seed=42)
    val = coco_json_split(ann, img, "val", train_fraction=0.99, split_seed=42)
    assert len(ids) == 80 and len(train.keys) == 79 and len(val.keys) == 1
    perm = np.random.default_rng(42).permutation(80)
    assert val.keys == (str(ids[perm[79]]),)
    assert sorted(map(int, train.keys)) == sorted(ids[i] for i in perm[:79])
    assert all(len(c) >= 1 for c in train.captions) and all(p.endswith(".jpg") for p in train.paths)
    other = coco_json_split(ann, img, "val", train_fraction=0.99, split_seed=0)
    assert other.keys == (str(ids[np.random.default_rng(0).permutation(80)[79]]),)
    it = make_train_iterator({"source": "coco_json", "annotations": str(ann), "images": str(img),
                              "train_fraction": 0.99, "split_seed": 42}, global_batch_size=8, image_size=SIZE)
    assert it.num_examples == 79 and it.steps_per_epoch == 9
    with pytest.raises(ValueError, match="splits 'train' and 'val'"):
        coco_json_split(ann, img, "test")


def test_missing_shared_data_fails_in_ci(tmp_path, monkeypatch):
    from conftest import require_shared_data

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_shared_data(tmp_path / "missing")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        require_shared_data(tmp_path / "missing")
