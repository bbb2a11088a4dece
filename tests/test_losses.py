"""jax_refine.losses against the independent PyTorch reference (tests/torch_reference_losses.py),
sharded vs one device on 8 fake CPU devices, known answers, and trace-time validation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import AxisType

import tolerances as tol
from conftest import slow
import torch_reference_losses as ref
from jax_refine import losses as L

# the fast tier checks every loss at (8, 16); the smallest and the odd-sized batch run in the full suite
SHAPES = [slow(2, 3), (8, 16), slow(33, 64)]


def _feats(seed: int, b: int, d: int, n: int = 4, scale: float = 0.4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal((b, d))).astype(np.float32) for _ in range(n)]


def _torch_value_and_grad(fn, fi, ft, *rest):
    ti = torch.tensor(fi, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(ft, dtype=torch.float64, requires_grad=True)
    out = fn(ti, tt, *[torch.tensor(np.asarray(r), dtype=torch.float64) for r in rest])
    out.backward()
    return out.item(), ti.grad.numpy(), tt.grad.numpy()


# name -> (jax fn(fi, ft, gi, gt, z, key) , torch fn(fi, ft, gi, gt, z, lam))
M2_KEY, M2_BETA = jax.random.key(7), 0.5
M2_LAM = float(jax.random.beta(M2_KEY, M2_BETA, M2_BETA))


def _cases(normalize: bool):
    """name -> (jax fn, torch float64 fn, fp32 error bounds (tests/tolerances.py) from float64 inputs)."""
    n = normalize
    return {
        "rafa": (lambda fi, ft, gi, gt, z: L.rafa_loss(fi, ft, z, normalize=n),
                 lambda fi, ft, gi, gt, z: ref.rafa(fi, ft, z, n),
                 lambda fi, ft, gi, gt, z: tol.rafa(fi, ft, z, n)),
        "hycd": (lambda fi, ft, gi, gt, z: L.hycd_loss(fi, ft, gi, gt, normalize=n),
                 lambda fi, ft, gi, gt, z: ref.hycd(fi, ft, gi, gt, 0.5, 1.0, n),
                 lambda fi, ft, gi, gt, z: tol.hycd(fi, ft, gi, gt, 0.5, 1.0, n)),
        "hycd_a0.2_T2": (lambda fi, ft, gi, gt, z: L.hycd_loss(fi, ft, gi, gt, alpha=0.2, temperature=2.0, normalize=n),
                         lambda fi, ft, gi, gt, z: ref.hycd(fi, ft, gi, gt, 0.2, 2.0, n),
                         lambda fi, ft, gi, gt, z: tol.hycd(fi, ft, gi, gt, 0.2, 2.0, n)),
        "hycd_a1_T0.5": (lambda fi, ft, gi, gt, z: L.hycd_loss(fi, ft, gi, gt, alpha=1.0, temperature=0.5, normalize=n),
                         lambda fi, ft, gi, gt, z: ref.hycd(fi, ft, gi, gt, 1.0, 0.5, n),
                         lambda fi, ft, gi, gt, z: tol.hycd(fi, ft, gi, gt, 1.0, 0.5, n)),
        "self_kd": (lambda fi, ft, gi, gt, z: L.self_kd_loss(fi, ft, gi, gt, temperature=1.5, normalize=n),
                    lambda fi, ft, gi, gt, z: ref.hycd(fi, ft, gi, gt, 0.0, 1.5, n),
                    lambda fi, ft, gi, gt, z: tol.hycd(fi, ft, gi, gt, 0.0, 1.5, n)),
        "clip_refine": (lambda fi, ft, gi, gt, z: L.clip_refine_loss(fi, ft, gi, gt, z, alpha=0.5, rafa_weight=0.7,
                                                                     normalize=n)[0],
                        lambda fi, ft, gi, gt, z: ref.hycd(fi, ft, gi, gt, 0.5, 1.0, n) + 0.7 * ref.rafa(fi, ft, z, n),
                        lambda fi, ft, gi, gt, z: tol.hycd(fi, ft, gi, gt, 0.5, 1.0, n) + tol.rafa(fi, ft, z, n) * 0.7),
        "contrastive": (lambda fi, ft, gi, gt, z: L.contrastive_loss(fi, ft, jnp.float32(2.5), normalize=n),
                        lambda fi, ft, gi, gt, z: ref.contrastive(fi, ft, 2.5, n),
                        lambda fi, ft, gi, gt, z: tol.contrastive(fi, ft, 2.5, n)),
        "feature_distill": (lambda fi, ft, gi, gt, z: L.feature_distill_loss(fi, ft, gi, gt, normalize=n),
                            lambda fi, ft, gi, gt, z: ref.feature_distill(fi, ft, gi, gt, n),
                            lambda fi, ft, gi, gt, z: tol.feature_distill(fi, ft, gi, gt, n)),
        "logit_distill": (lambda fi, ft, gi, gt, z: L.logit_distill_loss(fi, ft, gi, gt, normalize=n),
                          lambda fi, ft, gi, gt, z: ref.logit_distill(fi, ft, gi, gt, n),
                          lambda fi, ft, gi, gt, z: tol.logit_distill(fi, ft, gi, gt, n)),
        "m2_mix": (lambda fi, ft, gi, gt, z: L.m2_mix_loss(fi, ft, 10.0, M2_KEY, beta=M2_BETA),
                   lambda fi, ft, gi, gt, z: ref.m2_mix(fi, ft, 10.0, M2_LAM, True),
                   lambda fi, ft, gi, gt, z: tol.m2_mix(fi, ft, 10.0, M2_LAM)),
    }


CASE_NAMES = list(_cases(False))


# the fast tier: normalized features (unnormalized ones go through test_objectives.py's fast cases too)
@pytest.mark.parametrize("normalize", [slow(False), True])
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_value_and_grad_match_torch(name, b, d, normalize):
    """Our float64 (x64) equals the float64 torch transcription to 1e-11 (the formulas); our fp32 is within the
    bounds derived from each quantity's condition (tests/tolerances.py) of our float64 (the rounding)."""
    jfn, tfn, bounds = _cases(normalize)[name]
    feats = _feats(b * 100 + d, b, d, n=5)

    def run(fi, ft, gi, gt, z):
        value, (g_i, g_t) = jax.jit(jax.value_and_grad(lambda x, y: jfn(x, y, gi, gt, z), (0, 1)))(fi, ft)
        return value, np.asarray(g_i, np.float64), np.asarray(g_t, np.float64)

    ours = run(*feats)
    assert ours[0].dtype == jnp.float32
    with jax.enable_x64(True):
        ours64 = run(*(np.asarray(x, np.float64) for x in feats))
        assert ours64[0].dtype == jnp.float64
    for what, a, t in zip(("value", "grad fi", "grad ft"), ours64, _torch_value_and_grad(tfn, *feats)):
        tol.assert_f64_close(a, t, f"{name} {what}")
    bound = bounds(*(np.asarray(x, np.float64) for x in feats))
    for what, a, w, e in zip(("value", "grad fi", "grad ft"), ours, ours64, bound):
        tol.assert_fp32_close(float(a) if what == "value" else a, w, e, f"{name} {what}")


