"""Training objectives: every method is one weighted sum of named loss terms, as the reference builds it.

``L = sum_t w_t * L_t`` over ``TERMS`` (contrastive, sigmoid, kd, rafa, feature, logit, m2), each term one
function of `jax_refine.losses`. `config.method.name` picks a preset (``PRESETS``) of the weights, alpha and
normalize; a value set in the config wins and `resolve_method` fills in the rest. ``Objective.frozen`` says
which loss-side parameters (logit scale, logit bias) train. The term table, the presets and their sources in
the reference, normalization and the feature scale: docs/training.md, "Methods".
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_refine import losses, stats_file

Array = jax.Array

TERMS = ("contrastive", "sigmoid", "kd", "rafa", "feature", "logit", "m2")
TEACHER_TERMS = ("kd", "feature", "logit")
LOGIT_SCALE_TERMS = ("contrastive", "sigmoid", "m2")
LOGIT_BIAS_TERMS = ("sigmoid",)


class Preset(NamedTuple):
    """A method's defaults: nonzero term weights, HyCD alpha and feature normalization."""

    weights: Mapping[str, float]
    alpha: float = 0.5
    normalize: bool = False
    source: str = ""


# The m2-mix weight: Oh et al.'s script (changdaeoh/multimodal-mixup, scripts/m2mix.sh) sweeps
# {0.05, 0.01, 0.005, 0.001} with Beta(0.5, 0.5) and tau 0.01; 0.01 is the middle of that sweep.
M2_WEIGHT = 0.01

PRESETS: Mapping[str, Preset] = {
    "clip_refine": Preset({"kd": 1.0, "rafa": 1.0}, 0.5, False,
                          "clip-refine.yaml: lambda_cont 0, lambda_kd 1, lambda_rand 1, kd, alpha_blending 0.5"),
    "contrastive": Preset({"contrastive": 1.0}, 0.5, False, "contrastive.yaml: CLIPUpdater, lambda_cont 1"),
    "sigmoid": Preset({"sigmoid": 1.0}, 0.5, False,
                      "SigLIP's contrastive fine-tuning: its pairwise sigmoid loss (Zhai et al. 2023) on unit "
                      "vectors with the learned logit scale and bias"),
    "self_kd": Preset({"contrastive": 1.0, "kd": 1.0}, 0.0, False,
                      "CLIPUpdater, lambda_cont 1 (default), lambda_kd 1, kd, alpha_blending 0 (default)"),
    "feature_distill": Preset({"contrastive": 1.0, "feature": 1.0}, 0.5, False,
                              "CLIPUpdater, lambda_cont 1 (default), lambda_kd 1, distill_loss fd"),
    "logit_distill": Preset({"contrastive": 1.0, "logit": 1.0}, 0.5, False,
                            "CLIPUpdater, lambda_cont 1 (default), lambda_kd 1, distill_loss ld"),
    "hycd": Preset({"kd": 1.0}, 0.5, False, "ablation: CLIP-Refine without RaFA (no config in the reference)"),
    "rafa": Preset({"rafa": 1.0}, 0.5, False, "ablation: CLIP-Refine without HyCD (no config in the reference)"),
    "m2_mix": Preset({"contrastive": 1.0, "m2": M2_WEIGHT}, 0.5, True,
                     "Oh et al. NeurIPS 2023 (not in the reference): CLIP loss + m2 on unit vectors"),
}


class Outputs(NamedTuple):
    fi: Array  # student image features (B, D)
    ft: Array  # student text features (B, D)
    gi: Array | None  # teacher image features (B, D)
    gt: Array | None  # teacher text features (B, D)
    z: Array | None  # RaFA reference (B, D)
    log_logit_scale: Array  # model.logit_scale (log of the scale), ()
    key: Array  # PRNG key for stochastic losses (m2)
    logit_bias: Array | None = None  # model.logit_bias (SigLIP), (); None for CLIP
    teacher_log_logit_scale: Array | None = None  # the teacher's logit_scale (log), (); feature_scale="teacher"


