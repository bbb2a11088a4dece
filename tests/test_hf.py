"""Hugging Face checkpoints in and out: `jax_refine.hf` against transformers' PyTorch `CLIPModel`."""
from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import (assert_matches_torch, assert_same_forward, clip_tokenizer, hf_clip_config,
                         hf_reference_features, random_pixels, write_hf_clip, write_torch_bin)
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file
from transformers import CLIPModel, CLIPTokenizer

from jax_refine import hf
from jax_refine.models import registry
from jax_refine.models.clip.modeling import create_clip
from jax_refine.models.clip.params import config_from as clip_config_from, hf_state_dict


def _texts():
    enc = clip_tokenizer()(["a photo of a cat", "a much longer caption, with commas and words", "x"],
                           padding=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def _features(model, pixels, ids, mask):
    return np.asarray(model.encode_image(pixels)), np.asarray(model.encode_text(ids, mask))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_hf_clip(tmp_path_factory.mktemp("tiny"), "tiny", seed=7)


# ------------------------------------------------------------------------------------ round trip
def test_load_save_round_trip_opens_in_transformers(tiny_dir, tmp_path):
    ours = registry.load(tiny_dir)
    out = registry.save(ours, tmp_path / "export")
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "preprocessor_config.json",
                                       "vocab.json"]
    reloaded, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = CLIPModel.from_pretrained(tiny_dir).eval()
    ids, mask = _texts()
    pixels = random_pixels(2, 32, seed=1)
    want = hf_reference_features(original, pixels, ids, mask)
    got = hf_reference_features(reloaded.eval(), pixels, ids, mask)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert_matches_torch(_features(ours, pixels, ids, mask), original, pixels, ids, mask)
    tok = CLIPTokenizer.from_pretrained(out)  # the copied tokenizer files work
    assert tok("a photo of a cat")["input_ids"] == ids[0][mask[0] == 1].tolist()


