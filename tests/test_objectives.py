"""Every method's WHOLE objective (the weighted sum of its terms, with its default weights) against an
independent float64 PyTorch transcription (tests/torch_reference_losses.py: METHOD_WEIGHTS, objective), at the
scales real CLIPs produce, plus which parameters each method trains and the config checks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tolerances as tol
import torch_reference_losses as ref
from conftest import slow
from train_helpers import set_dotted
from jax_refine import config_base as default  # the base config, `--config default`
from jax_refine import objectives

KEY = jax.random.key(11)
LAM = float(jax.random.beta(KEY, 0.5, 0.5))  # the m2 ratio the objective draws from KEY (m2_beta 0.5)
LOG_SCALE = float(np.log(100.0))  # CLIP's trained logit scale


def _method(method_name: str, **overrides):
    c = default.get_config().method
    c.name = method_name
    return set_dotted(c, overrides)


def _realistic(b: int = 16, d: int = 64, norm: float = 10.0, seed: int = 0) -> list[np.ndarray]:
    """Unnormalized student/teacher features shaped like a trained CLIP's: image and text in two separate
    directions (the modality gap), paired content, hard negatives (pair cosine ~0.45, negatives ~0.05 lower),
    norms ~`norm` (at 10: HyCD logits ~45, contrastive logits x100 ~4500); teacher near the student; z ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    u, v, k = unit(rng.standard_normal((3, d)))
    content = unit(k + 0.33 * unit(rng.standard_normal((b, d))))
    fi = unit(u + content + 0.3 * unit(rng.standard_normal((b, d))))
    ft = unit(v + content + 0.3 * unit(rng.standard_normal((b, d))))
    gi = unit(fi + 0.1 * unit(rng.standard_normal((b, d))))
    gt = unit(ft + 0.1 * unit(rng.standard_normal((b, d))))
    feats = [(norm * x * rng.uniform(0.9, 1.1, (b, 1))).astype(np.float32) for x in (fi, ft, gi, gt)]
    return [*feats, rng.standard_normal((b, d)).astype(np.float32)]


def _ours(c, fi, ft, gi, gt, z, dtype=jnp.float32):
    """(value, grad fi, grad ft, grad log scale) of `total_loss` on features of `dtype`, float64 in NumPy."""
    def loss(fi_, ft_, s):
        out = objectives.Outputs(fi_.astype(dtype), ft_.astype(dtype), jnp.asarray(gi, dtype),
                                 jnp.asarray(gt, dtype), jnp.asarray(z, np.asarray(fi).dtype), s, KEY)
        return objectives.total_loss(out, c)[0]
    v, g = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(jnp.asarray(fi), jnp.asarray(ft),
                                                         jnp.asarray(LOG_SCALE, np.asarray(fi).dtype))
    return float(v), *(np.asarray(x, np.float64) for x in g[:2]), float(g[2])


def _ours64(c, fi, ft, gi, gt, z):
    """`_ours` in float64 (x64 on): the exact reference that the fp32 run is bounded against."""
    with jax.enable_x64(True):
        return _ours(c, *(np.asarray(x, np.float64) for x in (fi, ft, gi, gt, z)), dtype=jnp.float64)


def _torch(name, fi, ft, gi, gt, z, **kw):
    t = [torch.tensor(np.asarray(x, np.float64), requires_grad=i in (0, 1)) for i, x in enumerate((fi, ft, gi, gt, z))]
    s = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    out = ref.objective(name, *t, s, LAM, **kw)
    out.backward()
    out = out.detach()
    g_s = 0.0 if s.grad is None else float(s.grad)
    return float(out), t[0].grad.numpy(), t[1].grad.numpy(), g_s


QUANTITIES = ("value", "grad fi", "grad ft", "grad log_scale")