class Objective(NamedTuple):
    fn: Callable[[Outputs, Any], tuple[Array, dict[str, Array]]]  # (out, method cfg) -> (loss, {term: L_t})
    weights: Mapping[str, float]  # the nonzero weights
    needs_teacher: bool
    needs_reference: bool
    uses_logit_scale: bool  # False: the logit scale gets no gradient and is frozen (no weight decay)
    uses_logit_bias: bool = False  # False: the logit bias (SigLIP) is frozen the same way

    @property
    def frozen(self) -> tuple[str, ...]:
        """Regexes (re.search on parameter paths) of the parameters this objective does not train."""
        return (() if self.uses_logit_scale else ("^logit_scale$",)) + (
            () if self.uses_logit_bias else ("^logit_bias$",))


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"config.method.name={name!r} is unknown; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


FEATURE_SCALE_TEACHER = "teacher"


def feature_scale_setting(value: Any) -> float | str | None:
    """`config.method.feature_scale` checked: None, a finite float > 0 or "teacher" (a number typed as text, as
    an override of a field a config file set to "teacher" arrives, is read as the number); one-line error naming
    the key and value otherwise."""
    if value is None or value == FEATURE_SCALE_TEACHER:
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number) and number > 0:
        return float(number)
    raise ValueError(f"config.method.feature_scale={value!r} is invalid: must be None, a finite number > 0 "
                     f"or {FEATURE_SCALE_TEACHER!r}")


def feature_regime(c: Any) -> str:
    """What the feature terms (and RaFA) compare, for a resolved `config.method`: "raw" features, "unit"
    vectors, or "scaled" (unit times `feature_scale`)."""
    if c.get("feature_scale") is not None:
        return "scaled"
    return "unit" if c.get("normalize") else "raw"


def feature_scale(c: Any, teacher_log_logit_scale: Array | None = None) -> Array | None:
    """The scale c (float32, ()) of `config.method.feature_scale`, or None when it is not set.

    "teacher": c = sqrt(exp(teacher_log_logit_scale)) = exp(log_scale / 2), no gradient.
    """
    value = feature_scale_setting(c.get("feature_scale"))
    if value is None:
        return None
    if value != FEATURE_SCALE_TEACHER:
        return jnp.float32(value)
    if teacher_log_logit_scale is None:
        raise ValueError("config.method.feature_scale='teacher' needs the teacher's logit scale "
                         "(objectives.Outputs.teacher_log_logit_scale), got None")
    log_scale = jnp.asarray(teacher_log_logit_scale, jnp.float32).reshape(())
    return jnp.exp(0.5 * jax.lax.stop_gradient(log_scale))


def resolve_method(method_cfg: Any) -> ml_collections.ConfigDict:
    """`config.method` with the preset of `method_cfg.name` filling every None weight, alpha, normalize.

    Returns a new ConfigDict (the input is not changed); one-line errors for an unknown method, an
    unknown term, a negative weight or all weights zero, a bad feature scale (or one with normalize=False)
    and bad RaFA prior parameters (`check_prior`; the stats file itself is read by `prior_params`).
    """
    c = ml_collections.ConfigDict(method_cfg.to_dict() if hasattr(method_cfg, "to_dict") else dict(method_cfg))
    p = _preset(c.name)
    given = dict(c.get("weights") or {})
    unknown = sorted(set(given) - set(TERMS))
    if unknown:
        raise ValueError(f"config.method.weights has unknown term(s) {unknown}; terms are {', '.join(TERMS)}")
    weights = {}
    for t in TERMS:
        w = given.get(t)
        w = float(p.weights.get(t, 0.0) if w is None else w)
        if not (math.isfinite(w) and w >= 0.0):  # inf >= 0 holds: an infinite weight is no weight
            raise ValueError(f"config.method.weights.{t}={w!r} must be a finite number >= 0")
        weights[t] = w
    if not any(weights.values()):
        raise ValueError(f"config.method.weights are all 0 for method {c.name!r}: nothing to train")
    c.weights = ml_collections.ConfigDict(weights)
    if c.get("alpha") is None:
        c.alpha = p.alpha
    scale = feature_scale_setting(c.get("feature_scale"))
    if scale is not None and c.get("normalize") is False:
        raise ValueError(f"config.method.feature_scale={scale!r} takes unit vectors times the scale, but "
                         "config.method.normalize=False is set: leave normalize unset (None) or True")
    if c.get("normalize") is None:
        c.normalize = True if scale is not None else p.normalize
    check_prior(c)
    return c


