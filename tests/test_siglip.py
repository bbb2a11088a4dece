"""SigLIP: our NNX module, HF name map and tokenizer against transformers' PyTorch `SiglipModel` and
`SiglipTokenizer` (plus a plain sentencepiece transcription of big_vision's text pre-processing), and the
sigmoid loss against a float64 torch transcription of its equation, on one and on 8 fake CPU devices."""
from __future__ import annotations

import json
import re
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
import tolerances as tol
from conftest import slow
from hf_fixtures import TINY_SIGLIP, assert_matches_torch, assert_same_forward, write_hf_siglip
from jax.sharding import AxisType

from jax_refine import losses
from jax_refine.models import registry
from jax_refine.models.siglip import modeling, params, tokenizer

# SO400M/14's layer width (hidden 1152, 16 heads of 72, MLP 4304), one layer per tower and a 2x2 patch grid.
REAL_WIDTH = dict(
    text_config=dict(vocab_size=64, hidden_size=1152, intermediate_size=4304, num_hidden_layers=1,
                     num_attention_heads=16, max_position_embeddings=16, pad_token_id=1, eos_token_id=1,
                     bos_token_id=None),
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
                       image_size=28, patch_size=14),
)
TOL = 1e-4
SENTENCES = ["A photo of a cat.", "Two dogs play in the park!", "a red circle on the left side",
             "The quick brown fox jumps over the lazy dog", "SigLIP uses a sigmoid loss", "images and captions"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_hf_siglip(tmp_path_factory.mktemp("tiny_siglip"), TINY_SIGLIP)


def _pixels(n, size, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _torch_features(model, pixels, ids, mask=None):
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).pooler_output
        text = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                       attention_mask=None if mask is None else torch.tensor(mask)).pooler_output
    return image.numpy(), text.numpy()


def _ids_and_mask(n, length, vocab, seed=1):
    """Random ids, the tail of rows 1.. replaced by the pad id 1 with mask 0 (right padding, as SigLIP pads)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(n, length))
    mask = np.ones((n, length), np.int64)
    for i in range(1, n):
        keep = max(1, length - 3 * i)
        ids[i, keep:], mask[i, keep:] = 1, 0
    return ids, mask


@nnx.jit
def _encode(model, pixels, ids, mask=None):
    """Our (image, text) features in one compiled call (op-by-op eager NNX costs seconds of compiles)."""
    return model.encode_image(pixels), model.encode_text(ids, mask)


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------ model parity
@pytest.mark.parametrize("spec", ["tiny", slow("real_width")])
def test_features_match_transformers(spec, tiny, tmp_path):
    directory, torch_model = tiny if spec == "tiny" else write_hf_siglip(tmp_path, REAL_WIDTH, seed=1)
    cfg = torch_model.config
    ours = registry.load(directory)
    pixels = _pixels(3, cfg.vision_config.image_size)
    ids, mask = _ids_and_mask(3, cfg.text_config.max_position_embeddings, cfg.text_config.vocab_size)
    # within 8x the fp32 error transformers' own forward makes against its float64 copy (tests/tolerances.py)
    _, tt = assert_matches_torch(_encode(ours, pixels, ids), torch_model, pixels, ids)  # pads attended, last pooled
    _, tt_masked = assert_matches_torch((None, _encode(ours, pixels, ids, mask)[1]), torch_model, None, ids, mask)
    assert _max_err(tt, tt_masked) > 10 * TOL  # the mask matters, so the line above tests it
    np.testing.assert_allclose(float(ours.logit_scale[...]), torch_model.logit_scale.item(), rtol=0, atol=0)
    np.testing.assert_allclose(float(ours.logit_bias[...]), torch_model.logit_bias.item(), rtol=0, atol=0)


SO400M_14_384 = dict(  # google/siglip-so400m-patch14-384's config.json
    text_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     max_position_embeddings=64, vocab_size=32000),
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14),
)


def test_so400m_names_and_shapes_match_transformers():
    """The full SO400M/14-384: our parameters map one to one onto the tensors of transformers' SiglipModel
    (built on torch's meta device, no memory), same names and shapes, so a real checkpoint loads."""
    from transformers import SiglipConfig, SiglipModel

    config = SiglipConfig(**SO400M_14_384)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in SiglipModel(config).state_dict().items()}
    abstract = nnx.eval_shape(lambda: modeling.SigLIP(config, rngs=nnx.Rngs(0)))
    got = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        got.update(params.hf_shapes("/".join(map(str, path)), tuple(var.shape), 3))
    assert got == want
    assert abstract.image_size == 384 and abstract.text_length == 64
    assert abstract.vision.position.shape == (729, 1152)  # 27 x 27 patches, no class token


