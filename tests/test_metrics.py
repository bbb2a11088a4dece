"""jax_refine.metrics: known answers on hand-made embeddings and values vs NumPy references written
from the definitions (float64, explicit loops / argsort)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances as tol
from conftest import slow
from jax_refine import metrics as M


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------
def np_gap(x, y):
    return np.linalg.norm(_unit(x.astype(np.float64)).mean(0) - _unit(y.astype(np.float64)).mean(0))


def np_uniformity(x, t=2.0):
    x = _unit(x.astype(np.float64))
    vals = [np.exp(-t * np.sum((x[i] - x[j]) ** 2)) for i in range(len(x)) for j in range(i + 1, len(x))]
    return np.log(np.mean(vals))


def np_recall(img, txt, cap_idx, ks):
    img, txt = _unit(img.astype(np.float64)), _unit(txt.astype(np.float64))
    sims = img @ txt.T  # (N, M)
    out = {}
    for k in ks:
        t2i = [cap_idx[j] in np.argsort(-sims[:, j])[:k] for j in range(txt.shape[0])]
        has = [i for i in range(img.shape[0]) if np.any(cap_idx == i)]
        i2t = [np.any(cap_idx[np.argsort(-sims[i])[:k]] == i) for i in has]
        out[f"i2t_R@{k}"], out[f"t2i_R@{k}"] = np.mean(i2t), np.mean(t2i)
    return out


def np_topk(logits, labels, k):
    return np.mean([labels[i] in np.argsort(-logits[i])[:k] for i in range(len(labels))])


# ---------------------------------------------------------------------------------------------
# modality gap, alignment, uniformity
# ---------------------------------------------------------------------------------------------
def test_gap_known_answers():
    x = _rand(0, 10, 6)
    x64 = x.astype(np.float64)
    e_gap, _ = tol.centroid_gap(x64, x64)  # derived fp32 bounds (tests/tolerances.py)
    tol.assert_fp32_close(float(M.modality_gap(x, x)), 0.0, e_gap, "gap(x, x)")
    tol.assert_fp32_close(float(M.modality_gap(x, 3.0 * x)), 0.0, e_gap, "gap(x, 3x)")  # scale-free: normalized
    e = np.zeros((5, 6), np.float32)
    e[:, 2] = 1.0
    e_gap, e_mse = tol.centroid_gap(e.astype(np.float64), -e.astype(np.float64))
    tol.assert_fp32_close(float(M.modality_gap(e, -e[:3])), 2.0, e_gap, "antipodal gap")
    tol.assert_fp32_close(float(M.modality_gap_mse(e, -e)), 4.0 / 6, e_mse, "antipodal gap mse")  # 2^2 in 1 of 6 dims
    assert float(M.modality_gap_mse(x, x)) == 0.0


def test_gap_vs_numpy():
    x, y = _rand(1, 20, 8) + 1.0, _rand(2, 13, 8) - 0.5
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    e_gap, e_mse = tol.centroid_gap(x64, y64)  # fp32 bounds derived from the sums involved
    tol.assert_fp32_close(float(M.modality_gap(x, y)), np_gap(x, y), e_gap, "gap")
    mu = _unit(x64).mean(0) - _unit(y64).mean(0)
    tol.assert_fp32_close(float(M.modality_gap_mse(x, y)), np.mean(mu**2), e_mse, "gap mse")
    raw = x64.mean(0) - y64.mean(0)
    tol.assert_fp32_close(float(M.modality_gap_mse(x, y, normalize=False)), np.mean(raw**2),
                          tol.centroid_gap(x64, y64, normalize=False)[1], "raw gap mse")


def test_alignment():
    x, y = _rand(3, 12, 5), _rand(4, 12, 5)
    u, v = _unit(x.astype(np.float64)), _unit(y.astype(np.float64))
    ref = np.mean(np.sum((u - v) ** 2, 1))
    # bound: the mean of the rows' squared-distance bounds plus the row sum's rounding (tests/tolerances.py)
    tol.assert_fp32_close(float(M.alignment(x, y)), ref, tol.pair_distances(u, v).mean() + tol.sum_error(12, ref),
                          "alignment")
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    raw = np.mean(np.sum((x64 - y64) ** 2, 1))
    tol.assert_fp32_close(float(M.alignment(x, y, normalize=False)), raw,
                          tol.pair_distances(x64, y64, False).mean() + tol.sum_error(12, raw), "raw alignment")
    # known answers within the same derived bound: the pairs' squared distances and the row mean's rounding
    tol.assert_fp32_close(float(M.alignment(x, 2 * x)), 0.0, tol.pair_distances(u, u).mean(), "alignment(x, 2x)")
    tol.assert_fp32_close(float(M.alignment(x, -x)), 4.0, tol.pair_distances(u, -u).mean() + tol.sum_error(12, 4.0),
                          "alignment(x, -x)")  # antipodal pairs: ||2x||^2 = 4


@pytest.mark.parametrize("n,chunk", [slow(2, 1024), slow(17, 4), (17, 5), slow(40, 1024), slow(40, 7)])
def test_uniformity_vs_numpy(n, chunk):
    x = _rand(5 + n, n, 6)
    tol.assert_fp32_close(float(M.uniformity(x, chunk_size=chunk)), np_uniformity(x),
                          tol.uniformity(x.astype(np.float64)), "uniformity")
    # the last chunk may hold no pair (e.g. n=17, chunk 4): gradient must stay finite
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda a: M.uniformity(a, chunk_size=chunk))(x))))


def test_uniformity_known_answers_and_all():
    # two antipodal points: one pair at squared distance 4 -> log exp(-8) = -8
    e = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    tol.assert_fp32_close(float(M.uniformity(e)), -8.0, tol.uniformity(e.astype(np.float64)), "uniformity")
    x, y = _rand(30, 9, 4), _rand(31, 7, 4)
    u = M.uniformity_all(x, y)
    tol.assert_fp32_close(float(u["image"]), np_uniformity(x), tol.uniformity(x.astype(np.float64)), "image")
    tol.assert_fp32_close(float(u["text"]), np_uniformity(y), tol.uniformity(y.astype(np.float64)), "text")
    joint = np.concatenate([_unit(x.astype(np.float64)), _unit(y.astype(np.float64))])
    tol.assert_fp32_close(float(u["joint"]), np_uniformity(joint), tol.uniformity(joint), "joint")


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------
def test_recall_hand_made():
    # 3 images on the axes; captions: image 0 has two (one good, one pointing at image 1),
    # image 1 has one pointing at image 2, image 2 has one good caption.
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.2, 1.0], [0.0, 0.1, 1.1]], np.float32)
    cap = np.array([0, 0, 1, 2], np.int32)
    r = M.recall_at_k(img, txt, cap, ks=(1, 2, 3))
    # t2i: caption0 -> image0 rank 1 (hit); caption1 -> image0 rank 2; caption2 -> image1 rank 2; caption3 -> image2 hit
    assert float(r["t2i_R@1"]) == pytest.approx(0.5) and float(r["t2i_R@2"]) == pytest.approx(1.0)
    # i2t: image0's best caption is caption0 (rank 1); image1's best caption (caption2) ranks 2nd
    # behind caption1 (0.99 > 0.2); image2: caption3 cos 0.99 vs caption2 0.98, hit.
    assert float(r["i2t_R@1"]) == pytest.approx(2 / 3) and float(r["i2t_R@2"]) == pytest.approx(1.0)
    assert float(r["i2t_R@3"]) == pytest.approx(1.0)


@pytest.mark.parametrize("chunk", [slow(1), 3, slow(8), slow(1024)])
def test_recall_vs_numpy_several_captions(chunk):
    n, per, d = 13, 5, 8
    rng = np.random.default_rng(6)
    img = rng.standard_normal((n, d)).astype(np.float32)
    cap = np.repeat(np.arange(n), per).astype(np.int32)
    cap = cap[cap != 4]  # image 4 has no caption: excluded from i2t
    txt = (img[cap] + 1.5 * rng.standard_normal((len(cap), d))).astype(np.float32)
    ks = (1, 5, 10)
    got = jax.jit(lambda a, b, c: M.recall_at_k(a, b, c, ks, chunk_size=chunk))(img, txt, cap)
    want = np_recall(img, txt, cap, ks)
    assert set(got) == set(want)
    for k in want:  # hits / n: an exact count, one fp32 division (half an ulp of a value <= 1)
        np.testing.assert_allclose(float(got[k]), want[k], rtol=0, atol=tol.U32, err_msg=k)
    assert 0.0 < want["t2i_R@1"] < 1.0 and 0.0 < want["i2t_R@1"] < 1.0  # a non-trivial case


# ---------------------------------------------------------------------------------------------
# zero-shot
# ---------------------------------------------------------------------------------------------
def test_zero_shot_logits_and_ensemble():
    img, cls = _rand(7, 6, 5), _rand(8, 4, 5)
    u, c = _unit(img.astype(np.float64)), _unit(cls.astype(np.float64))
    # cosines of fp32-normalized rows: each a D-term dot product of normalized vectors (tests/tolerances.py)
    np.testing.assert_allclose(M.zero_shot_logits(img, cls), u @ c.T, rtol=0, atol=tol.logit_error(u, c, 1.0, True))
    prompts = _rand(9, 4, 3, 5)  # (C, P, D)
    mean = _unit(prompts.astype(np.float64)).mean(1)
    ens = _unit(mean)
    # the ensemble's entries: P normalized prompts' entries, their P-term mean, renormalized: errors grow by
    # 1 / |mean|; each logit then moves by at most sqrt(D) x that per entry (|u| = 1), plus its own dot product
    e_ens = (2 * tol.unit_entry_error(5) + tol.sum_error(3, 1.0)) / np.linalg.norm(mean, axis=1).min()
    np.testing.assert_allclose(M.zero_shot_logits(img, prompts), u @ ens.T, rtol=0,
                               atol=tol.logit_error(u, ens, 1.0, True) + np.sqrt(5) * e_ens)


def test_zero_shot_accuracy():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.4], [0.3, 0.2, 0.1]], np.float32)
    labels = np.array([0, 1, 2, 2], np.int32)
    acc = M.zero_shot_accuracy(logits, labels, ks=(1, 2, 5))
    assert float(acc["top1"]) == pytest.approx(0.25)  # only row 0
    assert float(acc["top2"]) == pytest.approx(0.75)  # rows 0, 1 (0.3 2nd), 2 (0.4 2nd)
    assert float(acc["top5"]) == pytest.approx(1.0)  # k >= C
    big, lab = _rand(10, 50, 20), np.random.default_rng(0).integers(0, 20, 50).astype(np.int32)
    acc = jax.jit(M.zero_shot_accuracy)(big, lab)
    for k in (1, 5):  # hits / n: an exact count, one fp32 division (half an ulp of a value <= 1)
        np.testing.assert_allclose(float(acc[f"top{k}"]), np_topk(big, lab, k), rtol=0, atol=tol.U32)


# ---------------------------------------------------------------------------------------------
# jit / grad / dtypes / validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # a compile per metric; the vs-NumPy tests are the fast tier's
def test_every_metric_jits_and_differentiates():
    x, y = _rand(11, 8, 4), _rand(12, 8, 4)
    cap = np.arange(8, dtype=np.int32)
    scalars = {
        "modality_gap": lambda a: M.modality_gap(a, y),
        "modality_gap_mse": lambda a: M.modality_gap_mse(a, y),
        "alignment": lambda a: M.alignment(a, y),
        "uniformity": lambda a: M.uniformity(a, chunk_size=3),
        "uniformity_all": lambda a: M.uniformity_all(a, y, chunk_size=3)["joint"],
        "zero_shot_logits": lambda a: jnp.sum(M.zero_shot_logits(a, y[:3])),
    }
    for name, f in scalars.items():
        v, g = jax.jit(jax.value_and_grad(f))(x)
        assert v.dtype == jnp.float32 and np.isfinite(float(v)), name
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0), name
    for f in (lambda a: M.recall_at_k(a, y, cap, (1,)), lambda a: M.zero_shot_accuracy(a, cap)):
        out = jax.jit(f)(x)
        g = jax.grad(lambda a: sum(f(a).values()))(x)  # piecewise constant: zero, but defined
        assert all(v.dtype == jnp.float32 for v in out.values()) and np.all(np.asarray(g) == 0)


def test_bf16_inputs_give_fp32():
    x, y = (jnp.asarray(a, jnp.bfloat16) for a in (_rand(13, 6, 4), _rand(14, 6, 4)))
    for v in (M.modality_gap(x, y), M.alignment(x, y), M.uniformity(x), M.zero_shot_logits(x, y)):
        assert v.dtype == jnp.float32


@pytest.mark.parametrize("call,match", [
    (lambda x, y: M.modality_gap(x, y[:, :3]), "feature dim"),
    (lambda x, y: M.alignment(x, y[:3]), "same shape"),
    (lambda x, y: M.uniformity(x[:1]), "at least 2"),
    (lambda x, y: M.uniformity(x, chunk_size=0), "chunk_size"),
    (lambda x, y: M.recall_at_k(x, y, jnp.zeros(3, jnp.int32)), "caption_image_index"),
    (lambda x, y: M.recall_at_k(x, y, jnp.zeros(6, jnp.float32)), "integer"),
    (lambda x, y: M.recall_at_k(x, y, jnp.zeros(6, jnp.int32), ks=(0,)), "ks"),
    (lambda x, y: M.zero_shot_logits(x, y[:, :2]), "class_emb"),
    (lambda x, y: M.zero_shot_accuracy(x, jnp.zeros(2, jnp.int32)), "labels"),
    (lambda x, y: M.modality_gap(x[0], y), "2-D"),
])
def test_bad_input_raises_at_trace_time(call, match):
    x, y = jnp.asarray(_rand(15, 6, 4)), jnp.asarray(_rand(16, 6, 4))
    with pytest.raises(ValueError, match=match):
        jax.jit(call)(x, y)