def total_loss(out: Outputs, method_cfg: Any) -> tuple[Array, dict[str, Array]]:
    """``sum_t w_t L_t`` over the terms of nonzero weight; returns (loss, {term: L_t}) in float32 (float64 with
    float64 features under `jax.enable_x64`)."""
    c = resolve_method(method_cfg)
    w, n = c.weights, bool(c.normalize)
    fi, ft, gi, gt = out.fi, out.ft, out.gi, out.gt
    scale = feature_scale(c, out.teacher_log_logit_scale)
    if scale is not None:  # unit vectors times c, once for every feature term (student and teacher alike)
        fi, ft = losses.scale_features(fi, scale), losses.scale_features(ft, scale)
        if gi is not None:
            gi, gt = losses.scale_features(gi, scale), losses.scale_features(gt, scale)
        n = False  # already normalized (and scaled)
    parts: dict[str, Array] = {}
    if w.contrastive:
        parts["contrastive"] = losses.contrastive_loss(fi, ft, jnp.exp(out.log_logit_scale), normalize=n)
    if w.sigmoid:
        if out.logit_bias is None:
            raise ValueError("config.method.weights.sigmoid > 0 needs a model with a logit bias (SigLIP); this model "
                             "has none: use the contrastive term")
        parts["sigmoid"] = losses.sigmoid_loss(out.fi, out.ft, jnp.exp(out.log_logit_scale), out.logit_bias,
                                               normalize=True)
    if w.kd:
        parts["kd"] = losses.hycd_loss(fi, ft, gi, gt, alpha=c.alpha, temperature=c.temperature, normalize=n)
    if w.rafa:  # z is never scaled: the reference compares its norm-~10 features with N(0, I) draws
        parts["rafa"] = losses.rafa_loss(fi, ft, out.z, normalize=n)
    if w.feature:
        parts["feature"] = losses.feature_distill_loss(fi, ft, gi, gt, normalize=n)
    if w.logit:
        parts["logit"] = losses.logit_distill_loss(fi, ft, gi, gt, normalize=n)
    if w.m2:
        parts["m2"] = losses.m2_mix_loss(out.fi, out.ft, jnp.exp(out.log_logit_scale), out.key,
                                         beta=c.m2_beta, normalize=True)
    loss = sum(w[t] * v for t, v in parts.items())
    return jnp.asarray(loss, losses.compute_dtype(loss)), parts


def get_objective(method: Any) -> Objective:
    """The objective for `config.method` (or a bare method name, which takes its preset's defaults)."""
    if isinstance(method, str):
        method = {"name": method}
    c = resolve_method(method)
    weights = {t: w for t, w in c.weights.items() if w}
    if "rafa" in weights:
        prior_params(c)  # a missing or malformed stats file fails here, before any model is built
    # feature_scale="teacher" reads the start model's logit scale: the frozen teacher copy holds it
    needs_teacher = any(t in weights for t in TEACHER_TERMS) or c.get("feature_scale") == FEATURE_SCALE_TEACHER
    return Objective(total_loss, weights, needs_teacher, "rafa" in weights,
                     any(t in weights for t in LOGIT_SCALE_TERMS), any(t in weights for t in LOGIT_BIAS_TERMS))


def reference(key: Array, shape: tuple[int, int], c: Any) -> Array:
    """RaFA reference z (B, D) from ``config.method.prior`` / ``prior_params`` (see `prior_params`)."""
    return losses.sample_reference(key, shape, c.prior, **prior_params(c, int(shape[-1])))


# ------------------------------------------------------------------------------------- RaFA prior
# The keys of `config.method.prior_params` each prior reads; the others are left alone (the defaults hold
# normal's mean 0 / std 1 whatever the prior). "path": a `feature-stats` file (jax_refine/feature_stats.py).
PRIOR_KEYS = {"normal": ("mean", "std"), "uniform": ("low", "high"), "precomputed": ("path", "mean", "std"),
              "fixed": ("mean",)}
ALL_PRIOR_KEYS = ("mean", "std", "low", "high", "path")


