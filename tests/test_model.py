"""Numerics of `jax_refine.models.clip.modeling.CLIP` against transformers' PyTorch `CLIPModel` on the same weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
import tolerances as tol
from conftest import slow
from hf_fixtures import (assert_matches_torch, assert_same_forward, clip_tokenizer, hf_clip_config,
                         hf_reference_features, random_pixels, random_torch_clip, write_hf_clip)
from transformers import CLIPConfig, CLIPModel

from jax_refine.models import registry
from jax_refine.models.clip.modeling import CLIP, create_clip
from jax_refine.models.clip.params import hf_state_dict

CAPTIONS = ["a photo of a cat", "Two dogs, running on the beach at sunset (very fast)!", "x",
            "ünïcödé café — naïve 東京 🚀"]
LOGICAL = {"embed", "mlp", "heads", "vocab", "proj", "norm", "patch", "pos", None}


def _text_batch():
    """Real token ids of different lengths, right-padded, plus two synthetic rows: one with a masked
    token in the middle (the padding mask must matter) and one without any EOS (the two HF pooling modes
    pick different positions)."""
    enc = clip_tokenizer()(CAPTIONS, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    holed = mask[1].copy()
    holed[3] = 0
    no_eos = np.random.default_rng(0).integers(300, 40000, ids.shape[1]).astype(np.int32)
    ids = np.concatenate([ids, ids[1:2], no_eos[None]])
    mask = np.concatenate([mask, holed[None], np.ones((1, ids.shape[1]), np.int32)])
    return ids, mask


def _assert_parity(directory, pixels):
    """Load `directory` with ours and with transformers; assert image and text features (on `_text_batch`)
    agree (hf_fixtures.assert_matches_torch). Returns (ours, ref, pixels, ids, mask, reference text features)."""
    ours = registry.load(directory)
    ref = CLIPModel.from_pretrained(directory).eval()
    ids, mask = _text_batch()
    _, rt = assert_matches_torch((ours.encode_image(pixels), ours.encode_text(ids, mask)), ref, pixels, ids, mask)
    return ours, ref, pixels, ids, mask, rt


def _save_torch_clip(out_dir, config: CLIPConfig, seed: int = 0):
    model = random_torch_clip(config, seed)
    model.save_pretrained(out_dir)
    return model


@pytest.mark.parametrize("eos_token_id", [49407, slow(2)])
def test_tiny_parity_both_eos_modes(tmp_path, eos_token_id):
    directory = write_hf_clip(tmp_path, "tiny", seed=1, eos_token_id=eos_token_id)
    ours, ref, pixels, ids, mask, rt = _assert_parity(directory, random_pixels(3, 32, seed=1))
    fi, ft = ours(pixels, ids, mask)
    assert fi.shape == (3, 24) and ft.shape == (len(ids), 24)
    # without a mask every token is attended: differs from the masked row, equals HF without a mask
    _, rt_nomask = assert_matches_torch((None, ours.encode_text(ids)), ref, None, ids, None)
    assert np.abs(rt_nomask[-2] - rt[-2]).max() > 1e-3


def test_eos_modes_differ_on_rows_without_eos(tmp_path):
    """The synthetic no-EOS row pools at argmax(ids) in legacy mode and at position 0 otherwise."""
    ids, mask = _text_batch()
    feats, dirs = {}, {}
    for eos in (49407, 2):
        dirs[eos] = write_hf_clip(tmp_path / str(eos), "tiny", seed=1, eos_token_id=eos)
        feats[eos] = np.asarray(registry.load(dirs[eos]).encode_text(ids, mask))
    # real texts pool the same position: two fp32 forwards of the same features (hf_fixtures.assert_same_forward)
    assert_same_forward((None, feats[2][:-1]), (None, feats[49407][:-1]),
                        CLIPModel.from_pretrained(dirs[49407]).eval(), None, ids[:-1], mask[:-1])
    assert np.abs(feats[2][-1] - feats[49407][-1]).max() > 1e-3


@pytest.mark.slow  # a real-width ViT-B/32 in two frameworks; the tiny parity covers the code in the fast tier
def test_vit_b32_width_parity(tmp_path):
    _assert_parity(write_hf_clip(tmp_path, "vit_b32", seed=2), random_pixels(2, 224, seed=2))


@pytest.mark.parametrize("act", ["gelu", slow("gelu_new")])
def test_hidden_act_is_respected(tmp_path, act):
    config = hf_clip_config("tiny", hidden_act=act)
    config.vision_config.hidden_act = act
    ref = _save_torch_clip(tmp_path, config, seed=3)
    ours = registry.load(tmp_path)
    ids, mask = _text_batch()
    pixels = random_pixels(2, 32, seed=3)
    assert_matches_torch((ours.encode_image(pixels), ours.encode_text(ids, mask)), ref, pixels, ids, mask)


@pytest.mark.slow  # bf16 compute: the full suite (fp32 parity is the fast tier's check)
def test_bf16_compute_close_to_fp32(tiny_hf_clip_dir):
    ours = registry.load(tiny_hf_clip_dir, dtype=jnp.bfloat16)
    assert {v.dtype for v in jax.tree.leaves(nnx.state(ours, nnx.Param))} == {jnp.dtype(jnp.float32)}
    ref = CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    ids, mask = _text_batch()
    pixels = random_pixels(2, 32, seed=4)
    call = lambda m, dtype: hf_reference_features(m, pixels, ids, mask, dtype)  # noqa: E731
    ri, rt = call(ref, np.float32)
    fi, ft = ours(pixels, ids, mask)
    assert fi.dtype == jnp.bfloat16 and ft.dtype == jnp.bfloat16
    # within (U_BF16 / U32) x the network's fp32 error measured on transformers' forward (first order in u)
    for got, want, e, what in zip((fi, ft), (ri, rt), tol.torch_fp32_errors(ref, call), ("image", "text")):
        tol.assert_bf16_parity(np.asarray(got, np.float32), want, e, f"bf16 {what} features")


@pytest.mark.slow  # gradients through two frameworks; the tiny feature parity is the fast tier's
def test_jit_grad_through_split_merge_matches_torch(tiny_hf_clip_dir):
    ours = registry.load(tiny_hf_clip_dir)
    ref = CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    ids, mask = _text_batch()
    ids, mask = ids[:3], mask[:3]
    pixels = random_pixels(3, 32, seed=5)

    graphdef, params = nnx.split(ours, nnx.Param)

    @jax.jit
    def loss_fn(params, pixels, ids, mask):
        model = nnx.merge(graphdef, params)
        fi, ft = model(pixels, ids, mask)
        return jnp.exp(model.logit_scale[...]) * jnp.sum(fi * ft) / fi.shape[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, pixels, ids, mask)

    def torch_loss_and_grads(model, dtype):
        """[loss, *gradients by HF name] of the same loss from a torch CLIPModel of `dtype`."""
        with torch.enable_grad():
            model.zero_grad()
            t_pixels = torch.from_numpy(np.asarray(pixels, dtype).transpose(0, 3, 1, 2).copy())
            t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
            fi = model.get_image_features(pixel_values=t_pixels).pooler_output
            ft = model.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output
            out = model.logit_scale.exp() * (fi * ft).sum() / 3
            out.backward()
        return [out.detach().numpy()] + [p.grad.numpy().copy() for _, p in model.named_parameters()]

    names = [k for k, _ in ref.named_parameters()]
    want = torch_loss_and_grads(ref, np.float32)
    errors = tol.torch_fp32_errors(ref, torch_loss_and_grads)  # torch's own fp32 error, per output
    ours_grads = hf_state_dict(nnx.merge(graphdef, grads))
    assert set(ours_grads) == set(names)
    tol.assert_parity(np.float64(loss), want[0], errors[0], "loss")
    # a backward pass rounds relative to the gradients flowing through it, so no gradient's error is below
    # LAMBDA ulps of the largest one (k_proj.bias has a zero true gradient: both sides are rounding noise there)
    floor = tol.LAMBDA * tol.U32 * max(np.abs(g).max() for g in want[1:])
    for key, g, e in zip(names, want[1:], errors[1:]):
        tol.assert_parity(ours_grads[key], g, max(e, floor), key)


def _size_config(name: str) -> CLIPConfig:
    text = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12)
    vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  image_size=224, patch_size=32)
    proj = 512
    if name == "B/16":
        vision["patch_size"] = 16
    if name.startswith("L/14"):
        text = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                      image_size=336 if name == "L/14-336" else 224, patch_size=14)
        proj = 768
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


@pytest.mark.parametrize("name", ["B/32", slow("B/16"), slow("L/14"), slow("L/14-336")])
def test_every_clip_size_matches_hf_layout(name):
    """Abstract init of the full-size models: every HF tensor exists with HF's shape (torch meta model)."""
    from jax_refine.models.clip import params as clip_params

    config = _size_config(name)
    with torch.device("meta"):
        ref_shapes = {k: tuple(v.shape) for k, v in CLIPModel(config).state_dict().items()}
    size = config.vision_config.image_size

    def build_and_run():
        model = CLIP(config, rngs=nnx.Rngs(0))
        return model, model.encode_image(jnp.zeros((1, size, size, 3))), model.encode_text(jnp.zeros((2, 77), int))

    model, fi, ft = nnx.eval_shape(build_and_run)
    assert fi.shape == (1, config.projection_dim) and ft.shape == (2, config.projection_dim)
    ours = {k: s for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            for k, s in clip_params.hf_shapes("/".join(map(str, path)), v.shape)}
    assert ours == ref_shapes