def _close(name, feats, c=None, torch_kw=None, dtype=jnp.float32):
    """Our float64 equals the float64 torch transcription tightly (the formulas); our run on `dtype` features is
    within the bounds derived from the condition of each quantity (tests/tolerances.py) of our float64 (the
    rounding). `c`: the method config (default: `name`'s preset), `torch_kw` the same for the transcription."""
    c, torch_kw = c or _method(name), torch_kw or {}
    ours32, ours64, theirs = _ours(c, *feats, dtype=dtype), _ours64(c, *feats), _torch(name, *feats, **torch_kw)
    for what, a, b in zip(QUANTITIES, ours64, theirs):
        tol.assert_f64_close(a, b, f"{name} {what}")
    weights = {**ref.METHOD_WEIGHTS[name], **torch_kw.get("weights", {})}
    bounds = tol.objective(weights, *(np.asarray(x, np.float64) for x in feats), LOG_SCALE, LAM, ours64[0],
                           alpha=torch_kw.get("alpha", ref.METHOD_ALPHA.get(name, 0.5)),
                           normalize=torch_kw.get("normalize", ref.METHOD_NORMALIZE.get(name, False)))
    for i, (what, a, b, bound) in enumerate(zip(QUANTITIES, ours32, ours64, bounds)):
        if dtype == jnp.bfloat16 and i in (1, 2):  # the gradient w.r.t. bf16 features is rounded to bf16
            bound += tol.U_BF16 * np.linalg.norm(b)
        tol.assert_fp32_close(a, b, bound, f"{name} {what}")


METHODS = list(ref.METHOD_WEIGHTS)


# fast tier: norm 10 for CLIP-Refine (HyCD + RaFA), contrastive (the logit scale) and M2-Mix (normalized, a key)
@pytest.mark.parametrize("name", [n if n in ("clip_refine", "contrastive", "m2_mix") else slow(n) for n in METHODS])
@pytest.mark.parametrize("norm", [slow(1.0), 10.0, slow(14.0)])
def test_whole_objective_matches_torch_fp32(name, norm):
    """Default weights, alpha and normalization of each method; features of norm 1, 10 and 14 (HyCD logits ~45
    and ~90; contrastive logits x100: ~5e3-1e4 on unnormalized features, as the reference computes them)."""
    feats = _realistic(norm=norm, seed=int(norm))
    _close(name, feats)


@pytest.mark.parametrize("name", [n if n == "clip_refine" else slow(n) for n in METHODS])
def test_whole_objective_bf16_inputs(name):
    """bf16 features in: the value is computed in fp32 on the bf16-rounded values (the fp32 bounds); the
    gradient w.r.t. bf16 features is itself bf16 (8 significant bits: one bf16 rounding, 2^-8 of its norm, more)."""
    fi, ft, gi, gt, z = _realistic(norm=10.0, seed=3)
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (fi, ft, gi, gt)]
    _close(name, [*rounded, z], dtype=jnp.bfloat16)


@pytest.mark.parametrize("name, overrides, torch_kw", [
    ("clip_refine", {"weights.rafa": 0.3, "weights.contrastive": 0.5},
     dict(weights={"rafa": 0.3, "contrastive": 0.5})),
    slow("self_kd", {"weights.kd": 2.0, "alpha": 0.25}, dict(weights={"kd": 2.0}, alpha=0.25)),
    slow("contrastive", {"weights.feature": 0.7, "normalize": True}, dict(weights={"feature": 0.7}, normalize=True)),
    slow("m2_mix", {"weights.m2": 0.5, "weights.logit": 0.1}, dict(weights={"m2": 0.5, "logit": 0.1})),
])
def test_weights_from_config_override_the_preset(name, overrides, torch_kw):
    feats = _realistic(norm=3.0, seed=5)
    _close(name, feats, _method(name, **overrides), torch_kw)


@pytest.mark.parametrize("name", METHODS)
def test_what_each_method_trains_and_needs(name):
    w = ref.METHOD_WEIGHTS[name]
    o = objectives.get_objective(_method(name))
    assert dict(o.weights) == w
    assert o.uses_logit_scale == bool(w.get("contrastive") or w.get("m2"))
    assert o.needs_teacher == bool(w.get("kd") or w.get("feature") or w.get("logit"))
    assert o.needs_reference == bool(w.get("rafa"))


def test_contrastive_weight_makes_the_logit_scale_trainable():
    assert not objectives.get_objective(_method("clip_refine")).uses_logit_scale
    o = objectives.get_objective(_method("clip_refine", **{"weights.contrastive": 1.0}))
    assert o.uses_logit_scale and o.needs_teacher and o.needs_reference


def test_resolve_method_fills_presets_and_keeps_overrides():
    r = objectives.resolve_method(_method("self_kd"))
    assert r.alpha == 0.0 and r.normalize is False and r.weights.to_dict() == {
        "contrastive": 1.0, "sigmoid": 0.0, "kd": 1.0, "rafa": 0.0, "feature": 0.0, "logit": 0.0, "m2": 0.0}
    r = objectives.resolve_method(_method("self_kd", alpha=0.3, **{"weights.contrastive": 0.0}))
    assert r.alpha == 0.3 and r.weights.contrastive == 0.0 and r.weights.kd == 1.0


