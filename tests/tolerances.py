"""fp32 error bounds derived from the condition of each compared quantity, not guessed (issue 22, item 5).

The tests compare our fp32 losses with the SAME computation in float64 (ours under `jax.enable_x64`, itself
checked against the float64 PyTorch transcription to `F64_RTOL`). What separates the two is only fp32 rounding,
and this module bounds it to first order from the float64 inputs, one source at a time:

* a logit <q_i, k_j> (a D-term dot product) carries an absolute error of at most
  `LAMBDA * sqrt(D) * U32 * s * sum_d |q_id k_jd|` (Higham & Mary 2019: rounding errors of a D-term sum grow
  like sqrt(D); `LAMBDA = 6` is exceeded with probability < 2 exp(-18) per sum), plus a few ulps of the logit
  itself (the scale's exp/log, the multiplication, normalized inputs);
* a softmax row moves by at most `|dP_ij| <= 2 e P_ij (1 - P_ij)` under logit errors <= e (the row's errors
  enter only through their differences from the P-weighted mean), so a saturated softmax (P one-hot, the hard
  negatives of a trained CLIP at logits ~1e4) is insensitive, while the terms that CANCEL (log-sum-exp minus
  the positive logit; E_P[L] - L_ii in the logit-scale gradient) carry the absolute error of their largest
  term: that is the condition of the quantity, and why a relative tolerance at a fixed rtol can flake;
* every sum of n terms of the final reductions (rows, the batch mean, a matmul with B rows) adds
  `LAMBDA * sqrt(n) * U32 * sum |terms|`.

Each function returns ABSOLUTE bounds on (value, grad_fi, grad_ft, grad_log_scale) (gradient bounds are on the
Frobenius norm of the error), for the loss as jax_refine.losses computes it; `assert_fp32_close` checks one and
says observed / bound (and appends it to the file $TOL_LOG if set). The bounds are conservative (worst case
over signs), typically 10-1000x the observed error.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np

U32 = 2.0**-24  # fp32 unit roundoff (half an ulp at 1)
U_BF16 = 2.0**-8  # bfloat16 unit roundoff (8 significant bits)
LAMBDA = 6.0  # probabilistic rounding-error bound factor (Higham & Mary 2019)
F64_RTOL = 1e-11  # float64 vs float64: ~1e5 ulps of float64 headroom for different summation orders


class Bounds(NamedTuple):
    """Absolute first-order fp32 error bounds: loss value, ||grad_fi||_F, ||grad_ft||_F, |grad log_scale|,
    |grad bias| (SigLIP's)."""

    value: float
    g_fi: float
    g_ft: float
    g_s: float
    g_b: float = 0.0

    def __add__(self, other: "Bounds") -> "Bounds":  # type: ignore[override]
        return Bounds(*(a + b for a, b in zip(self, other, strict=True)))

    def __mul__(self, w: float) -> "Bounds":  # type: ignore[override]
        return Bounds(*(w * a for a in self))


ZERO = Bounds(0.0, 0.0, 0.0, 0.0, 0.0)


def sum_error(n: int, magnitude: float | np.ndarray) -> float | np.ndarray:
    """Absolute fp32 error bound of a sum of `n` terms whose absolute values add up to `magnitude`."""
    return LAMBDA * math.sqrt(n) * U32 * magnitude


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logit_error(q: np.ndarray, k: np.ndarray, scale: float, normalized: bool = False) -> float:
    """Largest absolute fp32 error of the logits scale * q k^T (q (n, D), k (m, D), float64 values); inputs
    `normalized` in fp32 carry another sqrt(D)-term sum's error (the squared norm) each."""
    magnitude = scale * np.abs(q) @ np.abs(k).T  # sum_d |q_id k_jd|, per logit
    dot = (1 + 2 * normalized) * sum_error(q.shape[1], magnitude)
    return float(np.max(dot + 8 * U32 * magnitude))  # 8 ulps: exp/log of the scale, the product, the inputs


def softmax_rows(logits: np.ndarray, qn: np.ndarray, kn: np.ndarray, scale: float, target: np.ndarray,
                 err: float, target_err: np.ndarray | None = None) -> Bounds:
    """Bounds for mean_i CE(softmax(logits)_i, target_i) over B rows (`target` rows sum to 1), logits
    scale * <q_i, k_j> with row norms `qn`, `kn`, logit errors <= `err`, target errors <= `target_err` (B, B);
    gradients w.r.t. the queries q (g_fi), the keys k (g_ft) and log(scale) (g_s)."""
    b = logits.shape[0]
    p = _softmax(logits)
    dp = 2 * err * p * (1 - p)  # |dP_ij| under logit errors <= err
    dq = np.zeros_like(p) if target_err is None else target_err
    top = logits.max(1, keepdims=True)
    lse = np.log(np.sum(np.exp(logits - top), 1)) + top[:, 0]
    centred = np.abs(logits - np.sum(p * logits, 1, keepdims=True))  # dP sums to 0 over a row
    log_ratio = np.where(target > 0, np.abs(np.log(np.maximum(target, 1e-300)) - np.log(np.maximum(p, 1e-300))), 0)
    value = np.mean(2 * err + np.sum(dq * log_ratio, 1)
                    + sum_error(b, np.abs(lse) + np.sum(target * np.abs(logits), 1)))
    diff = np.abs(p - target)
    g_s = np.sum((dp + dq) * centred + diff * err + sum_error(b * b, diff * np.abs(logits))) / b
    rows = scale / b * ((dp + dq) @ kn + sum_error(b, diff @ kn))  # grad q_i = scale/B sum_j (P - T)_ij k_j
    cols = scale / b * ((dp + dq).T @ qn + sum_error(b, diff.T @ qn))
    return Bounds(float(value), float(np.linalg.norm(rows)), float(np.linalg.norm(cols)), float(g_s))


def _ce(q: np.ndarray, k: np.ndarray, scale: float, target: np.ndarray, err: float,
        target_err: np.ndarray | None = None) -> Bounds:
    """`softmax_rows` of the logits scale * q k^T."""
    return softmax_rows(scale * q @ k.T, np.linalg.norm(q, axis=1), np.linalg.norm(k, axis=1), scale, target, err,
                        target_err)


def _through_normalize(bound: Bounds, fi: np.ndarray, ft: np.ndarray, grads: tuple[float, float]) -> Bounds:
    """Map gradient bounds w.r.t. unit vectors back to the raw features: the Jacobian (I - u u^T) / |f| has
    norm 1 / |f|, and its own fp32 rounding adds ~sqrt(D) ulps of the gradient `grads` (norms, unit side)."""
    d = fi.shape[1]
    gi = (bound.g_fi + sum_error(d, 2 * grads[0])) / np.linalg.norm(fi, axis=1).min()
    gt = (bound.g_ft + sum_error(d, 2 * grads[1])) / np.linalg.norm(ft, axis=1).min()
    return bound._replace(g_fi=float(gi), g_ft=float(gt))


def contrastive(fi: np.ndarray, ft: np.ndarray, scale: float, normalize: bool = False) -> Bounds:
    """(CE(s fi ft^T, I) + CE(s ft fi^T, I)) / 2 (jax_refine.losses.contrastive_loss)."""
    qi, qt = (_unit(fi), _unit(ft)) if normalize else (fi, ft)
    eye, err = np.eye(len(fi)), logit_error(qi, qt, scale, normalize)
    i2t, t2i = _ce(qi, qt, scale, eye, err), _ce(qt, qi, scale, eye, err)
    out = Bounds((i2t.value + t2i.value) / 2, (i2t.g_fi + t2i.g_ft) / 2, (i2t.g_ft + t2i.g_fi) / 2,
                 (i2t.g_s + t2i.g_s) / 2)
    if normalize:  # the unit-side gradient is at most 2 s max|f| per row (P-average minus target)
        g = 2 * scale * math.sqrt(len(fi)) / len(fi)
        out = _through_normalize(out, fi, ft, (g, g))
    return out


def hycd(fi, ft, gi, gt, alpha: float = 0.5, temperature: float = 1.0, normalize: bool = False) -> Bounds:
    """T^2 KL(alpha I + (1 - alpha) softmax(gi gt^T / T) || softmax(fi ft^T / T)), both ways, averaged
    (jax_refine.losses.hycd_loss); the teacher's logit errors move the target."""
    raw = fi, ft
    if normalize:
        fi, ft, gi, gt = (_unit(x) for x in (fi, ft, gi, gt))
    b, s = len(fi), 1.0 / temperature
    err, t_err = logit_error(fi, ft, s, normalize), logit_error(gi, gt, s, normalize)
    out = []
    for q, k, tq, tk in ((fi, ft, gi, gt), (ft, fi, gt, gi)):
        soft = _softmax(s * tq @ tk.T)
        target = alpha * np.eye(b) + (1 - alpha) * soft
        out.append(_ce(q, k, s, target, err, (1 - alpha) * 2 * t_err * soft * (1 - soft)))
    i2t, t2i = out
    t2 = temperature**2
    out = Bounds(t2 * (i2t.value + t2i.value) / 2, t2 * (i2t.g_fi + t2i.g_ft) / 2, t2 * (i2t.g_ft + t2i.g_fi) / 2, 0.0)
    if normalize:  # unit-side gradient: at most 2 s T^2 per row (P minus the target, times a unit key)
        g = 2 * s * t2 * math.sqrt(b) / b
        out = _through_normalize(out, *raw, (g, g))
    return out


def mse(f: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(value, ||grad||) bounds of mean((f - target)^2) over n elements: a sum of n positive terms; each
    difference is exact to one ulp of itself."""
    n, sq = f.size, (f - target) ** 2
    grad = 2 * (f - target) / n
    return float(sum_error(n, np.sum(sq)) / n + 4 * U32 * np.mean(sq)), float(4 * U32 * np.linalg.norm(grad))


def rafa(fi, ft, z, normalize: bool = False) -> Bounds:
    """mean((fi - z)^2) + mean((ft - z)^2) (jax_refine.losses.rafa_loss); normalized features carry
    ~sqrt(D) ulps each, which moves the value by 2 |f - z| |df| per element."""
    (vi, gi_), (vt, gt_) = mse(*_maybe(fi, normalize), z), mse(*_maybe(ft, normalize), z)
    out = Bounds(vi + vt, gi_, gt_, 0.0)
    if normalize:
        extra = [sum_error(fi.shape[1], 2 * np.mean(np.abs(_unit(f) - z))) for f in (fi, ft)]
        grads = [2 * np.linalg.norm(_unit(f) - z) / f.size for f in (fi, ft)]
        out = _through_normalize(Bounds(out.value + sum(extra), out.g_fi + 2 * extra[0], out.g_ft + 2 * extra[1],
                                        0.0), fi, ft, tuple(grads))
    return out


def _maybe(f: np.ndarray, normalize: bool) -> tuple[np.ndarray]:
    return (_unit(f) if normalize else f,)


def feature_distill(fi, ft, gi, gt, normalize: bool = False) -> Bounds:
    """mean((fi - gi)^2) + mean((ft - gt)^2) (jax_refine.losses.feature_distill_loss)."""
    if normalize:
        return rafa(fi, ft, _unit(gi), True) + rafa(fi, ft, _unit(gt), True)  # each side bounded by both
    (vi, gi_), (vt, gt_) = mse(fi, gi), mse(ft, gt)
    return Bounds(vi + vt, gi_, gt_, 0.0)


def logit_distill(fi, ft, gi, gt, normalize: bool = False) -> Bounds:
    """mean((fi ft^T - gi gt^T)^2) over B^2 logits (jax_refine.losses.logit_distill_loss): each logit
    difference carries the student's and the teacher's logit errors."""
    if normalize:
        fi_, ft_, gi, gt = (_unit(x) for x in (fi, ft, gi, gt))
    else:
        fi_, ft_ = fi, ft
    b = len(fi)
    diff = fi_ @ ft_.T - gi @ gt.T
    e = logit_error(fi_, ft_, 1.0) + logit_error(gi, gt, 1.0)
    value = np.mean(2 * np.abs(diff) * e + e**2) + sum_error(b * b, np.mean(diff**2))
    g = 2 / b**2 * ((e + sum_error(b, np.abs(diff))) @ np.linalg.norm(ft_, axis=1))
    h = 2 / b**2 * ((e + sum_error(b, np.abs(diff))).T @ np.linalg.norm(fi_, axis=1))
    out = Bounds(float(value), float(np.linalg.norm(g)), float(np.linalg.norm(h)), 0.0)
    if normalize:
        grads = [2 / b**2 * np.linalg.norm(np.abs(diff) @ np.linalg.norm(x, axis=1)) for x in (ft_, fi_)]
        out = _through_normalize(out, fi, ft, tuple(grads))
    return out


def m2_mix(fi, ft, scale: float, lam: float) -> Bounds:
    """Oh et al.'s m^2 loss on unit vectors (jax_refine.losses.m2_mix_loss): the SUM of two CE over [the
    positive <I_i, T_i>, the anchor against the geodesic mixes m_j (j != i)]; m_j = slerp carries ~sqrt(D) ulps
    amplified by 1 / sin(theta), and its gradient flows back to both features through the slerp (Lipschitz
    <= 1 + 2 / sin(theta)); the positive's gradient reaches both features too."""
    u, v = _unit(fi), _unit(ft)
    b, d = u.shape
    theta = np.arccos(np.clip(np.sum(u * v, 1), -1, 1))
    m = (np.sin(lam * theta)[:, None] * u + np.sin((1 - lam) * theta)[:, None] * v) / np.sin(theta)[:, None]
    lip = float(1 + 2 / np.sin(theta).min())
    err = logit_error(u, m, scale, True) + scale * sum_error(d, lip)
    ones = np.ones(b)
    total = ZERO
    for a in (u, v):
        logits = scale * a @ m.T
        logits[np.arange(b), np.arange(b)] = scale * np.sum(u * v, 1)
        rows = softmax_rows(logits, ones, ones, scale, np.eye(b), err)
        both = rows.g_fi + lip * rows.g_ft
        total = total + Bounds(rows.value, both, both, rows.g_s)
    g = 2 * scale * math.sqrt(b) / b * (1 + lip)  # unit-side gradient norm, per direction
    return _through_normalize(total, fi, ft, (2 * g, 2 * g))


def sigmoid(fi, ft, scale: float, bias: float, normalize: bool = True) -> Bounds:
    """SigLIP's -1/B sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)) on unit vectors (jax_refine.losses.sigmoid_loss;
    `normalize=False`: on the raw features): each term moves by w_ij = sigmoid(-z l) times its logit's error, its
    derivatives by w (1 - w) times it."""
    u, v = (_unit(fi), _unit(ft)) if normalize else (fi, ft)
    b = len(u)
    z = 2 * np.eye(b) - 1
    cos = u @ v.T
    logits = scale * cos + bias
    w = 1 / (1 + np.exp(z * logits))  # sigmoid(-z l): |d term / d logit|
    e = logit_error(u, v, scale, normalize) + 8 * U32 * abs(bias)
    dw = w * (1 - w) * e
    value = np.sum(w * e + sum_error(b * b, np.abs(np.logaddexp(0, -z * logits)))) / b
    g_s = np.sum(dw * scale * np.abs(cos) + w * e + sum_error(b * b, w * scale * np.abs(cos))) / b
    g_b = np.sum(dw + sum_error(b * b, w)) / b
    un, vn = np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=1)  # 1 on unit vectors
    rows = scale / b * ((dw + sum_error(b, w)) @ vn)  # grad x_i = t/B sum_j -z w y_j
    cols = scale / b * ((dw + sum_error(b, w)).T @ un)
    out = Bounds(float(value), float(np.linalg.norm(rows)), float(np.linalg.norm(cols)), float(g_s), float(g_b))
    if not normalize:
        return out
    grads = [scale / b * np.linalg.norm(w.sum(a)) for a in (1, 0)]
    return _through_normalize(out, fi, ft, tuple(grads))