@pytest.mark.parametrize("name", ["hycd", "self_kd", "feature_distill", "logit_distill"])
def test_no_gradient_into_teacher(name):
    jfn = _cases(False)[name][0]
    fi, ft, gi, gt, z = _feats(1, 8, 16, n=5)
    g_gi, g_gt = jax.grad(lambda a, c: jfn(fi, ft, a, c, z), (0, 1))(gi, gt)
    assert not np.any(np.asarray(g_gi)) and not np.any(np.asarray(g_gt))


# ------------------------------------------------------------------------------------------------
# sharded == single device
# ------------------------------------------------------------------------------------------------
def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


SHARDED = {
    "rafa": (L.rafa_loss, lambda a: (a["fi"], a["ft"], a["z"]), {}),
    "hycd": (L.hycd_loss, lambda a: (a["fi"], a["ft"], a["gi"], a["gt"]), dict(alpha=0.3, temperature=2.0)),
    "self_kd": (L.self_kd_loss, lambda a: (a["fi"], a["ft"], a["gi"], a["gt"]), {}),
    "clip_refine": (L.clip_refine_loss, lambda a: (a["fi"], a["ft"], a["gi"], a["gt"], a["z"]), dict(rafa_weight=0.5)),
    "contrastive": (L.contrastive_loss, lambda a: (a["fi"], a["ft"], jnp.float32(3.0)), dict(normalize=True)),
    "feature_distill": (L.feature_distill_loss, lambda a: (a["fi"], a["ft"], a["gi"], a["gt"]), {}),
    "logit_distill": (L.logit_distill_loss, lambda a: (a["fi"], a["ft"], a["gi"], a["gt"]), {}),
    "m2_mix": (L.m2_mix_loss, lambda a: (a["fi"], a["ft"], jnp.float32(20.0), jax.random.key(3)), {}),
}
# name -> derived fp32 bounds (tests/tolerances.py) of `_scalar` of SHARDED's call, from float64 arrays
SHARDED_BOUNDS = {
    "rafa": lambda a: tol.rafa(a["fi"], a["ft"], a["z"]),
    "hycd": lambda a: tol.hycd(a["fi"], a["ft"], a["gi"], a["gt"], 0.3, 2.0),
    "self_kd": lambda a: tol.hycd(a["fi"], a["ft"], a["gi"], a["gt"], 0.0),
    # loss hycd + 0.5 rafa, plus the aux terms hycd and rafa
    "clip_refine": lambda a: (tol.hycd(a["fi"], a["ft"], a["gi"], a["gt"]) * 2
                              + tol.rafa(a["fi"], a["ft"], a["z"]) * 1.5),
    "contrastive": lambda a: tol.contrastive(a["fi"], a["ft"], 3.0, True),
    "feature_distill": lambda a: tol.feature_distill(a["fi"], a["ft"], a["gi"], a["gt"]),
    "logit_distill": lambda a: tol.logit_distill(a["fi"], a["ft"], a["gi"], a["gt"]),
    "m2_mix": lambda a: tol.m2_mix(a["fi"], a["ft"], 20.0, float(jax.random.beta(jax.random.key(3), 0.5, 0.5))),
}

