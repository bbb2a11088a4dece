"""The feature-statistics file RaFA's `precomputed` prior reads (an npz of float32 (D,) arrays and a JSON `meta`;
`jax_refine.feature_stats` computes and writes it): written whole, read back checked against the run."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FORMAT = 1
STAT_KEYS = ("mean", "std", "image_mean", "image_std", "text_mean", "text_std")
KEY = "config.method.prior_params.path"


class Stats(NamedTuple):
    """The pooled (D,) mean and std RaFA draws from, and the file's metadata (empty for a bare mean/std file)."""

    mean: np.ndarray
    std: np.ndarray
    meta: dict[str, Any]


def write_stats(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write the npz at `path` whole: to a temporary file beside it, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")  # .npz: np.savez would append it otherwise
    try:
        np.savez(tmp, meta=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _bad(path: Any, why: str) -> ValueError:
    return ValueError(f"{KEY}={path}: {why} (write it with `python -m jax_refine feature-stats`)")


def load_stats(path: str | os.PathLike, *, regime: str | None = None, feature_scale: Any = None) -> Stats:
    """The pooled mean/std of a stats file, checked: one-line ValueError naming the file when it is missing,
    not an npz, lacks `mean`/`std`, holds arrays that are not (D,), not finite, or a std that is not > 0, or
    (when the file says and `regime` is given) statistics of another feature regime or feature scale than
    the run's. A bare npz with only `mean` and `std` (the reference's format) is taken as it is."""
    if not Path(path).is_file():
        raise _bad(path, "no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            contents = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:  # not an npz, truncated, or pickled objects
        why = str(e).split(". ")[0].splitlines()[0] if str(e) else type(e).__name__
        raise _bad(path, f"not a readable npz file ({why})") from None
    missing = [k for k in ("mean", "std") if k not in contents]
    if missing:
        raise _bad(path, f"has no {' or '.join(missing)} array (keys: {sorted(contents)})")
    try:
        mean, std = (np.asarray(contents[k], np.float32) for k in ("mean", "std"))
    except (TypeError, ValueError):
        raise _bad(path, "mean/std are not numeric arrays") from None
    if mean.ndim != 1 or mean.shape != std.shape or not mean.size:
        raise _bad(path, f"mean {mean.shape} and std {std.shape} must both have shape (D,)")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise _bad(path, "mean must be finite and std finite and > 0 in every dimension")
    meta: dict[str, Any] = {}
    if "meta" in contents:
        try:
            meta = json.loads(str(contents["meta"]))
        except json.JSONDecodeError:
            raise _bad(path, "its meta is not JSON") from None
    if regime is not None and meta:
        _check_regime(path, meta, regime, feature_scale)
    return Stats(mean, std, meta)


def _check_regime(path: Any, meta: dict[str, Any], regime: str, feature_scale: Any) -> None:
    """The file's features must be what this run's RaFA compares (raw / unit / unit times the same scale)."""
    theirs = (meta.get("regime"), meta.get("feature_scale") if meta.get("regime") == "scaled" else None)
    ours = (regime, feature_scale if regime == "scaled" else None)
    if theirs != ours:
        raise _bad(path, f"holds statistics of {_regime_text(*theirs)} features but this run's RaFA compares "
                         f"{_regime_text(*ours)} features (config.method.feature_scale / normalize): recompute "
                         "it under this run's config")


def _regime_text(regime: Any, feature_scale: Any) -> str:
    return f"scaled (feature_scale={feature_scale!r})" if regime == "scaled" else str(regime)