@pytest.mark.parametrize("overrides, message", [
    ({"name": "simclr"}, r"config.method.name='simclr' is unknown"),
    ({"weights.kd": -1.0}, r"config.method.weights.kd=-1.0 must be a finite number >= 0"),
    ({"weights.kd": 0.0, "weights.rafa": 0.0}, r"all 0 for method 'clip_refine'"),
])
def test_bad_method_config_is_one_line_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        objectives.resolve_method(_method("clip_refine", **overrides))


# SigLIP SO400M/14-384's trained logit scale (exp ~112) and bias (~-16.5): the sigmoid term at real values
SIGLIP_LOG_SCALE, SIGLIP_BIAS = float(np.log(112.0)), -16.5


@pytest.mark.parametrize("norm", [slow(1.0), 10.0])
@pytest.mark.parametrize("weights", [{"sigmoid": 1.0}, {"sigmoid": 0.5, "kd": 1.0, "rafa": 1.0}])
def test_sigmoid_term_matches_torch_float64_through_the_objective(norm, weights):
    """The `sigmoid` term (alone: the `sigmoid` preset; and next to HyCD + RaFA) through `total_loss`: value and
    gradients w.r.t. both features, the log scale and the bias: our float64 against the float64 transcription of
    the paper to 1e-11, our fp32 against our float64 within the derived bounds (tests/tolerances.py)."""
    fi, ft, gi, gt, z = feats = _realistic(norm=norm, seed=7)
    overrides = {f"weights.{t}": w for t, w in weights.items()}

    def ours(*arrays):
        fi_, ft_, gi_, gt_, z_ = (jnp.asarray(x) for x in arrays)
        dtype = fi_.dtype

        def loss(fi_, ft_, s, b):
            out = objectives.Outputs(fi_, ft_, gi_, gt_, z_, s, KEY, b)
            return objectives.total_loss(out, _method("sigmoid", **overrides))[0]

        v, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))(
            fi_, ft_, jnp.asarray(SIGLIP_LOG_SCALE, dtype), jnp.asarray(SIGLIP_BIAS, dtype))
        return [float(v), *(np.asarray(g, np.float64) for g in grads)]

    got = ours(*feats)
    with jax.enable_x64(True):
        got64 = ours(*(np.asarray(x, np.float64) for x in feats))
    t = [torch.tensor(np.asarray(x, np.float64), requires_grad=i in (0, 1)) for i, x in enumerate((fi, ft, gi, gt, z))]
    s = torch.tensor(SIGLIP_LOG_SCALE, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(SIGLIP_BIAS, dtype=torch.float64, requires_grad=True)
    want = weights["sigmoid"] * ref.sigmoid(t[0], t[1], torch.exp(s), b)
    rest = {k: w for k, w in weights.items() if k != "sigmoid"}
    if rest:
        want = want + ref.objective("clip_refine", *t, s, LAM, weights={"kd": 0.0, "rafa": 0.0, **rest})
    want.backward()
    names = (*QUANTITIES, "grad bias")
    for what, a, w in zip(names, got64, (float(want.detach()), t[0].grad, t[1].grad, s.grad, b.grad)):
        tol.assert_f64_close(a, np.asarray(w), what)
    bounds = tol.objective(weights, *(np.asarray(x, np.float64) for x in feats), SIGLIP_LOG_SCALE, LAM, got64[0],
                           bias=SIGLIP_BIAS)
    for what, a, w, bound in zip(names, got, got64, bounds):
        tol.assert_fp32_close(a, w, bound, f"sigmoid {weights} {what}")


def test_sigmoid_preset_trains_scale_and_bias_and_needs_a_bias():
    o = objectives.get_objective("sigmoid")
    assert dict(o.weights) == {"sigmoid": 1.0} and o.uses_logit_scale and o.uses_logit_bias and o.frozen == ()
    assert not o.needs_teacher and not o.needs_reference
    assert objectives.get_objective("clip_refine").frozen == ("^logit_scale$", "^logit_bias$")
    assert objectives.get_objective("contrastive").frozen == ("^logit_bias$",)
    fi, ft, gi, gt, z = (jnp.asarray(x) for x in _realistic(b=4, d=8))
    with pytest.raises(ValueError, match="needs a model with a logit bias"):  # a CLIP has none
        objectives.total_loss(objectives.Outputs(fi, ft, gi, gt, z, jnp.float32(1.0), KEY), _method("sigmoid"))
