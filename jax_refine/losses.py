"""CLIP-Refine losses (RaFA, HyCD) and the paper's baselines as pure, jittable JAX functions.

Features are (B, D); each loss computes in float32 (float64 stays float64), optionally L2-normalizes
(`normalize=False` by default: the reference's unnormalized features) and returns a scalar; teacher features
get no gradient; bad shapes and hyper-parameters raise `ValueError` at trace time. Three calls give the same
value and gradient: on whole-batch arrays; on local (b, D) shards inside your own `jax.shard_map` with
`axis_name=` (each device builds only its b rows of the (B, B) logits); or `sharded(loss, mesh)` on global
arrays. Equations: docs/losses_usage.md.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array
AxisName = str | tuple[str, ...] | None

PRIORS = ("normal", "uniform", "precomputed", "fixed")
_PRIOR_PARAMS = {
    "normal": {"mean": 0.0, "std": 1.0},
    "uniform": {"low": 0.0, "high": 1.0},
    "precomputed": {"mean": None, "std": None},
    "fixed": {"mean": 0.0},
}
_EPS = 1e-12  # as torch.nn.functional.normalize
_SLERP_CLIP = 1e-6  # cos(theta) is clipped to [-1 + c, 1 - c] so arccos and 1/sin(theta) stay finite


# --------------------------------------------------------------------------------------------
# validation and shared helpers
# --------------------------------------------------------------------------------------------
def array_shape(fn: str, name: str, x: Any, ndim: int | None = None) -> tuple[int, ...]:
    """The shape of array `x` (of `ndim` dimensions if given); ValueError naming `fn` and `name` otherwise.
    Shared with `metrics`."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"{fn}: {name} must be an array, got {type(x).__name__}")
    _refuse_complex(fn, name, x)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{fn}: {name} must be a {ndim}-D array, got shape {tuple(shape)}")
    return tuple(shape)


def _check_features(fn: str, min_batch: int, **arrays: Any) -> tuple[int, int]:
    """All arrays must share one (B, D) shape; returns (B_local, D)."""
    shapes = {k: array_shape(fn, k, v) for k, v in arrays.items()}
    first, shape = next(iter(shapes.items()))
    if len(shape) != 2:
        raise ValueError(f"{fn}: {first} must have shape (B, D), got {shape}")
    for k, s in shapes.items():
        if s != shape:
            raise ValueError(f"{fn}: {k} has shape {s} but {first} has shape {shape}; all must be (B, D)")
    if shape[0] < min_batch:
        raise ValueError(f"{fn}: batch size B={shape[0]} but this loss needs B >= {min_batch}")
    return shape


