"""Shared helpers for the trainer tests: tiny configs, synthetic resumable batches, a PyTorch reference step."""
from __future__ import annotations

import numpy as np

EOS, BOS = 49407, 49406


def tiny_config(workdir, **overrides):
    """configs/tiny_test.py with dotted-key overrides, e.g. ``**{"train.batch_size": 16}``."""
    from configs.tiny_test import get_config

    c = get_config()
    c.workdir = str(workdir)
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


def synthetic_batch(index: int, batch: int, image_size: int = 32, length: int = 16, seed: int = 0) -> dict:
    """A deterministic global batch ``index``: normal pixels (B,H,W,3), token ids with BOS .. EOS and padding."""
    rng = np.random.default_rng([seed, index])
    image = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    ids = rng.integers(1, 49405, size=(batch, length)).astype(np.int32)
    ends = rng.integers(3, length, size=batch)
    mask = (np.arange(length)[None, :] <= ends[:, None]).astype(np.int32)
    ids[:, 0] = BOS
    ids[np.arange(batch), ends] = EOS
    ids = np.where(mask == 1, ids, EOS).astype(np.int32)  # pad with EOS like the CLIP tokenizer's pad
    return {"image": image, "input_ids": ids, "attention_mask": mask}


class SyntheticIterator:
    """Resumable iterator of this process's slice of ``synthetic_batch(i)``; state ``{"index": i}``."""

    def __init__(self, batch: int, image_size: int = 32, seed: int = 0, nan_at: int | None = None):
        import jax

        self.batch, self.image_size, self.seed, self.index, self.nan_at = batch, image_size, seed, 0, nan_at
        n, p = jax.process_count(), jax.process_index()
        self.rows = slice(p * batch // n, (p + 1) * batch // n)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = synthetic_batch(self.index, self.batch, self.image_size, seed=self.seed)
        if self.nan_at is not None and self.index == self.nan_at:
            b["image"][:] = np.nan
        self.index += 1
        return {k: v[self.rows] for k, v in b.items()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def torch_clip_refine_step(hf_dir, batch: dict, z: np.ndarray, *, lr: float, weight_decay: float = 0.1,
                           alpha: float = 0.5, temperature: float = 1.0, rafa_weight: float = 1.0):
    """One CLIP-Refine step in PyTorch from design.md's equations: returns (loss, {hf name: updated param})."""
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel

    torch.manual_seed(0)
    student = CLIPModel.from_pretrained(hf_dir, torch_dtype=torch.float32).train()
    teacher = copy.deepcopy(student).eval()
    pixels = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    mask = torch.from_numpy(batch["attention_mask"].astype(np.int64))

    def feats(m):
        fi = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        ft = m.text_projection(m.text_model(input_ids=ids, attention_mask=mask).pooler_output)
        return fi, ft

    with torch.no_grad():
        gi, gt = feats(teacher)
    fi, ft = feats(student)
    eye = torch.eye(fi.shape[0])

    def kd(s, t):
        q = alpha * eye + (1 - alpha) * F.softmax(t / temperature, dim=1)
        return F.kl_div(F.log_softmax(s / temperature, dim=1), q, reduction="batchmean") * temperature**2

    s, t = fi @ ft.T, gi @ gt.T
    hycd = (kd(s, t) + kd(s.T, t.T)) / 2
    zt = torch.from_numpy(np.array(z, np.float32))
    rafa = F.mse_loss(fi, zt) + F.mse_loss(ft, zt)
    loss = hycd + rafa_weight * rafa
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item(), {k: v.detach().numpy().copy() for k, v in student.state_dict().items()}