# fast tier: CLIP-Refine (HyCD + RaFA: batch-coupled (B, B) logits and a per-example term) on data x fsdp; the
# other losses, and the 8-way data mesh, in the full suite
FAST_SHARDED = ("clip_refine",)

def _scalar(out):
    return out[0] + sum(out[1].values()) if isinstance(out, tuple) else out


@pytest.mark.parametrize("mesh_shape,names", [((4, 2), ("data", "fsdp")), slow((8,), ("data",))])
@pytest.mark.parametrize("name", [n if n in FAST_SHARDED else slow(n) for n in SHARDED])
def test_sharded_matches_single_device(name, mesh_shape, names):
    fn, args_of, kw = SHARDED[name]
    fi, ft, gi, gt, z = _feats(5, 16, 8, n=5)
    arrays = dict(fi=fi, ft=ft, gi=gi, gt=gt, z=z)
    mesh = _mesh(mesh_shape, names)
    sfn = L.sharded(fn, mesh, batch_axes=names)

    def run(f):
        def loss(x, y):
            args = args_of({**arrays, "fi": x, "ft": y})
            return _scalar(f(*args, **kw))
        return jax.jit(jax.value_and_grad(loss, (0, 1)))(fi, ft)

    v1, g1 = run(fn)
    v8, g8 = run(sfn)
    # two fp32 evaluations in different summation orders, each within the derived bound of the exact value
    bound = SHARDED_BOUNDS[name]({k: v.astype(np.float64) for k, v in arrays.items()}) * 2
    tol.assert_fp32_close(float(v8), float(v1), bound.value, f"{name} value")
    for a, b, e, what in zip(g8, g1, (bound.g_fi, bound.g_ft), ("fi", "ft")):
        tol.assert_fp32_close(np.asarray(a), np.asarray(b), e, f"{name} grad {what}")
    if name == "clip_refine":  # aux values too
        _, aux1 = fn(*args_of(arrays), **kw)
        _, aux8 = jax.jit(lambda *a: sfn(*a, **kw))(*args_of(arrays))
        f64 = {k: v.astype(np.float64) for k, v in arrays.items()}
        aux_bounds = {"hycd": tol.hycd(f64["fi"], f64["ft"], f64["gi"], f64["gt"]).value * 2,
                      "rafa": tol.rafa(f64["fi"], f64["ft"], f64["z"]).value * 2}
        for k in aux1:
            tol.assert_fp32_close(float(aux8[k]), float(aux1[k]), aux_bounds[k], f"aux {k}")


