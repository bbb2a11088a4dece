"""open_clip's checkpoint format -> our CLIP, against open_clip's own PyTorch model on the same weights.

Each test draws a small `open_clip.model.CLIP` in torch, saves its state dict the way the hub ships it
(`open_clip_model.safetensors` / `open_clip_pytorch_model.bin` + `open_clip_config.json`) and compares our
features with open_clip's `encode_image` / `encode_text` (texts padded with 0 after the EOT token, pooled
by argmax as open_clip does).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import tolerances as tol
from conftest import slow
from jax_refine.models import registry
from jax_refine.models.openclip import config as oc_config
from jax_refine.models.openclip import params as oc_params


class _Unavailable(type):
    """A torchvision name open_clip imports but its CLIP never uses: any attribute is another such name,
    calling one fails loudly (so a reference that did need torchvision could not pass silently)."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__name__}: torchvision is not installed (stand-in for importing open_clip)")


def _import_open_clip():
    """`import open_clip` (a test-only dependency, installed --no-deps by run.sh).

    open_clip's package imports torchvision (its image transforms and a ResNet batch-norm helper; its ViT
    CLIP uses neither). We do not install torchvision: PyPI's wheels are CUDA builds whose C++ ops do not
    load beside our CPU torch, and transformers then fails to import `CLIPImageProcessor` everywhere. When
    torchvision is absent, stand-in modules are put in `sys.modules` for the import only and removed after,
    so nothing else (transformers' backend checks) ever sees them.
    """
    import sys
    import types

    if "open_clip" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import open_clip

        return open_clip
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()  # transformers' cached answer (False) is settled before the stand-in
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
             "torchvision.ops.misc")
    for name in names:
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr, _n=name: getattr(_Unavailable(_n, (), {}), attr)
        sys.modules[name] = module
    try:
        import open_clip
    finally:
        for name in names:
            sys.modules.pop(name, None)
    return open_clip


def _tiny_cfg(quick_gelu: bool, **vision) -> dict:
    return {"embed_dim": 24, "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 2, "width": 32, "head_width": 8,
                           "mlp_ratio": 2.5, **vision},
            "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 48, "heads": 4, "layers": 2}}


REAL_WIDTH_CFG = {"embed_dim": 1024, "quick_gelu": True,
                  "vision_cfg": {"image_size": 28, "patch_size": 14, "layers": 1, "width": 1280, "head_width": 80},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 1024, "heads": 16, "layers": 1}}


