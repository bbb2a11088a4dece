"""The blocks every model family builds from, in Flax NNX with the numerics of Hugging Face's CLIP/SigLIP encoders:
`LayerNorm` (float32), `Attention` (fused qkv, `jax.nn.dot_product_attention`), `MLP`, the pre-norm `Block`,
`apply_layers` (a loop, or one `lax.scan`, with per-block remat), padding for the cuDNN attention
(`pad_for_attention`, `drop_padding`), patch and token embeddings, and the init helpers (`param`: a parameter
with logical axis names and its init rule; `create`: one random draw for a whole model; `with_options`).

Parameters are float32 by default (`param_dtype`) and are cast to the compute `dtype` where they are used; every
`nnx.Param` carries logical axis names in its `out_sharding` metadata (`embed`, `mlp`, `heads`, `vocab`, `proj`,
`norm`, `patch`, `pos`; not bound to a mesh: `eager_sharding=False`) that the trainer maps to mesh axes. Layouts
(ours vs torch's `Linear.weight (out, in)`): dense kernels `(in, out)`; attention one fused `qkv` kernel
`(D, 3, heads, head_dim)` and an output kernel `(heads, head_dim, D)`; the patch kernel `(patch*patch*C, D)` in
`(kh, kw, c)` order (an HWIO conv kernel). The attribute names below are the parameter paths checkpoints and the
families' HF name maps use (`vision/layers/3/attn/qkv`): renaming one changes every checkpoint.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_refine.sharding import constrain

Array = jax.Array
ACT = ("batch", None, None)  # logical names of the (B, T, D) residual stream (constraints only under a mesh)
LogicalNames = tuple[str | None, ...]

ATTENTION_IMPLS = ("xla", "cudnn", "xla_padded")
PADDED_ATTENTION = ("cudnn", "xla_padded")  # the modes that pad the tokens and pass lengths instead of a mask
SEQ_MULTIPLE = 2  # see padded_length
# "save_dots": keep the outputs of matmuls without batch dimensions (qkv, out, fc1, fc2 projections),
# recompute the rest (LayerNorm, activation, attention scores) in the backward pass.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], names: LogicalNames, std: float | None,
           dtype: Any, fill: float = 0.0) -> nnx.Param:
    """A parameter drawn from N(0, std^2) (or filled with `fill` when `std` is None) with logical names.

    The init rule is kept as `init=(std, fill)` metadata so `create` can redraw all parameters in one draw.
    """
    if std is None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False, init=(std, fill))


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis computed in float32 (biased variance, eps inside the sqrt)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any):
        self.eps = float(eps)
        self.scale = param(None, (dim,), ("norm",), None, param_dtype, fill=1.0)
        self.bias = param(None, (dim,), ("norm",), None, param_dtype)

    def __call__(self, x: Array) -> Array:
        """`x (..., D)` -> same shape and dtype."""
        y = x.astype(jnp.float32)
        mean = y.mean(-1, keepdims=True)
        var = jnp.square(y - mean).mean(-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection and `jax.nn.dot_product_attention`."""

    def __init__(self, dim: int, heads: int, num_layers: int, factor: float, *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs, implementation: str = "xla"):
        self.implementation = implementation
        if dim % heads:
            raise ValueError(f"hidden_size={dim} is not divisible by num_attention_heads={heads}")
        self.heads, self.head_dim, self.dtype = heads, dim // heads, dtype
        in_std = dim**-0.5 * (2 * num_layers) ** -0.5 * factor
        self.qkv = param(rngs, (dim, 3, heads, self.head_dim), ("embed", None, "heads", None), in_std, param_dtype)
        self.qkv_bias = param(None, (3, heads, self.head_dim), (None, "heads", None), None, param_dtype)
        self.out = param(rngs, (heads, self.head_dim, dim), ("heads", None, "embed"), dim**-0.5 * factor,
                         param_dtype)
        self.out_bias = param(None, (dim,), ("embed",), None, param_dtype)

    def __call__(self, x: Array, mask: Array | None = None, is_causal: bool = False,
                 seq_lengths: tuple[Array, Array] | None = None) -> Array:
        """`x (B, T, D)`, `mask (B, 1, 1|T, T)` bool (True = attend; "xla" only) -> `(B, T, D)`.

        The padded modes ("cudnn", "xla_padded") take `seq_lengths = (q (B,), kv (B,))` int32 instead of a mask
        (see `pad_for_attention`): keys at or past kv are masked, and rows at or past q are set to 0 here, so the
        padded rows stay finite whatever the kernel leaves in them (cuDNN's docs do not say).
        """
        b, t, _ = x.shape
        qkv = jnp.einsum("nd,dkhe->nkhe", token_rows(x), self.qkv[...].astype(self.dtype))
        qkv = (qkv + self.qkv_bias[...].astype(self.dtype)).reshape(b, t, *qkv.shape[1:])
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.implementation == "xla":
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                             scale=self.head_dim**-0.5)
        else:
            if mask is not None or seq_lengths is None:
                raise ValueError(f"attention={self.implementation!r} takes seq_lengths (q, kv), not a mask: "
                                 "build the block input with pad_for_attention")
            q_len, kv_len = seq_lengths
            y = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, scale=self.head_dim**-0.5,
                                             query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
                                             implementation="cudnn" if self.implementation == "cudnn" else "xla")
            rows = jnp.arange(x.shape[1])[None, :, None, None] < q_len[:, None, None, None]
            y = jnp.where(rows, y, jnp.zeros((), y.dtype))
        y = jnp.einsum("nhe,hed->nd", y.reshape(b * t, *y.shape[2:]), self.out[...].astype(self.dtype))
        return (y + self.out_bias[...].astype(self.dtype)).reshape(b, t, -1)


class MLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str, num_layers: int, factor: float, *, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        self.act, self.dtype = act, dtype
        activation(act)  # validate early
        self.fc1 = param(rngs, (dim, hidden), ("embed", "mlp"), (2 * dim) ** -0.5 * factor, param_dtype)
        self.fc1_bias = param(None, (hidden,), ("mlp",), None, param_dtype)
        self.fc2 = param(rngs, (hidden, dim), ("mlp", "embed"), dim**-0.5 * (2 * num_layers) ** -0.5 * factor,
                         param_dtype)
        self.fc2_bias = param(None, (dim,), ("embed",), None, param_dtype)

    def __call__(self, x: Array) -> Array:
        """`x (B, T, D)` -> `(B, T, D)`."""
        h = token_rows(x) @ self.fc1[...].astype(self.dtype) + self.fc1_bias[...].astype(self.dtype)
        h = activation(self.act)(h)
        return (h @ self.fc2[...].astype(self.dtype) + self.fc2_bias[...].astype(self.dtype)).reshape(x.shape)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, cfg: Any, factor: float, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs,
                 attention: str = "xla"):
        d, n = cfg.hidden_size, cfg.num_hidden_layers
        self.ln1 = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(d, cfg.num_attention_heads, n, factor, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                              implementation=attention)
        self.ln2 = LayerNorm(d, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act, n, factor, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)

    def __call__(self, x: Array, mask: Array | None = None, is_causal: bool = False,
                 seq_lengths: tuple[Array, Array] | None = None) -> Array:
        x = x + self.attn(self.ln1(x), mask, is_causal, seq_lengths)
        return x + self.mlp(self.ln2(x))


def token_rows(x: Array) -> Array:
    """`(B, T, D)` -> `(B*T, D)`: the blocks' projections run as 2-D matmuls over all tokens.

    Same values; the reason is the backward pass on CPU. With batch and tokens as two contracting dimensions of
    each weight gradient, XLA:CPU copies the output gradient into a transposed layout and fuses its whole
    producer chain into that copy (one copy per weight); with one token dimension it calls the matmul on the
    row-major buffers. ViT-B/32 CLIP-Refine step, batch 32, 2 CPU cores: 16.7 s -> 9.1 s (README, Benchmarks).
    The reshape is free (a bitcast) on every backend; on GPU the GEMMs are the same (not measured there).
    """
    return x.reshape(-1, x.shape[-1])