def _check_number(fn: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> None:
    """Range-check a Python (or concrete) hyper-parameter; traced values are left alone."""
    try:
        v = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    bad = (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high)
    if bad or not math.isfinite(v):  # nan, and inf (which passes any one-sided range)
        lo = "(" if low_open else "["
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{fn}: {name}={value!r} is outside {rng}")


class _Batch(NamedTuple):
    """How the rows this device holds relate to the global batch."""

    size: int  # global B
    offset: Array | int  # global index of the first local row
    gather: Callable[[Array], Array]  # local (b, D) -> global (B, D)
    total: Callable[[Array], Array]  # local partial sum -> global sum


def _batch(fn: str, local_b: int, axis_name: AxisName, min_batch: int) -> _Batch:
    if axis_name is None:
        ctx = _Batch(local_b, 0, lambda x: x, lambda s: s)
    else:
        try:
            n = jax.lax.axis_size(axis_name)
        except NameError as e:
            raise ValueError(f"{fn}: axis_name={axis_name!r} is not a bound mesh axis; call it inside "
                             f"jax.shard_map or use losses.sharded(...)") from e
        ctx = _Batch(local_b * n, jax.lax.axis_index(axis_name) * local_b,
                     lambda x: jax.lax.all_gather(x, axis_name, tiled=True),
                     lambda s: jax.lax.psum(s, axis_name))
    if ctx.size < min_batch:
        raise ValueError(f"{fn}: global batch size B={ctx.size} but this loss needs B >= {min_batch}")
    return ctx


def compute_dtype(*xs: Any) -> Any:
    """The dtype a loss computes in: float32, or float64 if an input is float64 (only under `jax.enable_x64`)."""
    return jnp.promote_types(jnp.result_type(*(jnp.asarray(x).dtype for x in xs)), jnp.float32)


def _refuse_complex(fn: str, name: str, x: Any) -> None:
    """ValueError for a complex array: a cast to float32 would silently drop its imaginary part."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(f"{fn}: {name} is {jnp.dtype(dtype).name}; features must be real (cast or take .real "
                         "yourself if that is meant)")


def l2_normalize(x: Array, axis: int = -1) -> Array:
    """x / ||x|| along `axis`, in float32 (float64 stays float64); a row of norm <= 1e-12 (all zero) gives
    zeros, with a zero gradient.

    Safe at zero: ``x * rsqrt(max(||x||^2, eps^2))`` would give the zero row a gradient of 1/eps = 1e12 per
    element (the max's constant branch leaves x / eps); here such rows take a ``where`` branch that holds
    no x, and the rsqrt never sees them (its input there is 1), so forward and backward stay finite.
    """
    _refuse_complex("l2_normalize", "x", x)
    x = jnp.asarray(x).astype(compute_dtype(x))
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    ok = sq > _EPS**2
    return jnp.where(ok, x * jax.lax.rsqrt(jnp.where(ok, sq, 1.0)), 0.0)


def as_float32(x: Array, normalize: bool = False) -> Array:
    """`x` in float32 (float64 stays float64), L2-normalized along the last axis if `normalize`. Shared with
    `metrics`."""
    _refuse_complex("as_float32", "x", x)
    return l2_normalize(x) if normalize else jnp.asarray(x).astype(compute_dtype(x))


def scale_features(x: Array, scale: Array | float) -> Array:
    """`scale * x / ||x||` (B, D) in float32: unit vectors times a scale c, the reference's regime on any model.

    Pass the result to any loss here (with normalize=False): HyCD's logits become c^2 cos (c^2 = a CLIP's
    exp(logit_scale) gives its own logits). See docs/losses_usage.md, "The feature scale".
    """
    return jnp.asarray(scale, jnp.float32) * l2_normalize(x)


def _student_teacher(fn: str, fi: Array, ft: Array, gi: Array, gt: Array, normalize: bool
                     ) -> tuple[int, int, Array, Array, Array, Array]:
    """Check four (B, D) feature arrays; return B, D and them in fp32 (L2-normalized if `normalize`),
    with no gradient flowing into the teacher's two."""
    b, d = _check_features(fn, 1, image_features=fi, text_features=ft, teacher_image_features=gi,
                           teacher_text_features=gt)
    teacher = jax.lax.stop_gradient((as_float32(gi, normalize), as_float32(gt, normalize)))
    return (b, d, as_float32(fi, normalize), as_float32(ft, normalize), *teacher)


def dot(a: Array, b: Array) -> Array:
    """(n, D) x (m, D) -> (n, m) fp32 (fp64) dot products at full precision. Shared with `metrics`."""
    return jnp.einsum("nd,md->nm", a, b, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=compute_dtype(a, b))


def _diag_mask(ctx: _Batch, b: int) -> Array:
    """(b, B) bool: True where column j is the global index of local row i."""
    return jnp.arange(ctx.size)[None, :] == (ctx.offset + jnp.arange(b))[:, None]


# --------------------------------------------------------------------------------------------
# RaFA
# --------------------------------------------------------------------------------------------
def sample_reference(key: Array, shape: Sequence[int], prior: str = "normal", *,
                     dtype: Any = jnp.float32, **params: Any) -> Array:
    """Reference vectors z of `shape` (usually (B, D)) for RaFA, drawn fresh every step.

    Priors and their params (defaults in brackets):
      - "normal": z ~ N(mean [0.0], std [1.0]^2), element-wise.
      - "uniform": z ~ U(low [0.0], high [1.0]); the reference passes its (mu, sigma) = (0, 1) as
        (low, high), so the default is U(0, 1).
      - "precomputed": z ~ N(mean, diag(std^2)) with `mean`, `std` arrays of shape (D,) (required),
        e.g. the per-dimension statistics of a model's features.
      - "fixed": z = mean [0.0] (scalar or (D,)) broadcast to `shape`; no sampling, `key` unused.
    """
    fn = "sample_reference"
    if prior not in PRIORS:
        raise ValueError(f"{fn}: unknown prior {prior!r}; expected one of {PRIORS}")
    unknown = sorted(set(params) - set(_PRIOR_PARAMS[prior]))
    if unknown:
        raise ValueError(f"{fn}: prior {prior!r} takes {sorted(_PRIOR_PARAMS[prior])}, got unknown {unknown}")
    p = {**_PRIOR_PARAMS[prior], **params}
    shape = tuple(int(s) for s in shape)
    if prior == "precomputed":
        for k in ("mean", "std"):
            if p[k] is None:
                raise ValueError(f"{fn}: prior 'precomputed' needs a {k}= array of shape (D,)")
            s = array_shape(fn, k, jnp.asarray(p[k]))
            if not shape or s != (shape[-1],):
                raise ValueError(f"{fn}: precomputed {k} has shape {s}, expected ({shape[-1] if shape else 'D'},)"
                                 f" to match shape {shape}")
    if prior in ("normal", "precomputed"):
        _check_number(fn, "std", p["std"], low=0.0)
        z = jnp.asarray(p["mean"], jnp.float32) + jnp.asarray(p["std"], jnp.float32) * jax.random.normal(
            key, shape, jnp.float32)
    elif prior == "uniform":
        lo, hi = p["low"], p["high"]
        try:
            if float(lo) >= float(hi):
                raise ValueError(f"{fn}: uniform needs low < high, got low={lo!r}, high={hi!r}")
        except (TypeError, jax.errors.ConcretizationTypeError):
            pass
        z = jax.random.uniform(key, shape, jnp.float32, jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32))
    else:
        mean = jnp.asarray(p["mean"], jnp.float32)
        if mean.ndim > 1 or (mean.ndim == 1 and (not shape or mean.shape[0] != shape[-1])):
            want = f"({shape[-1]},)" if shape else "(D,)"
            raise ValueError(f"{fn}: fixed mean has shape {mean.shape}, expected () or {want}")
        z = jnp.broadcast_to(mean, shape)
    return z.astype(dtype)


