"""Evaluation data: class folders (real CIFAR-10 photos), catalog sets (mocked), retrieval sets, class names."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from jax_refine import evaluate
from jax_refine.data import class_names, load_classification, load_retrieval
from jax_refine.data.tf_runtime import tfds

SIZE = 48
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory, cifar10_dir):
    """20 real test photos per class, in class folders (a copy: one gets truncated)."""
    root = tmp_path_factory.mktemp("cifar_folder")
    for c in CLASSES:
        (root / c).mkdir()
        for j in range(20):
            shutil.copy(cifar10_dir / "test" / c / f"{j:04d}.jpg", root / c / f"{j:04d}.jpg")
    return root


def _hf(path, size=SIZE):
    with Image.open(path) as img:
        return _hf_array(img, size)


def _hf_array(image, size=SIZE):
    """transformers' CLIP preprocessing of a PIL image or an (H, W, 3) uint8 array, as (size, size, 3)."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    return proc(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def test_class_folder_labels_and_pixels(cifar_folder):
    s = load_classification(f"folder:{cifar_folder}", batch_size=64, image_size=SIZE)
    assert s.class_names == CLASSES and s.num_examples == 200 and s.num_batches == 4
    batches = list(s.batches())
    assert len(batches) == 4
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert np.bincount(labels, minlength=10).tolist() == [20] * 10
    assert batches[-1]["mask"].sum() == 200 - 3 * 64 and batches[-1]["image"].shape == (64, SIZE, SIZE, 3)
    # rows follow sorted class folders then sorted files: row i of the set is file i
    files = [p for c in CLASSES for p in sorted((cifar_folder / c).glob("*.jpg"))]
    for i in (0, 37, 64, 199):
        b, r = divmod(i, 64)
        assert batches[b]["label"][r] == CLASSES.index(files[i].parent.name)
        assert np.abs(batches[b]["image"][r] - _hf(files[i])).max() <= 1e-3


def test_class_folder_two_hosts_classnames_and_bad_image(tmp_path, cifar_folder):
    root = tmp_path / "set"
    shutil.copytree(cifar_folder, root)
    (root / "classnames.txt").write_text("\n".join(f"{c} photo" for c in CLASSES) + "\n")
    bad = root / "cat" / "0005.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    got = []
    for p in range(2):
        s = load_classification(f"folder:{root}", batch_size=32, image_size=SIZE, process_index=p, process_count=2,
                                max_examples=150)
        assert s.class_names[3] == "cat photo" and s.num_examples == 150 and s.num_batches == 3
        bs = list(s.batches())
        assert len(bs) == 3
        got.append((sum(int(b["mask"].sum()) for b in bs), s.stats()["skipped_bad_image"]))
    valid = got[0][0] + got[1][0]
    assert valid + got[0][1] + got[1][1] == 150  # disjoint halves, together the whole (cut) set
    (root / "classnames.txt").write_text("just one\n")
    with pytest.raises(ValueError, match="1 names for 10 class folders"):
        load_classification(f"folder:{root}", batch_size=8)
    with pytest.raises(FileNotFoundError, match="class-folder directory not found"):
        load_classification(f"folder:{tmp_path / 'missing'}", batch_size=8)


@pytest.mark.usefixtures("tfds_online")
@pytest.mark.parametrize("name,num_classes,first,split", [("cifar10", 10, "airplane", "test"),
                                                          ("imagenet2012", 1000, "tench", "validation")])
def test_catalog_classification_mocked(name, num_classes, first, split):
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        s = load_classification(name, batch_size=4, image_size=SIZE)
        assert len(s.class_names) == num_classes and s.class_names[0] == first
        assert s.num_examples == 10 and s.num_batches == 3
        bs = list(s.batches())
        raw = list(tfds.builder(name).as_dataset(split=split).as_numpy_iterator())  # the mock's own examples
    assert [int(b["mask"].sum()) for b in bs] == [4, 4, 2]
    for b in bs:
        assert b["image"].shape == (4, SIZE, SIZE, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32
    # rows are the split's examples in order: the same labels, and (CIFAR-10's 32x32 mocks) the pixels that
    # transformers' CLIPImageProcessor makes of the same decoded image (1e-3 as for real photos above)
    assert np.concatenate([b["label"][b["mask"]] for b in bs]).tolist() == [int(r["label"]) for r in raw]
    if name == "cifar10":
        images = np.concatenate([b["image"][b["mask"]] for b in bs])
        for got, r in zip(images, raw, strict=True):
            assert np.abs(got - _hf_array(r["image"])).max() <= 1e-3


def test_missing_catalog_dataset_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="unknown TFDS dataset"):
        load_classification("not_a_dataset_abc", batch_size=4)