def _finite(key: str, value: Any, *, positive: bool = False) -> np.ndarray:
    """`value` as a float64 array; ValueError naming `config.method.prior_params.<key>` unless every entry is
    finite (and > 0 with `positive`)."""
    try:
        a = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"config.method.prior_params.{key}={value!r} is not a number or an array of numbers") from None
    bad = ~np.isfinite(a) | ((a <= 0) if positive else False)
    if a.ndim > 1 or bad.any():
        what = "finite and > 0" if positive else "finite"
        shown = value if a.size <= 8 else f"array of shape {a.shape} ({int(bad.sum())} entries not {what})"
        raise ValueError(f"config.method.prior_params.{key}={shown!r} is invalid: must be {what}"
                         + (" (a number or a (D,) array)" if a.ndim > 1 else ""))
    return a


def check_prior(c: Any) -> None:
    """`config.method.prior` and its `prior_params`: one-line errors naming the key for an unknown prior or
    parameter, a std that is not finite and > 0, a mean / low / high that is not finite, low >= high, or a
    `path` for a prior other than precomputed. The stats file is read by `prior_params`."""
    prior = c.get("prior", "normal")
    if prior not in PRIOR_KEYS:
        raise ValueError(f"config.method.prior: unknown prior {prior!r}; expected one of {', '.join(PRIOR_KEYS)}")
    params = {k: v for k, v in dict(c.get("prior_params") or {}).items() if v is not None}
    unknown = sorted(set(params) - set(ALL_PRIOR_KEYS))
    if unknown:
        raise ValueError(f"config.method.prior_params has unknown key(s) {unknown}; prior {prior!r} reads "
                         f"{', '.join(PRIOR_KEYS[prior])}")
    if "path" in params and prior != "precomputed":
        raise ValueError(f"config.method.prior_params.path={params['path']!r} is read only by prior=precomputed, "
                         f"but config.method.prior={prior!r}")
    for key in set(PRIOR_KEYS[prior]) & set(params) - {"path"}:
        _finite(key, params[key], positive=key == "std")
    if prior == "uniform":
        low, high = float(params.get("low", 0.0)), float(params.get("high", 1.0))
        if not low < high:
            raise ValueError(f"config.method.prior_params: uniform needs low < high, got low={low!r}, high={high!r}")


def prior_params(c: Any, dim: int | None = None) -> dict[str, Any]:
    """The keyword arguments of `losses.sample_reference` for `config.method.prior` (checked by `check_prior`).

    precomputed: `path` (a `feature-stats` file: its pooled per-dimension mean and std, which must describe
    the features this run's RaFA compares, `feature_regime`) or `mean` / `std` arrays of shape (D,) (the
    normal prior's scalar defaults are not used for it). `dim`: the model's D; a mean or std of another
    length is a one-line error naming the key or file.
    """
    check_prior(c)
    prior = c.get("prior", "normal")
    given = {k: v for k, v in dict(c.get("prior_params") or {}).items() if v is not None}
    params = {k: given[k] for k in PRIOR_KEYS[prior] if k in given}
    where = {"mean": "config.method.prior_params.mean", "std": "config.method.prior_params.std"}
    if prior == "precomputed":
        arrays = {k: np.asarray(params[k]) for k in ("mean", "std") if k in params and np.ndim(params[k]) == 1}
        if "path" in params:
            if arrays:
                raise ValueError(f"config.method.prior_params: give either path={params['path']!r} or mean/std "
                                 "arrays, not both")
            stats = stats_file.load_stats(params["path"], regime=feature_regime(c),
                                          feature_scale=feature_scale_setting(c.get("feature_scale")))
            params = {"mean": stats.mean, "std": stats.std}
            where = dict.fromkeys(where, f"config.method.prior_params.path={given['path']}")
        elif len(arrays) != 2:
            raise ValueError("config.method.prior=precomputed needs config.method.prior_params.path=FILE (written "
                             "by `python -m jax_refine feature-stats`) or mean and std arrays of shape (D,)")
        else:
            params = arrays
    if dim is not None:
        for k in ("mean", "std"):
            if k in params and np.ndim(params[k]) == 1 and np.shape(params[k])[0] != dim:
                raise ValueError(f"{where[k]}: {k} has length {np.shape(params[k])[0]} but the model's features "
                                 f"have D={dim}")
    return params