def rafa_loss(image_features: Array, text_features: Array, reference: Array, *, normalize: bool = False,
              axis_name: AxisName = None) -> Array:
    """Random Feature Alignment: mean((fi - z)^2) + mean((ft - z)^2).

    Means over all B*D elements; the same reference z (B, D) (or a (D,) / scalar mean, broadcast)
    for both modalities. `normalize` applies to the features, never to z. B = 1 is allowed.
    """
    fn = "rafa_loss"
    b, d = _check_features(fn, 1, image_features=image_features, text_features=text_features)
    zs = array_shape(fn, "reference", reference)
    if zs not in ((b, d), (d,), ()):
        raise ValueError(f"{fn}: reference has shape {zs}, expected {(b, d)} (or ({d},) / ())")
    ctx = _batch(fn, b, axis_name, 1)
    fi, ft = as_float32(image_features, normalize), as_float32(text_features, normalize)
    z = jnp.asarray(reference).astype(fi.dtype)
    sq = jnp.sum(jnp.square(fi - z)) + jnp.sum(jnp.square(ft - z))
    return ctx.total(sq) / (ctx.size * d)


# --------------------------------------------------------------------------------------------
# HyCD and the distillation baselines
# --------------------------------------------------------------------------------------------
def hycd_loss(image_features: Array, text_features: Array, teacher_image_features: Array,
              teacher_text_features: Array, *, alpha: float = 0.5, temperature: float = 1.0,
              normalize: bool = False, axis_name: AxisName = None) -> Array:
    """Hybrid contrastive distillation.

    S = fi ft^T, Tl = gi gt^T (no logit scale); q = alpha I + (1 - alpha) softmax(Tl / T) row-wise;
    L_i2t = T^2 / B * sum_i KL(q_i || softmax(S_i / T)); L_t2i the same with S^T, Tl^T;
    returns (L_i2t + L_t2i) / 2. Needs B >= 2, alpha in [0, 1], T > 0.
    """
    fn = "hycd_loss"
    _check_number(fn, "alpha", alpha, low=0.0, high=1.0)
    _check_number(fn, "temperature", temperature, low=0.0, low_open=True)
    b, _, fi, ft, gi, gt = _student_teacher(fn, image_features, text_features, teacher_image_features,
                                            teacher_text_features, normalize)
    ctx = _batch(fn, b, axis_name, 2)
    eye = _diag_mask(ctx, b).astype(fi.dtype)

    def one_direction(s_q: Array, s_k: Array, t_q: Array, t_k: Array) -> Array:
        log_p = jax.nn.log_softmax(dot(s_q, ctx.gather(s_k)) / temperature, axis=-1)
        q = alpha * eye + (1.0 - alpha) * jax.nn.softmax(dot(t_q, ctx.gather(t_k)) / temperature, axis=-1)
        kl = jnp.sum(xlogy(q, q) - q * log_p)
        return ctx.total(kl) / ctx.size * temperature**2

    return 0.5 * (one_direction(fi, ft, gi, gt) + one_direction(ft, fi, gt, gi))


