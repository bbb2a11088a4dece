"""The model registry and interface: which family a checkpoint is, what every model tells its users, the
one-line error for an unknown family, and one trainer run per family (CLIP, open_clip's format, SigLIP) through
the real input pipeline on real COCO photos.

References: transformers' PyTorch models open what we export, transformers' default image processors give the
pixel statistics, each family's own processors and tokenizers (CLIPImageProcessor / CLIPTokenizer,
SiglipImageProcessor / SiglipTokenizer) give the batches, and the checkpoints themselves (written by torch) give
the start parameters."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
import tolerances as tol
from hf_fixtures import clip_tokenizer, write_tiny_siglip
from test_openclip_format import _open_clip_model, _save, _tiny_cfg
from train_helpers import tiny_config

from jax_refine import checkpoint as ckpt, cli, evaluate, train
from jax_refine.models import registry
from jax_refine.models.interface import Model

pytestmark = pytest.mark.slow  # a training run per model family: not in the fast tier


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_hf_clip_dir):
    """One tiny random checkpoint per registered family, each written by its own PyTorch library."""
    root = tmp_path_factory.mktemp("families")
    siglip_dir = write_tiny_siglip(root / "siglip", seed=2)  # with its SentencePiece tokenizer, as the hub has
    cfg = _tiny_cfg(True)
    cfg["text_cfg"]["vocab_size"] = 49408  # CLIP's BPE: the pipeline tokenizes real captions
    openclip_dir = _save(_open_clip_model(cfg, seed=4), cfg, root / "openclip", "safetensors")
    return {"clip": tiny_hf_clip_dir, "openclip": openclip_dir, "siglip": siglip_dir}


def test_family_of_each_checkpoint(family_dirs, tmp_path):
    for name, directory in family_dirs.items():
        assert registry.family_of(directory).name == name
    both = tmp_path / "both"  # a hub repo shipping HF and open_clip files: the HF CLIP weights win
    shutil.copytree(family_dirs["clip"], both)
    shutil.copy(family_dirs["openclip"] / "open_clip_model.safetensors", both)
    assert registry.family_of(both).name == "clip"
    assert registry.family_of_config({"model_type": "siglip"}).name == "siglip"
    assert registry.family_of_config({}).name == "clip"


def test_interface_attributes_against_transformers_processors(family_dirs):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    clip_proc, siglip_proc = CLIPImageProcessor(), SiglipImageProcessor()
    want = {"clip": ("clip", "crop", "longest", clip_proc), "openclip": ("clip", "crop", "longest", clip_proc),
            "siglip": ("siglip", "squash", "max_length", siglip_proc)}
    for name, directory in family_dirs.items():
        model = registry.load(directory)
        family, resize, padding, proc = want[name]
        assert isinstance(model, Model)
        assert (model.family, model.resize, model.text_padding) == (family, resize, padding)
        # the processor's constants, at most rounded once to fp32 (half an ulp: relative U32)
        np.testing.assert_allclose(model.pixel_mean, proc.image_mean, rtol=tol.U32, atol=0)
        np.testing.assert_allclose(model.pixel_std, proc.image_std, rtol=tol.U32, atol=0)
        config = json.loads((directory / ("open_clip_config.json" if name == "openclip" else "config.json")).read_text())
        if name == "openclip":
            vision, text = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
            assert (model.image_size, model.text_length) == (vision["image_size"], text["context_length"])
            assert model.feature_dim == config["model_cfg"]["embed_dim"]
        else:
            assert model.image_size == config["vision_config"]["image_size"]
            assert model.text_length == config["text_config"]["max_position_embeddings"]
        pixels = np.zeros((2, model.image_size, model.image_size, 3), np.float32)
        ids = np.ones((2, model.text_length), np.int32)
        image, text = nnx.jit(lambda m, p, i: m(p, i))(model, pixels, ids)  # one compile, not op by op
        assert image.shape == text.shape == (2, model.feature_dim)
        assert (model.logit_bias is None) == (family == "clip")
        assert isinstance(model.logit_scale, nnx.Param)


def test_unknown_family_is_a_one_line_error(family_dirs, tmp_path):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(BertConfig(architectures=["BertModel"]).to_dict()))
    shutil.copy(family_dirs["clip"] / "model.safetensors", bert)
    for load in (ckpt.load_model, registry.load):
        with pytest.raises(ValueError) as err:
            load(bert)
        message = str(err.value)
        assert "\n" not in message and str(bert) in message
        assert "model_type 'bert' (architectures: BertModel); weight files: model.safetensors" in message
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"notes/config\.json: not found, and no open_clip checkpoint files "
                                                r"either \(weight files: none\)") as err:
        ckpt.load_model(empty)
    assert "\n" not in str(err.value)


def _coco_config(workdir, directory, coco_mini_dir, **overrides):
    """tiny_test from the checkpoint `directory`, on coco_mini's captioned train photos read in place."""
    return tiny_config(workdir, **{
        "model.random_init": None, "model.name_or_path": str(directory), "train.num_steps": 1,
        "data.source": "coco_json", "data.annotations": str(coco_mini_dir / "annotations" / "captions_train2017.json"),
        "data.images": str(coco_mini_dir / "train2017"), "data.split": "train", **overrides})


def _processors_batch(model, directory, paths, captions) -> tuple[np.ndarray, np.ndarray]:
    """The family's own transformers processors on these photos and captions: NHWC pixels, token ids."""
    from PIL import Image
    from transformers import CLIPImageProcessor, SiglipImageProcessorPil, SiglipTokenizer

    size, length = model.image_size, model.text_length
    if model.family == "siglip":
        processor, tokenizer = (SiglipImageProcessorPil(size={"height": size, "width": size}),
                                SiglipTokenizer.from_pretrained(str(directory)))
    else:
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        tokenizer = clip_tokenizer()
    pixels = np.concatenate([processor(images=Image.open(p).convert("RGB"), return_tensors="np")["pixel_values"]
                             for p in paths]).transpose(0, 2, 3, 1)
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=length)["input_ids"]
    return pixels, np.asarray(ids)


