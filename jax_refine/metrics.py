"""Feature-space and retrieval metrics as pure, jittable JAX functions (fp32 outputs).

Embeddings are (N, D) arrays. Unless `normalize=False`, every metric L2-normalizes its inputs first
(cosine geometry, as the papers measure it). Functions that compare all pairs (`uniformity`,
`recall_at_k`) work in row chunks of `chunk_size` under `jax.lax.map`, so memory stays at
chunk_size x N instead of N x M. Shapes and options are checked in Python (ValueError at trace time).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jax_refine.losses import array_shape, as_float32, dot, l2_normalize

Array = jax.Array


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _emb_pair(fn: str, a: Any, b: Any, same_n: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    sa, sb = array_shape(fn, "first embedding", a, 2), array_shape(fn, "second embedding", b, 2)
    if sa[1] != sb[1] or (same_n and sa[0] != sb[0]):
        want = "the same shape" if same_n else "the same feature dim D"
        raise ValueError(f"{fn}: embeddings have shapes {sa} and {sb}; they need {want}")
    if min(sa[0], sb[0]) < 1:
        raise ValueError(f"{fn}: empty embedding set, shapes {sa} and {sb}")
    return sa, sb


def _ks(fn: str, ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"{fn}: ks must be positive ints, got {ks!r}")
    return ks


def _map_chunks(fn_name: str, x: Array, chunk_size: int, body: Callable[[Array, Array], Array]) -> Array:
    """Stack `body(rows (c, D), global_row_ids (c,))` over row chunks of x; ids >= N mark padding rows."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn_name}: chunk_size must be a positive int, got {chunk_size!r}")
    n = x.shape[0]
    c = min(chunk_size, n)
    n_chunks = -(-n // c)
    xp = jnp.pad(x, ((0, n_chunks * c - n), (0, 0)))

    def one(i: Array) -> Array:
        return body(jax.lax.dynamic_slice_in_dim(xp, i * c, c), i * c + jnp.arange(c))

    return jax.lax.map(one, jnp.arange(n_chunks))


# --------------------------------------------------------------------------------------------
# modality gap, alignment, uniformity
# --------------------------------------------------------------------------------------------
def modality_gap(image_emb: Array, text_emb: Array) -> Array:
    """Liang et al. (2022): ||mean(normalize(image)) - mean(normalize(text))||_2.

    image_emb (N, D), text_emb (M, D). 0 for identical sets, 2 for antipodal clusters.
    """
    _emb_pair("modality_gap", image_emb, text_emb)
    delta = jnp.mean(l2_normalize(image_emb), axis=0) - jnp.mean(l2_normalize(text_emb), axis=0)
    return jnp.sqrt(jnp.sum(delta * delta))


def modality_gap_mse(image_emb: Array, text_emb: Array, *, normalize: bool = True) -> Array:
    """The reference's gap: mean_d((mu_img - mu_txt)_d^2) with mu the per-dimension means.

    Default on L2-normalized embeddings (then it equals modality_gap^2 / D); the reference logs it on
    the raw training features, which `normalize=False` reproduces.
    """
    _emb_pair("modality_gap_mse", image_emb, text_emb)
    delta = jnp.mean(as_float32(image_emb, normalize), axis=0) - jnp.mean(as_float32(text_emb, normalize), axis=0)
    return jnp.mean(delta * delta)


def alignment(image_emb: Array, text_emb: Array, *, normalize: bool = True) -> Array:
    """Wang & Isola alignment over positive pairs: mean_i ||x_i - y_i||^2; x, y (N, D), row i paired."""
    _emb_pair("alignment", image_emb, text_emb, same_n=True)
    d = as_float32(image_emb, normalize) - as_float32(text_emb, normalize)
    return jnp.mean(jnp.sum(d * d, axis=-1))


def uniformity(emb: Array, *, t: float = 2.0, normalize: bool = True, chunk_size: int = 1024) -> Array:
    """Wang & Isola uniformity: log mean_{i<j} exp(-t ||x_i - x_j||^2), t = 2.

    Over the N(N-1)/2 distinct pairs of one set (as torch.pdist), computed by log-sum-exp in row
    chunks. For the joint value of two modalities pass their concatenation (see `uniformity_all`).
    """
    fn = "uniformity"
    n, _ = array_shape(fn, "emb", emb, 2)
    if n < 2:
        raise ValueError(f"{fn}: needs at least 2 embeddings, got shape {tuple(emb.shape)}")
    if float(t) <= 0:
        raise ValueError(f"{fn}: t={t!r} must be > 0")
    x = as_float32(emb, normalize)
    sq = jnp.sum(x * x, axis=-1)

    def body(rows: Array, ids: Array) -> Array:
        d2 = jnp.maximum(jnp.sum(rows * rows, -1)[:, None] + sq[None, :] - 2.0 * dot(rows, x), 0.0)
        keep = (jnp.arange(n)[None, :] > ids[:, None]) & (ids[:, None] < n)
        return jax.nn.logsumexp(jnp.where(keep, -t * d2, -jnp.inf))

    per_chunk = _map_chunks(fn, x, chunk_size, body)  # (n_chunks,) partial log-sum-exps
    return jax.nn.logsumexp(per_chunk) - math.log(n * (n - 1) / 2)


def uniformity_all(image_emb: Array, text_emb: Array, *, t: float = 2.0, normalize: bool = True,
                   chunk_size: int = 1024) -> dict[str, Array]:
    """{"image", "text", "joint"} uniformity; joint is over the concatenated (N + M, D) set."""
    _emb_pair("uniformity_all", image_emb, text_emb)
    kw = dict(t=t, normalize=normalize, chunk_size=chunk_size)
    joint = jnp.concatenate([as_float32(image_emb, normalize), as_float32(text_emb, normalize)])
    return {"image": uniformity(image_emb, **kw), "text": uniformity(text_emb, **kw),
            "joint": uniformity(joint, **kw)}


# --------------------------------------------------------------------------------------------
# retrieval and zero-shot classification
# --------------------------------------------------------------------------------------------
def recall_at_k(image_emb: Array, text_emb: Array, caption_image_index: Array, ks: Sequence[int] = (1, 5, 10), *,
                normalize: bool = True, chunk_size: int = 1024) -> dict[str, Array]:
    """Image<->text retrieval recall@k with several captions per image, as CLIP papers count it.

    image_emb (N, D), text_emb (M, D), caption_image_index (M,) int: the image of each caption.
    t2i: a caption is a hit if its image ranks in the top k of all N images.
    i2t: an image is a hit if ANY of its captions ranks in the top k of all M captions; images
    without captions are left out of the i2t mean. Ranking by cosine similarity (dot product when
    normalize=False); ties count in the query's favour (rank = number of strictly better items).
    Returns {"i2t_R@k": ..., "t2i_R@k": ...} as fractions in [0, 1]. Memory: chunk_size x max(N, M).
    """
    fn = "recall_at_k"
    (n, _), (m, _) = _emb_pair(fn, image_emb, text_emb)
    idx_shape = array_shape(fn, "caption_image_index", caption_image_index, 1)
    if idx_shape != (m,):
        raise ValueError(f"{fn}: caption_image_index has shape {idx_shape}, expected ({m},) (one per caption)")
    if not jnp.issubdtype(jnp.asarray(caption_image_index).dtype, jnp.integer):
        raise ValueError(f"{fn}: caption_image_index must be integer, got {jnp.asarray(caption_image_index).dtype}")
    ks = _ks(fn, ks)
    kv = jnp.asarray(ks)
    img, txt = as_float32(image_emb, normalize), as_float32(text_emb, normalize)
    cap_idx = jnp.asarray(caption_image_index).astype(jnp.int32)

    def t2i(rows: Array, ids: Array) -> Array:  # rows: captions (c, D)
        sims = dot(rows, img)  # (c, N)
        target = jnp.take(cap_idx, jnp.minimum(ids, m - 1))
        correct = jnp.take_along_axis(sims, target[:, None], axis=1)
        rank = jnp.sum(sims > correct, axis=1)
        hit = (rank[:, None] < kv[None, :]) & (ids < m)[:, None]
        return jnp.sum(hit, axis=0).astype(jnp.float32)

    def i2t(rows: Array, ids: Array) -> Array:  # rows: images (c, D)
        sims = dot(rows, txt)  # (c, M)
        mine = cap_idx[None, :] == ids[:, None]
        best = jnp.max(jnp.where(mine, sims, -jnp.inf), axis=1)
        rank = jnp.sum(sims > best[:, None], axis=1)
        has = jnp.any(mine, axis=1) & (ids < n)
        hit = (rank[:, None] < kv[None, :]) & has[:, None]
        return jnp.concatenate([jnp.sum(hit, axis=0), jnp.sum(has)[None]]).astype(jnp.float32)

    t2i_hits = jnp.sum(_map_chunks(fn, txt, chunk_size, t2i), axis=0) / m
    i2t_counts = jnp.sum(_map_chunks(fn, img, chunk_size, i2t), axis=0)
    i2t_hits = i2t_counts[:-1] / jnp.maximum(i2t_counts[-1], 1.0)
    out = {f"i2t_R@{k}": i2t_hits[j] for j, k in enumerate(ks)}
    out.update({f"t2i_R@{k}": t2i_hits[j] for j, k in enumerate(ks)})
    return out


def zero_shot_logits(image_emb: Array, class_emb: Array) -> Array:
    """Cosine similarities (N, C) between images (N, D) and class embeddings.

    class_emb is (C, D), or (C, P, D) for a prompt-template ensemble: each prompt embedding is
    normalized, averaged over P and renormalized (CLIP's recipe). No logit scale (accuracy-neutral).
    """
    fn = "zero_shot_logits"
    si = array_shape(fn, "image_emb", image_emb, 2)
    sc = tuple(getattr(class_emb, "shape", ()))
    if len(sc) not in (2, 3) or sc[-1] != si[1]:
        raise ValueError(f"{fn}: class_emb has shape {sc}, expected (C, {si[1]}) or (C, P, {si[1]})")
    cls = l2_normalize(class_emb)
    if cls.ndim == 3:
        cls = l2_normalize(jnp.mean(cls, axis=1))
    return dot(l2_normalize(image_emb), cls)


def zero_shot_accuracy(logits: Array, labels: Array, ks: Sequence[int] = (1, 5)) -> dict[str, Array]:
    """Top-k accuracy {"top1": ..., "top5": ...} (fractions) of logits (N, C) for int labels (N,).

    A hit when fewer than k classes score strictly higher than the true class (k >= C is always a hit).
    """
    fn = "zero_shot_accuracy"
    n, _ = array_shape(fn, "logits", logits, 2)
    if array_shape(fn, "labels", labels, 1) != (n,):
        raise ValueError(f"{fn}: labels has shape {tuple(labels.shape)}, expected ({n},) to match logits")
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise ValueError(f"{fn}: labels must be integer, got {jnp.asarray(labels).dtype}")
    ks = _ks(fn, ks)
    x = jnp.asarray(logits).astype(jnp.float32)
    true = jnp.take_along_axis(x, jnp.asarray(labels).astype(jnp.int32)[:, None], axis=1)
    rank = jnp.sum(x > true, axis=1)
    return {f"top{k}": jnp.mean((rank < k).astype(jnp.float32)) for k in ks}
