"""`config.method.feature_scale`: every feature term on c * unit(f) (student and teacher), against an independent
float64 NumPy transcription of the losses; "teacher" = sqrt(exp(teacher logit_scale)); the identities of
design.md ("The scale regime"); gradients against a float64 PyTorch transcription; the train step on 1 and 8
devices; the config checks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference_losses as ref
from conftest import slow
from train_helpers import set_dotted, synthetic_batch, tiny_config
from jax_refine import losses, objectives
from jax_refine import config_base as default  # the base config, `--config default`

KEY = jax.random.key(3)
C = float(np.sqrt(13.5))  # the study's pre-trained model: exp(logit_scale) = 13.5


# ------------------------------------------------------------------ float64 NumPy transcription of the terms
def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_hycd(fi, ft, gi, gt, alpha=0.5, T=1.0):
    def one(s, t):
        q = alpha * np.eye(len(s)) + (1 - alpha) * np.exp(_log_softmax(t / T))
        return T**2 * np.sum(q * (np.log(q) - _log_softmax(s / T))) / len(s)
    return 0.5 * (one(fi @ ft.T, gi @ gt.T) + one(ft @ fi.T, gt @ gi.T))


def np_rafa(fi, ft, z):
    return np.mean((fi - z) ** 2) + np.mean((ft - z) ** 2)


def np_contrastive(fi, ft, s):
    logits = s * fi @ ft.T
    diag = np.arange(len(fi))
    return -0.5 * (_log_softmax(logits)[diag, diag].mean() + _log_softmax(logits.T)[diag, diag].mean())


def np_feature(fi, ft, gi, gt):
    return np.mean((fi - gi) ** 2) + np.mean((ft - gt) ** 2)


def np_logit(fi, ft, gi, gt):
    return np.mean((fi @ ft.T - gi @ gt.T) ** 2)


NP_TERMS = {
    "clip_refine": lambda f, z, s: np_hycd(*f) + np_rafa(f[0], f[1], z),
    "hycd": lambda f, z, s: np_hycd(*f),
    "rafa": lambda f, z, s: np_rafa(f[0], f[1], z),
    "contrastive": lambda f, z, s: np_contrastive(f[0], f[1], s),
    "self_kd": lambda f, z, s: np_contrastive(f[0], f[1], s) + np_hycd(*f, alpha=0.0),
    "feature_distill": lambda f, z, s: np_contrastive(f[0], f[1], s) + np_feature(*f),
    "logit_distill": lambda f, z, s: np_contrastive(f[0], f[1], s) + np_logit(*f),
}
LOG_SCALE = float(np.log(30.0))  # the student's own (trained) scale: used by the contrastive term only


def _features(b=8, d=16, seed=0):
    """Raw features of norms ~10 (image) / ~8 (text) as OpenAI CLIP's, a teacher near them, z ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    fi = 10 * _unit(rng.standard_normal((b, d)) + 0.5)
    ft = 8 * _unit(rng.standard_normal((b, d)) + 0.3 * fi / 10)
    gi, gt = fi + 0.5 * rng.standard_normal((b, d)), ft + 0.5 * rng.standard_normal((b, d))
    return [x.astype(np.float32) for x in (fi, ft, gi, gt, rng.standard_normal((b, d)))]


def _method(name, **overrides):
    c = default.get_config().method
    c.name = name
    return set_dotted(c, overrides)


def _total(c, fi, ft, gi, gt, z, teacher_log_scale=None, log_scale=LOG_SCALE):
    out = objectives.Outputs(jnp.asarray(fi), jnp.asarray(ft), jnp.asarray(gi), jnp.asarray(gt), jnp.asarray(z),
                             jnp.float32(log_scale), KEY, None,
                             None if teacher_log_scale is None else jnp.float32(teacher_log_scale))
    return objectives.total_loss(out, c)


@pytest.mark.parametrize("name", list(NP_TERMS))
@pytest.mark.parametrize("c", [0.5, C, 10.0])
def test_objective_with_a_number_equals_float64_formulas_on_scaled_unit_features(name, c):
    fi, ft, gi, gt, z = _features(seed=int(10 * c))
    got = float(_total(_method(name, feature_scale=c), fi, ft, gi, gt, z)[0])
    want = NP_TERMS[name]([c * _unit(x) for x in (fi, ft, gi, gt)], np.float64(z), np.exp(LOG_SCALE))
    assert got == pytest.approx(want, rel=2e-5, abs=1e-6)