def self_kd_loss(image_features: Array, text_features: Array, teacher_image_features: Array,
                 teacher_text_features: Array, *, temperature: float = 1.0, normalize: bool = False,
                 axis_name: AxisName = None) -> Array:
    """Self-KD baseline: `hycd_loss` with alpha = 0 (pure distillation of the teacher's softmax)."""
    return hycd_loss(image_features, text_features, teacher_image_features, teacher_text_features,
                     alpha=0.0, temperature=temperature, normalize=normalize, axis_name=axis_name)


def feature_distill_loss(image_features: Array, text_features: Array, teacher_image_features: Array,
                         teacher_text_features: Array, *, normalize: bool = False,
                         axis_name: AxisName = None) -> Array:
    """Feature distillation baseline: mean((fi - gi)^2) + mean((ft - gt)^2) over B*D elements each."""
    fn = "feature_distill_loss"
    b, d, fi, ft, gi, gt = _student_teacher(fn, image_features, text_features, teacher_image_features,
                                            teacher_text_features, normalize)
    ctx = _batch(fn, b, axis_name, 1)
    sq = jnp.sum(jnp.square(fi - gi)) + jnp.sum(jnp.square(ft - gt))
    return ctx.total(sq) / (ctx.size * d)


def logit_distill_loss(image_features: Array, text_features: Array, teacher_image_features: Array,
                       teacher_text_features: Array, *, normalize: bool = False,
                       axis_name: AxisName = None) -> Array:
    """Logit distillation baseline: mean((fi ft^T - gi gt^T)^2) over the B*B logits.

    The reference averages this MSE for the image->text and text->image logits, which are transposes
    of each other, so both terms are equal and one is computed. Needs B >= 2.
    """
    fn = "logit_distill_loss"
    b, _, fi, ft, gi, gt = _student_teacher(fn, image_features, text_features, teacher_image_features,
                                            teacher_text_features, normalize)
    ctx = _batch(fn, b, axis_name, 2)
    diff = dot(fi, ctx.gather(ft)) - dot(gi, ctx.gather(gt))
    return ctx.total(jnp.sum(jnp.square(diff))) / (ctx.size * ctx.size)


# --------------------------------------------------------------------------------------------
# contrastive baselines
# --------------------------------------------------------------------------------------------
def _logit_scale(fn: str, logit_scale: Any, features: Any) -> Array:
    """The scalar `logit_scale` in the compute dtype of `features`."""
    s = jnp.asarray(logit_scale)
    if s.size != 1:
        raise ValueError(f"{fn}: logit_scale must be a scalar, got shape {s.shape}")
    return s.astype(compute_dtype(features)).reshape(())


def contrastive_loss(image_features: Array, text_features: Array, logit_scale: Array | float, *,
                     normalize: bool = False, axis_name: AxisName = None) -> Array:
    """Symmetric InfoNCE (CLIP): (CE(s fi ft^T, I) + CE(s ft fi^T, I)) / 2, CE averaged over rows.

    `logit_scale` s is the *exponentiated* scale (e.g. `exp(model.logit_scale)`, 100 for CLIP).
    The reference feeds unnormalized features (normalize=False); CLIP itself normalizes. B >= 2.
    """
    fn = "contrastive_loss"
    b, _ = _check_features(fn, 1, image_features=image_features, text_features=text_features)
    ctx = _batch(fn, b, axis_name, 2)
    s = _logit_scale(fn, logit_scale, image_features)
    fi, ft = as_float32(image_features, normalize), as_float32(text_features, normalize)
    pos = s * jnp.sum(fi * ft, axis=-1)
    ce = (jax.nn.logsumexp(s * dot(fi, ctx.gather(ft)), axis=-1) - pos
          + jax.nn.logsumexp(s * dot(ft, ctx.gather(fi)), axis=-1) - pos)
    return ctx.total(jnp.sum(ce)) / (2 * ctx.size)


