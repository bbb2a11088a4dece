"""Independent PyTorch reference for the losses, written from the equations in shared/design.md and
Oh et al. (NeurIPS 2023). Does not import jax_refine. Computes in float64.

All functions take torch tensors (B, D) of student image/text features fi, ft and teacher features
gi, gt; they return a scalar tensor so autograd gives the reference gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _maybe_norm(*xs: torch.Tensor, normalize: bool) -> list[torch.Tensor]:
    return [F.normalize(x, dim=-1) if normalize else x for x in xs]


def rafa(fi, ft, z, normalize=False):
    fi, ft = _maybe_norm(fi, ft, normalize=normalize)
    return F.mse_loss(fi, z.expand_as(fi)) + F.mse_loss(ft, z.expand_as(ft))


def _distill(student_logits, teacher_logits, T, alpha):
    """KL(q || softmax(s / T)) with q = alpha I + (1 - alpha) softmax(t / T), batchmean, times T^2."""
    log_p = F.log_softmax(student_logits / T, dim=1)
    eye = torch.eye(student_logits.shape[0], dtype=student_logits.dtype)
    q = alpha * eye + (1.0 - alpha) * F.softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * T**2


def hycd(fi, ft, gi, gt, alpha=0.5, T=1.0, normalize=False):
    fi, ft, gi, gt = _maybe_norm(fi, ft, gi, gt, normalize=normalize)
    gi, gt = gi.detach(), gt.detach()
    return (_distill(fi @ ft.T, gi @ gt.T, T, alpha) + _distill(ft @ fi.T, gt @ gi.T, T, alpha)) / 2


def contrastive(fi, ft, scale, normalize=False):
    fi, ft = _maybe_norm(fi, ft, normalize=normalize)
    labels = torch.arange(fi.shape[0])
    return (F.cross_entropy(scale * fi @ ft.T, labels) + F.cross_entropy(scale * ft @ fi.T, labels)) / 2


def feature_distill(fi, ft, gi, gt, normalize=False):
    fi, ft, gi, gt = _maybe_norm(fi, ft, gi, gt, normalize=normalize)
    return F.mse_loss(fi, gi.detach()) + F.mse_loss(ft, gt.detach())


def logit_distill(fi, ft, gi, gt, normalize=False):
    fi, ft, gi, gt = _maybe_norm(fi, ft, gi, gt, normalize=normalize)
    gi, gt = gi.detach(), gt.detach()
    return (F.mse_loss(fi @ ft.T, gi @ gt.T) + F.mse_loss(ft @ fi.T, gt @ gi.T)) / 2


def geodesic_mix(a, b, lam):
    theta = torch.acos((a * b).sum(dim=1, keepdim=True))
    return (torch.sin(lam * theta) * a + torch.sin((1 - lam) * theta) * b) / torch.sin(theta)


def m2_mix(fi, ft, scale, lam, normalize=True):
    """Oh et al. Eq.: image and text anchors, positives <I_i, T_i>, negatives <anchor_i, m_j>, j != i."""
    fi, ft = _maybe_norm(fi, ft, normalize=normalize)
    b = fi.shape[0]
    m = geodesic_mix(fi, ft, lam)
    eye = torch.eye(b, dtype=torch.bool)
    pos = (fi * ft).sum(dim=1)
    labels = torch.arange(b)
    total = 0.0
    for anchor in (fi, ft):
        logits = torch.where(eye, pos[:, None].expand(b, b), anchor @ m.T)
        total = total + F.cross_entropy(scale * logits, labels)
    return total


# The reference's defaults (yshinya6/clip-refine: updater/contrastive.py, config/01_post-pre-training/*.yaml),
# written out here independently of jax_refine.objectives.PRESETS:
# total = lambda_cont * contrastive + lambda_kd * distill + lambda_rand * RaFA, lambda_cont = 1 unless set.
METHOD_WEIGHTS = {
    "clip_refine": {"kd": 1.0, "rafa": 1.0},  # clip-refine.yaml: lambda_cont 0, lambda_kd 1, lambda_rand 1
    "contrastive": {"contrastive": 1.0},  # contrastive.yaml: CLIPUpdater, no teacher
    "self_kd": {"contrastive": 1.0, "kd": 1.0},  # CLIPUpdater, distill_loss kd, alpha_blending 0
    "feature_distill": {"contrastive": 1.0, "feature": 1.0},  # CLIPUpdater, distill_loss fd
    "logit_distill": {"contrastive": 1.0, "logit": 1.0},  # CLIPUpdater, distill_loss ld
    "hycd": {"kd": 1.0},  # ablation: CLIP-Refine without RaFA
    "rafa": {"rafa": 1.0},  # ablation: CLIP-Refine without HyCD
    "m2_mix": {"contrastive": 1.0, "m2": 0.01},  # Oh et al.: CLIP loss + m2 (weight from their sweep)
}
def sigmoid(fi, ft, scale, bias):
    """SigLIP's loss, written from the paper (Zhai et al. 2023, Algorithm 1): on unit vectors, logits
    t <x_i, y_j> + b, labels +1 on the diagonal and -1 elsewhere, -sum log sigmoid(label * logit) / B."""
    fi, ft = F.normalize(fi, dim=-1), F.normalize(ft, dim=-1)
    logits = scale * fi @ ft.T + bias
    labels = 2 * torch.eye(fi.shape[0], dtype=fi.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / fi.shape[0]


METHOD_ALPHA = {"self_kd": 0.0}  # HyCD alpha 0.5 otherwise (alpha_blending 0.5 in clip-refine.yaml)
METHOD_NORMALIZE = {"m2_mix": True}  # unnormalized features otherwise (the reference's model output)


def objective(method, fi, ft, gi, gt, z, log_scale, lam, *, weights=None, alpha=None, T=1.0, normalize=None):
    """The whole weighted-sum objective of `method`; `weights`/`alpha`/`normalize` override its defaults."""
    w = {**METHOD_WEIGHTS[method], **(weights or {})}
    a = METHOD_ALPHA.get(method, 0.5) if alpha is None else alpha
    n = METHOD_NORMALIZE.get(method, False) if normalize is None else normalize
    scale = torch.exp(torch.as_tensor(log_scale, dtype=fi.dtype))
    terms = {
        "contrastive": lambda: contrastive(fi, ft, scale, n),
        "kd": lambda: hycd(fi, ft, gi, gt, a, T, n),
        "rafa": lambda: rafa(fi, ft, z, n),
        "feature": lambda: feature_distill(fi, ft, gi, gt, n),
        "logit": lambda: logit_distill(fi, ft, gi, gt, n),
        "m2": lambda: m2_mix(fi, ft, scale, lam, True),
    }
    return sum(wt * terms[t]() for t, wt in w.items() if wt)