def slerp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row bound on |slerp_fp32(a, b, lam) - slerp_fp64| for unit rows (any lam in [0, 1]): cos = <a, b>
    carries a D-term sum's error, theta = arccos(cos) that over sin(theta), and the mix moves by at most
    (1 + 2 |cot theta|) / sin(theta) per unit of theta; plus a few ulps of the two scaled rows and the division."""
    cos = np.sum(a * b, 1)
    sin = np.sqrt(1 - cos**2)
    e_theta = (sum_error(a.shape[1], np.sum(np.abs(a * b), 1)) + 2 * U32) / sin + 2 * U32 * np.arccos(cos)
    return e_theta * (1 + 2 * np.abs(cos) / sin) / sin + 8 * U32 * 2 / sin


# ---- metrics (jax_refine.metrics) on unit vectors: every entry of an fp32 unit vector carries the error of its
# norm's D-term sum of squares (half of it, through the square root) plus two ulps
def unit_entry_error(d: int) -> float:
    """Absolute error bound of one entry of an fp32 L2-normalized D-vector (entries <= 1)."""
    return float(sum_error(d, 1.0) / 2 + 2 * U32)


def centroid_gap(x: np.ndarray, y: np.ndarray, normalize: bool = True) -> tuple[float, float]:
    """(modality_gap, modality_gap_mse) bounds: each centroid entry is a mean of n entries (their errors and
    the n-term sum's), the difference adds both; the gap's D-term norm and the MSE's mean add their sums'."""
    n = max(len(x), len(y))
    xs, ys = (_unit(x), _unit(y)) if normalize else (x, y)
    entry = (unit_entry_error(x.shape[1]) if normalize else 0.0) * max(1.0, float(np.abs(np.vstack([xs, ys])).max()))
    e_mu = 2 * (entry + float(sum_error(n, np.abs(np.vstack([xs, ys])).max())))
    mu = xs.mean(0) - ys.mean(0)
    gap = float(np.linalg.norm(mu))
    e_gap = math.sqrt(len(mu)) * e_mu + float(sum_error(len(mu), gap))
    e_mse = 2 * float(np.mean(np.abs(mu))) * e_mu + e_mu**2 + float(sum_error(len(mu), np.mean(mu**2)))
    return e_gap, e_mse


def pair_distances(u: np.ndarray, v: np.ndarray, normalized: bool = True) -> np.ndarray:
    """Bounds of the fp32 squared distances ||u_i - v_i||^2 (rows paired), from each entry's error."""
    e = 2 * unit_entry_error(u.shape[1]) if normalized else 2 * U32 * max(np.abs(u).max(), np.abs(v).max())
    sq = np.sum((u - v) ** 2, 1)
    return 2 * np.sum(np.abs(u - v), 1) * e + sum_error(u.shape[1], sq)


def uniformity(x: np.ndarray, t: float = 2.0) -> float:
    """log mean_{i<j} exp(-t ||x_i - x_j||^2) on unit rows: each exponent moves by t x its distance's error,
    the log-mean-exp by at most the largest of those, plus the pair sum's rounding."""
    u = _unit(x)
    i, j = np.triu_indices(len(u), 1)
    e_sq = pair_distances(u[i], u[j])
    vals = np.exp(-t * np.sum((u[i] - u[j]) ** 2, 1))
    return float(t * e_sq.max() + sum_error(len(i), 1.0) + 4 * U32 * abs(np.log(vals.mean())))


def objective(weights: dict[str, float], fi, ft, gi, gt, z, log_scale: float, lam: float, value: float, *,
              alpha: float = 0.5, temperature: float = 1.0, normalize: bool = False, bias: float = 0.0) -> Bounds:
    """Bounds for jax_refine.objectives.total_loss = sum_t w_t L_t (the terms of tests/torch_reference_losses
    METHOD_WEIGHTS): the weighted sum of the terms' bounds, plus the rounding of that sum of positive terms
    (a few ulps of `value`, the float64 loss)."""
    s = math.exp(log_scale)
    terms = {
        "contrastive": lambda: contrastive(fi, ft, s, normalize),
        "kd": lambda: hycd(fi, ft, gi, gt, alpha, temperature, normalize),
        "rafa": lambda: rafa(fi, ft, z, normalize),
        "feature": lambda: feature_distill(fi, ft, gi, gt, normalize),
        "logit": lambda: logit_distill(fi, ft, gi, gt, normalize),
        "m2": lambda: m2_mix(fi, ft, s, lam),
        "sigmoid": lambda: sigmoid(fi, ft, s, bias),
    }
    total = Bounds(4 * U32 * abs(value), 0.0, 0.0, 0.0, 0.0)
    for t, w in weights.items():
        if w:
            total = total + terms[t]() * w
    return total


def pixel_error(mean, std) -> float:
    """Largest difference of two fp32 evaluations of (x / 255 - mean) / std from the same uint8 x (ours and an
    image processor's, in any order of operations): per side at most 3 roundings of values <= 1 + |mean| (the
    1/255 scale, its product, the subtraction), carried through 1 / std, and 1 of the result."""
    top = (1 + float(np.max(np.abs(mean)))) / float(np.min(std))
    return 2 * 4 * U32 * top


BF16_OVER_FP32 = U_BF16 / U32  # first-order rounding errors are linear in the unit roundoff


def assert_bf16_parity(got: np.ndarray, want: np.ndarray, torch_error: float, what: str) -> float:
    """Our bfloat16 forward (max abs) within BF16_OVER_FP32 x the fp32 error of the same network (measured with
    `torch_fp32_errors`) of the fp32 reference `want`: to first order a forward's rounding error is its condition
    times the unit roundoff, and a bf16 forward rounds (at most) every operation the fp32 one does at U_BF16;
    the second-order terms are negligible while that error is a small fraction of the output."""
    err = float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())
    bound = BF16_OVER_FP32 * torch_error + torch_error  # plus the fp32 reference's own error
    assert bound <= 0.1 * float(np.abs(want).max()), f"{what}: bf16 bound {bound:.3e} is not first order"
    return _record(err, bound, what, f"torch fp32 error {torch_error:.3e}")