def apply_layers(layers: nnx.List, x: Array, *, remat: str = "none", scan: bool = False, **kwargs) -> Array:
    """Run `x (B, T, D)` through `layers` (identical `Block`s) in order, with `remat` / `scan` as above.

    `kwargs` (mask or seq_lengths, is_causal) go to every block. Without remat and scan this is the plain Python loop.
    """
    x = constrain(x, ACT)
    if remat == "none" and not scan:
        for layer in layers:
            x = constrain(layer(x, **kwargs), ACT)
        return x
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.state(layer) for layer in layers]

    def one(state: nnx.State, h: Array) -> Array:
        return constrain(nnx.merge(graphdef, state)(h, **kwargs), ACT)

    if remat != "none":
        one = jax.checkpoint(one, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if not scan:
        for state in states:
            x = one(state, x)
        return x
    stacked = jax.tree.map(lambda *v: jnp.stack(v), *states)
    x, _ = jax.lax.scan(lambda h, state: (one(state, h), None), x, stacked)
    return x


def pad_for_attention(x: Array, attention: str, key_mask: Array | None = None) -> tuple[Array, dict[str, Any]]:
    """The blocks' input and keyword arguments for `attention`, from `x (B, T, D)` and `key_mask (B, T)`
    (1 = attend; None = all).

    "xla": `x` unchanged and `mask (B, 1, 1, T)` bool (or none): today's program. Padded modes: `x` with zero rows
    appended to `(B, padded_length(T), D)` and `seq_lengths = (q, kv)` int32 `(B,)`: q = T, kv = the number of
    kept keys per row (exact for right padding, as our tokenizers pad: the kept keys must be a prefix), else T.
    Undo with `drop_padding(x, T)` before pooling.
    """
    if attention not in PADDED_ATTENTION:
        return x, {} if key_mask is None else {"mask": key_mask.astype(bool)[:, None, None, :]}
    b, t = x.shape[:2]
    q = jnp.full((b,), t, jnp.int32)
    kv = q if key_mask is None else key_mask.astype(bool).sum(-1, dtype=jnp.int32)
    return jnp.pad(x, ((0, 0), (0, padded_length(t) - t), (0, 0))), {"seq_lengths": (q, kv)}


def drop_padding(x: Array, length: int) -> Array:
    """`x (B, T', D)` -> its first `length` rows `(B, length, D)` (`x` itself when there are no more)."""
    return x if x.shape[1] == length else x[:, :length]


def padded_length(length: int, multiple: int = SEQ_MULTIPLE) -> int:
    """Tokens the padded attention modes run at: `length` rounded up to a multiple of `multiple` (default 2).

    The rule is jax's, not cuDNN's: `jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention` (the
    same in jax 0.10.2 and 0.11.2) rejects an odd Q or KV length when training with a bias ("Unsupported
    sequence length Q 77, KV 77."), and the training rule `_dot_product_attention_fwd_rule` passes
    `bias is not None` after a missing bias was replaced by an empty placeholder array, so every differentiated
    call counts as biased. Odd lengths pass in inference; the other limit there is the head dim (a multiple of
    8, <= 256 on Hopper). So text 77 -> 78, ViT-B/16 197 -> 198, L/14 257 -> 258, L/14-336 577 -> 578,
    SigLIP 729 -> 730; ViT-B/32 (50) and SigLIP's text (64) stay.
    """
    return -(-int(length) // multiple) * multiple


def embed_tokens(token: Array, position: Array, input_ids: Array, dtype: Any) -> Array:
    """`input_ids (B, L)` -> token + learned position embeddings `(B, L, D)` in `dtype` (`token (V, D)`,
    `position (P, D)`, L <= P; a longer input is a one-line ValueError)."""
    length = input_ids.shape[1]
    if length > position.shape[0]:
        raise ValueError(f"input_ids have length {length} > max_position_embeddings={position.shape[0]}")
    return (jnp.take(token, input_ids, axis=0) + position[:length]).astype(dtype)


def embed_patches(pixel_values: Array, kernel: Array, patch: int, image_size: int, dtype: Any) -> Array:
    """Non-overlapping patch embedding: `pixel_values (B, H, W, C)` NHWC, `kernel (P*P*C, D)` in `(kh, kw, c)`
    order -> `(B, (H/P)*(W/P), D)` in `dtype`, row-major patches (a stride-P conv, no bias). One-line
    ValueError unless H = W = `image_size` and C matches the kernel."""
    b, h, w, c = pixel_values.shape
    if (h, w) != (image_size, image_size) or kernel.shape[0] != patch * patch * c:
        channels = kernel.shape[0] // (patch * patch)
        raise ValueError(f"pixel_values have shape {pixel_values.shape}; this model takes "
                         f"(B, {image_size}, {image_size}, {channels}) NHWC")
    x = jax.lax.conv_general_dilated(pixel_values.astype(dtype), kernel.astype(dtype).reshape(patch, patch, c, -1),
                                     (patch, patch), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return x.reshape(b, -1, x.shape[-1])


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function HF names `name` (`config.hidden_act`), e.g. `quick_gelu`."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def check_options(attention: str, remat: str, dtype: Any) -> None:
    """One-line `ValueError` for an unknown attention implementation / remat policy or a bad pairing."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention={attention!r} is unknown; use one of {ATTENTION_IMPLS}")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is unknown; use one of {tuple(REMAT_POLICIES)}")
    if attention == "cudnn" and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"attention='cudnn' needs bfloat16 or float16 compute, got dtype={jnp.dtype(dtype).name}")


def create(cls: type[nnx.Module], config: Any, *, seed: int = 0, dtype: Any = jnp.float32, **options: Any
           ) -> nnx.Module:
    """A randomly initialised `cls(config, ...)` (a module whose parameters come from `param`, e.g. `CLIP` or
    `SigLIP`) with float32 parameters and compute `dtype`; `options`: `attention`, `remat`, `scan_layers`.

    All parameters come from one `jax.random.normal` draw (fast to compile, also inside `jax.jit` /
    `nnx.eval_shape`); `cls(config, rngs=...)` draws the same distributions parameter by parameter.
    """
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(seed),
                                          **options))
    graphdef, state = nnx.split(abstract)
    variables = [var for _, var in nnx.to_flat_state(state)]
    specs = tuple((tuple(var.shape), *var.get_metadata()["init"]) for var in variables)
    for var, value in zip(variables, _draw_params(specs, seed)):
        var.set_value(value)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(0,))
def _draw_params(specs: tuple[tuple[tuple[int, ...], float | None, float], ...], seed: Array) -> list[Array]:
    """Float32 values for `(shape, std, fill)` specs from ONE normal draw (one random kernel to compile)."""
    sizes = [int(np.prod(shape)) if std is not None else 0 for shape, std, _ in specs]
    flat = jax.random.normal(jax.random.key(seed), (max(sum(sizes), 1),), jnp.float32)
    out, start = [], 0
    for (shape, std, fill), size in zip(specs, sizes):
        if std is None:
            out.append(jnp.full(shape, fill, jnp.float32))
        else:
            out.append(std * flat[start:start + size].reshape(shape))
        start += size
    return out


def with_options(model: nnx.Module, **options: Any) -> nnx.Module:
    """The same parameters (shared, not copied) in a model of the same class (`CLIP`, `SigLIP`) built with other
    `attention` / `remat` / `scan_layers` options, e.g. a loaded checkpoint run with a scan over layers. The
    parameter tree is the same in every mode, so the loaded state merges unchanged."""
    current = {"attention": model.vision.layers[0].attn.implementation, "remat": model.vision.remat,
               "scan_layers": model.vision.scan_layers}
    unknown = sorted(set(options) - set(current))
    if unknown:
        raise TypeError(f"with_options: unknown option {unknown[0]!r}; expected one of {sorted(current)}")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: type(model)(model.config, dtype=model.dtype, rngs=nnx.Rngs(0),
                                                               **{**current, **options})))
    return nnx.merge(graphdef, nnx.state(model))