def test_tensors_bit_identical_after_load_save(tiny_dir, tmp_path):
    registry.save(registry.load(tiny_dir), tmp_path / "export")
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    assert set(before) == set(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "clip" and config["text_config"]["eos_token_id"] == 49407


def test_random_init_exports_to_transformers(tmp_path):
    """create_clip -> save_pretrained -> torch CLIPModel computes the same features as our model."""
    ours = create_clip(hf_clip_config("tiny", eos_token_id=2), seed=5)
    registry.save(ours, tmp_path)
    ref = CLIPModel.from_pretrained(tmp_path).eval()
    assert ref.config.text_config.eos_token_id == 2
    ids, mask = _texts()
    pixels = random_pixels(2, 32, seed=2)
    assert_matches_torch(_features(ours, pixels, ids, mask), ref, pixels, ids, mask)


def test_pytorch_bin_loads_without_torch(tiny_dir, tmp_path, monkeypatch):
    import torch

    bin_dir = write_torch_bin(tiny_dir, tmp_path / "bin")  # with the old position_ids buffers
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was used"))
    from_bin = hf_state_dict(registry.load(bin_dir))
    want = load_file(tiny_dir / "model.safetensors")
    assert set(from_bin) == set(want)
    for key in want:
        assert np.array_equal(from_bin[key], want[key]), key
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails: the reader itself needs no torch
    raw = hf.read_torch_bin(bin_dir / "pytorch_model.bin")
    assert np.array_equal(raw["text_model.embeddings.position_ids"], np.arange(77)[None])


def test_bf16_safetensors_checkpoint(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    shutil.copyfile(tiny_dir / "config.json", tmp_path / "config.json")
    state = {k: v.to(torch.bfloat16) for k, v in load_torch(tiny_dir / "model.safetensors").items()}
    save_torch(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    got = hf_state_dict(registry.load(tmp_path))
    for key, value in state.items():
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], value.float().numpy(), err_msg=key)


def test_sharded_safetensors_index(tiny_dir, tmp_path):
    tensors = load_file(tiny_dir / "model.safetensors")
    keys = sorted(tensors)
    shutil.copyfile(tiny_dir / "config.json", tmp_path / "config.json")
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, tmp_path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = hf_state_dict(registry.load(tmp_path))
    assert all(np.array_equal(got[k], tensors[k]) for k in keys)


# -------------------------------------------------------------------------------------- sharding
def test_sharded_load_places_each_tensor_in_its_sharding(tiny_dir):
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    calls = []

    def shardings(path, names):
        calls.append((path, names))
        return NamedSharding(mesh, PartitionSpec(*("fsdp" if n == "embed" else None for n in names)))

    sharded = registry.load(tiny_dir, shardings=shardings)
    plain = registry.load(tiny_dir)
    assert ("vision/layers/0/attn/qkv", ("embed", None, "heads", None)) in calls
    qkv = sharded.vision.layers[0].attn.qkv[...]
    assert qkv.sharding.spec == PartitionSpec("fsdp", None, None, None)
    assert len(qkv.addressable_shards) == 8 and qkv.addressable_shards[0].data.shape == (6, 3, 4, 12)
    token = sharded.text.token[...]
    assert token.sharding.spec == PartitionSpec(None, "fsdp")
    assert {s.data.shape for s in token.addressable_shards} == {(49408, 4)}
    assert sharded.logit_scale[...].sharding.is_fully_replicated
    by_path = registry.load(tiny_dir, shardings={"text/token": NamedSharding(mesh, PartitionSpec(None, "fsdp"))})
    assert by_path.text.token[...].sharding.spec == PartitionSpec(None, "fsdp")
    assert len(by_path.text.position[...].sharding.device_set) == 1
    for a, b in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)), jax.tree.leaves(nnx.state(plain, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exported = hf_state_dict(sharded)  # gathers shards back to host for save_pretrained
    assert all(np.array_equal(v, w) for v, w in zip(exported.values(), hf_state_dict(plain).values()))
    ids, mask = _texts()
    pixels = random_pixels(2, 32, seed=3)
    graphdef, params = nnx.split(sharded, nnx.Param)
    fi, ft = jax.jit(lambda p, x, i, m: nnx.merge(graphdef, p)(x, i, m))(params, pixels, ids, mask)
    assert_same_forward((fi, ft), _features(plain, pixels, ids, mask), CLIPModel.from_pretrained(tiny_dir).eval(),
                        pixels, ids, mask)


# ---------------------------------------------------------------------------------------- errors
def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_unexpected_and_misshaped_keys(tiny_dir, tmp_path):
    bad = _rewrite(tiny_dir, tmp_path / "missing", lambda t: t.pop("text_model.final_layer_norm.bias"))
    with pytest.raises(ValueError, match=r"1 missing keys: text_model\.final_layer_norm\.bias$"):
        registry.load(bad)
    bad = _rewrite(tiny_dir, tmp_path / "unexpected", lambda t: t.update({"head.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"1 unexpected keys: head\.weight"):
        registry.load(bad)
    bad = _rewrite(tiny_dir, tmp_path / "shape",
                   lambda t: t.update({"text_projection.weight": np.zeros((24, 31), np.float32)}))
    with pytest.raises(ValueError, match=r"shape mismatches: text_projection\.weight \(24, 31\) != \(24, 32\)"):
        registry.load(bad)

    def drop_layer(t):
        for k in [k for k in t if k.startswith("vision_model.encoder.layers.1.")]:
            del t[k]

    bad = _rewrite(tiny_dir, tmp_path / "layer", drop_layer)
    with pytest.raises(ValueError, match=r"16 missing keys: vision_model\.encoder\.layers\.1\..*\(16 in all\)") as e:
        registry.load(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_other_configs_are_refused(tiny_dir, tmp_path):
    """CLIP weights under a SigLIP config.json load as SigLIP (the registry goes by model_type) and fail the
    key check in one line; `config_from` refuses any other model_type."""
    from transformers import BertConfig, SiglipConfig

    shutil.copytree(tiny_dir, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(SiglipConfig().to_dict()))
    with pytest.raises(ValueError, match=r"ckpt: checkpoint does not match its config: \d+ missing keys: logit_bias") as e:
        registry.load(tmp_path / "ckpt")
    assert "\n" not in str(e.value)
    for config in (SiglipConfig().to_dict(), BertConfig().to_dict()):
        with pytest.raises(ValueError, match=f"model_type is '{config['model_type']}', not 'clip'"):
            clip_config_from(config)


def test_clip_config_from_accepts_dict_path_and_config(tiny_dir):
    config = clip_config_from(tiny_dir)
    assert config.projection_dim == 24 and config.vision_config.image_size == 32
    assert clip_config_from(config) is config
    assert clip_config_from(tiny_dir / "config.json").text_config.hidden_size == 32
    assert clip_config_from(config.to_dict()).vision_config.patch_size == 8
    with pytest.raises(TypeError, match="int"):
        clip_config_from(3)


def test_missing_files_are_named(tiny_dir, tmp_path):
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_config/config\.json"):
        registry.load(no_config)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_weights: no weights file \(model\.safetensors"):
        registry.load(no_weights)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        registry.load(tmp_path / "does" / "not" / "exist")


def test_hub_id_goes_through_huggingface_hub(monkeypatch, tmp_path, tiny_dir):
    """Offline and not cached: a clear error naming the repo; with a cached file: loads from the snapshot."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(FileNotFoundError, match="someone/not-a-cached-clip: .*Hugging Face hub"):
        registry.load("someone/not-a-cached-clip")
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    asked = []

    def fake_download(repo_id, filename):  # stands in for the network; the resolution logic is ours
        asked.append(filename)
        if not (tiny_dir / filename).is_file():
            raise EntryNotFoundError(filename)
        (tmp_path / filename).write_bytes((tiny_dir / filename).read_bytes())
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = registry.load("openai/clip-tiny-test")
    assert asked[:2] == ["config.json", "model.safetensors"] and "pytorch_model.bin" not in asked
    assert np.array_equal(hf_state_dict(model)["logit_scale"], load_file(tiny_dir / "model.safetensors")["logit_scale"])


# ------------------------------------------------------------------------------------ atomicity
def test_save_is_atomic(tiny_dir, tmp_path, monkeypatch):
    model = registry.load(tiny_dir)
    out = tmp_path / "export"
    registry.save(model, out)
    (out / "stale.txt").write_text("old")
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    import safetensors.numpy

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        registry.save(model, out)
    assert (out / "model.safetensors").read_bytes() == before and (out / "stale.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temp dir left behind
    monkeypatch.undo()
    registry.save(model, out)  # a successful save replaces the directory as a whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").read_bytes() == before