def test_sharded_on_explicit_mesh():
    """jax.make_mesh's default Explicit axes, used under jax.set_mesh: inputs are resharded for the caller."""
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    fi, ft, gi, gt, z = _feats(8, 16, 8, n=5)
    sfn = L.sharded(L.clip_refine_loss, mesh)
    with jax.set_mesh(mesh):
        v8, g8 = jax.jit(jax.value_and_grad(lambda a, b: sfn(a, b, gi, gt, z)[0], (0, 1)))(fi, ft)
    v1, g1 = jax.value_and_grad(lambda a, b: L.clip_refine_loss(a, b, gi, gt, z)[0], (0, 1))(fi, ft)
    f64 = [np.asarray(x, np.float64) for x in (fi, ft, gi, gt, z)]
    bound = (tol.hycd(*f64[:4]) + tol.rafa(f64[0], f64[1], f64[4])) * 2  # two fp32 orders, each within the bound
    tol.assert_fp32_close(float(v8), float(v1), bound.value, "clip_refine value")
    tol.assert_fp32_close(np.asarray(g8[0]), np.asarray(g1[0]), bound.g_fi, "clip_refine grad fi")
    tol.assert_fp32_close(np.asarray(g8[1]), np.asarray(g1[1]), bound.g_ft, "clip_refine grad ft")


def test_axis_name_inside_user_shard_map():
    """The trainer path: call the loss with axis_name inside its own shard_map on a (data, fsdp) mesh."""
    mesh = _mesh((2, 4), ("data", "fsdp"))
    fi, ft, gi, gt, z = _feats(9, 8, 4, n=5)
    spec = jax.sharding.PartitionSpec(("data", "fsdp"))

    def step(a, b, c, d, r):
        loss, aux = L.clip_refine_loss(a, b, c, d, r, axis_name=("data", "fsdp"))
        return loss

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(spec,) * 5, out_specs=jax.sharding.PartitionSpec()))
    t64 = [torch.tensor(x, dtype=torch.float64) for x in (fi, ft, gi, gt, z)]
    t = ref.hycd(*t64[:4]) + ref.rafa(t64[0], t64[1], t64[4])
    f64 = [np.asarray(x, np.float64) for x in (fi, ft, gi, gt, z)]
    bound = (tol.hycd(*f64[:4]) + tol.rafa(f64[0], f64[1], f64[4])).value  # derived fp32 bound (tolerances.py)
    tol.assert_fp32_close(float(f(fi, ft, gi, gt, z)), t.item(), bound, "clip_refine in shard_map")


