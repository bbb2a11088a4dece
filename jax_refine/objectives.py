"""Training objectives: a method name from ``config.method`` -> a loss on the model outputs.

Each objective is ``fn(out: Outputs, cfg) -> (loss, parts)`` where ``out`` holds the student features
``fi, ft`` (B, D), the teacher features ``gi, gt`` (B, D, or None when the method has no teacher),
the RaFA reference ``z`` (B, D, or None), the model's log logit scale and a PRNG key. The losses
themselves live in ``jax_refine/losses.py``.

Normalization: `config.method.normalize` (default False) applies to every loss, the contrastive ones
included. False is what the reference implementation computes: its model returns unnormalized features and
its CLIP loss multiplies their dot products by a logit scale initialised at log 100. Set it True for CLIP's
own pre-training loss on unit vectors (the demo's pre-training stage does). m^2-mix always mixes unit
vectors (slerp needs them).

Batch coupling: HyCD, Self-KD, logit distillation and the contrastive losses mix examples through the
(B, B) logits, so with gradient accumulation each micro-batch is an independent smaller batch (the
result equals the big batch only for the per-example losses: RaFA and feature distillation).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jax_refine import losses

Array = jax.Array


class Outputs(NamedTuple):
    fi: Array  # student image features (B, D)
    ft: Array  # student text features (B, D)
    gi: Array | None  # teacher image features (B, D)
    gt: Array | None  # teacher text features (B, D)
    z: Array | None  # RaFA reference (B, D)
    log_logit_scale: Array  # model.logit_scale (log of the scale), ()
    key: Array  # PRNG key for stochastic losses (m2_mix)


class Objective(NamedTuple):
    fn: Callable[[Outputs, Any], tuple[Array, dict[str, Array]]]
    needs_teacher: bool
    needs_reference: bool
    uses_logit_scale: bool  # False: the logit scale gets no gradient and is frozen (as in torch, no decay)


def _clip_refine(o: Outputs, c: Any) -> tuple[Array, dict[str, Array]]:
    return losses.clip_refine_loss(o.fi, o.ft, o.gi, o.gt, o.z, alpha=c.alpha, temperature=c.temperature,
                                   rafa_weight=c.rafa_weight, normalize=c.normalize)


def _hycd(o: Outputs, c: Any) -> tuple[Array, dict[str, Array]]:
    loss = losses.hycd_loss(o.fi, o.ft, o.gi, o.gt, alpha=c.alpha, temperature=c.temperature,
                            normalize=c.normalize)
    return loss, {"hycd": loss}


def _rafa(o: Outputs, c: Any) -> tuple[Array, dict[str, Array]]:
    rafa = losses.rafa_loss(o.fi, o.ft, o.z, normalize=c.normalize)
    con = losses.contrastive_loss(o.fi, o.ft, jnp.exp(o.log_logit_scale), normalize=c.normalize)
    return c.contrastive_weight * con + c.rafa_weight * rafa, {"contrastive": con, "rafa": rafa}


def _contrastive(o: Outputs, c: Any) -> tuple[Array, dict[str, Array]]:
    loss = losses.contrastive_loss(o.fi, o.ft, jnp.exp(o.log_logit_scale), normalize=c.normalize)
    return loss, {"contrastive": loss}


def _self_kd(o: Outputs, c: Any) -> tuple[Array, dict[str, Array]]:
    loss = losses.self_kd_loss(o.fi, o.ft, o.gi, o.gt, temperature=c.temperature, normalize=c.normalize)
    return loss, {"self_kd": loss}


def _feature_distill(o: Outputs, c: Any) -> tuple[Array, dict[str, Array]]:
    loss = losses.feature_distill_loss(o.fi, o.ft, o.gi, o.gt, normalize=c.normalize)
    return loss, {"feature_distill": loss}


def _logit_distill(o: Outputs, c: Any) -> tuple[Array, dict[str, Array]]:
    loss = losses.logit_distill_loss(o.fi, o.ft, o.gi, o.gt, normalize=c.normalize)
    return loss, {"logit_distill": loss}


def _m2_mix(o: Outputs, c: Any) -> tuple[Array, dict[str, Array]]:
    scale = jnp.exp(o.log_logit_scale)
    con = losses.contrastive_loss(o.fi, o.ft, scale, normalize=c.normalize)
    mix = losses.m2_mix_loss(o.fi, o.ft, scale, o.key, beta=c.m2_mix_beta, normalize=True)
    return con + c.m2_mix_weight * mix, {"contrastive": con, "m2_mix": mix}


OBJECTIVES: Mapping[str, Objective] = {
    "clip_refine": Objective(_clip_refine, True, True, False),
    "hycd": Objective(_hycd, True, False, False),
    "rafa": Objective(_rafa, False, True, True),
    "contrastive": Objective(_contrastive, False, False, True),
    "self_kd": Objective(_self_kd, True, False, False),
    "feature_distill": Objective(_feature_distill, True, False, False),
    "logit_distill": Objective(_logit_distill, True, False, False),
    "m2_mix": Objective(_m2_mix, False, False, True),
}


def get_objective(name: str) -> Objective:
    """The objective for ``config.method.name``; one-line error for an unknown name."""
    if name not in OBJECTIVES:
        raise ValueError(f"config.method.name={name!r} is unknown; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def reference(key: Array, shape: tuple[int, int], c: Any) -> Array:
    """RaFA reference z (B, D) from ``config.method.prior`` / ``prior_params``."""
    params = dict(c.get("prior_params") or {})
    return losses.sample_reference(key, shape, c.prior, **params)
