"""The model registry and interface: which family a checkpoint is, what every model tells its users, the
one-line error for an unknown family, and one trainer run per family (CLIP, open_clip's format, SigLIP).

References: transformers' PyTorch models open what we export, transformers' default image processors give the
pixel statistics, and the checkpoints themselves (written by torch) give the start parameters."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import TINY_SIGLIP, write_hf_siglip
from test_openclip_format import _open_clip_model, _save, _tiny_cfg
from train_helpers import tiny_config

from jax_refine import checkpoint as ckpt, hf, train
from jax_refine.models import registry
from jax_refine.models.interface import Model


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_hf_clip_dir):
    """One tiny random checkpoint per registered family, each written by its own PyTorch library."""
    root = tmp_path_factory.mktemp("families")
    siglip_dir, _ = write_hf_siglip(root / "siglip", TINY_SIGLIP, seed=2)
    cfg = _tiny_cfg(True)
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
        model = hf.load_pretrained(directory)
        family, resize, padding, proc = want[name]
        assert isinstance(model, Model)
        assert (model.family, model.resize, model.text_padding) == (family, resize, padding)
        np.testing.assert_allclose(model.pixel_mean, proc.image_mean, rtol=0, atol=1e-7)  # float32 constants
        np.testing.assert_allclose(model.pixel_std, proc.image_std, rtol=0, atol=1e-7)
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
    for load in (ckpt.load_model, hf.load_pretrained):
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


def _batches(model, batch: int, seed: int = 0):
    """Endless global batches the model can read: pixels at its image size, ids within its vocabulary, texts
    padded its way (SigLIP: every text at its full length, mask all ones)."""
    vocab = int(model.config.text_config.vocab_size)
    length = model.text_length
    rng = np.random.default_rng(seed)

    class It:
        index = 0

        def __iter__(self):
            return self

        def __next__(self):
            image = rng.normal(size=(batch, model.image_size, model.image_size, 3)).astype(np.float32)
            ids = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
            mask = np.ones((batch, length), np.int32)
            if model.text_padding == "longest":
                ends = rng.integers(2, length, size=batch)
                mask = (np.arange(length)[None] <= ends[:, None]).astype(np.int32)
                ids[np.arange(batch), ends] = vocab - 1  # the highest id: the EOS that argmax pooling finds
                ids = np.where(mask == 1, ids, 0).astype(np.int32)
            self.index += 1
            return {"image": image, "input_ids": ids, "attention_mask": mask}

        def get_state(self):
            return {"index": self.index}

        def set_state(self, state):
            self.index = int(state["index"])

    return It()


@pytest.mark.parametrize("name", ["clip", "openclip", "siglip"])
def test_one_clip_refine_run_per_family(family_dirs, tmp_path, name):
    """train.train on each family's checkpoint: the params move, the workdir restores as the same family
    with the trained params, and the export opens in transformers."""
    from transformers import AutoModel

    directory = family_dirs[name]
    start = hf.load_pretrained(directory)
    config = tiny_config(tmp_path / "run", **{"model.random_init": None, "model.name_or_path": str(directory),
                                              "train.num_steps": 1, "train.export_hf": True})
    out = train.train(config, data_iter=_batches(start, 8), return_state=True)
    assert out["steps"] == 1
    before = nnx.state(start, nnx.Param).to_pure_dict()
    after = jax.tree.map(np.asarray, out["state"].params)
    changed = {jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(after),
                                                           jax.tree.leaves(before)) if not np.array_equal(a, b)}
    every = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(after)}
    assert changed == every - {"['logit_scale']"}  # CLIP-Refine does not use (and freezes) the logit scale

    restored = ckpt.load_model(tmp_path / "run")
    assert type(restored) is type(start) and restored.family == start.family
    for a, b in zip(jax.tree.leaves(nnx.state(restored, nnx.Param).to_pure_dict()), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert registry.family_of(out["hf_dir"]).name == start.family
    _, info = AutoModel.from_pretrained(out["hf_dir"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
