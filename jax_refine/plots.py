"""Pictures of the modality gap (matplotlib, PNG): the paper's Figure 1 style projection and the
histogram of image-text cosine similarities, one panel per model, side by side on the same scale.

Inputs are per-model `Embeddings`: image `(N, D)`, text `(M, D)` features (any scale; normalized
here) and `caption_image_index (M,)` (the image each text belongs to). Uses the object-oriented
matplotlib API (`Figure` + Agg canvas), so it never touches pyplot's global state or a display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jax_refine import metrics

IMAGE_COLOR, TEXT_COLOR = "#1f77b4", "#d62728"


class Embeddings(NamedTuple):
    """One model's embeddings of one paired set: image (N, D), text (M, D), caption_image_index (M,)."""

    image: np.ndarray
    text: np.ndarray
    caption_image_index: np.ndarray


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of rows `x (N, D)` by SVD: returns `(projected (N, 2), mean (D,), components (2, D))`."""
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = vt[:2]
    # Fix the sign of each component (SVD's is arbitrary) so re-runs give the same picture.
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    return (x - mean) @ components.T, mean, components


def _umap_2d(x: np.ndarray, seed: int = 0) -> np.ndarray | None:
    """UMAP of `x (N, D)` to 2-D if `umap-learn` is importable, else None."""
    try:
        import umap  # type: ignore[import-not-found]  # optional (umap-learn is not a requirement)
    except ImportError:
        return None
    return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)


def _subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=limit, replace=False)) if n > limit else np.arange(n)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_projection(embeddings: Mapping[str, Embeddings], path: str | Path, *, method: str = "pca",
                    max_points: int = 1500, seed: int = 0) -> Path | None:
    """2-D projection of normalized image and text embeddings, one panel per model, shared axes.

    Each panel: points colored by modality, the two centroids (stars) joined by a line, and the
    gap (distance of the centroids in the full D-dim space) in the title. `method`: "pca" or
    "umap" (returns None when umap-learn is not installed). Writes `path`, returns it.
    """
    if method not in ("pca", "umap"):
        raise ValueError(f"plot_projection: method must be 'pca' or 'umap', got {method!r}")
    if not embeddings:
        raise ValueError("plot_projection: no embeddings to plot")
    rng = np.random.default_rng(seed)
    panels = []
    for name, emb in embeddings.items():
        img, txt = _normalize(emb.image), _normalize(emb.text)
        img, txt = img[_subsample(len(img), max_points, rng)], txt[_subsample(len(txt), max_points, rng)]
        mu_i, mu_t = img.mean(0), txt.mean(0)
        both = np.concatenate([img, txt])
        if method == "pca":
            xy, mean, comps = pca_2d(both)
            centroids = (np.stack([mu_i, mu_t]) - mean) @ comps.T
        else:
            xy = _umap_2d(np.concatenate([both, np.stack([mu_i, mu_t])]), seed)
            if xy is None:
                return None
            xy, centroids = xy[:-2], xy[-2:]
        gap = float(metrics.modality_gap(np.asarray(emb.image, np.float32), np.asarray(emb.text, np.float32)))
        panels.append((name, xy[: len(img)], xy[len(img):], centroids, gap))

    allxy = np.concatenate([np.concatenate([p[1], p[2], p[3]]) for p in panels])
    lo, hi = allxy.min(0), allxy.max(0)
    pad = 0.05 * (hi - lo + 1e-9)
    fig = Figure(figsize=(4.6 * len(panels), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, pi, pt, c, gap) in zip(axes, panels):
        ax.scatter(pi[:, 0], pi[:, 1], s=7, alpha=0.45, c=IMAGE_COLOR, label="image", linewidths=0)
        ax.scatter(pt[:, 0], pt[:, 1], s=7, alpha=0.45, c=TEXT_COLOR, label="text", linewidths=0)
        ax.plot(c[:, 0], c[:, 1], "k--", lw=1.5)
        ax.scatter(c[:1, 0], c[:1, 1], marker="*", s=260, c=IMAGE_COLOR, edgecolors="k", zorder=5,
                   label="image centroid")
        ax.scatter(c[1:, 0], c[1:, 1], marker="*", s=260, c=TEXT_COLOR, edgecolors="k", zorder=5,
                   label="text centroid")
        ax.set_title(f"{name}\ngap = {gap:.3f}", fontsize=10)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xlabel(f"{method.upper()} 1")
        ax.set_ylabel(f"{method.upper()} 2")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8, markerscale=1.0)
    fig.suptitle(f"Image and text embeddings ({method.upper()} of the L2-normalized features)", fontsize=11)
    return _save(fig, path)


def similarity_pairs(emb: Embeddings, *, max_negatives: int = 200_000, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities of positive (text, its image) and negative (text, another image) pairs.

    Returns `(positive (M,), negative (K,))`: all `M * (N - 1)` negatives when that is at most
    `max_negatives`, else a uniform random sample of `max_negatives` of them.
    """
    img, txt = _normalize(emb.image), _normalize(emb.text)
    idx = np.asarray(emb.caption_image_index)
    positive = np.einsum("md,md->m", txt, img[idx])
    rng = np.random.default_rng(seed)
    m, n = len(txt), len(img)
    if n < 2:
        return positive, np.zeros((0,))
    if m * (n - 1) <= max_negatives:  # every negative pair
        rows, cols = np.repeat(np.arange(m), n - 1), np.tile(np.arange(n - 1), m)
    else:
        rows = rng.integers(0, m, size=max_negatives)
        cols = rng.integers(0, n - 1, size=max_negatives)
    cols = cols + (cols >= idx[rows])  # skip each text's own image
    negative = np.einsum("kd,kd->k", txt[rows], img[cols])
    return positive, negative


