"""Named CLIP sizes for the benchmarks (`transformers.CLIPConfig` keyword arguments) and their matmul FLOPs.

| name        | vision (width/layers/heads/mlp, patch, px) | text (width/layers/heads/mlp) | proj |
|-------------|---------------------------------------------|-------------------------------|------|
| tiny        | the trainer tests' model (configs/tiny_test.py)                                      |||
| vitb32      | 768/12/12/3072, 32, 224                     | 512/12/8/2048                 | 512  |
| vitb16      | 768/12/12/3072, 16, 224                     | 512/12/8/2048                 | 512  |
| vitl14      | 1024/24/16/4096, 14, 224                    | 768/12/12/3072                | 768  |
| vitl14_336  | 1024/24/16/4096, 14, 336                    | 768/12/12/3072                | 768  |
| h14         | 1280/32/16/5120, 14, 224                    | 1024/24/16/4096               | 1024 |
| bigg14      | 1664/48/16/8192, 14, 224 (gelu)             | 1280/32/20/5120 (gelu)        | 1280 |
| dfn_h14_378 | 1280/32/16/5120, 14, 378                    | 1024/24/16/4096               | 1024 |
| siglip_so400m | 1152/27/16/4304, 14, 384 (SigLIP: `model_type` siglip; 64 tokens, vocab 32000) | 1152/27/16/4304 | 1152 |

h14 is OpenCLIP's ViT-H-14 (LAION-2B, gelu); bigG/14 is OpenCLIP's ViT-bigG-14 (LAION-2B) in HF's CLIPConfig form; dfn_h14_378 is Apple's DFN5B ViT-H/14-378
(quick_gelu, open_clip's ViT-H-14-378 config). Vocabulary 49408, 77 text positions.
"""
from __future__ import annotations

import copy


def _tower(width: int, layers: int, heads: int, mlp: int, **extra) -> dict:
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                **extra)


def _sizes() -> dict[str, dict]:
    from jax_refine.config import shipped_module

    b_text = _tower(512, 12, 8, 2048)
    l_text = _tower(768, 12, 12, 3072)
    return {
        "tiny": copy.deepcopy(shipped_module("tiny_test").TINY_CLIP),
        "vitb32": dict(text_config=b_text, vision_config=_tower(768, 12, 12, 3072, patch_size=32, image_size=224),
                       projection_dim=512),
        "vitb16": dict(text_config=b_text, vision_config=_tower(768, 12, 12, 3072, patch_size=16, image_size=224),
                       projection_dim=512),
        "vitl14": dict(text_config=l_text, vision_config=_tower(1024, 24, 16, 4096, patch_size=14, image_size=224),
                       projection_dim=768),
        "vitl14_336": dict(text_config=l_text,
                           vision_config=_tower(1024, 24, 16, 4096, patch_size=14, image_size=336),
                           projection_dim=768),
        "h14": dict(text_config=_tower(1024, 24, 16, 4096, hidden_act="gelu"),
                    vision_config=_tower(1280, 32, 16, 5120, patch_size=14, image_size=224, hidden_act="gelu"),
                    projection_dim=1024),
        "bigg14": dict(text_config=_tower(1280, 32, 20, 5120, hidden_act="gelu"),
                       vision_config=_tower(1664, 48, 16, 8192, patch_size=14, image_size=224, hidden_act="gelu"),
                       projection_dim=1280),
        "dfn_h14_378": dict(text_config=_tower(1024, 24, 16, 4096),
                            vision_config=_tower(1280, 32, 16, 5120, patch_size=14, image_size=378),
                            projection_dim=1024),
        "siglip_so400m": dict(model_type="siglip",  # SiglipConfig kwargs: the registry picks the SigLIP family
                              text_config=_tower(1152, 27, 16, 4304, vocab_size=32000, max_position_embeddings=64,
                                                 projection_size=1152),
                              vision_config=_tower(1152, 27, 16, 4304, patch_size=14, image_size=384)),
    }


SIZE_NAMES = ("tiny", "vitb32", "vitb16", "vitl14", "vitl14_336", "bigg14")