def test_sigmoid_loss_matches_siglip_model_loss(tiny):
    """Our loss on our features equals `SiglipModel(..., return_loss=True).loss` (HF's own implementation)."""
    directory, torch_model = tiny
    ours = registry.load(directory)
    pixels, (ids, _) = _pixels(4, 32, seed=3), _ids_and_mask(4, 16, 64, seed=4)
    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                          return_loss=True)
    fi, ft = _encode(ours, pixels, ids)
    got = losses.sigmoid_loss(fi, ft, jnp.exp(ours.logit_scale[...]), ours.logit_bias[...])

    def torch_loss(model, dtype):
        with torch.no_grad():
            px = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype))
            return [model(input_ids=torch.tensor(ids), pixel_values=px, return_loss=True).loss.numpy()]

    # within PARITY_FACTOR x the fp32 error of transformers' loss against its float64 copy (features and loss)
    (error,) = tol.torch_fp32_errors(torch_model, torch_loss)
    tol.assert_parity(np.float64(got), out.loss.numpy(), error, "sigmoid loss")


@pytest.mark.slow  # model options; test_model_options.py's scan + remat check is the fast tier's
def test_options_and_logical_names(tiny):
    """remat / scan over layers give the same features; every parameter carries names from our vocabulary."""
    directory, _ = tiny
    plain = registry.load(directory)
    scanned = registry.load(directory, remat="full", scan_layers=True)
    pixels, (ids, _) = _pixels(2, 32), _ids_and_mask(2, 16, 64)
    assert_same_forward(_encode(scanned, pixels, ids), _encode(plain, pixels, ids), tiny[1], pixels, ids)
    vocab = {"embed", "mlp", "heads", "vocab", "proj", "norm", "patch", "pos", None}
    for path, var in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.ndim and set(names) <= vocab, (path, names)
    assert (plain.image_size, plain.text_length) == (32, 16)
    assert plain.pixel_mean == plain.pixel_std == (0.5, 0.5, 0.5)


@pytest.mark.slow  # an 8-device sharded load; test_hf.py's is the fast tier's
def test_sharded_load_uses_the_project_rules(tiny):
    """Each tensor goes straight into the sharding its logical names give under jax_refine.config_base rules
    on a (data 2, fsdp 2, tensor 2) mesh; features and the exported tensors equal the one-device load."""
    from jax_refine.config_base import get_config
    from jax_refine.sharding import logical_to_sharding, make_mesh

    directory, _ = tiny
    mesh, rules = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), tuple(get_config().mesh.rules)
    sharded = registry.load(directory, shardings=lambda path, names: logical_to_sharding(names, mesh, rules))
    plain = registry.load(directory)
    head_qkv = sharded.vision.head.qkv[...]
    assert head_qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    assert head_qkv.addressable_shards[0].data.shape == (24, 3, 2, 12)
    assert sharded.text.head[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    pixels, (ids, _) = _pixels(2, 32), _ids_and_mask(2, 16, 64)
    assert_same_forward(_encode(sharded, pixels, ids), _encode(plain, pixels, ids), tiny[1], pixels, ids)
    got, want = params.hf_state_dict(sharded), params.hf_state_dict(plain)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_save_then_transformers_from_pretrained(tiny, tmp_path):
    from transformers import SiglipImageProcessor, SiglipModel

    directory, torch_model = tiny
    ours = registry.load(directory)
    out = registry.save(ours, tmp_path / "export")
    reloaded = SiglipModel.from_pretrained(out).eval()
    pixels, (ids, mask) = _pixels(2, 32, seed=5), _ids_and_mask(2, 16, 64, seed=6)
    for got, want in zip(_torch_features(reloaded, pixels, ids, mask), _torch_features(torch_model, pixels, ids, mask)):
        np.testing.assert_array_equal(got, want)
    want_state = torch_model.state_dict()
    assert set(reloaded.state_dict()) == set(want_state)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, want_state[k]), k
    processor = SiglipImageProcessor.from_pretrained(out)
    assert processor.size == {"height": 32, "width": 32} and list(processor.image_mean) == [0.5] * 3


def test_non_siglip_directory_is_a_one_line_error(tiny_hf_clip_dir, tmp_path):
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'clip' \(architectures: CLIPModel\), "
                                         r"not 'siglip'") as err:
        params.load(tiny_hf_clip_dir)
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        params.load(tmp_path)


