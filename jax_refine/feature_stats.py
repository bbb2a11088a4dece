"""Per-dimension feature statistics of the start model on a caption set: the file RaFA's `precomputed` prior reads.

The reference (yshinya6/clip-refine, `updater/contrastive.py`, `RandRegUpdater` with strategy
`precomputed_sample`) loads `np.load(precomputed_stats)` and draws each step z ~ N(mean, diag(std^2)) from its
`"mean"` and `"std"` arrays (D,); ONE z serves the image and the text features (`share_random_feat=True`). It
ships no code that writes the file. `python -m jax_refine feature-stats` writes it here:

    python -m jax_refine feature-stats --config CONFIG [--config.KEY=VALUE ...] --out stats.npz [--data SPEC]
    python -m jax_refine train --config CONFIG ... --config.method.prior=precomputed \
        --config.method.prior_params.path=stats.npz

The model is the run's start model (`config.model`: the teacher), the captions are the run's training data
(`config.data`) or `--data` (a retrieval spec: `coco_json:<json>:<images>`, `flickr:...`, `karpathy:...`,
`tfds_dir:...`), every image and every caption of it. The features are taken in the regime the run's RaFA
compares (`objectives.feature_regime`): raw, unit vectors, or unit vectors times `config.method.feature_scale`.

The npz (written whole or not at all: a temporary file, then a rename) holds float32 (D,) arrays
`image_mean`, `image_std`, `text_mean`, `text_std` (population std, ddof 0) and `mean`, `std`: the POOLED
statistics, those of the equal mixture of the image and the text features (a training batch holds B images
and B captions and RaFA pulls both toward the same z), which RaFA reads (the reference's key names, so the
file also works there); and `meta`, a JSON string: model, regime, feature_scale, scale, data, images,
captions, dim, format.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from jax_refine.stats_file import FORMAT, write_stats


# ------------------------------------------------------------------------------------------ the numbers
def regime_features(features: np.ndarray, regime: str, scale: float | None = None) -> np.ndarray:
    """(N, D) features as RaFA compares them, float64: "raw" as they are, "unit" L2-normalized, "scaled"
    L2-normalized times `scale`."""
    x = np.asarray(features, np.float64)
    if regime == "raw":
        return x
    unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    if regime == "unit":
        return unit
    if regime == "scaled" and scale is not None:
        return float(scale) * unit
    raise ValueError(f"feature regime {regime!r} (scale {scale!r}) is not raw, unit or scaled with a scale")


def pooled_stats(image: np.ndarray, text: np.ndarray) -> dict[str, np.ndarray]:
    """Per-dimension mean and std (ddof 0) of image (N, D) and text (T, D) features and of their equal mixture:
    mean = (m_i + m_t) / 2, var = (v_i + v_t) / 2 + ((m_i - m_t) / 2)^2. float32 (D,) arrays (`stats_file.STAT_KEYS`)."""
    m_i, m_t = image.mean(0), text.mean(0)
    v_i, v_t = image.var(0), text.var(0)
    pooled_var = 0.5 * (v_i + v_t) + 0.25 * np.square(m_i - m_t)
    out = {"mean": 0.5 * (m_i + m_t), "std": np.sqrt(pooled_var), "image_mean": m_i, "image_std": np.sqrt(v_i),
           "text_mean": m_t, "text_std": np.sqrt(v_t)}
    return {k: v.astype(np.float32) for k, v in out.items()}


# ------------------------------------------------------------------------------------------ the command
def caption_set(config: Any, data_spec: str | None, prep: Any, batch_size: int, max_examples: int | None
                ) -> tuple[Any, str]:
    """The caption set to embed and its name: `data_spec` (a retrieval spec) or the run's `config.data`."""
    from jax_refine.data import retrieval, sources

    kw = dict(batch_size=batch_size, prep=prep, max_examples=max_examples)
    if data_spec:
        return retrieval.load_retrieval(data_spec, **kw), data_spec
    d = config.data
    source = d.get("source", "tfds")
    if source == "coco_json":  # the run's split of the file (train_fraction, split_seed), as training reads it
        listed = sources.coco_json_split(d.annotations, d.images, d.get("split", "train"),
                                         train_fraction=float(d.get("train_fraction", 1.0)),
                                         split_seed=int(d.get("split_seed", 42)))
        return retrieval.load_caption_list(listed, **kw), f"coco_json:{d.annotations}:{d.images}[{listed.name}]"
    if source == "tfds":
        spec = f"tfds:{d.name}:{d.get('split', 'train')}"
        return retrieval.load_retrieval(spec, data_dir=d.get("data_dir"), **kw), spec
    if source == "tfds_dir":
        spec = f"tfds_dir:{d.data_dir}:{d.get('split', 'train')}"
        return retrieval.load_retrieval(spec, **kw), spec
    raise ValueError(f"config.data.source={source!r} is unknown: use coco_json, tfds or tfds_dir (or --data SPEC)")


def compute_feature_stats(config: Any, out: str | os.PathLike, *, data_spec: str | None = None,
                          max_examples: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Embed the caption set with the start model of `config` and write the stats npz at `out`; returns its meta.

    The model is built exactly as the trainer builds its start weights (`train.setup_model`: the checkpoint,
    or the random init of `config.seed`), the features taken in the run's regime (`objectives.feature_regime`;
    "teacher" scale: sqrt(exp(the model's logit_scale))).
    """
    from flax import nnx

    from jax_refine import embeddings, objectives, train
    from jax_refine import sharding as shd

    method = objectives.resolve_method(config.method)  # the preset's normalize; the prior file is not read
    regime = objectives.feature_regime(method)
    setup = train.setup_model(config, shd.make_mesh(config.mesh.shape))
    params = setup.load()
    model = nnx.merge(setup.graphdef, params, setup.rest)
    scale = None
    if regime == "scaled":
        log_scale = np.asarray(params["logit_scale"], np.float64).reshape(())
        given = objectives.feature_scale_setting(method.feature_scale)
        scale = math.exp(0.5 * float(log_scale)) if given == objectives.FEATURE_SCALE_TEACHER else float(given)
    prep = train.model_preprocessing(config)
    batch_size = int(config.eval.get("batch_size", 256))
    captions, data_name = caption_set(config, data_spec, prep, batch_size, max_examples)
    image, _ = embeddings.extract(model, captions.image_batches(), "image", batch_size=batch_size,
                                  total=captions.num_images, desc="feature-stats images", progress=progress)
    tokens = {k: captions.texts[k] for k in ("input_ids", "attention_mask")}
    text, _ = embeddings.extract(model, embeddings.iterate_arrays(tokens, batch_size), "text", batch_size=batch_size,
                                 total=len(tokens["input_ids"]), desc="feature-stats captions", progress=progress)
    arrays = pooled_stats(regime_features(image, regime, scale), regime_features(text, regime, scale))
    model_name = ("random_init (seed %d)" % int(config.seed) if config.model.get("random_init") is not None
                  else str(config.model.name_or_path))
    meta = {"format": FORMAT, "model": model_name, "regime": regime,
            "feature_scale": objectives.feature_scale_setting(method.get("feature_scale")),
            "scale": scale, "data": data_name, "images": int(len(image)), "captions": int(len(text)),
            "dim": int(image.shape[1]), "pooled": "equal mixture of the image and the text features (RaFA reads "
            "mean/std)", "std": "population (ddof 0)"}
    write_stats(out, arrays, meta)
    return meta
