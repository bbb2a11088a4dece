"""One CLIP-Refine run on each model family through the real pipeline (issue 13): tiny random checkpoints of
transformers' `SiglipModel` (with a SentencePiece tokenizer trained here) and of open_clip's own format, trained
for two steps with the tiny_test config on real COCO photos read in place. The batches the pipeline feeds are
compared with the family's own processors (transformers' SiglipImageProcessor / SiglipTokenizer,
CLIPImageProcessor / CLIPTokenizer) on the same photos and captions."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from hf_fixtures import write_tiny_siglip
from train_helpers import tiny_config

from jax_refine import hf, preprocess, train
from jax_refine import train_state as ts


def _config(workdir, coco_mini_dir, model_dir, **overrides):
    """tiny_test, starting from the checkpoint `model_dir`, on coco_mini's captioned train photos (in place)."""
    return tiny_config(workdir, **{
        "model.random_init": None, "model.name_or_path": str(model_dir), "train.num_steps": 2,
        "train.export_hf": False, "checkpoint.every_steps": 2, "data.source": "coco_json",
        "data.annotations": str(coco_mini_dir / "annotations" / "captions_train2017.json"),
        "data.images": str(coco_mini_dir / "train2017"), "data.split": "train", **overrides})


def _first_batch_and_rows(config, prep):
    """The pipeline's first batch for `config` and the (photo path, caption) of each of its rows."""
    it = train.make_data_iterator(config, prep)
    batch = next(it)
    order = it.epoch_examples(0)
    assert it.stats()["skipped_bad_image"] == 0 and it.stats()["skipped_no_caption"] == 0
    n = len(batch["image"])
    return batch, list(zip(order["path"][:n], order["caption"][:n]))


def _params(tree) -> dict[str, np.ndarray]:
    return {ts.path_str(p): np.asarray(jax.device_get(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _changed(config, model_dir) -> dict[str, bool]:
    """Train `config`; which start parameters (those of `model_dir`) the run changed."""
    start = _params(ts.split_model(hf.load_pretrained(model_dir))[1])
    out = train.train(config, return_state=True)
    assert out["steps"] == 2 and np.isfinite(out["metrics"]["loss"])
    end = _params(out["state"].params)
    assert set(end) == set(start)
    return {k: not np.array_equal(start[k], end[k]) for k in start}


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    return write_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"))


def test_clip_refine_on_siglip_feeds_its_preprocessing_and_trains(tmp_path, coco_mini_dir, tiny_siglip):
    from transformers import SiglipImageProcessorPil, SiglipTokenizer

    config = _config(tmp_path / "run", coco_mini_dir, tiny_siglip)
    prep = train.model_preprocessing(config)
    assert prep == preprocess.Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash", 16, "max_length",
                                            "siglip", str(tiny_siglip))
    batch, rows = _first_batch_and_rows(config, prep)
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    tokenizer = SiglipTokenizer.from_pretrained(str(tiny_siglip))
    for image, ids, (path, caption) in zip(batch["image"], batch["input_ids"], rows):
        with Image.open(path) as photo:
            assert photo.size[0] != photo.size[1]  # a squash differs from a center crop here
            want = processor(images=photo.convert("RGB"), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert np.abs(image - want).max() <= 1e-5
        np.testing.assert_array_equal(ids, tokenizer(caption, padding="max_length", truncation=True,
                                                     max_length=16)["input_ids"])
    assert (batch["attention_mask"] == 1).all()  # SigLIP attends to its pads

    changed = _changed(config, tiny_siglip)
    frozen = {"logit_scale", "logit_bias"}  # CLIP-Refine (HyCD + RaFA) does not use them
    assert not any(changed[k] for k in frozen)
    assert all(v for k, v in changed.items() if k not in frozen), [k for k, v in changed.items() if not v]


def test_sigmoid_baseline_trains_siglip_logit_scale_and_bias(tmp_path, coco_mini_dir, tiny_siglip):
    changed = _changed(_config(tmp_path / "run", coco_mini_dir, tiny_siglip, **{"method.name": "sigmoid"}),
                       tiny_siglip)
    assert changed["logit_scale"] and changed["logit_bias"] and all(changed.values())


def test_clip_refine_on_an_open_clip_format_checkpoint(tmp_path, coco_mini_dir):
    """A tiny open_clip CLIP (quick_gelu; open_clip's own weights file and config) trained the same way: the
    pipeline feeds CLIPImageProcessor pixels and CLIPTokenizer ids at the model's size and text length."""
    from transformers import CLIPImageProcessor, CLIPTokenizer

    from test_openclip_format import _open_clip_model, _save

    cfg = {"embed_dim": 24, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 32, "head_width": 8},
           "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    model_dir = _save(_open_clip_model(cfg), cfg, tmp_path / "open_clip", "safetensors")
    config = _config(tmp_path / "run", coco_mini_dir, model_dir)
    prep = train.model_preprocessing(config)
    assert (prep.image_size, prep.resize, prep.text_length, prep.padding, prep.tokenizer) == (32, "crop", 20,
                                                                                                "longest", "clip")
    batch, rows = _first_batch_and_rows(config, prep)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = CLIPTokenizer(vocab=str(preprocess.TOKENIZER_DIR / "vocab.json"),
                              merges=str(preprocess.TOKENIZER_DIR / "merges.txt"))
    for image, ids, (path, caption) in zip(batch["image"], batch["input_ids"], rows):
        with Image.open(path) as photo:
            want = processor(images=photo.convert("RGB"), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        assert np.abs(image - want).max() <= 1e-5
        np.testing.assert_array_equal(ids, tokenizer(caption, padding="max_length", truncation=True,
                                                     max_length=20)["input_ids"])

    changed = _changed(config, model_dir)
    assert not changed["logit_scale"] and all(v for k, v in changed.items() if k != "logit_scale")