def test_class_name_files_match_tfds_label_counts():
    for name, tfds_name in [("cifar100", None), ("food101", None), ("oxford_flowers102", None),
                            ("oxford_iiit_pet", None), ("caltech101", None), ("dtd", None), ("eurosat", None),
                            ("sun397", None), ("stanford_cars", "cars196"), ("imagenet2012", None)]:
        names = class_names(name)
        label = tfds.builder(tfds_name or name, try_gcs=False, data_dir="/nonexistent").info.features["label"]
        assert len(names) == label.num_classes, name
        assert all(n.strip() == n and n for n in names), name
    assert len(class_names("fgvc_aircraft")) == 100 and class_names("cifar10") == CLASSES
    assert class_names("caltech101")[class_names("caltech101").index("centered face")] == "centered face"
    assert evaluate.resolve_templates("single") == ("a photo of a {}.",)
    openai = evaluate.resolve_templates("openai")
    assert len(openai) == 80 == len(set(openai)) and all(t.count("{}") == 1 for t in openai)
    with pytest.raises(ValueError, match="config.eval.templates='nope': expected one of"):
        evaluate.resolve_templates("nope")


def _coco(root, cifar10_dir, n=10):
    img = root / "images"
    img.mkdir(parents=True)
    images, anns = [], []
    for k in range(n):
        shutil.copy(cifar10_dir / "test" / "ship" / f"{k:04d}.jpg", img / f"{k}.jpg")
        images.append({"id": 50 + k, "file_name": f"{k}.jpg"})
        anns += [{"image_id": 50 + k, "caption": f"a ship, photo {k} caption {c}."} for c in range(1 + k % 3)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root / "ann.json", img


def test_retrieval_coco_json_and_prepared_dir(tmp_path, cifar10_dir):
    from transformers import CLIPTokenizer

    from jax_refine.data import prepare_coco_json
    from jax_refine.preprocess import TOKENIZER_DIR

    ann, img = _coco(tmp_path, cifar10_dir)
    hf_tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    direct = load_retrieval(f"coco_json:{ann}:{img}", batch_size=4, image_size=SIZE)
    prepared_dir = prepare_coco_json(ann, img, tmp_path / "tfds")
    for spec in (f"coco_json:{ann}:{img}", f"tfds_dir:{prepared_dir}"):
        per_host = [load_retrieval(spec, batch_size=4, image_size=SIZE, process_index=p, process_count=2)
                    for p in range(2)]
        r = per_host[0]
        assert r.num_images == 10 and len(r.captions) == sum(1 + k % 3 for k in range(10))
        for text, ids, owner in zip(r.captions, r.texts["input_ids"], r.texts["caption_image_index"]):
            want = hf_tok(text, padding="max_length", max_length=77)["input_ids"]
            np.testing.assert_array_equal(ids, want)
            photo = int(text.split("photo ")[1].split(" ")[0])
            assert r.captions.count(text) == 1 and sum(
                f"photo {photo} " in t for t, o in zip(r.captions, r.texts["caption_image_index"]) if o == owner
            ) == 1 + photo % 3
        seen = {}
        for host in per_host:
            assert host.num_batches == 2
            for b in host.image_batches():
                for i, ok, pix in zip(b["image_index"], b["mask"], b["image"]):
                    if ok:
                        seen[int(i)] = pix
        assert sorted(seen) == list(range(10))
        # image_index i is the image whose captions point at i
        for i, pix in seen.items():
            text = r.captions[int(np.argmax(r.texts["caption_image_index"] == i))]
            photo = int(text.split("photo ")[1].split(" ")[0])
            assert np.abs(pix - _hf(img / f"{photo}.jpg")).max() <= 1e-3
    assert direct.texts["caption_image_index"].dtype == np.int32
    with pytest.raises(ValueError, match="unknown retrieval spec"):
        load_retrieval("flickr", batch_size=4)


@pytest.mark.usefixtures("tfds_online")
def test_retrieval_karpathy_test_mocked(cifar10_dir):
    from test_data_training import _mock_coco_as_dataset

    as_dataset, paths = _mock_coco_as_dataset(cifar10_dir, n=6)
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset):
        r = load_retrieval("coco_karpathy_test", batch_size=4, image_size=SIZE)
        batches = list(r.image_batches())
    assert r.num_images == 6 and r.captions[2] == "a photo of a dog number 2."
    assert r.texts["caption_image_index"].tolist() == list(range(6))
    b = batches[0]
    assert b["image_index"].tolist() == [0, 1, 2, 3] and batches[1]["mask"].tolist() == [True, True, False, False]
    assert np.abs(b["image"][2] - _hf(paths[2])).max() <= 1e-3