def slerp(a: Array, b: Array, lam: Array | float) -> Array:
    """Geodesic mix of unit vectors (rows): (sin(lam th) a + sin((1 - lam) th) b) / sin th, th = arccos<a, b>.

    Note the convention of Oh et al.: lam weighs `a` (lam = 1 gives a, lam = 0 gives b).
    """
    cos = jnp.clip(jnp.sum(a * b, axis=-1, keepdims=True), -1.0 + _SLERP_CLIP, 1.0 - _SLERP_CLIP)
    theta = jnp.arccos(cos)
    return (jnp.sin(lam * theta) * a + jnp.sin((1.0 - lam) * theta) * b) / jnp.sin(theta)


def m2_mix_loss(image_features: Array, text_features: Array, logit_scale: Array | float, key: Array, *,
                beta: float = 0.5, normalize: bool = True, axis_name: AxisName = None) -> Array:
    """m^2-mix (Oh et al., "Geodesic Multi-Modal Mixup for Robust Fine-Tuning", NeurIPS 2023).

    On unit-norm I, T (B, D): lam ~ Beta(beta, beta), one draw per call from `key`;
    m_j = slerp(I_j, T_j; lam) hard negatives. With s the logit scale (1 / tau):
      L = -1/B sum_i [ log e^{s<I_i,T_i>} / (e^{s<I_i,T_i>} + sum_{j!=i} e^{s<I_i,m_j>})
                     + log e^{s<I_i,T_i>} / (e^{s<I_i,T_i>} + sum_{j!=i} e^{s<T_i,m_j>}) ].
    The two directions are summed, as in the paper. Used as `contrastive_loss + w * m2_mix_loss`.
    The only loss whose default is `normalize=True`: the geodesic mix needs unit vectors; pass False
    only for features that are already unit norm. Needs B >= 2, beta > 0.
    """
    fn = "m2_mix_loss"
    _check_number(fn, "beta", beta, low=0.0, low_open=True)
    b, _ = _check_features(fn, 1, image_features=image_features, text_features=text_features)
    ctx = _batch(fn, b, axis_name, 2)
    s = _logit_scale(fn, logit_scale, image_features)
    fi, ft = as_float32(image_features, normalize), as_float32(text_features, normalize)
    lam = jax.random.beta(key, beta, beta, dtype=jnp.float32).astype(fi.dtype)  # the same draw in fp32 and fp64
    mixed = ctx.gather(slerp(fi, ft, lam))
    pos = s * jnp.sum(fi * ft, axis=-1)
    diag = _diag_mask(ctx, b)

    def ce_rows(anchor: Array) -> Array:
        logits = jnp.where(diag, pos[:, None], s * dot(anchor, mixed))
        return jax.nn.logsumexp(logits, axis=-1) - pos

    return ctx.total(jnp.sum(ce_rows(fi) + ce_rows(ft))) / ctx.size


# --------------------------------------------------------------------------------------------
# CLIP-Refine
# --------------------------------------------------------------------------------------------
def clip_refine_loss(image_features: Array, text_features: Array, teacher_image_features: Array,
                     teacher_text_features: Array, reference: Array, *, alpha: float = 0.5,
                     temperature: float = 1.0, rafa_weight: float = 1.0, normalize: bool = False,
                     axis_name: AxisName = None) -> tuple[Array, dict[str, Array]]:
    """CLIP-Refine: L = L_hycd + rafa_weight * L_rafa (no contrastive term).

    Returns (loss, {"hycd": L_hycd, "rafa": L_rafa}); `reference` (B, D) from `sample_reference`.
    """
    _check_number("clip_refine_loss", "rafa_weight", rafa_weight, low=0.0)
    hycd = hycd_loss(image_features, text_features, teacher_image_features, teacher_text_features,
                     alpha=alpha, temperature=temperature, normalize=normalize, axis_name=axis_name)
    rafa = rafa_loss(image_features, text_features, reference, normalize=normalize, axis_name=axis_name)
    return hycd + rafa_weight * rafa, {"hycd": hycd, "rafa": rafa}


