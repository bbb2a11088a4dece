"""The padded attention program (`attention="cudnn"` on a GPU) run on CPU as `attention="xla_padded"`.

References: jax's own cuDNN length check (`check_is_flash_attention`, the function that raised "Unsupported
sequence length Q 77, KV 77" on the H100) for the length rule; transformers' PyTorch `CLIPModel` and
`SiglipModel` on the same weights for the features (odd token counts, so both towers pad); the unpadded
program (`attention="xla"`, which tests/test_model.py checks against PyTorch) for one train step's gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hf_fixtures import TINY_SIGLIP, assert_matches_torch, clip_tokenizer, random_pixels, write_hf_siglip
from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
from train_helpers import synthetic_batch, tiny_config
from transformers import CLIPModel

from jax_refine import sharding as shd, step as step_lib, train
from jax_refine.models import registry
from jax_refine.models.clip import modeling
from jax_refine.models.layers import padded_length

TOL = 1e-4  # a padding leak must move features by > 10 x this: ~1000x the fp32 rounding of these features (~1e-6)
# captions whose longest has an odd token count (BOS + 13 words + EOS = 15), right-padded as our tokenizer pads
CAPTIONS = ["a photo of a cat", "two dogs run on the beach at sunset while a man throws a red ball", "x"]
# tokens per image of the models we train: ViT-B/32, B/16, L/14, L/14-336 (class token + patches), SigLIP
# SO400M/14-384 (patches only), and the text lengths (CLIP 77, SigLIP 64)
MODEL_LENGTHS = (50, 197, 257, 577, 729, 77, 64)


def _cudnn_training_check(length: int, head_dim: int = 64) -> None:
    """jax's check for a training call of cuDNN attention at `length` tokens, as jax's training rule makes it:
    with `has_bias=True` (it passes `bias is not None` after replacing a missing bias by a placeholder array)."""
    q = jax.ShapeDtypeStruct((2, length, 4, head_dim), jnp.bfloat16)
    cudnn_fa.check_is_flash_attention(q, q, q, cudnn_fa.AttentionLayout.BTNH.value, 90800, True, True)


@pytest.mark.parametrize("length", MODEL_LENGTHS)
def test_padded_length_passes_jax_cudnn_check(length):
    padded = padded_length(length)
    assert length <= padded <= length + 1
    _cudnn_training_check(padded)
    if padded != length:  # the unpadded length is what failed on the GPU
        with pytest.raises(NotImplementedError, match=f"Q {length}, KV {length}"):
            _cudnn_training_check(length)


def _unmasked_padding(monkeypatch):
    """Make the padded modes attend to the padded keys too (kv = padded length): the negative control."""
    real = modeling.pad_for_attention

    def leaky(x, attention, key_mask=None):
        x, kwargs = real(x, attention, key_mask)
        if "seq_lengths" in kwargs:
            q, _ = kwargs["seq_lengths"]
            kwargs["seq_lengths"] = (q, jnp.full_like(q, x.shape[1]))
        return x, kwargs

    monkeypatch.setattr(modeling, "pad_for_attention", leaky)


def test_clip_padded_features_match_transformers(tiny_hf_clip_dir, monkeypatch):
    enc = clip_tokenizer()(CAPTIONS, padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    pixels = random_pixels(3, 32, seed=2)
    ours = registry.load(tiny_hf_clip_dir, attention="xla_padded")
    vision_tokens = (32 // 8) ** 2 + 1
    assert ids.shape[1] % 2 == 1 and vision_tokens % 2 == 1  # both towers really pad
    assert 0 < mask.sum(-1).min() < ids.shape[1]  # and the captions' own padding is masked
    fi, ft = jax.jit(lambda p, i, m: ours(p, i, m))(pixels, ids, mask)
    ri, _ = assert_matches_torch((fi, ft), CLIPModel.from_pretrained(tiny_hf_clip_dir).eval(), pixels, ids, mask)

    _unmasked_padding(monkeypatch)  # the padded image keys matter: leaving them unmasked breaks parity
    leaky = registry.load(tiny_hf_clip_dir, attention="xla_padded")
    fi_leaky = jax.jit(lambda p: leaky.encode_image(p))(pixels)
    assert np.abs(np.asarray(fi_leaky) - ri).max() > 10 * TOL


@pytest.mark.slow  # the CLIP padded features are the fast tier's
def test_siglip_padded_features_match_transformers(tmp_path, monkeypatch):
    spec = {**TINY_SIGLIP, "vision_config": {**TINY_SIGLIP["vision_config"], "image_size": 40}}  # 5 x 5 patches
    directory, torch_model = write_hf_siglip(tmp_path, spec, seed=3)
    length = 15  # < max_position_embeddings 16: an odd text length
    rng = np.random.default_rng(4)
    ids = rng.integers(2, spec["text_config"]["vocab_size"], size=(3, length))
    mask = np.ones_like(ids)
    mask[1, 9:], mask[2, 4:] = 0, 0
    ids[mask == 0] = 1  # right padding with the pad id
    pixels = random_pixels(3, 40, seed=5)
    ours = registry.load(directory, attention="xla_padded")
    fi, ft = jax.jit(lambda p, i, m: ours(p, i, m))(pixels, ids.astype(np.int32), mask.astype(np.int32))
    ri, _ = assert_matches_torch((fi, ft), torch_model, pixels, ids, mask)

    import jax_refine.models.siglip.modeling as siglip_modeling

    _unmasked_padding(monkeypatch)
    monkeypatch.setattr(siglip_modeling, "pad_for_attention", modeling.pad_for_attention)
    leaky = registry.load(directory, attention="xla_padded")
    fi_leaky = jax.jit(lambda p: leaky.encode_image(p))(pixels)
    assert np.abs(np.asarray(fi_leaky) - ri).max() > 10 * TOL


def _recorded_gradients(tmp_path, attention: str, batch: dict):
    """Loss and gradients of one CLIP-Refine train step (the trainer's step function, float32, with an
    optimizer whose state records the gradients it was given)."""
    config = tiny_config(tmp_path / attention, **{"train.batch_size": 8, "model.attention": attention})
    trainer = train.build_trainer(config, shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                                  total_steps=1)
    record = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                          lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))
    step = step_lib.make_train_step(trainer.setup, config.method, record, trainer.schedule, trainer.labels,
                                    trainer.mesh)
    state = trainer.init_state()
    state = state.replace(opt_state=record.init(state.params))
    new_state, metrics = jax.jit(step)(state, shd.host_to_global(batch, trainer.mesh), jax.random.key(7))
    return float(metrics["loss"]), jax.tree.map(np.asarray, new_state.opt_state)


@pytest.mark.slow  # two train-step compiles
def test_padded_train_step_gradients_equal_unpadded(tmp_path):
    batch = synthetic_batch(1, 8, length=15)  # 15 text tokens and 17 image tokens: both towers pad
    loss, grads = _recorded_gradients(tmp_path, "xla", batch)
    ploss, pgrads = _recorded_gradients(tmp_path, "xla_padded", batch)
    assert ploss == pytest.approx(loss, rel=1e-6)
    assert jax.tree.structure(pgrads) == jax.tree.structure(grads)
    top = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    assert top > 0
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), pgrads, grads)
    assert max(jax.tree.leaves(diffs)) <= 1e-5 * top


def test_padded_modes_are_one_switch():
    """xla_padded takes float32 (cudnn's bf16 requirement: tests/test_model_options.py) and sets both towers;
    a block of a padded mode refuses a mask (it would be ignored) with a one-line error."""
    from hf_fixtures import hf_clip_config

    model = modeling.create_clip(hf_clip_config("tiny"), attention="xla_padded")
    assert model.text.attention == model.vision.attention == "xla_padded"
    x = jnp.zeros((2, 5, 32))
    with pytest.raises(ValueError, match="seq_lengths"):
        model.text.layers[0](x, mask=jnp.ones((2, 1, 1, 5), bool))