def test_sharded_rejects_bad_mesh_and_batch():
    mesh = _mesh((8,), ("data",))
    fi, ft = _feats(0, 12, 4, n=2)
    with pytest.raises(ValueError, match="not in the mesh"):
        L.sharded(L.contrastive_loss, mesh, batch_axes=("data", "fsdp"))
    with pytest.raises(ValueError, match="not divisible"):
        L.sharded(L.contrastive_loss, mesh, batch_axes="data")(fi, ft, 1.0)
    with pytest.raises(ValueError, match="shard_map"):
        L.hycd_loss(fi, ft, fi, ft, axis_name="data")


# ------------------------------------------------------------------------------------------------
# known answers
# ------------------------------------------------------------------------------------------------
def test_hycd_alpha_one_is_student_cross_entropy():
    fi, ft, gi, gt = _feats(11, 10, 6)
    ti, tt = torch.tensor(fi, dtype=torch.float64), torch.tensor(ft, dtype=torch.float64)
    labels = torch.arange(10)
    ce = (F.cross_entropy(ti @ tt.T, labels) + F.cross_entropy(tt @ ti.T, labels)).item() / 2
    f64 = [np.asarray(x, np.float64) for x in (fi, ft, gi, gt)]
    tol.assert_fp32_close(float(L.hycd_loss(fi, ft, gi, gt, alpha=1.0)), ce, tol.hycd(*f64, alpha=1.0).value, "hycd")
    tol.assert_fp32_close(float(L.contrastive_loss(fi, ft, 1.0)), ce, tol.contrastive(*f64[:2], 1.0).value, "ce")


def test_hycd_zero_when_teacher_is_student_and_alpha_zero():
    fi, ft = _feats(12, 8, 5, n=2)
    loss, grads = jax.value_and_grad(lambda a, b: L.hycd_loss(a, b, fi, ft, alpha=0.0, temperature=0.7), (0, 1))(fi, ft)
    f64 = [x.astype(np.float64) for x in (fi, ft)]
    bound = tol.hycd(*f64, *f64, 0.0, 0.7)  # exactly 0 in exact arithmetic: only the derived fp32 rounding is left
    tol.assert_fp32_close(float(loss), 0.0, bound.value, "KL(P || P)")
    tol.assert_fp32_close(np.asarray(grads[0]), 0.0, bound.g_fi, "grad fi")
    tol.assert_fp32_close(np.asarray(grads[1]), 0.0, bound.g_ft, "grad ft")
    # and strictly positive once the teacher differs
    assert float(L.hycd_loss(fi, ft, fi[::-1], ft, alpha=0.0)) > 1e-3


def test_rafa_minimised_at_reference():
    (z,) = _feats(13, 6, 4, n=1)
    loss, (g_i, g_t) = jax.value_and_grad(L.rafa_loss, (0, 1))(z, z, z)
    assert float(loss) == 0.0 and not np.any(np.asarray(g_i)) and not np.any(np.asarray(g_t))
    rng = np.random.default_rng(0)
    for _ in range(5):
        eps = (1e-2 * rng.standard_normal(z.shape)).astype(np.float32)
        assert float(L.rafa_loss(z + eps, z, z)) > 0.0 and float(L.rafa_loss(z, z - eps, z)) > 0.0
    # closed form: mean((fi - z)^2) + mean((ft - z)^2) with fi = z + 1, ft = z - 2 gives 1 + 4
    # (the fp32 inputs z + 1, z - 2 are rounded: the differences 1, 2 move by an ulp of |z| + 2, the squares by
    # 2 x 1 and 2 x 2 times that)
    z64 = z.astype(np.float64)
    bound = tol.rafa(z64 + 1, z64 - 2, z64).value + 6 * tol.U32 * (np.abs(z64).max() + 2)
    tol.assert_fp32_close(float(L.rafa_loss(z + 1.0, z - 2.0, z)), 5.0, bound, "rafa closed form")
    # a (D,) reference broadcasts over the batch
    m = z64[0]
    tol.assert_fp32_close(float(L.rafa_loss(z, z, z[0])), 2 * np.mean((z64 - m) ** 2), tol.rafa(z64, z64, m).value,
                          "rafa, (D,) reference")