def _open_clip_model(model_cfg: dict, seed: int = 0):
    """A random open_clip CLIP in eval mode; LayerNorms and biases (constant at init) are perturbed."""
    import torch

    open_clip = _import_open_clip()
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**model_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _save(model, model_cfg: dict, out: Path, fmt: str) -> Path:
    """The hub layout: weights + `open_clip_config.json` with `model_cfg` and `preprocess_cfg`."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, out / oc_params.SAFETENSORS)
    else:
        torch.save(state, out / oc_params.TORCH_BIN)
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711]}}
    (out / oc_config.OPEN_CLIP_CONFIG).write_text(json.dumps(config))
    return out


def _inputs(model_cfg: dict, n: int = 4, seed: int = 1, eot: int | None = None):
    """Pixels `(n, H, W, 3)`, open_clip-style texts `(n, L)` and their attention mask. The texts end with
    `eot` (default vocab-1, the highest id, as CLIP's tokenizer) followed by 0s; with another `eot` the other
    tokens are drawn above it, so argmax pooling would pick a wrong position."""
    rng = np.random.default_rng(seed)
    size, t = model_cfg["vision_cfg"]["image_size"], model_cfg["text_cfg"]
    pixels = rng.normal(size=(n, size, size, 3)).astype(np.float32)
    length, vocab = t["context_length"], t["vocab_size"]
    eot = vocab - 1 if eot is None else eot
    low, high = (1, eot) if eot == vocab - 1 else (eot + 1, vocab)
    ids = np.zeros((n, length), np.int64)
    mask = np.zeros((n, length), np.int32)
    for i, last in enumerate(np.linspace(1, length - 1, n).astype(int)):  # EOT at 1 ... the last slot
        ids[i, :last] = rng.integers(low, high, size=last)
        ids[i, last] = eot
        mask[i, : last + 1] = 1
    return pixels, ids, mask


def _open_clip_features(model, pixels: np.ndarray, ids: np.ndarray, dtype=np.float32):
    """open_clip's (image, text) features as numpy; `dtype` the model's (float64 for its double copy)."""
    import torch

    with torch.no_grad():
        fi = model.encode_image(torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype)))
        ft = model.encode_text(torch.from_numpy(ids))
    return fi.numpy(), ft.numpy()


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _open_clip_errors(ref, pixels: np.ndarray, ids: np.ndarray) -> tuple[list, list[float]]:
    """open_clip's fp32 (image, text) features and their fp32 rounding errors, measured against its float64 copy
    (tests/tolerances.torch_fp32_errors: the features' condition x eps32, a property of the network)."""
    call = lambda m, dtype: _open_clip_features(m, pixels, ids, dtype)  # noqa: E731
    return list(call(ref, np.float32)), tol.torch_fp32_errors(ref, call)


def _assert_same_features(model, ref, cfg: dict, **inputs) -> None:
    """Our image and text features on `_inputs(cfg, **inputs)` within PARITY_FACTOR x open_clip's own measured
    fp32 error of them (tests/tolerances.assert_parity)."""
    pixels, ids, mask = _inputs(cfg, **inputs)
    (fi, ft), (ei, et) = _open_clip_errors(ref, pixels, ids)
    tol.assert_parity(model.encode_image(pixels), fi, ei, "image features")
    tol.assert_parity(model.encode_text(ids.astype(np.int32), mask), ft, et, "text features")


@pytest.mark.parametrize("quick_gelu,fmt", [(True, "safetensors"), slow(False, "safetensors"), slow(False, "bin")])
def test_features_match_open_clip(tmp_path, quick_gelu, fmt):
    cfg = _tiny_cfg(quick_gelu)
    ref = _open_clip_model(cfg)
    ckpt = _save(ref, cfg, tmp_path / "ckpt", fmt)
    model = registry.load(ckpt)  # the registry finds open_clip's format
    assert model.family == "clip"
    assert model.config.vision_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    _assert_same_features(model, ref, cfg)
    assert _max_err(model.logit_scale[...], ref.logit_scale.item()) == 0.0


def test_eos_pooling_and_layer_norm_eps_match_open_clip(tmp_path):
    """text_cfg pool_type 'eos' (the first `eos_id`, not the highest id) and a LayerNorm eps from norm_kwargs."""
    cfg = _tiny_cfg(False)
    cfg["text_cfg"].update(pool_type="eos", eos_id=5, norm_kwargs={"eps": 1e-3})
    cfg["vision_cfg"]["norm_kwargs"] = {"eps": 1e-3}
    ref = _open_clip_model(cfg, seed=7)
    model = oc_params.load_openclip(_save(ref, cfg, tmp_path / "ckpt", "safetensors"))
    assert model.config.text_config.eos_token_id == 5 and model.config.vision_config.layer_norm_eps == 1e-3
    _assert_same_features(model, ref, cfg, eot=5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load(tmp_path, dtype):
    """fp16 / bf16 open_clip files (bf16 has no numpy dtype in safetensors' reader) against open_clip run in
    float32 on the same rounded weights."""
    import torch

    cfg = _tiny_cfg(True)
    ref = _open_clip_model(cfg, seed=8)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(getattr(torch, dtype)).float())
    ckpt = _save(ref.to(getattr(torch, dtype)), cfg, tmp_path / "ckpt", "safetensors")
    model = oc_params.load_openclip(ckpt)
    ref = ref.float()
    _assert_same_features(model, ref, cfg)


@pytest.mark.slow  # real-width layers in two frameworks
def test_real_width_layer_matches_open_clip(tmp_path):
    """Width 1280 / head_width 80 (ViT-H's and DFN's vision layer), width 1024 / 16 heads text layer."""
    ref = _open_clip_model(REAL_WIDTH_CFG)
    model = oc_params.load_openclip(_save(ref, REAL_WIDTH_CFG, tmp_path / "ckpt", "safetensors"))
    assert model.config.vision_config.num_attention_heads == 16
    _assert_same_features(model, ref, REAL_WIDTH_CFG, n=3)


def test_export_to_hf_opens_in_transformers_with_the_same_features(tmp_path):
    import torch
    from transformers import CLIPModel

    cfg = _tiny_cfg(True)
    ref = _open_clip_model(cfg, seed=3)
    model = registry.load(_save(ref, cfg, tmp_path / "ckpt", "bin"))
    out = registry.save(model, tmp_path / "hf")
    exported = CLIPModel.from_pretrained(out).eval()
    pixels, ids, mask = _inputs(cfg, seed=4)
    (fi, ft), (ei, et) = _open_clip_errors(ref, pixels, ids)
    with torch.no_grad():
        hi = exported.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        ht = exported.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    # transformers' fp32 forward of the exported weights: the same network, so the same order of fp32 error
    tol.assert_parity(hi.pooler_output.numpy(), fi, ei, "exported image features")
    tol.assert_parity(ht.pooler_output.numpy(), ft, et, "exported text features")


def test_custom_text_and_ddp_prefixes_load(tmp_path):
    """`CustomTextCLIP` keeps the text tower under `text.`; DDP training saves add `module.`."""
    from safetensors.numpy import load_file, save_file

    cfg = _tiny_cfg(False)
    ref = _open_clip_model(cfg, seed=5)
    ckpt = _save(ref, cfg, tmp_path / "ckpt", "safetensors")
    state = load_file(ckpt / oc_params.SAFETENSORS)
    renamed = {("module." if k.startswith("visual.") else "text.") + k if k != "logit_scale" else k: v
               for k, v in state.items()}
    save_file(renamed, ckpt / oc_params.SAFETENSORS)
    model = oc_params.load_openclip(ckpt)
    _assert_same_features(model, ref, cfg)


@pytest.mark.parametrize("section,key,value", [
    ("vision_cfg", "attentional_pool", True),
    ("vision_cfg", "no_ln_pre", True),
    ("vision_cfg", "pool_type", "avg"),
    ("vision_cfg", "ls_init_value", 1e-5),
    ("vision_cfg", "layers", [3, 4, 6, 3]),
    ("vision_cfg", "image_size", [224, 160]),
    ("text_cfg", "no_causal_mask", True),
    ("text_cfg", "hf_tokenizer_name", "timm/ViT-B-16-SigLIP"),
    ("text_cfg", "pool_type", "last"),
    ("text_cfg", "proj_bias", True),
    ("text_cfg", "embed_cls", True),
    (None, "init_logit_bias", -10.0),
    (None, "some_future_option", 1),
])
def test_unsupported_config_is_a_one_line_error_naming_the_key(tmp_path, section, key, value):
    cfg = _tiny_cfg(False)
    (cfg[section] if section else cfg)[key] = value
    path = tmp_path / oc_config.OPEN_CLIP_CONFIG
    path.write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(oc_config.UnsupportedConfig) as err:
        oc_config.clip_config(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert f"{section + '.' if section else ''}{key}={value!r}" in message


def test_directory_without_open_clip_weights_names_what_it_found(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as err:
        oc_params.open_checkpoint(tmp_path)
    message = str(err.value)
    assert "\n" not in message and oc_params.SAFETENSORS in message and oc_params.TORCH_BIN in message
    assert "config.json, model.safetensors, notes.txt" in message and "jax_refine.models.registry.load" in message


def test_tensor_without_a_place_in_our_clip_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg = _tiny_cfg(False)
    ckpt = _save(_open_clip_model(cfg), cfg, tmp_path / "ckpt", "safetensors")
    state = load_file(ckpt / oc_params.SAFETENSORS)
    state["visual.attn_pool.query"] = np.zeros((4, 24), np.float32)
    save_file(state, ckpt / oc_params.SAFETENSORS)
    with pytest.raises(ValueError, match=r"1 tensors jax_refine's CLIP has no place for: visual\.attn_pool\.query$"):
        oc_params.open_checkpoint(ckpt)


def _count_ours(clip_config) -> int:
    import jax
    from flax import nnx

    from jax_refine.models.clip.modeling import CLIP

    abstract = nnx.eval_shape(lambda: CLIP(clip_config, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("name,billions", [("ViT-H-14", 0.99), slow("ViT-bigG-14", 2.54),
                                           slow("ViT-H-14-378-quickgelu", 0.99)])
def test_known_configs_match_open_clip_and_transformers_shapes(name, billions):
    """Our shipped copy equals open_clip's packaged model config; the CLIPConfig made from it gives the
    parameter count of open_clip's model and of transformers' CLIPModel (both built on the meta device)."""
    import torch
    from transformers import CLIPModel

    open_clip = _import_open_clip()
    packaged = open_clip.get_model_config(name)
    assert oc_config.known_model_config(name) == packaged
    clip_config = oc_config.clip_config(packaged)
    with torch.device("meta"):
        open_clip_model, hf_model = open_clip.model.CLIP(**packaged), CLIPModel(clip_config)
    theirs = sum(p.numel() for p in open_clip_model.parameters())
    assert _count_ours(clip_config) == theirs == sum(p.numel() for p in hf_model.parameters())
    # The name map at full size: open_clip's state dict read as HF names is transformers' state dict.
    open_clip_shapes = {k: tuple(v.shape) for k, v in open_clip_model.state_dict().items()}
    shapes_only = type("ShapesOnly", (), {"shapes": open_clip_shapes})
    as_hf = oc_params.OpenClipWeights(shapes_only, Path(name)).shapes
    assert as_hf == {k: tuple(v.shape) for k, v in hf_model.state_dict().items() if not k.endswith("position_ids")}
    assert abs(theirs / 1e9 - billions) < 0.01
    assert clip_config.vision_config.hidden_act == ("quick_gelu" if "quickgelu" in name else "gelu")


@pytest.mark.slow  # an 8-device sharded load; test_hf.py's sharded load is in the fast tier
def test_loads_straight_into_shardings(tmp_path):
    """`shardings` goes through to the HF loader: each tensor lands in its FSDP sharding over 8 devices."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    cfg = _tiny_cfg(False)
    ref = _open_clip_model(cfg, seed=6)
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))

    def shardings(path, names):
        return NamedSharding(mesh, PartitionSpec(*("fsdp" if n == "embed" else None for n in names)))

    model = oc_params.load_openclip(_save(ref, cfg, tmp_path / "ckpt", "safetensors"), shardings=shardings)
    qkv = model.vision.layers[0].attn.qkv[...]
    assert qkv.sharding.spec[0] == "fsdp" and {s.data.shape for s in qkv.addressable_shards} == {(4, 3, 4, 8)}
    _assert_same_features(model, ref, cfg)


def test_weights_file_with_a_bare_model_config(tmp_path):
    """A lone weights file: the bare model config comes from `config=`; without it the error says so."""
    cfg = _tiny_cfg(False)
    ref = _open_clip_model(cfg, seed=9)
    ckpt = _save(ref, cfg, tmp_path / "ckpt", "bin")
    (ckpt / oc_config.OPEN_CLIP_CONFIG).unlink()
    weights = ckpt / oc_params.TORCH_BIN
    with pytest.raises(FileNotFoundError, match=f"no {oc_config.OPEN_CLIP_CONFIG} beside {oc_params.TORCH_BIN}"):
        oc_params.open_checkpoint(weights)
    model = oc_params.load_openclip(weights, config=cfg)
    _assert_same_features(model, ref, cfg)


def test_preprocess_that_differs_from_ours_is_named():
    """DFN5B's hub config resizes by 'squash'; other means/stds or interpolations are named too."""
    clip = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    assert oc_params.preprocess_differences({}) == []
    assert oc_params.preprocess_differences({**clip, "interpolation": "bicubic", "resize_mode": "shortest"}) == []
    got = oc_params.preprocess_differences({**clip, "std": [0.5, 0.5, 0.5], "resize_mode": "squash",
                                            "interpolation": "bilinear"})
    assert got == ["std=[0.5, 0.5, 0.5]", "interpolation='bilinear'", "resize_mode='squash'"]


def test_a_squash_preprocess_cfg_is_carried_by_the_model_and_its_export(tmp_path, coco_mini_dir):
    """A DFN5B-style `preprocess_cfg` (resize_mode squash, its own mean/std) becomes the loaded model's
    preprocessing: the pipeline's pixels equal open_clip's squash transform written out with PIL (bicubic to
    (size, size), /255, mean/std) and transformers' image processor read from our export; the export reloads
    with the same settings."""
    from PIL import Image
    from transformers import AutoImageProcessor

    cfg = _tiny_cfg(True)
    ckpt = _save(_open_clip_model(cfg), cfg, tmp_path / "ckpt", "safetensors")
    mean, std = [0.45, 0.5, 0.55], [0.2, 0.25, 0.3]
    layout = json.loads((ckpt / oc_config.OPEN_CLIP_CONFIG).read_text())
    layout["preprocess_cfg"] = {"mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": "squash"}
    (ckpt / oc_config.OPEN_CLIP_CONFIG).write_text(json.dumps(layout))
    model = registry.load(ckpt)
    assert (model.resize, model.pixel_mean, model.pixel_std) == ("squash", tuple(mean), tuple(std))
    export = registry.save(model, tmp_path / "hf")
    again = registry.load(export)
    assert (again.resize, again.pixel_mean, again.pixel_std) == ("squash", tuple(mean), tuple(std))

    size, prep = model.image_size, registry.preprocessing(model)
    processor = AutoImageProcessor.from_pretrained(export)
    photos = sorted((coco_mini_dir / "val2017").glob("*.jpg"))[:4]
    for photo in photos:
        image = Image.open(photo).convert("RGB")
        assert image.size[0] != image.size[1]  # a squash and a crop differ on it
        ours = prep.image(image)
        plain = (np.asarray(image.resize((size, size), Image.BICUBIC), np.float32) / 255 - mean) / std
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        bound = tol.pixel_error(mean, std)  # the same uint8 resize; fp32 (x / 255 - mean) / std in any order
        assert np.abs(ours - plain).max() <= bound and np.abs(ours - theirs).max() <= bound, photo.name


def test_missing_or_misshaped_tensors_name_the_checkpoint(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg = _tiny_cfg(False)
    ckpt = _save(_open_clip_model(cfg), cfg, tmp_path / "ckpt", "safetensors")
    state = load_file(ckpt / oc_params.SAFETENSORS)
    del state["visual.proj"]
    save_file(state, ckpt / oc_params.SAFETENSORS)
    source = ckpt / oc_params.SAFETENSORS
    with pytest.raises(ValueError, match=f"^{source} .*1 missing keys: visual_projection.weight$"):
        oc_params.load_openclip(ckpt)
    wider = dict(cfg, text_cfg=dict(cfg["text_cfg"], width=64))
    with pytest.raises(ValueError, match=f"^{source} .*shape mismatches: text_model\\S+ \\(48,\\) != \\(64,\\)"):
        oc_params.load_openclip(ckpt, config=wider)


@pytest.mark.slow  # a train step
def test_one_clip_refine_step_on_open_clip_weights(tmp_path):
    """The CLIP-Refine loss (HyCD + RaFA) and its gradients on a loaded open_clip student and teacher equal
    those of open_clip's own models with the PyTorch transcription of the equations, within PARITY_FACTOR x the
    fp32 error that computation makes against its float64 copy (tests/tolerances.py)."""
    import torch
    import torch_reference_losses as reference
    from flax import nnx

    from jax_refine import losses

    cfg = _tiny_cfg(True)
    student_ref, teacher_ref = _open_clip_model(cfg, seed=10), _open_clip_model(cfg, seed=11)
    student = oc_params.load_openclip(_save(student_ref, cfg, tmp_path / "student", "safetensors"))
    teacher = oc_params.load_openclip(_save(teacher_ref, cfg, tmp_path / "teacher", "safetensors"))
    pixels, ids, mask = _inputs(cfg)
    z = np.random.default_rng(0).normal(size=(len(ids), cfg["embed_dim"])).astype(np.float32)
    gi, gt = teacher.encode_image(pixels), teacher.encode_text(ids.astype(np.int32), mask)

    def loss_fn(model):
        fi, ft = model.encode_image(pixels), model.encode_text(ids.astype(np.int32), mask)
        return losses.clip_refine_loss(fi, ft, gi, gt, z)[0]

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(student)
    grads = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}

    def torch_loss_and_grads(pair, dtype):
        """[loss, *gradients of `pairs`' tensors] from open_clip's student and teacher `pair` of `dtype`, the loss
        written from the equations (tests/torch_reference_losses)."""
        s, t = pair
        with torch.enable_grad():
            pair.zero_grad()
            px = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype))
            tid = torch.from_numpy(ids)
            with torch.no_grad():
                gi_ref, gt_ref = t.encode_image(px), t.encode_text(tid)
            fi_ref, ft_ref = s.encode_image(px), s.encode_text(tid)
            out = reference.hycd(fi_ref, ft_ref, gi_ref, gt_ref) + reference.rafa(fi_ref, ft_ref,
                                                                                   torch.from_numpy(z.astype(dtype)))
            out.backward()
        block = s.visual.transformer.resblocks[0]
        grads = (s.visual.proj.grad, s.text_projection.grad, s.token_embedding.weight.grad,
                 block.mlp.c_fc.weight.grad.T, s.visual.class_embedding.grad)
        return [out.detach().numpy()] + [g.numpy().copy() for g in grads]

    names = ("visual_projection", "text_projection", "text/token", "vision/layers/0/mlp/fc1", "vision/class_embedding")
    pair = torch.nn.ModuleList([student_ref, teacher_ref])
    want = torch_loss_and_grads(pair, np.float32)
    errors = tol.torch_fp32_errors(pair, torch_loss_and_grads)  # open_clip's own fp32 error, per output
    tol.assert_parity(np.float64(loss), want[0], errors[0], "loss")
    # a backward pass rounds relative to the gradients flowing through it: no gradient's error is below LAMBDA
    # ulps of the largest one
    floor = tol.LAMBDA * tol.U32 * max(np.abs(g).max() for g in want[1:])
    for name, g, e in zip(names, want[1:], errors[1:]):
        tol.assert_parity(grads[name], g, max(e, floor), name)


def test_a_tensor_present_twice_is_an_error(tmp_path):
    """`x` and `module.x` name the same parameter: refused, not one silently chosen."""
    from safetensors.numpy import load_file, save_file

    cfg = _tiny_cfg(False)
    ckpt = _save(_open_clip_model(cfg), cfg, tmp_path / "ckpt", "safetensors")
    state = load_file(ckpt / oc_params.SAFETENSORS)
    state["module.visual.proj"] = state["visual.proj"]
    save_file(state, ckpt / oc_params.SAFETENSORS)
    with pytest.raises(ValueError, match=r"doubled: (module\.)?visual\.proj \(the same tensor as (module\.)?visual"):
        oc_params.open_checkpoint(ckpt)