def test_teacher_scale_is_the_teachers_logit_scale_not_the_students():
    fi, ft, gi, gt, z = _features(seed=1)
    c = _method("clip_refine", feature_scale="teacher")
    got = float(_total(c, fi, ft, gi, gt, z, teacher_log_scale=np.log(13.5), log_scale=np.log(100.0))[0])
    want = NP_TERMS["clip_refine"]([C * _unit(x) for x in (fi, ft, gi, gt)], np.float64(z), None)
    assert got == pytest.approx(want, rel=2e-5)
    # HyCD's logits c^2 cos are then the teacher's own CLIP logits exp(logit_scale) cos
    assert np.allclose((C * _unit(gi)) @ (C * _unit(gt)).T, 13.5 * _unit(gi) @ _unit(gt).T)
    with pytest.raises(ValueError, match="feature_scale='teacher' needs the teacher's logit scale"):
        _total(c, fi, ft, gi, gt, z)
    assert objectives.get_objective(_method("rafa", feature_scale="teacher")).needs_teacher
    assert not objectives.get_objective(_method("rafa", feature_scale=2.0)).needs_teacher


def test_sigmoid_and_m2_keep_unit_vectors():
    fi, ft, gi, gt, z = _features(seed=2)
    scaled = _total(_method("m2_mix", feature_scale=C), fi, ft, gi, gt, z)[1]
    unit = _total(_method("m2_mix"), fi, ft, gi, gt, z)[1]  # m2_mix's preset: normalize=True
    assert float(scaled["m2"]) == pytest.approx(float(unit["m2"]), rel=1e-6)
    assert float(scaled["contrastive"]) == pytest.approx(np_contrastive(C * _unit(fi), C * _unit(ft),
                                                                        np.exp(LOG_SCALE)), rel=2e-5)


@pytest.mark.parametrize("c", [0.7, C, 12.0])
def test_identities_of_the_scale_regime(c):
    """design.md: T^2 KL(q(Tl/T) || softmax(S/T)) at T = 1/c^2 on unit features = c^-4 HyCD on c-scaled ones,
    RaFA(c f, z) = c^2 RaFA(f, z / c); so feature_scale=c is the unit regime at T = 1/c^2 with the kd weight
    times c^4, the RaFA weight times c^2 and z / c (the issue's emulation)."""
    fi, ft, gi, gt, z = _features(seed=3)
    u = [_unit(x) for x in (fi, ft, gi, gt)]
    z = np.float64(z)
    assert np_hycd(*u, T=1 / c**2) == pytest.approx(c**-4 * np_hycd(*[c * x for x in u]), rel=1e-10)
    assert np_rafa(c * u[0], c * u[1], z) == pytest.approx(c**2 * np_rafa(u[0], u[1], z / c), rel=1e-10)
    # the same identities through the library's own losses (float32)
    j = [jnp.asarray(x, jnp.float32) for x in u]
    hycd_t = losses.hycd_loss(*j, temperature=1 / c**2)
    hycd_c = losses.hycd_loss(*[losses.scale_features(x, c) for x in (fi, ft, gi, gt)])
    assert float(hycd_t) == pytest.approx(c**-4 * float(hycd_c), rel=1e-4)
    rafa_c = losses.rafa_loss(losses.scale_features(fi, c), losses.scale_features(ft, c), jnp.float32(z))
    assert float(rafa_c) == pytest.approx(c**2 * float(losses.rafa_loss(j[0], j[1], jnp.float32(z / c))), rel=1e-5)
    scaled = float(_total(_method("clip_refine", feature_scale=c), fi, ft, gi, gt, z)[0])
    emulated = float(_total(_method("clip_refine", normalize=True, temperature=1 / c**2,
                                    **{"weights.kd": c**4, "weights.rafa": c**2}), fi, ft, gi, gt, np.float32(z / c))[0])
    assert scaled == pytest.approx(emulated, rel=1e-4)


@pytest.mark.parametrize("name", ["clip_refine", slow("logit_distill"), slow("feature_distill"), slow("self_kd")])
def test_gradients_match_a_float64_torch_transcription(name):
    """d/d(fi, ft, logit_scale) of the objective with feature_scale=c vs torch autograd through c * normalize(f)."""
    fi, ft, gi, gt, z = _features(seed=4)
    g_ours = jax.grad(lambda a, b, s: objectives.total_loss(objectives.Outputs(
        a, b, jnp.asarray(gi), jnp.asarray(gt), jnp.asarray(z), s, KEY), _method(name, feature_scale=C))[0],
        (0, 1, 2))(jnp.asarray(fi), jnp.asarray(ft), jnp.float32(LOG_SCALE))
    t = [torch.tensor(np.float64(x), requires_grad=i < 2) for i, x in enumerate((fi, ft, gi, gt, z))]
    s = torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)
    scaled = [C * torch.nn.functional.normalize(x, dim=-1) for x in t[:4]]
    ref.objective(name, *scaled, t[4], s, 0.5, normalize=False).backward()
    for ours, theirs in ((g_ours[0], t[0].grad), (g_ours[1], t[1].grad)):
        np.testing.assert_allclose(np.asarray(ours, np.float64), theirs.numpy(), rtol=2e-4,
                                   atol=2e-5 * float(theirs.abs().max()))
    assert float(g_ours[2]) == pytest.approx(0.0 if s.grad is None else float(s.grad), rel=2e-4, abs=1e-7)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), "student", True, [2.0]])