def test_slerp_geodesic():
    """slerp against the float64 geodesic mix (tests/torch_reference_losses.geodesic_mix) of the same fp32 unit
    rows, within the derived fp32 bound (tests/tolerances.slerp); lam = 1 gives a, lam = 0 gives b."""
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in _feats(14, 5, 7, n=2))
    a64, b64 = (torch.tensor(x, dtype=torch.float64) for x in (a, b))
    bound = tol.slerp(a.astype(np.float64), b.astype(np.float64))
    for lam in (0.0, 0.3, 1.0):
        m = np.asarray(L.slerp(jnp.asarray(a), jnp.asarray(b), lam), np.float64)
        err = np.linalg.norm(m - ref.geodesic_mix(a64, b64, lam).numpy(), axis=1)
        assert np.all(err <= bound), (lam, err, bound)


def test_m2_mix_ratio_follows_key():
    fi, ft = _feats(15, 8, 4, n=2)
    a = L.m2_mix_loss(fi, ft, 10.0, jax.random.key(0))
    assert float(a) == float(L.m2_mix_loss(fi, ft, 10.0, jax.random.key(0)))
    vals = {round(float(L.m2_mix_loss(fi, ft, 10.0, jax.random.key(i))), 6) for i in range(4)}
    assert len(vals) == 4


# ------------------------------------------------------------------------------------------------
# dtypes, jit/grad of every public function
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n if n == "clip_refine" else slow(n) for n in CASE_NAMES])
def test_bf16_inputs_give_fp32(name):
    jfn = _cases(False)[name][0]
    fi, ft, gi, gt, z = _feats(16, 8, 16, n=5)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (fi, ft, gi, gt, z)]
    out = jax.jit(jfn)(*bf)
    assert out.dtype == jnp.float32
    up = [np.asarray(x.astype(jnp.float32)) for x in bf]  # the bf16 values, computed in fp32
    # jit vs eager: two fp32 evaluations of the same values, each within the derived bound of the exact loss
    bound = _cases(False)[name][2](*(x.astype(np.float64) for x in up)).value * 2
    tol.assert_fp32_close(float(out), float(jfn(*up)), bound, f"{name} bf16 inputs")
    g = jax.grad(lambda x: jfn(x, *bf[1:]))(bf[0])
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_sample_reference_priors():
    key = jax.random.key(0)
    n, d = 20000, 4
    z = jax.jit(lambda k: L.sample_reference(k, (n, d)))(key)
    assert z.shape == (n, d) and z.dtype == jnp.float32
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1.0) < 0.02
    z = L.sample_reference(key, (n, d), "normal", mean=2.0, std=0.5)
    assert abs(float(z.mean()) - 2.0) < 0.01 and abs(float(z.std()) - 0.5) < 0.01
    u = L.sample_reference(key, (n, d), "uniform")
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.01
    u = L.sample_reference(key, (n, d), "uniform", low=-1.0, high=1.0)
    assert float(u.min()) >= -1.0 and abs(float(u.mean())) < 0.01
    mean, std = np.array([0.0, 1.0, -2.0, 5.0], np.float32), np.array([1.0, 0.1, 2.0, 0.5], np.float32)
    p = jax.jit(lambda k, m, s: L.sample_reference(k, (n, d), "precomputed", mean=m, std=s))(key, mean, std)
    # sample statistics of n draws within 6 standard errors: std / sqrt(n) for the mean, std / sqrt(2 n) for the
    # std (a fixed key: this is a check of the parameters, with a margin that a correct sampler cannot miss)
    np.testing.assert_array_less(np.abs(np.asarray(p.mean(0)) - mean), 6 * std / np.sqrt(n))
    np.testing.assert_array_less(np.abs(np.asarray(p.std(0)) - std), 6 * std / np.sqrt(2 * n))
    f = L.sample_reference(key, (3, d), "fixed", mean=mean)
    np.testing.assert_array_equal(f, np.broadcast_to(mean, (3, d)))
    np.testing.assert_array_equal(L.sample_reference(key, (3, d), "fixed"), np.zeros((3, d)))
    a, b = L.sample_reference(jax.random.key(1), (2, 3)), L.sample_reference(jax.random.key(2), (2, 3))
    assert not np.allclose(a, b)