PARITY_FACTOR = 8.0  # two fp32 forwards in different summation orders: each ~ the measured error, 4x margin each


def torch_fp32_errors(torch_model, call) -> list[float]:
    """The fp32 rounding error of a PyTorch forward, measured: max |call(model, float32) - call(float64 copy,
    float64)| per output (None stays None), at least LAMBDA ulps of the largest output (the last projection's
    rounding alone).

    For a deep network (LayerNorm's 1 / std, attention's softmax, GELU) the error is not worth deriving by hand,
    but it is a property of the quantity (its condition times fp32's unit roundoff), not of the code: our fp32
    forward of the same weights must err by the same order. Parity tests use PARITY_FACTOR x this as atol."""
    import copy

    import torch

    with torch.no_grad():
        f32 = call(torch_model, np.float32)
        f64 = call(copy.deepcopy(torch_model).to(torch.float64), np.float64)
    return [None if b is None else max(float(np.abs(np.asarray(a, np.float64) - b).max()),
                                       LAMBDA * U32 * float(np.abs(b).max())) for a, b in zip(f32, f64)]


def assert_parity(got: np.ndarray, want: np.ndarray, torch_error: float, what: str) -> float:
    """Our fp32 output within PARITY_FACTOR x torch's own measured fp32 error of its fp32 output (max abs)."""
    err = float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())
    bound = PARITY_FACTOR * torch_error
    return _record(err, bound, what, f"torch fp32 error {torch_error:.3e}")