# --------------------------------------------------------------------------------------------
# sharded convenience wrapper
# --------------------------------------------------------------------------------------------
def sharded(loss_fn: Callable[..., Any], mesh: Mesh, batch_axes: str | Sequence[str] = ("data", "fsdp"),
            ) -> Callable[..., Any]:
    """Wrap a loss so it runs as a `jax.shard_map` over `mesh` with the batch split over `batch_axes`.

    The returned function takes the same arguments as `loss_fn` on *global* arrays: every 2-D array
    argument is split along its first (batch) axis, everything else (keys, logit scale, a (D,)
    reference) is replicated; keyword arguments are static. The outputs are replicated. Call it
    inside `jax.jit`; each device builds only its (B / n, B) block of the logits.
    """
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    missing = [a for a in axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"sharded: batch axes {missing} are not in the mesh axes {mesh.axis_names}")
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    explicit = any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))

    @functools.wraps(loss_fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        specs = []
        for i, a in enumerate(args):
            if jnp.ndim(a) == 2:
                if a.shape[0] % n:
                    raise ValueError(f"sharded({loss_fn.__name__}): argument {i} has batch size {a.shape[0]}, "
                                     f"not divisible by the {n} devices of mesh axes {axes}")
                specs.append(P(axes))
            else:
                specs.append(P())
        if explicit:  # Explicit-axis meshes (used under `jax.set_mesh`) need inputs already laid out
            args = tuple(jax.reshard(a, NamedSharding(mesh, s)) if s != P() else a for a, s in zip(args, specs))
        body = functools.partial(loss_fn, **kwargs, axis_name=axes)
        return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=P())(*args)

    return wrapped


# --------------------------------------------------------------------------------------------
# SigLIP's sigmoid loss
# --------------------------------------------------------------------------------------------
def sigmoid_loss(image_features: Array, text_features: Array, logit_scale: Array | float,
                 logit_bias: Array | float, *, normalize: bool = True, text_chunk: int | None = None,
                 axis_name: AxisName = None) -> Array:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023; big_vision's `sigmoid_loss`).

    With x_i, y_j the (B, D) image/text features (L2-normalized when `normalize`, the default: the loss is
    defined on unit vectors), t the *exponentiated* scale (`exp(model.logit_scale)`, as `contrastive_loss`
    takes it), b the bias, z_ij = +1 for i == j and -1 otherwise:
      L = -1/B sum_i sum_j log sigmoid(z_ij (t <x_i, y_j> + b)).
    Gradients flow into t and b. `text_chunk` computes the (b_local, B) logits block by block over
    `text_chunk` texts at a time (a `lax.scan`; must divide B), so no (B, B) or (b, B) array is
    materialized; with `axis_name` each device computes only its rows against all texts (all-gathered).
    """
    fn = "sigmoid_loss"
    b, _ = _check_features(fn, 1, image_features=image_features, text_features=text_features)
    ctx = _batch(fn, b, axis_name, 1)
    t = _logit_scale(fn, logit_scale, image_features)
    bias = jnp.asarray(logit_bias)
    if bias.size != 1:
        raise ValueError(f"{fn}: logit_bias must be a scalar, got shape {bias.shape}")
    fi, ft = as_float32(image_features, normalize), as_float32(text_features, normalize)
    bias = bias.astype(fi.dtype).reshape(())
    texts = ctx.gather(ft)
    rows = ctx.offset + jnp.arange(b)

    def block_sum(cols: Array, start: Array | int) -> Array:
        logits = t * dot(fi, cols) + bias
        sign = jnp.where(rows[:, None] == start + jnp.arange(cols.shape[0])[None, :], 1.0, -1.0)
        return -jnp.sum(jax.nn.log_sigmoid(sign * logits))

    if text_chunk is None:
        total = block_sum(texts, 0)
    else:
        chunk = int(text_chunk)
        if chunk < 1 or ctx.size % chunk:
            raise ValueError(f"{fn}: text_chunk={text_chunk!r} must be a positive divisor of the batch size "
                             f"B={ctx.size}")
        blocks = texts.reshape(ctx.size // chunk, chunk, texts.shape[-1])
        starts = jnp.arange(ctx.size // chunk) * chunk
        _, sums = jax.lax.scan(lambda carry, xs: (carry, block_sum(*xs)), None, (blocks, starts))
        total = jnp.sum(sums)
    return ctx.total(total) / ctx.size