@pytest.mark.slow  # the vs-torch tests jit and differentiate each loss in the fast tier
def test_every_loss_under_jit_and_grad():
    """Every public function's value and gradient through jax.jit(jax.value_and_grad), in float64 (x64), against
    the float64 torch transcription to 1e-11; the logit scale's gradient too; the sampler under jit."""
    fi, ft, gi, gt, z = (np.asarray(x, np.float64) for x in _feats(17, 4, 3, n=5))
    key = jax.random.key(0)
    t_ft, t_gi, t_gt, t_z = (torch.tensor(x) for x in (ft, gi, gt, z))
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    cases = {  # name -> (ours as a function of fi, the transcription of the same)
        "rafa_loss": (lambda x: L.rafa_loss(x, ft, z), lambda x: ref.rafa(x, t_ft, t_z)),
        "hycd_loss": (lambda x: L.hycd_loss(x, ft, gi, gt), lambda x: ref.hycd(x, t_ft, t_gi, t_gt)),
        "self_kd_loss": (lambda x: L.self_kd_loss(x, ft, gi, gt), lambda x: ref.hycd(x, t_ft, t_gi, t_gt, 0.0)),
        "clip_refine_loss": (lambda x: L.clip_refine_loss(x, ft, gi, gt, z)[0],
                             lambda x: ref.hycd(x, t_ft, t_gi, t_gt) + ref.rafa(x, t_ft, t_z)),
        "contrastive_loss": (lambda x: L.contrastive_loss(x, ft, 5.0), lambda x: ref.contrastive(x, t_ft, 5.0)),
        "feature_distill_loss": (lambda x: L.feature_distill_loss(x, ft, gi, gt),
                                 lambda x: ref.feature_distill(x, t_ft, t_gi, t_gt)),
        "logit_distill_loss": (lambda x: L.logit_distill_loss(x, ft, gi, gt),
                               lambda x: ref.logit_distill(x, t_ft, t_gi, t_gt)),
        "m2_mix_loss": (lambda x: L.m2_mix_loss(x, ft, 5.0, key),
                        lambda x: ref.m2_mix(x, t_ft, 5.0, float(jax.random.beta(key, 0.5, 0.5, dtype=jnp.float32)))),
        "l2_normalize": (lambda x: jnp.sum(L.l2_normalize(x) * ft), lambda x: (unit(x) * t_ft).sum()),
        "slerp": (lambda x: jnp.sum(L.slerp(L.l2_normalize(x), L.l2_normalize(ft), 0.3)),
                  lambda x: ref.geodesic_mix(unit(x), unit(t_ft), 0.3).sum()),
    }
    with jax.enable_x64(True):
        for name, (ours, theirs) in cases.items():
            v, g = jax.jit(jax.value_and_grad(ours))(fi)
            x = torch.tensor(fi, requires_grad=True)
            want = theirs(x)
            want.backward()
            tol.assert_f64_close(float(v), want.item(), name)
            tol.assert_f64_close(np.asarray(g), x.grad.numpy(), f"{name} gradient")
        # the learnable logit scale gets its gradient: d/ds of the contrastive loss at exp(s) = e
        g_s = jax.jit(jax.grad(lambda s: L.contrastive_loss(fi, ft, jnp.exp(s))))(1.0)
        s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        ref.contrastive(torch.tensor(fi), t_ft, torch.exp(s)).backward()
        tol.assert_f64_close(float(g_s), s.grad.item(), "logit scale gradient")
    # the reference sampler under jit, with a traced mean: N(mean, 1) is mean + a standard normal draw
    z2 = jax.jit(lambda k, m: L.sample_reference(k, (4, 3), "normal", mean=m))(key, jnp.float32(1.0))
    draw = np.asarray(jax.random.normal(key, (4, 3)), np.float64)
    # the draw's erfinv is fused differently under jit: a few fp32 ulps of the draw (and one of the sum)
    np.testing.assert_allclose(z2, 1.0 + draw, rtol=0, atol=8 * tol.U32 * (1.0 + np.abs(draw).max()))


