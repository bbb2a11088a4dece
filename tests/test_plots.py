"""Pictures: the PCA projection against an eigendecomposition of the covariance, the positive/negative
similarities against a plain loop, and the PNG files themselves (readable, one panel per model)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jax_refine import plots


def _pair_set(rng: np.random.Generator, n: int, d: int, shift: float, captions: int = 2) -> plots.Embeddings:
    base = rng.normal(size=(n, d))
    axis = np.eye(d)[0] * 3 * shift
    idx = np.repeat(np.arange(n), captions)
    return plots.Embeddings(base + axis + 0.3 * rng.normal(size=(n, d)),
                            base[idx] - axis + 0.3 * rng.normal(size=(n * captions, d)), idx)


def test_pca_matches_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * np.array([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    xy, mean, comps = plots.pca_2d(x)
    cov = np.cov(x, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    top = vecs[:, ::-1][:, :2].T  # the two largest-variance directions
    np.testing.assert_allclose(np.abs(np.sum(comps * top, axis=1)), 1.0, atol=1e-8)
    np.testing.assert_allclose(mean, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(xy.var(axis=0, ddof=1), vals[::-1][:2], rtol=1e-8)


def test_similarity_pairs_against_loop():
    rng = np.random.default_rng(1)
    e = _pair_set(rng, n=7, d=5, shift=0.5, captions=3)
    pos, neg = plots.similarity_pairs(e)  # 21 * 6 = 126 negatives: all of them
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    want_pos = [cos(e.text[j], e.image[e.caption_image_index[j]]) for j in range(len(e.text))]
    want_neg = [cos(e.text[j], e.image[i]) for j in range(len(e.text)) for i in range(len(e.image))
                if i != e.caption_image_index[j]]
    np.testing.assert_allclose(pos, want_pos, atol=1e-10)
    np.testing.assert_allclose(np.sort(neg), np.sort(want_neg), atol=1e-10)
    # Sampled negatives never include a text's own image.
    _, sampled = plots.similarity_pairs(e, max_negatives=50)
    assert len(sampled) == 50 and set(np.round(sampled, 10)) <= set(np.round(want_neg, 10))


def test_pngs_one_panel_per_model(tmp_path):
    rng = np.random.default_rng(2)
    two = {"pretrained": _pair_set(rng, 60, 16, 1.0), "refined": _pair_set(rng, 60, 16, 0.1)}
    paths = plots.make_plots(two, tmp_path, prefix="coco_")
    names = sorted(p.name for p in paths)
    assert names == ["coco_gap_pca.png", "coco_similarity_hist.png"]  # umap-learn is not installed
    one = plots.plot_projection({"pretrained": two["pretrained"]}, tmp_path / "one.png")
    w2, h2 = Image.open(tmp_path / "coco_gap_pca.png").size
    w1, _ = Image.open(one).size
    assert h2 > 200 and w2 > 1.6 * w1  # two panels side by side
    for p in paths:
        img = np.asarray(Image.open(p).convert("L"))
        assert img.std() > 10  # something is drawn


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="method"):
        plots.plot_projection({"a": _pair_set(np.random.default_rng(0), 5, 4, 1)}, tmp_path / "x.png", method="tsne")
    with pytest.raises(ValueError, match="no embeddings"):
        plots.plot_similarity_histogram({}, tmp_path / "x.png")