def test_checkpoint_with_missing_tensor_names_it(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory, _ = tiny
    tensors = load_file(directory / "model.safetensors")
    del tensors["vision_model.head.probe"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ValueError, match=r"1 missing keys: vision_model\.head\.probe"):
        registry.load(tmp_path)


# --------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A tiny SentencePiece model trained here, with SigLIP's special ids (pad 0, </s> 1, <unk> 2)."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(out / "spiece"),
                                   vocab_size=48, hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    return out


def _big_vision_ids(model_file, texts, length, lower=True):
    """big_vision's SigLIP text pre-processing written out: canonicalize, SentencePiece, sticky </s>, pad </s>."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    rows = []
    for text in texts:
        text = text.lower() if lower else text
        text = re.sub(r"\s+", " ", text.translate(str.maketrans("", "", string.punctuation))).strip()
        ids = sp.encode(text)[: length - 1] + [sp.eos_id()]
        rows.append(ids + [sp.eos_id()] * (length - len(ids)))
    return np.array(rows)


TEXTS = ["A photo of a CAT!!", "two   dogs, in the park", "", "the quick brown fox jumps over the lazy dog " * 3]


def test_tokenizer_matches_transformers_and_big_vision(spm_dir):
    from transformers import SiglipTokenizer

    ours = tokenizer.tokenize(TEXTS, tokenizer.get_tokenizer(spm_dir), max_length=16)
    ref = SiglipTokenizer(str(spm_dir / "spiece.model"))(TEXTS, padding="max_length", truncation=True, max_length=16)
    np.testing.assert_array_equal(ours["input_ids"], np.array(ref["input_ids"]))
    np.testing.assert_array_equal(ours["attention_mask"], np.array(ref["attention_mask"]))
    np.testing.assert_array_equal(ours["input_ids"], _big_vision_ids(spm_dir / "spiece.model", TEXTS, 16))
    assert ours["input_ids"].dtype == np.int32 and ours["input_ids"].shape == (4, 16)


def test_tokenizer_follows_the_checkpoint_lowercase_setting(spm_dir, tmp_path):
    from transformers import SiglipTokenizer

    SiglipTokenizer(str(spm_dir / "spiece.model"), do_lower_case=False).save_pretrained(tmp_path)
    ours = tokenizer.tokenize(TEXTS, tokenizer.get_tokenizer(tmp_path), max_length=16)["input_ids"]
    np.testing.assert_array_equal(ours, _big_vision_ids(spm_dir / "spiece.model", TEXTS, 16, lower=False))
    assert not np.array_equal(ours, _big_vision_ids(spm_dir / "spiece.model", TEXTS, 16, lower=True))


def test_tokenizer_missing_file_is_a_one_line_error(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no spiece\.model .*found \['config\.json', 'model\.safetensors'\]"):
        tokenizer.get_tokenizer(tiny[0])
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        tokenizer.get_tokenizer(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"^no-such-org/siglip: not a local directory.*hub") as err:
        tokenizer.get_tokenizer("no-such-org/siglip")  # offline in tests (HF_HUB_OFFLINE=1)
    assert "\n" not in str(err.value)


def test_bad_configs_are_one_line_errors():
    from transformers import SiglipConfig

    no_head = SiglipConfig(**{**TINY_SIGLIP, "vision_config": {**TINY_SIGLIP["vision_config"], "vision_use_head": False}})
    with pytest.raises(ValueError, match="vision_use_head=False"):
        nnx.eval_shape(lambda: modeling.SigLIP(no_head, rngs=nnx.Rngs(0)))
    widths = SiglipConfig(**{**TINY_SIGLIP, "text_config": {**TINY_SIGLIP["text_config"], "projection_size": 24}})
    with pytest.raises(ValueError, match=r"projection_size=24 != vision_config.hidden_size=48"):
        nnx.eval_shape(lambda: modeling.SigLIP(widths, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="needs a transformers.SiglipConfig, got dict"):
        modeling.SigLIP(TINY_SIGLIP, rngs=nnx.Rngs(0))


def test_save_copies_the_tokenizer(tiny, spm_dir, tmp_path):
    ours = registry.load(tiny[0])
    out = registry.save(ours, tmp_path / "export", tokenizer_dir=spm_dir)
    ids = tokenizer.tokenize(TEXTS, tokenizer.get_tokenizer(out), max_length=16)["input_ids"]
    np.testing.assert_array_equal(ids, _big_vision_ids(spm_dir / "spiece.model", TEXTS, 16))


# ------------------------------------------------------------------------------------------ images
def test_image_preprocessing_matches_siglip_image_processor(coco_mini_dir):
    """Real non-square COCO photos (and a grey-scale one): equal to transformers' SiglipImageProcessor."""
    from PIL import Image
    from transformers import SiglipImageProcessorPil

    from jax_refine.models.siglip.image import preprocess_image

    processor = SiglipImageProcessorPil(size={"height": 64, "width": 64})
    photos = sorted((coco_mini_dir / "val2017").glob("*.jpg"))[:3]
    images = [Image.open(p).convert("RGB") for p in photos]
    images.append(images[0].convert("L"))
    assert len({im.size for im in images}) > 1 and all(im.size[0] != im.size[1] for im in images)
    for im in images:
        want = processor(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = preprocess_image(im, 64)
        assert got.shape == (64, 64, 3) and got.dtype == np.float32
        assert _max_err(got, want) <= tol.pixel_error(0.5, 0.5)  # same uint8 resize; fp32 (x / 255 - 0.5) / 0.5


# ------------------------------------------------------------------------- one CLIP-Refine step
@pytest.mark.slow  # a train step
def test_clip_refine_step_on_siglip_features(tiny):
    """HyCD + RaFA on SigLIP's features against a frozen copy: finite loss, a gradient on every parameter of
    the feature path (logit scale/bias are not in this loss), and one SGD step changes them."""
    directory, _ = tiny
    student, teacher = registry.load(directory), registry.load(directory)
    pixels, (ids, _) = _pixels(4, 32, seed=7), _ids_and_mask(4, 16, 64, seed=8)
    gi, gt = _encode(teacher, pixels, ids)
    z = losses.sample_reference(jax.random.key(0), gi.shape)
    graphdef, state = nnx.split(student, nnx.Param)

    @jax.jit
    def step(state):
        def loss_fn(s):
            fi, ft = nnx.merge(graphdef, s)(pixels, ids)
            return losses.clip_refine_loss(fi, ft, gi, gt, z)[0]

        loss, grads = jax.value_and_grad(loss_fn)(state)
        return loss, grads, jax.tree.map(lambda p, g: p - 1e-2 * g, state, grads)

    loss, grads, new = step(state)
    assert np.isfinite(float(loss)) and float(loss) > 0
    for (path, g), (_, old), (_, upd) in zip(*(nnx.to_flat_state(t) for t in (grads, state, new))):
        if path in (("logit_scale",), ("logit_bias",)):
            assert float(np.abs(np.asarray(g.get_value()))) == 0.0
            continue
        assert np.abs(np.asarray(g.get_value())).max() > 0, path
        assert not np.array_equal(np.asarray(upd.get_value()), np.asarray(old.get_value())), path


# ----------------------------------------------------------------------------------- sigmoid loss
def _torch_sigmoid_loss(fi, ft, t, b, normalize=True):
    """-1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)), float64, written from Zhai et al. (2023), eq. 1."""
    x, y = torch.tensor(fi, dtype=torch.float64), torch.tensor(ft, dtype=torch.float64)
    if normalize:
        x, y = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
    z = 2 * torch.eye(x.shape[0], dtype=torch.float64) - 1
    return float(-torch.nn.functional.logsigmoid(z * (t * x @ y.T + b)).sum() / x.shape[0])


def _numpy_sigmoid_loss(fi, ft, t, b):
    """The same sum as explicit loops over (i, j) in NumPy float64, on unit vectors."""
    x = fi.astype(np.float64) / np.linalg.norm(fi.astype(np.float64), axis=-1, keepdims=True)
    y = ft.astype(np.float64) / np.linalg.norm(ft.astype(np.float64), axis=-1, keepdims=True)
    total = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            total += np.log1p(np.exp(-(1.0 if i == j else -1.0) * (t * x[i] @ y[j] + b)))
    return total / len(x)


def _feats(b, d, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(b, d)).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("b,d,t,bias", [(1, 4, 10.0, -10.0), (8, 16, 10.0, -10.0), (13, 32, 3.0, 0.5)])
def test_sigmoid_loss_matches_references(b, d, t, bias):
    fi, ft = _feats(b, d)
    got = float(jax.jit(losses.sigmoid_loss)(fi, ft, t, bias))
    f64 = (fi.astype(np.float64), ft.astype(np.float64))
    bound = tol.sigmoid(*f64, t, bias).value  # derived fp32 bound (tests/tolerances.py)
    tol.assert_fp32_close(got, _torch_sigmoid_loss(fi, ft, t, bias), bound, "sigmoid vs torch")
    tol.assert_fp32_close(got, _numpy_sigmoid_loss(fi, ft, t, bias), bound, "sigmoid vs numpy")
    raw = float(losses.sigmoid_loss(fi, ft, t, bias, normalize=False))
    tol.assert_fp32_close(raw, _torch_sigmoid_loss(fi, ft, t, bias, normalize=False),
                          tol.sigmoid(*f64, t, bias, normalize=False).value, "raw sigmoid vs torch")


def _grads(fn, fi, ft, t, b):
    return jax.jit(jax.grad(lambda *a: fn(*a), argnums=(0, 1, 2, 3)))(fi, ft, jnp.float32(t), jnp.float32(b))


def test_sigmoid_loss_gradients_match_torch():
    fi, ft = _feats(6, 8, seed=1)
    x, y = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (fi, ft))
    t, b = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (4.0, -2.0))
    xn, yn = x / x.norm(dim=-1, keepdim=True), y / y.norm(dim=-1, keepdim=True)
    z = 2 * torch.eye(6, dtype=torch.float64) - 1
    (-torch.nn.functional.logsigmoid(z * (t * xn @ yn.T + b)).sum() / 6).backward()
    got = _grads(losses.sigmoid_loss, fi, ft, 4.0, -2.0)
    bound = tol.sigmoid(fi.astype(np.float64), ft.astype(np.float64), 4.0, -2.0)  # derived fp32 bounds
    # d/dt = (d/d log t) / t: the log-scale bound over t
    for g, want, e, what in zip(got, (x.grad, y.grad, t.grad, b.grad), (bound.g_fi, bound.g_ft, bound.g_s / 4.0,
                                                                         bound.g_b), ("fi", "ft", "t", "b")):
        tol.assert_fp32_close(np.asarray(g), want.numpy(), e, f"sigmoid grad {what}")