def clip_size(name: str, layers: int | None = None) -> dict:
    """`CLIPConfig` kwargs of size `name` (a fresh copy); `layers` cuts both towers to that many blocks."""
    sizes = _sizes()
    if name not in sizes:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(sizes)}")
    spec = copy.deepcopy(sizes[name])
    if layers is not None:
        spec["text_config"]["num_hidden_layers"] = spec["vision_config"]["num_hidden_layers"] = int(layers)
    return spec


def _block_flops(tokens: int, width: int, mlp: int) -> int:
    """Matmul FLOPs of one pre-norm block's forward for one sequence of `tokens`:
    qkv 2*T*D*3D + out 2*T*D*D + scores 2*T*T*D + weighted values 2*T*T*D + MLP 2*2*T*D*M."""
    return 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width


def forward_flops_per_sample(spec: dict, text_length: int = 77) -> int:
    """Matmul FLOPs of one CLIP forward (image + text tower + projections) per (image, caption) pair.

    Vision: patch embedding 2*N*(p*p*3)*D over N = (px/p)^2 patches, blocks over T = N + 1 tokens, projection
    2*D*P. Text: blocks over all `text_length` positions (dense causal attention, as both frameworks compute
    it), projection 2*D*P. Elementwise work (LayerNorm, softmax, activations) is not counted.
    SigLIP (`model_type` siglip): N tokens (no class token), text over its `max_position_embeddings`, the
    vision head's attention pooling counted as its key/value projections 4*N*D*D, the text head 2*D*D.
    """
    if spec.get("model_type") == "siglip":
        return _siglip_forward_flops(spec)
    from transformers import CLIPConfig

    cfg = CLIPConfig(**copy.deepcopy(spec))
    v, t, proj = cfg.vision_config, cfg.text_config, cfg.projection_dim
    patches = (v.image_size // v.patch_size) ** 2
    vision = (2 * patches * v.patch_size**2 * v.num_channels * v.hidden_size
              + v.num_hidden_layers * _block_flops(patches + 1, v.hidden_size, v.intermediate_size)
              + 2 * v.hidden_size * proj)
    text = t.num_hidden_layers * _block_flops(text_length, t.hidden_size, t.intermediate_size) + 2 * t.hidden_size * proj
    return vision + text


def _siglip_forward_flops(spec: dict) -> int:
    from transformers import SiglipConfig

    cfg = SiglipConfig(**{k: v for k, v in copy.deepcopy(spec).items() if k != "model_type"})
    v, t = cfg.vision_config, cfg.text_config
    patches = (v.image_size // v.patch_size) ** 2
    vision = (2 * patches * v.patch_size**2 * v.num_channels * v.hidden_size
              + v.num_hidden_layers * _block_flops(patches, v.hidden_size, v.intermediate_size)
              + 4 * patches * v.hidden_size**2)
    text = (t.num_hidden_layers * _block_flops(t.max_position_embeddings, t.hidden_size, t.intermediate_size)
            + 2 * t.hidden_size * t.projection_size)
    return vision + text


def feature_dim(spec: dict) -> int:
    """The (B, D) feature width P the losses see."""
    if spec.get("model_type") == "siglip":
        return int(spec["text_config"].get("projection_size", spec["text_config"]["hidden_size"]))
    return int(spec["projection_dim"])


def clip_refine_step_flops(spec: dict, batch: int, text_length: int = 77, grad_accum: int = 1) -> int:
    """Model matmul FLOPs of one CLIP-Refine train step at global batch `batch`:
    student forward + backward = 3 x forward, frozen teacher forward = 1 x forward, where a forward is the
    towers over B pairs plus its B x B logits (2*B*B*P): 4 * (B * forward_per_sample + 2*B*B*P).
    With `grad_accum` > 1 (exact accumulation, jax_refine/step.py) the student's forward runs twice (features,
    then again under the vjp): 5 x the towers; the B x B logits stay 4 x (computed once on the whole batch).
    AdamW and elementwise work are not counted."""
    towers = batch * forward_flops_per_sample(spec, text_length)
    return (4 if grad_accum == 1 else 5) * towers + 4 * 2 * batch * batch * feature_dim(spec)