def test_logical_axis_names_on_every_param():
    model = create_clip(hf_clip_config("tiny"))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    flat = dict(nnx.to_flat_state(specs))
    values = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, spec in flat.items():
        spec = spec.get_value()
        assert len(spec) == values[path].ndim and set(spec) <= LOGICAL, (path, spec)
    assert tuple(flat[("text", "token")].get_value()) == ("vocab", "embed")
    assert tuple(flat[("vision", "layers", 0, "attn", "qkv")].get_value()) == ("embed", None, "heads", None)
    assert tuple(flat[("text", "layers", 1, "mlp", "fc1")].get_value()) == ("embed", "mlp")
    assert tuple(flat[("visual_projection",)].get_value()) == ("embed", "proj")
    assert tuple(flat[("vision", "patch")].get_value()) == ("patch", "embed")


def test_create_clip_init_and_static_config():
    config = hf_clip_config("tiny")
    model = create_clip(config, seed=3)
    # the config's float, stored once in fp32: half an ulp
    assert float(model.logit_scale[...]) == pytest.approx(config.logit_scale_init_value, rel=tol.U32, abs=0)
    assert isinstance(model.config, CLIPConfig) and model.config.projection_dim == 24
    graphdef, _ = nnx.split(model, nnx.Param)
    hash(graphdef)  # usable as a static jit argument
    a = create_clip(config, seed=3).text.token[...]
    b = create_clip(config, seed=4).text.token[...]
    assert np.array_equal(a, model.text.token[...]) and not np.array_equal(a, b)
    # HF's init std for token embeddings: the sample std of N normal draws within 6 standard errors, 1 / sqrt(2 N)
    assert float(jnp.std(a)) == pytest.approx(0.02, rel=6 / np.sqrt(2 * a.size), abs=0)
    # the trainer builds it inside jit (with out_shardings): same values as eager
    traced = jax.jit(lambda: nnx.state(create_clip(config, seed=3), nnx.Param))()
    for x, y in zip(jax.tree.leaves(traced), jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_input_shapes():
    model = create_clip(hf_clip_config("tiny"))
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
        model.encode_image(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="max_position_embeddings=77"):
        model.encode_text(jnp.zeros((1, 78), jnp.int32))
