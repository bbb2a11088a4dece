"""Random CLIP checkpoints in the Hugging Face format, made with transformers' PyTorch CLIPModel.

These are the independent reference for parity tests: the weights are drawn by torch, written by
`CLIPModel.save_pretrained`, and our loader must read them back to the same features.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(
    text=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=77),
    vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8),
    projection_dim=24,
)

# ViT-B/32 widths; layers are cut to 2 by default to keep the tests fast.
VIT_B32 = dict(
    text=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
              num_attention_heads=8, max_position_embeddings=77),
    vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
                image_size=224, patch_size=32),
    projection_dim=512,
)

SIZES = {"tiny": TINY, "vit_b32": VIT_B32}


def hf_clip_config(size: str = "tiny", *, eos_token_id: int = 49407, **text_overrides):
    """A `transformers.CLIPConfig` of a named size. `eos_token_id=2` gives the legacy pooling mode."""
    from transformers import CLIPConfig

    spec = SIZES[size]
    text = dict(spec["text"], eos_token_id=eos_token_id, bos_token_id=49406, pad_token_id=1, **text_overrides)
    return CLIPConfig(text_config=text, vision_config=dict(spec["vision"]), projection_dim=spec["projection_dim"])


def write_hf_clip(out_dir: Path, size: str = "tiny", *, seed: int = 0, eos_token_id: int = 49407,
                  safe_serialization: bool = True) -> Path:
    """Draw a random torch `CLIPModel` of `size` and save it to `out_dir` in the HF format."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(hf_clip_config(size, eos_token_id=eos_token_id)).eval()
    # HF initialises biases and LayerNorms to constants; perturb them so parity tests see every tensor.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layrnorm" in name:
                p.add_(0.02 * torch.randn_like(p))
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


def hf_reference_features(model, pixels_nhwc=None, input_ids=None, attention_mask=None):
    """(image_features, text_features) as numpy from a torch `CLIPModel` (either may be None)."""
    import torch

    img = txt = None
    with torch.no_grad():
        if pixels_nhwc is not None:
            px = torch.from_numpy(np.ascontiguousarray(np.asarray(pixels_nhwc).transpose(0, 3, 1, 2)))
            img = model.get_image_features(pixel_values=px).pooler_output.numpy()
        if input_ids is not None:
            mask = None if attention_mask is None else torch.from_numpy(np.asarray(attention_mask, np.int64))
            out = model.get_text_features(input_ids=torch.from_numpy(np.asarray(input_ids, np.int64)),
                                          attention_mask=mask)
            txt = out.pooler_output.numpy()
    return img, txt
