"""Random CLIP checkpoints in the Hugging Face format, made with transformers' PyTorch CLIPModel.

These are the independent reference for parity tests: the weights are drawn by torch, written by
`CLIPModel.save_pretrained`, and our loader must read them back to the same features.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jax_refine.config import shipped_module

TINY_CLIP = shipped_module("tiny_test").TINY_CLIP

# CLIPConfig keyword arguments by size. "tiny" is the trainer tests' model; transformers' CLIPConfig defaults
# are ViT-B/32, so "vit_b32" only cuts the layers (to 2) to keep the tests fast.
SIZES = {
    "tiny": TINY_CLIP,
    "vit_b32": dict(text_config=dict(num_hidden_layers=2), vision_config=dict(num_hidden_layers=2)),
}


def hf_clip_config(size: str = "tiny", *, eos_token_id: int = 49407, **text_overrides):
    """A `transformers.CLIPConfig` of a named size. `eos_token_id=2` gives the legacy pooling mode."""
    from transformers import CLIPConfig

    spec = SIZES[size]
    text = dict(spec["text_config"], eos_token_id=eos_token_id, bos_token_id=49406, pad_token_id=1,
                **text_overrides)
    return CLIPConfig(**{**spec, "text_config": text, "vision_config": dict(spec["vision_config"])})


def random_torch_clip(config, seed: int = 0):
    """A random torch `CLIPModel(config)` in eval mode. HF initialises biases and LayerNorms to constants;
    they are perturbed so parity tests see every tensor."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layrnorm" in name:
                p.add_(0.02 * torch.randn_like(p))
    return model


def write_hf_clip(out_dir: Path, size: str = "tiny", *, seed: int = 0, eos_token_id: int = 49407,
                  safe_serialization: bool = True) -> Path:
    """Draw a random torch `CLIPModel` of `size` and save it to `out_dir` in the HF format."""
    model = random_torch_clip(hf_clip_config(size, eos_token_id=eos_token_id), seed)
    model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return Path(out_dir)


def random_pixels(n: int, image_size: int, seed: int = 0) -> np.ndarray:
    """Normalized-looking pixels `(n, H, W, 3)` float32 (NHWC, what our encode_image takes)."""
    return np.random.default_rng(seed).normal(size=(n, image_size, image_size, 3)).astype(np.float32)


# --- added for tests/test_model.py and tests/test_hf.py --------------------------------------------
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "jax_refine" / "assets" / "tokenizer"


def clip_tokenizer():
    """transformers' `CLIPTokenizer` on the packaged vocab.json / merges.txt (pads with <|endoftext|>)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"))


def write_torch_bin(src_dir: Path, out_dir: Path, *, with_position_ids: bool = True) -> Path:
    """Copy an HF CLIP dir to `out_dir` as a legacy `pytorch_model.bin` (`torch.save` of the state dict).

    transformers 5 always writes safetensors; older checkpoints were `torch.save(state_dict)` and also
    held the `position_ids` buffers, which `with_position_ids` reproduces.
    """
    import shutil

    import torch
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(src_dir) / "config.json", out_dir / "config.json")
    state = load_file(str(Path(src_dir) / "model.safetensors"))
    if with_position_ids:
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        n = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        state["vision_model.embeddings.position_ids"] = torch.arange(n)[None]
    torch.save(state, out_dir / "pytorch_model.bin")
    return out_dir


def hf_reference_features(model, pixels_nhwc=None, input_ids=None, attention_mask=None, dtype=np.float32):
    """(image_features, text_features) as numpy from a torch `CLIPModel` (either may be None); `dtype` the
    model's (float64 for its double copy)."""
    import torch

    img = txt = None
    with torch.no_grad():
        if pixels_nhwc is not None:
            px = torch.from_numpy(np.ascontiguousarray(np.asarray(pixels_nhwc, dtype).transpose(0, 3, 1, 2)))
            img = model.get_image_features(pixel_values=px).pooler_output.numpy()
        if input_ids is not None:
            mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, np.int64))
            out = model.get_text_features(input_ids=torch.from_numpy(np.asarray(input_ids, np.int64)),
                                          attention_mask=mask)
            txt = out.pooler_output.numpy()
    return img, txt


def assert_matches_torch(got, torch_model, pixels_nhwc=None, input_ids=None, attention_mask=None):
    """Our fp32 (image, text) features `got` (either None) against `torch_model`'s fp32 ones (a transformers
    CLIPModel / SiglipModel), within tolerances.PARITY_FACTOR x the fp32 error that the torch forward itself makes
    against its float64 copy (a measured property of the features, see tests/tolerances.py). Returns torch's."""
    import tolerances as tol

    call = lambda m, dtype: hf_reference_features(m, pixels_nhwc, input_ids, attention_mask, dtype)  # noqa: E731
    want = call(torch_model, np.float32)
    for g, w, e, what in zip(got, want, tol.torch_fp32_errors(torch_model, call), ("image", "text")):
        if g is not None:
            tol.assert_parity(np.asarray(g), w, e, f"{what} features")
    return want


def assert_same_forward(got, want, torch_model, pixels_nhwc=None, input_ids=None, attention_mask=None) -> None:
    """Two fp32 forwards of ours, (image, text) features `got` and `want` (either None) in different layouts
    (sharding, scan, remat, batching), within tolerances.PARITY_FACTOR x the fp32 error of the same network on the
    same inputs, measured on `torch_model`'s forward (transformers CLIPModel / SiglipModel of the same weights)
    against its float64 copy: each forward is within that order of the exact features."""
    import tolerances as tol

    call = lambda m, dtype: hf_reference_features(m, pixels_nhwc, input_ids, attention_mask, dtype)  # noqa: E731
    for g, w, e, what in zip(got, want, tol.torch_fp32_errors(torch_model, call), ("image", "text")):
        if g is not None:
            tol.assert_parity(np.asarray(g), np.asarray(w), e, f"{what} features")


# --- SigLIP: random transformers SiglipModel checkpoints (tests/test_siglip.py, tests/test_model_registry.py) ---
TINY_SIGLIP = dict(
    text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=16, projection_size=48, pad_token_id=1, eos_token_id=1, bos_token_id=None),
    vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
)


def write_hf_siglip(out_dir, spec, seed=0):
    """A random torch `SiglipModel(spec)` (every tensor perturbed, logit bias/scale non-zero), saved by HF.
    Returns `(out_dir, torch_model)`."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(**spec)).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return out_dir, model


SPM_SENTENCES = ["A photo of a cat.", "Two dogs play in the park!", "a man riding a horse on a beach",
                 "people sitting at a table with food", "a red bus on the street", "images and captions"]


def write_tiny_siglip(out_dir: Path, seed: int = 0) -> Path:
    """`write_hf_siglip(out_dir, TINY_SIGLIP)` plus a tiny SentencePiece model trained here (SigLIP's ids:
    pad 0, </s> 1, <unk> 2) saved beside it by `SiglipTokenizer.save_pretrained`: a complete SigLIP checkpoint
    directory, as the hub ships one (tests/test_train_families.py, test_preprocess.py, test_evaluate.py)."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    write_hf_siglip(out_dir, TINY_SIGLIP, seed)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SPM_SENTENCES * 4), model_prefix=str(out_dir / "sp_train"),
                                   vocab_size=48, hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    SiglipTokenizer(str(out_dir / "sp_train.model")).save_pretrained(out_dir)
    return Path(out_dir)
