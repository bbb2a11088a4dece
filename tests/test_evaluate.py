"""The evaluation suite: known answers on hand-made embeddings, a cross-check against transformers'
PyTorch CLIPModel and a NumPy recall loop, sharded vs single-device extraction, the npz cache, the
report tables, bad input, and the whole suite end to end on real CIFAR-10 photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tolerances as tol

from jax_refine import embeddings as emb_lib
from jax_refine import evaluate, report


# --------------------------------------------------------------------------------------------------
# Known answers
# --------------------------------------------------------------------------------------------------

def _ranked(n_items: int, target_ranks: list[tuple[list[int], int]], seed: int = 0) -> np.ndarray:
    """Query vectors against items = identity rows (D = n_items): query q scores item i by q[i].

    `target_ranks[q] = (targets, r)`: the best of q's targets sits at rank r (1-based): r - 1 other items
    score above it, the other targets below, everything else lower still with distinct tiny scores.
    """
    rng = np.random.default_rng(seed)
    out = np.zeros((len(target_ranks), n_items))
    for q, (targets, r) in enumerate(target_ranks):
        scores = 1e-3 * rng.permutation(n_items) / n_items  # distinct background
        others = [i for i in rng.permutation(n_items) if i not in targets]
        scores[others[: r - 1]] = 1.0 + 0.01 * np.arange(r - 1)
        scores[targets[0]] = 0.9
        scores[targets[1:]] = 0.5
        out[q] = scores
    return out


def test_recall_known_answer_text_to_image():
    n_img = 12
    idx = np.array([0, 0, 1, 2, 3, 4, 5, 5, 6, 7])
    ranks = [1, 3, 1, 5, 6, 11, 10, 2, 1, 12]  # rank of each caption's image
    txt = _ranked(n_img, [([i], r) for i, r in zip(idx, ranks)])
    got = evaluate.retrieval_scores(np.eye(n_img), txt, idx)["t2i"]
    ranks = np.array(ranks)
    assert got == pytest.approx({f"R@{k}": 100 * np.mean(ranks <= k) for k in (1, 5, 10)})
    assert got == pytest.approx({"R@1": 30.0, "R@5": 60.0, "R@10": 80.0})


def test_recall_known_answer_image_to_text_several_captions():
    # Captions are identity rows; images score captions. Image i's captions: 2 each (3 for image 0).
    idx = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    n_cap = len(idx)
    best_rank = [2, 1, 7, 4, 12, 6]  # rank of the best-ranked correct caption of each image
    img = _ranked(n_cap, [(list(np.flatnonzero(idx == i)), r) for i, r in enumerate(best_rank)], seed=1)
    got = evaluate.retrieval_scores(img, np.eye(n_cap), idx)["i2t"]
    # Hit if ANY of the image's captions is in the top k (only the best one counts).
    assert got == pytest.approx({"R@1": 100 / 6, "R@5": 300 / 6, "R@10": 500 / 6})


def test_zero_shot_known_answer_and_top5():
    rng = np.random.default_rng(0)
    c, d, per = 8, 16, 5
    classes = np.linalg.qr(rng.normal(size=(d, c)))[0].T  # (C, D) orthonormal
    labels = np.repeat(np.arange(c), per)
    images = classes[labels] + 0.05 * rng.normal(size=(len(labels), d))
    assert evaluate.zero_shot_scores(images, labels, classes) == pytest.approx({"top1": 100.0, "top5": 100.0})
    # Move 8 images so their class comes second (another class first): top-1 loses exactly those 8.
    moved = rng.choice(len(labels), size=8, replace=False)
    for i in moved:
        images[i] = 0.8 * classes[labels[i]] + 1.0 * classes[(labels[i] + 1) % c]
    got = evaluate.zero_shot_scores(images, labels, classes)
    assert got["top1"] == pytest.approx(100 * (len(labels) - 8) / len(labels))
    assert got["top5"] == pytest.approx(100.0) and got["top5"] >= got["top1"]
    # Random embeddings: against a NumPy rank count.
    imgs, labs, cls = rng.normal(size=(200, d)), rng.integers(0, c, 200), rng.normal(size=(c, d))
    got = evaluate.zero_shot_scores(imgs, labs, cls)
    sims = (imgs / np.linalg.norm(imgs, axis=1, keepdims=True)) @ (cls / np.linalg.norm(cls, axis=1, keepdims=True)).T
    rank = (sims > sims[np.arange(200), labs][:, None]).sum(axis=1)  # classes scoring above the true one
    assert got == pytest.approx({"top1": 100 * np.mean(rank < 1), "top5": 100 * np.mean(rank < 5)})


def test_template_ensemble_is_normalized_mean():
    a, b = np.array([3.0, 0, 0]), np.array([0, 0.5, 0])  # two templates of one class, any scale
    got = evaluate.ensemble_class_embeddings(np.stack([a, b])[None])
    np.testing.assert_allclose(got[0], [2**-0.5, 2**-0.5, 0], atol=1e-7)
    # The ensemble behind the pictures ranks classes exactly as the zero-shot scores do.
    rng = np.random.default_rng(0)
    per_template, images = rng.normal(size=(5, 3, 8)), rng.normal(size=(40, 8))
    labels = np.argmax(evaluate.normalize(images) @ evaluate.ensemble_class_embeddings(per_template).T, axis=1)
    assert evaluate.zero_shot_scores(images, labels, per_template)["top1"] == pytest.approx(100.0)
    assert evaluate.resolve_templates("single") == ("a photo of a {}.",)
    assert len(evaluate.resolve_templates("openai")) == 80
    with pytest.raises(ValueError, match="templates"):
        evaluate.resolve_templates(["a photo of a cat"])


# --------------------------------------------------------------------------------------------------
# Against transformers' PyTorch CLIPModel and a NumPy definition of recall
# --------------------------------------------------------------------------------------------------

def _numpy_recall(img: np.ndarray, txt: np.ndarray, idx: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Recall@k written from the definition with loops: a hit when a correct item is in the top k."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    sim = img @ txt.T
    i2t_rank = []
    for i in range(len(img)):
        order = list(np.argsort(-sim[i], kind="stable"))
        i2t_rank.append(min(order.index(j) for j in np.flatnonzero(idx == i)) + 1)
    t2i_rank = [list(np.argsort(-sim[:, j], kind="stable")).index(idx[j]) + 1 for j in range(len(txt))]
    return {d: {f"R@{k}": 100 * float(np.mean(np.array(r) <= k)) for k in ks}
            for d, r in (("i2t", i2t_rank), ("t2i", t2i_rank))}


@pytest.mark.slow  # a tiny CLIP in two frameworks over a retrieval set; the known-answer tests are the fast tier's
def test_retrieval_matches_torch_clip_and_numpy(tiny_hf_clip_dir):
    from transformers import CLIPModel

    from hf_fixtures import assert_matches_torch, random_pixels
    from jax_refine import preprocess
    from jax_refine.models import registry

    model = registry.load(str(tiny_hf_clip_dir))
    n_img, size = 12, model.config.vision_config.image_size
    pixels = random_pixels(n_img, size, seed=3)
    words = ["cat", "dog", "ship", "truck", "bird", "frog", "horse", "deer", "plane", "car", "boat", "fish"]
    captions = [f"a photo of a {w}." for w in words] + [f"a small {w} here" for w in words[:6]]
    idx = np.array(list(range(n_img)) + list(range(6)))
    tokens = preprocess.tokenize(captions)
    img, _ = emb_lib.extract(model, emb_lib.iterate_arrays({"image": pixels}, 5), "image", batch_size=8,
                             progress=False)
    txt, _ = emb_lib.extract(model, emb_lib.iterate_arrays(tokens, 7), "text", batch_size=8, progress=False)

    ref = CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    # within 8x the fp32 error transformers' own forward makes against its float64 copy (tests/tolerances.py)
    ti, tt = assert_matches_torch((img, txt), ref, pixels, tokens["input_ids"], tokens["attention_mask"])

    ours, want = evaluate.retrieval_scores(img, txt, idx), _numpy_recall(ti, tt, idx)
    for direction in ("i2t", "t2i"):
        assert ours[direction] == pytest.approx(want[direction])
    # The feature metrics, from their equations in float64 on our embeddings (checked against torch's above),
    # within their derived fp32 bounds (tests/tolerances.py), doubled: the features are normalized twice in
    # fp32 (evaluate.normalize, then the metric's own), each adding at most the unit-entry error the bound holds.
    i64, t64 = img.astype(np.float64), txt.astype(np.float64)
    fi = i64 / np.linalg.norm(i64, axis=1, keepdims=True)
    ft = t64 / np.linalg.norm(t64, axis=1, keepdims=True)
    gap = fi.mean(0) - ft.mean(0)
    feats = evaluate.feature_scores(img, txt, idx)
    e_gap, e_mse = tol.centroid_gap(i64, t64)
    tol.assert_fp32_close(feats["modality_gap"], np.linalg.norm(gap), 2 * e_gap, "gap")
    tol.assert_fp32_close(feats["modality_gap_mse"], np.mean(gap**2), 2 * e_mse, "gap mse")
    align = np.mean(np.sum((fi[idx] - ft) ** 2, axis=1))
    e_align = tol.pair_distances(fi[idx], ft).mean() + tol.sum_error(len(idx), align)
    tol.assert_fp32_close(feats["alignment"], align, 2 * e_align, "alignment")
    sq = np.sum((fi[:, None] - fi[None]) ** 2, axis=-1)[np.triu_indices(n_img, 1)]
    tol.assert_fp32_close(feats["uniformity_image"], np.log(np.mean(np.exp(-2 * sq))), 2 * tol.uniformity(i64),
                          "uniformity")


def test_sharded_extraction_equals_single_device(tiny_hf_clip_dir):
    from hf_fixtures import random_pixels
    from jax_refine.models import registry

    assert jax.device_count() == 8
    model = registry.load(str(tiny_hf_clip_dir))
    pixels = random_pixels(21, model.config.vision_config.image_size, seed=4)  # 21: a padded last batch
    labels = np.arange(21)
    one, ex1 = emb_lib.extract(model, emb_lib.iterate_arrays({"image": pixels, "label": labels}, 6), "image",
                               mesh=emb_lib.default_mesh(jax.devices()[:1]), batch_size=8, progress=False)
    eight, ex8 = emb_lib.extract(model, emb_lib.iterate_arrays({"image": pixels, "label": labels}, 5), "image",
                                 mesh=emb_lib.default_mesh(), batch_size=8, progress=False)
    assert one.shape == eight.shape == (21, model.config.projection_dim)
    np.testing.assert_array_equal(ex1["label"], labels)
    np.testing.assert_array_equal(ex8["label"], labels)
    # two fp32 forwards in different batch layouts: each within the network's measured fp32 error of the exact
    from transformers import CLIPModel

    from hf_fixtures import assert_same_forward

    assert_same_forward((eight, None), (one, None), CLIPModel.from_pretrained(tiny_hf_clip_dir).eval(), pixels)


def test_cache_reuses_embeddings(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"features": np.arange(6.0).reshape(3, 2)}

    a = emb_lib.cached(tmp_path, compute, model="abc", dataset="folder:/x/y", split="test", n=3)
    b = emb_lib.cached(tmp_path, compute, model="abc", dataset="folder:/x/y", split="test", n=3)
    c = emb_lib.cached(tmp_path, compute, model="abd", dataset="folder:/x/y", split="test", n=3)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    np.testing.assert_array_equal(a["features"], b["features"])
    np.testing.assert_array_equal(a["features"], c["features"])


# --------------------------------------------------------------------------------------------------
# Report tables
# --------------------------------------------------------------------------------------------------

def _result(name: str, c10: float, pets: float, t2i: float, i2t: float, gap: float) -> dict:
    return {"model": name,
            "zero_shot": {"cifar10": {"top1": c10, "top5": 99.0, "n": 10, "num_classes": 10},
                          "oxford_iiit_pet": {"top1": pets, "top5": 90.0, "n": 10, "num_classes": 37}},
            "zero_shot_mean": {"top1": (c10 + pets) / 2, "top5": 94.5},
            "retrieval": {"coco_karpathy_test": {"i2t": {"R@1": i2t, "R@5": 0.0, "R@10": 0.0},
                                                 "t2i": {"R@1": t2i, "R@5": 0.0, "R@10": 0.0},
                                                 "n_images": 5, "n_captions": 25}},
            "features": {"coco_karpathy_test": {"modality_gap": gap, "modality_gap_mse": gap / 100,
                                                "alignment": 1.0, "uniformity_image": -1.0,
                                                "uniformity_text": -1.0}}}


def test_report_table_layout_and_differences(tmp_path):
    base, refined = _result("pretrained", 80.0, 50.0, 30.56, 33.26, 0.82), _result("refined", 82.5, 49.0, 37.64,
                                                                                   38.78, 0.41)
    table = report.comparison([base, refined])
    assert table["columns"] == ["C10 top-1", "Pets top-1", "ZS avg", "COCO T->I R@1", "COCO I->T R@1", "gap",
                                "gap_mse"]
    diff = table["models"][1]["diff"]
    assert diff["ZS avg"] == pytest.approx(0.75) and diff["COCO T->I R@1"] == pytest.approx(7.08)
    assert diff["gap"] == pytest.approx(-0.41)
    md = report.markdown_table([base, refined])
    assert "| refined | 82.50 (+2.50) | 49.00 (-1.00) | 65.75 (+0.75) | 37.64 (+7.08) | 38.78 (+5.52) |" in md
    paths = report.write_report([base, refined], tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["comparison"]["baseline"] == "pretrained" and len(saved["results"]) == 2


# --------------------------------------------------------------------------------------------------
# End to end on real photos
# --------------------------------------------------------------------------------------------------

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def cifar_subset(cifar10_dir, tmp_path_factory) -> dict[str, Path]:
    """10 test photos per class as class folders, and a COCO-format caption set of 20 of them
    (2 captions each, from the class names)."""
    root = tmp_path_factory.mktemp("cifar_eval")
    folders = root / "classes"
    images = root / "coco_images"
    images.mkdir()
    coco = {"images": [], "annotations": []}
    for c, name in enumerate(CLASSES):
        (folders / name).mkdir(parents=True)
        for k in range(10):
            src = cifar10_dir / "test" / name / f"{k:04d}.jpg"
            shutil.copy(src, folders / name / src.name)
            if k < 2:
                image_id = len(coco["images"]) + 1
                file_name = f"{name}_{k}.jpg"
                shutil.copy(src, images / file_name)
                coco["images"].append({"id": image_id, "file_name": file_name, "height": 32, "width": 32})
                for j, cap in enumerate((f"a photo of a {name}.", f"a small blurry {name} in the picture")):
                    coco["annotations"].append({"id": 2 * image_id + j, "image_id": image_id, "caption": cap})
    (root / "captions.json").write_text(json.dumps(coco))
    return {"folders": folders, "annotations": root / "captions.json", "images": images}


def _eval_config(subset: dict[str, Path], cache_dir: Path) -> ml_collections.ConfigDict:
    from jax_refine import config_base as default  # the base config, `--config default`

    config = default.get_config()
    config.eval.zero_shot = (f"folder:{subset['folders']}",)
    config.eval.retrieval = (f"coco_json:{subset['annotations']}:{subset['images']}",)
    config.eval.batch_size = 32
    config.eval.cache_dir = str(cache_dir)
    config.eval.progress = False
    return config


@pytest.mark.slow  # the whole compare on real photos; test_retrieval_matches_torch_clip_and_numpy is the fast tier's
def test_end_to_end_compare_on_cifar10(cifar_subset, tiny_hf_clip_dir, tmp_path, monkeypatch):
    from hf_fixtures import write_hf_clip

    other = write_hf_clip(tmp_path / "other_clip", "tiny", seed=1)
    config = _eval_config(cifar_subset, tmp_path / "cache")
    out = tmp_path / "report"
    got = evaluate.compare([f"pretrained={tiny_hf_clip_dir}", ("refined", str(other))], config, out)
    results = got["results"]
    assert [r["model"] for r in results] == ["pretrained", "refined"]
    for r in results:
        (zs,) = r["zero_shot"].values()
        assert zs["n"] == 100 and zs["num_classes"] == 10
        (rt,) = r["retrieval"].values()
        assert rt["n_images"] == 20 and rt["n_captions"] == 40
        assert set(r["features"]) == set(r["zero_shot"]) | set(r["retrieval"])
    md = got["markdown"].read_text()
    assert "| pretrained |" in md and "| refined |" in md and "ZS avg" in md and "gap" in md
    assert json.loads(got["json"].read_text())["comparison"]["baseline"] == "pretrained"
    names = {p.name for p in got["pictures"]}
    assert {"captions_gap_pca.png", "captions_similarity_hist.png"} <= names
    assert all((out / n).is_file() and f"]({n})" in md for n in names)

    # A second run reads every embedding from the npz cache: extraction is never called. The cache key is
    # the parameters' fingerprint, so an already-loaded model (as the demo passes) hits it too.
    from jax_refine.models import registry

    monkeypatch.setattr(emb_lib, "extract", lambda *a, **k: pytest.fail("embeddings recomputed"))
    models = {"pretrained": registry.load(str(tiny_hf_clip_dir)), "refined": str(other)}
    again = evaluate.compare(models, config, tmp_path / "r2")
    assert again["results"] == results


def test_in_memory_zero_shot_with_template_ensemble(tiny_hf_clip_dir, tmp_path):
    from hf_fixtures import random_pixels
    from jax_refine.models import registry

    model = registry.load(str(tiny_hf_clip_dir))
    labels = np.arange(12) % 3
    task = evaluate.zero_shot_from_arrays("toy", random_pixels(12, model.config.vision_config.image_size), labels,
                                          ["cat", "dog", "ship"])
    eval_config = ml_collections.ConfigDict({"batch_size": 8, "templates": "openai", "progress": False})
    result = evaluate.evaluate(model, eval_config, name="tiny", zero_shot=[task], retrieval=[], out_dir=tmp_path)
    assert result["templates"] == "openai" and result["zero_shot"]["toy"]["n"] == 12
    assert result["zero_shot_mean"]["top1"] == result["zero_shot"]["toy"]["top1"]
    assert {p.name for p in tmp_path.glob("*.png")} == {"toy_gap_pca.png", "toy_similarity_hist.png"}
    assert "| tiny |" in (tmp_path / "report.md").read_text()


def test_bad_input(cifar_subset, tiny_hf_clip_dir, tmp_path):
    from jax_refine.models import registry

    model = registry.load(str(tiny_hf_clip_dir))
    config = _eval_config(cifar_subset, tmp_path / "cache")
    empty = evaluate.ZeroShotTask("empty", lambda size: iter(()), ["cat", "dog"])
    with pytest.raises(ValueError, match="empty"):
        evaluate.evaluate(model, config.eval, zero_shot=[empty], retrieval=[])
    size = model.config.vision_config.image_size
    nonames = evaluate.zero_shot_from_arrays("nonames", np.zeros((2, size, size, 3)), np.zeros(2), [])
    with pytest.raises(ValueError, match="no class names"):
        evaluate.evaluate(model, config.eval, zero_shot=[nonames], retrieval=[])
    wrong_size = evaluate.zero_shot_from_arrays("small", np.zeros((2, 8, 8, 3)), np.zeros(2), ["a", "b"])
    with pytest.raises(ValueError, match="8x8 but the model takes"):
        evaluate.evaluate(model, config.eval, zero_shot=[wrong_size], retrieval=[])
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        evaluate.compare([str(tmp_path / "no_such_dir")], config, tmp_path / "out")
    # A checkpoint whose weights do not match its config.json.
    from hf_fixtures import write_hf_clip

    bad = write_hf_clip(tmp_path / "mismatched", "tiny", seed=0)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "projection_dim": 32}))
    with pytest.raises(ValueError, match="mismatched.*does not match"):
        evaluate.compare([str(bad)], config, tmp_path / "out")
    not_clip = tmp_path / "not_clip"
    not_clip.mkdir()
    (not_clip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not_clip"):
        evaluate.compare([str(not_clip)], config, tmp_path / "out")


@pytest.mark.slow  # the whole compare on a SigLIP checkpoint
def test_compare_on_a_siglip_checkpoint_prepares_as_siglip(coco_mini_dir, tmp_path):
    """`compare` on a SigLIP checkpoint directory: real COCO photos squash-resized to [-1, 1], captions through
    the directory's SentencePiece tokenizer padded to 16 and attended to. Recall against transformers'
    SiglipImageProcessor + SiglipTokenizer + PyTorch SiglipModel (no mask) and the NumPy recall."""
    from transformers import SiglipImageProcessorPil, SiglipModel, SiglipTokenizer
    from PIL import Image

    from hf_fixtures import assert_matches_torch, write_tiny_siglip
    from jax_refine import config_base as default  # the base config, `--config default`
    from jax_refine.data import sources

    directory = write_tiny_siglip(tmp_path / "siglip")
    ann = coco_mini_dir / "annotations" / "captions_val2017.json"
    spec = f"coco_json:{ann}:{coco_mini_dir / 'val2017'}"
    config = default.get_config()
    config.eval.update({"zero_shot": (), "retrieval": (spec,), "max_examples": 6, "batch_size": 8, "plots": False,
                        "progress": False, "cache_dir": str(tmp_path / "cache")})  # the cache keeps our embeddings
    result = evaluate.compare({"siglip": str(directory)}, config, tmp_path / "report")["results"][0]
    got, gap = result["retrieval"][spec], result["features"][spec]["modality_gap"]

    records = sources.read_captions(ann, coco_mini_dir / "val2017")[:6]
    captions = [t for r in records for _, t in r["captions"]]
    idx = np.array([i for i, r in enumerate(records) for _ in r["captions"]])
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    pixels = np.concatenate([processor(images=Image.open(r["path"]).convert("RGB"), return_tensors="np")["pixel_values"]
                             for r in records])
    ids = SiglipTokenizer.from_pretrained(str(directory))(captions, padding="max_length", truncation=True,
                                                          max_length=16, return_tensors="pt")["input_ids"]
    ref = SiglipModel.from_pretrained(str(directory)).eval()
    ti, tt = assert_matches_torch(_cached_features(tmp_path / "cache"), ref, pixels.transpose(0, 2, 3, 1), ids.numpy())
    want = _numpy_recall(ti, tt, idx)
    assert (got["n_images"], got["n_captions"]) == (6, len(captions))
    for direction in ("i2t", "t2i"):
        assert got[direction] == pytest.approx(want[direction])
    # the gap against its equation in float64 on our embeddings (just checked against torch's), within the derived
    # fp32 bound doubled: the features are normalized twice in fp32 (evaluate.normalize, then the metric's own)
    fi, ft = (x.astype(np.float64) for x in _cached_features(tmp_path / "cache"))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    tol.assert_fp32_close(gap, np.linalg.norm(unit(fi).mean(0) - unit(ft).mean(0)), 2 * tol.centroid_gap(fi, ft)[0],
                          "gap")


def _cached_features(cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) embeddings that one evaluation wrote to its `cache_dir` (embeddings.cached's npz files)."""
    found = {}
    for path in cache_dir.glob("*.npz"):
        with np.load(path) as f:
            found[json.loads(str(f["__key__"]))["kind"]] = f["features"]
    return found["image"], found["text"]
