"""Training objectives: every method is ONE weighted sum of named loss terms, as the reference builds it.

The reference's updater (yshinya6/clip-refine, `updater/contrastive.py`) computes
``lambda_cont * contrastive + lambda_kd * distill + lambda_rand * RaFA`` with ``lambda_cont = 1`` unless a
method's config sets it; only CLIP-Refine (`clip-refine.yaml`) sets it to 0. Here::

    L = sum_t  w_t * L_t,   t in TERMS = (contrastive, sigmoid, kd, rafa, feature, logit, m2)

| term          | loss (jax_refine/losses.py)                                  | needs            |
|---------------|--------------------------------------------------------------|------------------|
| `contrastive` | `contrastive_loss(fi, ft, exp(logit_scale))`                 | the logit scale  |
| `sigmoid`     | `sigmoid_loss(fi, ft, exp(logit_scale), logit_bias)` (SigLIP's own; unit vectors always) | scale + bias |
| `kd`          | `hycd_loss(fi, ft, gi, gt, alpha, temperature)` (HyCD; Self-KD at alpha 0) | teacher |
| `rafa`        | `rafa_loss(fi, ft, z)`, z from `config.method.prior`         | reference z      |
| `feature`     | `feature_distill_loss(fi, ft, gi, gt)`                       | teacher          |
| `logit`       | `logit_distill_loss(fi, ft, gi, gt)`                         | teacher          |
| `m2`          | `m2_mix_loss(fi, ft, exp(logit_scale), key, beta)` (unit vectors always) | the logit scale |

`config.method.name` picks a preset (`PRESETS`): the default weights, `alpha` and `normalize` of that
method. Any `config.method.weights.<term>`, `config.method.alpha` or `config.method.normalize` left at
None takes the preset's value; a value set in the config or on the command line wins
(`--config.method.name=self_kd --config.method.weights.kd=2.0`). `resolve_method` gives the filled-in
section (the `config` command prints it). A term of weight 0 is not computed.

What trains: all parameters, except the logit scale, which is trainable iff a term that uses it
(`contrastive`, `sigmoid`, `m2`) has a nonzero weight, and the logit bias (SigLIP), trainable iff `sigmoid`
has (otherwise they get no gradient and no weight decay: `Objective.frozen`).

SigLIP: its own contrastive baseline is the `sigmoid` preset (SigLIP's pairwise sigmoid loss with the
model's logit scale and bias, as SigLIP was pre-trained); `configs/clip_refine.py` picks it for
`method=contrastive` on a SigLIP model. The `sigmoid` term needs a model with a logit bias (an error
otherwise). HyCD, RaFA and the distillation terms use the projected features only and apply unchanged.

Normalization: `normalize` (False by default) applies to every term but `sigmoid` and `m2`, which always
take unit vectors (SigLIP's loss is defined on them; slerp needs them). False is what the reference computes: its model returns unnormalized features
and its CLIP loss multiplies their dot products by a logit scale initialised at log 100. The m2-mix preset
sets True, so its contrastive term is CLIP's own loss on unit vectors, as in Oh et al. (NeurIPS 2023).

Batch coupling: `contrastive`, `kd`, `logit` and `m2` mix examples through the (B, B) logits, so with
gradient accumulation each micro-batch is an independent smaller batch (the result equals the big batch
only for the per-example terms `rafa` and `feature`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jax_refine import losses

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


def resolve_method(method_cfg: Any) -> ml_collections.ConfigDict:
    """`config.method` with the preset of `method_cfg.name` filling every None weight, alpha, normalize.

    Returns a new ConfigDict (the input is not changed); one-line errors for an unknown method, an
    unknown term, a negative weight or all weights zero.
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
    if c.get("normalize") is None:
        c.normalize = p.normalize
    return c


def total_loss(out: Outputs, method_cfg: Any) -> tuple[Array, dict[str, Array]]:
    """``sum_t w_t L_t`` over the terms of nonzero weight; returns (loss, {term: L_t}) in float32."""
    c = resolve_method(method_cfg)
    w, n = c.weights, bool(c.normalize)
    parts: dict[str, Array] = {}
    if w.contrastive:
        parts["contrastive"] = losses.contrastive_loss(out.fi, out.ft, jnp.exp(out.log_logit_scale), normalize=n)
    if w.sigmoid:
        if out.logit_bias is None:
            raise ValueError("config.method.weights.sigmoid > 0 needs a model with a logit bias (SigLIP); this model "
                             "has none: use the contrastive term")
        parts["sigmoid"] = losses.sigmoid_loss(out.fi, out.ft, jnp.exp(out.log_logit_scale), out.logit_bias,
                                               normalize=True)
    if w.kd:
        parts["kd"] = losses.hycd_loss(out.fi, out.ft, out.gi, out.gt, alpha=c.alpha, temperature=c.temperature,
                                       normalize=n)
    if w.rafa:
        parts["rafa"] = losses.rafa_loss(out.fi, out.ft, out.z, normalize=n)
    if w.feature:
        parts["feature"] = losses.feature_distill_loss(out.fi, out.ft, out.gi, out.gt, normalize=n)
    if w.logit:
        parts["logit"] = losses.logit_distill_loss(out.fi, out.ft, out.gi, out.gt, normalize=n)
    if w.m2:
        parts["m2"] = losses.m2_mix_loss(out.fi, out.ft, jnp.exp(out.log_logit_scale), out.key,
                                         beta=c.m2_beta, normalize=True)
    loss = sum(w[t] * v for t, v in parts.items())
    return jnp.asarray(loss, jnp.float32), parts


def get_objective(method: Any) -> Objective:
    """The objective for `config.method` (or a bare method name, which takes its preset's defaults)."""
    if isinstance(method, str):
        method = {"name": method}
    c = resolve_method(method)
    weights = {t: w for t, w in c.weights.items() if w}
    return Objective(total_loss, weights, any(t in weights for t in TEACHER_TERMS), "rafa" in weights,
                     any(t in weights for t in LOGIT_SCALE_TERMS), any(t in weights for t in LOGIT_BIAS_TERMS))


def reference(key: Array, shape: tuple[int, int], c: Any) -> Array:
    """RaFA reference z (B, D) from ``config.method.prior`` / ``prior_params``."""
    params = dict(c.get("prior_params") or {})
    return losses.sample_reference(key, shape, c.prior, **params)