def test_bad_feature_scale_is_a_one_line_error_naming_key_and_value(value):
    with pytest.raises(ValueError, match=r"^config\.method\.feature_scale=.* is invalid: must be None, a finite "
                                         r"number > 0 or 'teacher'$"):
        objectives.resolve_method(_method("clip_refine", feature_scale=value))


def test_feature_scale_with_normalize_false_is_refused_and_unset_normalize_resolves_true():
    with pytest.raises(ValueError, match=r"feature_scale=2\.0 .*method\.normalize=False is set"):
        objectives.resolve_method(_method("clip_refine", feature_scale=2.0, normalize=False))
    r = objectives.resolve_method(_method("clip_refine", feature_scale="teacher"))
    assert r.normalize is True and r.feature_scale == "teacher"
    assert objectives.resolve_method(r).normalize is True  # resolving twice (the step does) changes nothing
    assert objectives.resolve_method(_method("clip_refine")).feature_scale is None  # the default: today's regime


# ------------------------------------------------------------------ the train step, 1 and 8 devices
def _step_loss_and_reference(tmp_path, devices, shape):
    """One train step of clip_refine with feature_scale='teacher' whose teacher's logit scale is set to log 50
    (the student's stays at its init, log(1/0.07)); returns the step's loss and a float64 NumPy loss of
    the same step from the model's own features."""
    from flax import nnx

    from jax_refine import sharding as shd, step as step_lib, train

    config = tiny_config(tmp_path, **{"method.feature_scale": "teacher"})
    mesh = shd.make_mesh(shape, devices)
    trainer = train.build_trainer(config, mesh, 1)
    state = trainer.init_state()
    teacher = dict(state.teacher)
    teacher["logit_scale"] = jax.device_put(jnp.full_like(teacher["logit_scale"], np.log(50.0)),
                                            teacher["logit_scale"].sharding)
    state = state.replace(teacher=teacher)
    batch = synthetic_batch(0, 8)
    model = nnx.merge(trainer.setup.graphdef, state.params, trainer.setup.rest)
    fi, ft = (np.asarray(x, np.float64) for x in model(batch["image"], batch["input_ids"], batch["attention_mask"]))
    key = trainer.step_key(np.asarray(jax.device_get(state.rng)), 0)
    z = np.asarray(step_lib.step_reference(key, fi.shape, objectives.resolve_method(config.method)), np.float64)
    c = np.sqrt(50.0)
    f = [c * _unit(x) for x in (fi, ft)]
    want = np_hycd(*f, *f) + np_rafa(f[0], f[1], z)  # step 0: the student is the teacher
    _, metrics = trainer.step_fn(state, shd.host_to_global(batch, mesh), key)
    return float(metrics["loss"]), want


@pytest.mark.slow  # a train step on 1 and 8 devices / a training run
def test_train_step_uses_the_teachers_logit_scale_on_1_and_8_devices(tmp_path):
    one, want = _step_loss_and_reference(tmp_path / "one", jax.devices()[:1], {"data": 1, "fsdp": 1, "tensor": 1})
    eight, _ = _step_loss_and_reference(tmp_path / "eight", jax.devices(), {"data": 2, "fsdp": 4, "tensor": 1})
    assert one == pytest.approx(want, rel=1e-4)
    assert eight == pytest.approx(one, rel=1e-5)


@pytest.mark.slow  # a training run
def test_resuming_a_run_from_before_the_new_keys_is_no_config_change(tmp_path):
    """A workdir whose saved config predates method.feature_scale and prior_params.low/high/path resumes: the new
    keys at their None default are today's behaviour; set to something else they are a change."""
    import json

    from jax_refine import workdir as workdir_lib

    config = tiny_config(tmp_path)
    path = workdir_lib.check_resume(tmp_path, config, resuming=False).write()
    saved = json.loads(path.read_text())
    del saved["method"]["feature_scale"]
    for k in ("low", "high", "path"):
        del saved["method"]["prior_params"][k]
    path.write_text(json.dumps(saved))
    workdir_lib.check_resume(tmp_path, config, resuming=True).write()
    path.write_text(json.dumps(saved))
    config.method.feature_scale = "teacher"
    with pytest.raises(workdir_lib.WorkdirError, match=r"method\.feature_scale: '<absent>' -> 'teacher'"):
        workdir_lib.check_resume(tmp_path, config, resuming=True).write()