def assert_fp32_close(got: float | np.ndarray, want: float | np.ndarray, bound: float, what: str) -> float:
    """|got - want| (Frobenius for arrays) <= bound; returns observed / bound (printed, for the stability report)."""
    err = float(np.linalg.norm(np.asarray(got, np.float64) - np.asarray(want, np.float64)))
    return _record(err, bound, what, f"got {got}, float64 {want}")


def _record(err: float, bound: float, what: str, detail: str) -> float:
    """Assert err <= bound; print observed / bound and append it to $TOL_LOG (the stability runs) if set."""
    ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
    print(f"[tol] {what}: error {err:.3e} bound {bound:.3e} ratio {ratio:.3f}")
    if os.environ.get("TOL_LOG"):  # one line per check, the test's id first
        with open(os.environ["TOL_LOG"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{what}\t{err:.3e}\t{bound:.3e}"
                    f"\t{ratio:.4f}\n")
    assert err <= bound, f"{what}: fp32 error {err:.3e} > derived bound {bound:.3e} ({detail})"
    return ratio


def assert_f64_close(got: float | np.ndarray, want: float | np.ndarray, what: str) -> None:
    """Our float64 against the float64 PyTorch transcription: relative Frobenius error <= F64_RTOL."""
    want64 = np.asarray(want, np.float64)
    err = float(np.linalg.norm(np.asarray(got, np.float64) - want64))
    assert err <= F64_RTOL * max(float(np.linalg.norm(want64)), 1e-300), f"{what}: float64 {got} vs torch {want}"