def plot_similarity_histogram(embeddings: Mapping[str, Embeddings], path: str | Path, *, bins: int = 50,
                              seed: int = 0) -> Path:
    """Histograms of image-text cosine similarity, positive vs negative pairs, one panel per model.

    All panels share the bins and the x range. Writes `path`, returns it.
    """
    if not embeddings:
        raise ValueError("plot_similarity_histogram: no embeddings to plot")
    sims = {name: similarity_pairs(e, seed=seed) for name, e in embeddings.items()}
    allv = np.concatenate([np.concatenate(s) for s in sims.values()])
    edges = np.linspace(allv.min(), allv.max(), bins + 1)
    fig = Figure(figsize=(4.6 * len(sims), 3.6), layout="constrained")
    axes = fig.subplots(1, len(sims), squeeze=False, sharex=True)[0]
    for ax, (name, (pos, neg)) in zip(axes, sims.items()):
        ax.hist(neg, bins=edges, density=True, alpha=0.55, color="0.5", label=f"negative (n={len(neg)})")
        ax.hist(pos, bins=edges, density=True, alpha=0.65, color="#2ca02c", label=f"positive (n={len(pos)})")
        ax.axvline(pos.mean(), color="#2ca02c", ls="--", lw=1)
        ax.axvline(neg.mean(), color="0.3", ls="--", lw=1)
        ax.set_title(f"{name}\nmean pos {pos.mean():.3f}, neg {neg.mean():.3f}", fontsize=10)
        ax.set_xlabel("cosine similarity (image, text)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def make_plots(embeddings: Mapping[str, Embeddings], out_dir: str | Path, *, prefix: str = "",
               methods: Sequence[str] = ("pca", "umap")) -> list[Path]:
    """All pictures for one paired set into `out_dir`: `{prefix}gap_{method}.png` per available
    projection method and `{prefix}similarity_hist.png`. Returns the written paths."""
    out = Path(out_dir)
    written = [plot_projection(embeddings, out / f"{prefix}gap_{m}.png", method=m) for m in methods]
    written.append(plot_similarity_histogram(embeddings, out / f"{prefix}similarity_hist.png"))
    return [p for p in written if p is not None]