# ------------------------------------------------------------------------------------------------
# validation: ValueError at trace time
# ------------------------------------------------------------------------------------------------
def _traced(f):
    return lambda *a: jax.jit(f)(*a)


@pytest.mark.parametrize("call,match", [
    (lambda fi, ft: L.hycd_loss(fi, ft[:, :3], fi, ft), "shape"),
    (lambda fi, ft: L.hycd_loss(fi, ft, fi[:3], ft), "shape"),
    (lambda fi, ft: L.contrastive_loss(fi[:1], ft[:1], 1.0), "B >= 2"),
    (lambda fi, ft: L.hycd_loss(fi[:1], ft[:1], fi[:1], ft[:1]), "B >= 2"),
    (lambda fi, ft: L.logit_distill_loss(fi[:1], ft[:1], fi[:1], ft[:1]), "B >= 2"),
    (lambda fi, ft: L.m2_mix_loss(fi[:1], ft[:1], 1.0, jax.random.key(0)), "B >= 2"),
    (lambda fi, ft: L.hycd_loss(fi, ft, fi, ft, alpha=1.5), "alpha"),
    (lambda fi, ft: L.hycd_loss(fi, ft, fi, ft, alpha=-0.1), "alpha"),
    (lambda fi, ft: L.hycd_loss(fi, ft, fi, ft, temperature=0.0), "temperature"),
    (lambda fi, ft: L.clip_refine_loss(fi, ft, fi, ft, fi, temperature=-1.0), "temperature"),
    (lambda fi, ft: L.clip_refine_loss(fi, ft, fi, ft, fi[:, :2]), "reference"),
    (lambda fi, ft: L.m2_mix_loss(fi, ft, 1.0, jax.random.key(0), beta=0.0), "beta"),
    (lambda fi, ft: L.contrastive_loss(fi, ft, jnp.ones(3)), "logit_scale"),
    (lambda fi, ft: L.rafa_loss(fi[0], ft[0], fi[0]), r"\(B, D\)"),
    (lambda fi, ft: L.sample_reference(jax.random.key(0), (4, 4), "laplace"), "unknown prior 'laplace'"),
    (lambda fi, ft: L.sample_reference(jax.random.key(0), (4, 4), "uniform", std=1.0), "unknown"),
    (lambda fi, ft: L.sample_reference(jax.random.key(0), (4, 4), "precomputed"), "mean"),
    (lambda fi, ft: L.sample_reference(jax.random.key(0), (4, 4), "precomputed", mean=jnp.zeros(3),
                                       std=jnp.ones(3)), "shape"),
    (lambda fi, ft: L.sample_reference(jax.random.key(0), (4, 4), "uniform", low=1.0, high=0.0), "low < high"),
])
def test_bad_input_raises_at_trace_time(call, match):
    fi, ft = (jnp.asarray(x) for x in _feats(18, 4, 4, n=2))
    with pytest.raises(ValueError, match=match):
        _traced(call)(fi, ft)


def test_rafa_allows_batch_of_one():
    fi, ft, z = _feats(19, 1, 4, n=3)
    t = ref.rafa(*[torch.tensor(x, dtype=torch.float64) for x in (fi, ft, z)]).item()
    bound = tol.rafa(*(np.asarray(x, np.float64) for x in (fi, ft, z))).value  # derived fp32 bound
    tol.assert_fp32_close(float(L.rafa_loss(fi, ft, z)), t, bound, "rafa, B = 1")