def _shapes_in(jaxpr) -> set[tuple[int, ...]]:
    """Every intermediate array shape of a (closed) jaxpr, sub-jaxprs (scan, shard_map, pjit) included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes |= _shapes_in(inner)
    return shapes


@pytest.mark.slow  # chunked and 8-device compiles; the sigmoid loss against transformers stays fast
def test_sigmoid_loss_chunked_and_sharded_equal_plain():
    """Text blocks of 4 on one device, and the batch split over 8 fake devices (with and without text
    blocks): same value and gradients as the plain loss; no (B, B) logits array in the chunked programs."""
    b, d = 16, 8
    fi, ft = _feats(b, d, seed=2)
    plain = float(losses.sigmoid_loss(fi, ft, 10.0, -10.0))
    plain_grads = _grads(losses.sigmoid_loss, fi, ft, 10.0, -10.0)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    chunked = lambda *a: losses.sigmoid_loss(*a, text_chunk=4)
    sharded = losses.sharded(losses.sigmoid_loss, mesh)
    sharded_chunked = lambda *a: losses.sharded(losses.sigmoid_loss, mesh)(*a, text_chunk=8)
    # two fp32 evaluations in different summation orders: each within the derived bound of the exact value
    bound = tol.sigmoid(fi.astype(np.float64), ft.astype(np.float64), 10.0, -10.0) * 2
    grad_bounds = (bound.g_fi, bound.g_ft, bound.g_s / 10.0, bound.g_b)  # d/dt = (d/d log t) / t
    for fn in (chunked, sharded, sharded_chunked):
        tol.assert_fp32_close(float(jax.jit(fn)(fi, ft, 10.0, -10.0)), plain, bound.value, "sigmoid value")
        for g, want, e, what in zip(_grads(fn, fi, ft, 10.0, -10.0), plain_grads, grad_bounds, ("fi", "ft", "t", "b")):
            tol.assert_fp32_close(np.asarray(g), np.asarray(want), e, f"sigmoid grad {what}")
    assert (b, b) in _shapes_in(jax.make_jaxpr(losses.sigmoid_loss)(fi, ft, 10.0, -10.0).jaxpr)
    for fn in (chunked, sharded, sharded_chunked):
        shapes = _shapes_in(jax.make_jaxpr(fn)(fi, ft, 10.0, -10.0).jaxpr)
        assert (b, b) not in shapes, shapes
    assert (2, b) in _shapes_in(jax.make_jaxpr(sharded)(fi, ft, 10.0, -10.0).jaxpr)  # 2 rows x all texts per device


def test_sigmoid_loss_rejects_bad_input():
    fi, ft = _feats(6, 4)
    with pytest.raises(ValueError, match=r"text_chunk=4 must be a positive divisor of the batch size B=6"):
        losses.sigmoid_loss(fi, ft, 1.0, 0.0, text_chunk=4)
    with pytest.raises(ValueError, match=r"logit_bias must be a scalar, got shape \(2,\)"):
        losses.sigmoid_loss(fi, ft, 1.0, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"text_features has shape \(5, 4\)"):
        losses.sigmoid_loss(fi, ft[:5], 1.0, 0.0)