@pytest.mark.usefixtures("tfds_online")
def test_ucf101_is_evaluated_on_each_video_middle_frame(tmp_path):
    """UCF101 (a TFDS video set) enters zero-shot as its middle frame, as in the reference; a real-photo
    frame in the middle, solid colours around it, compared with CLIPImageProcessor on that photo."""
    from jax_refine.data.tf_runtime import tf

    photo = np.array(Image.new("RGB", (256, 256), (30, 140, 220)))
    photo[64:192, 32:96] = (250, 250, 20)  # a yellow block: the frame has structure
    Image.fromarray(photo).save(tmp_path / "middle.png")
    solid = lambda c: np.full((256, 256, 3), c, np.uint8)  # noqa: E731
    videos = [[solid(0), solid(255), photo, solid(60), solid(90)], [solid(10), photo, solid(200)]]

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        features = self.info.features
        ser = [features.serialize_example({"video": v, "label": k}) for k, v in enumerate(videos)]
        ds = tf.data.Dataset.from_tensor_slices(ser).map(lambda s: features.deserialize_example(s, decoders=decoders))
        return ds.enumerate().map(lambda i, ex: {**ex, "tfds_id": tf.strings.as_string(i)})

    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset):
        s = load_classification("ucf101", batch_size=2, image_size=SIZE)
        (b,) = list(s.batches())
    assert s.class_names[:2] == ["Apply Eye Makeup", "Apply Lipstick"] and len(s.class_names) == 101
    assert b["mask"].tolist() == [True, True] and b["label"].tolist() == [0, 1]
    want = _hf(tmp_path / "middle.png")  # TFDS's Video feature stores frames lossy: a level or so of difference
    for got in b["image"]:
        assert np.abs(got - want).mean() <= 0.01 and np.abs(got - want).max() <= 0.15


def test_reference_suite_class_names_and_templates():
    """The reference's 12 zero-shot sets all have class names; its prompt is "a photo of {c}"."""
    from jax_refine import config_base as default  # the base config, `--config default`
    from jax_refine.data.sources import CATALOG_ALIASES
    from jax_refine.evaluate import resolve_templates

    suite = default.get_config().eval.zero_shot
    assert len(suite) == 12
    for spec in suite:
        if not spec.startswith("folder:"):
            names = class_names(spec)
            label = tfds.builder(CATALOG_ALIASES.get(spec, spec), try_gcs=False, data_dir="/nonexistent").info.features["label"]
            assert names is not None and len(names) == label.num_classes, spec
    birds = class_names("caltech_birds2011")
    assert birds[0] == "Black footed Albatross" and birds[-1] == "Common Yellowthroat" and len(set(birds)) == 200
    assert resolve_templates("reference") == ("a photo of {}",)
    assert resolve_templates("single") == ("a photo of a {}.",) and len(resolve_templates("openai")) == 80