@pytest.mark.parametrize("name", ["clip", "openclip", "siglip"])
def test_one_clip_refine_run_per_family(family_dirs, coco_mini_dir, tmp_path, name, capsys):
    """train.train on each family's checkpoint through the input pipeline on real (non-square) COCO photos and
    captions: its first batch is what the family's own processors make of them (SigLIP: squashed, [-1, 1],
    SentencePiece ids padded to 16 and all attended to); the params move, the workdir restores as the same
    family with the trained params, and the export opens in transformers."""
    from transformers import AutoModel

    directory = family_dirs[name]
    start = registry.load(directory)
    config = _coco_config(tmp_path / "run", directory, coco_mini_dir, **{"train.export_hf": True})
    it = train.make_data_iterator(config, train.model_preprocessing(config))  # what train() reads, first batch
    batch, order = next(it), it.epoch_examples(0)
    assert it.stats()["skipped_bad_image"] == it.stats()["skipped_no_caption"] == 0
    pixels, ids = _processors_batch(start, directory, order["path"][:8], order["caption"][:8])
    # the same uint8 resize, then fp32 (x / 255 - mean) / std in either order (tests/tolerances.pixel_error)
    assert np.abs(batch["image"] - pixels).max() <= tol.pixel_error(start.pixel_mean, start.pixel_std)
    np.testing.assert_array_equal(batch["input_ids"], ids)
    if name == "siglip":
        assert (batch["attention_mask"] == 1).all()

    out = train.train(config, return_state=True)
    assert out["steps"] == 1 and np.isfinite(out["metrics"]["loss"])
    before = nnx.state(start, nnx.Param).to_pure_dict()
    after = jax.tree.map(np.asarray, out["state"].params)
    changed = {jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(after),
                                                           jax.tree.leaves(before)) if not np.array_equal(a, b)}
    every = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(after)}
    # CLIP-Refine does not use (and freezes) the logit scale, nor SigLIP's logit bias
    assert changed == every - {"['logit_scale']", "['logit_bias']"}

    restored = ckpt.load_model(tmp_path / "run")
    assert type(restored) is type(start) and restored.family == start.family
    for a, b in zip(jax.tree.leaves(nnx.state(restored, nnx.Param).to_pure_dict()), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert registry.family_of(Path(out["hf_dir"])).name == start.family
    _, info = AutoModel.from_pretrained(out["hf_dir"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    # `export` of the workdir carries the tokenizer the run trained with, as the trainer's export does (before,
    # the command wrote none for SigLIP): the export's own tokenizer gives the reference processors' ids
    from transformers import AutoTokenizer

    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exported")]) == 0
    exported = AutoTokenizer.from_pretrained(tmp_path / "exported")
    got = exported(list(order["caption"][:8]), padding="max_length", truncation=True, max_length=start.text_length)
    np.testing.assert_array_equal(np.asarray(got["input_ids"]), ids)
    if name == "siglip":  # a start checkpoint gone from this machine: the export goes on and says what it lacks
        record = tmp_path / "run" / "config.resolved.json"
        resolved = json.loads(record.read_text())
        resolved["model"]["name_or_path"] = str(tmp_path / "moved_away")
        record.write_text(json.dumps(resolved))
        capsys.readouterr()
        assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "no_tok")]) == 0
        said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[export]")]
        assert len(said) == 1 and str(tmp_path / "moved_away") in said[0], said
        assert (tmp_path / "no_tok" / "model.safetensors").is_file() and not (tmp_path / "no_tok" / "spiece.model").exists()


def test_sigmoid_baseline_trains_siglip_logit_scale_and_bias(family_dirs, coco_mini_dir, tmp_path):
    """SigLIP's own contrastive baseline (the `sigmoid` preset) through the same pipeline trains the logit scale
    and bias with everything else; evaluation during training and of the (export-less) workdir afterwards
    read SigLIP's tokenizer from the start checkpoint and agree."""
    directory = family_dirs["siglip"]
    before = nnx.state(registry.load(directory), nnx.Param).to_pure_dict()
    val = f"coco_json:{coco_mini_dir / 'annotations' / 'captions_val2017.json'}:{coco_mini_dir / 'val2017'}"
    config = _coco_config(tmp_path / "run", directory, coco_mini_dir, **{
        "method.name": "sigmoid", "train.export_hf": False, "eval.every_steps": 1, "eval.zero_shot": (),
        "eval.retrieval": (val,), "eval.max_examples": 8, "eval.progress": False})
    out = train.train(config, return_state=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["kind"] == "eval"]
    model = ckpt.load_model(tmp_path / "run")
    result, _ = evaluate.run_suite(model, config.eval, prep=evaluate.preprocessing_of(model, tmp_path / "run"),
                                   zero_shot=[], retrieval=[evaluate.retrieval_task(val, config.eval)])
    for direction in ("i2t", "t2i"):
        assert row[f"retrieval/{val}/{direction}/R@1"] == result["retrieval"][val][direction]["R@1"]
    assert out["steps"] == 1 and np.isfinite(out["metrics"]["sigmoid"])
    after = out["state"].params
    for key in ("logit_scale", "logit_bias"):
        assert not np.array_equal(np.asarray(after[key]), np.asarray(before[key])), key
    assert all(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
