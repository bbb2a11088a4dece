"""Shared helpers for the trainer tests: tiny configs, synthetic resumable batches, a PyTorch reference step."""
from __future__ import annotations

import os
import signal
import time

import numpy as np

EOS, BOS = 49407, 49406


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess on ``devices`` fake CPU devices: the suite's own flags (conftest's, e.g. its
    compile level) with the device count replaced."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def set_dotted(config, overrides: dict):
    """Set ``{"a.b.c": value}`` entries on a ConfigDict in place (test set-up, no validation); returns it."""
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def tiny_config(workdir, **overrides):
    """configs/tiny_test.py with dotted-key overrides, e.g. ``**{"train.batch_size": 16}``."""
    from jax_refine.config import shipped_module

    get_config = shipped_module("tiny_test").get_config

    c = get_config()
    c.workdir = str(workdir)
    return set_dotted(c, overrides)


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


def torch_clip_refine_steps(hf_dir, batches: list, zs: list, *, lr: float, weight_decay: float = 0.1,
                            betas=(0.9, 0.999), eps: float = 1e-8, alpha: float = 0.5, temperature: float = 1.0,
                            rafa_weight: float = 1.0, eval_batch: dict | None = None):
    """CLIP-Refine in PyTorch from design.md's equations, one AdamW step per batch (with its RaFA reference z).

    Returns {"losses": [loss per step], "grads": {hf name: gradient of step 1}, "params": {hf name: final},
    "eval_loss": the loss on `eval_batch` (with zs[0]) at the final parameters, if given}.
    """
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel

    torch.manual_seed(0)
    student = CLIPModel.from_pretrained(hf_dir, torch_dtype=torch.float32).train()
    teacher = copy.deepcopy(student).eval()

    def loss_of(batch, z):
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
        zt = torch.from_numpy(np.array(z, np.float32))
        return (kd(s, t) + kd(s.T, t.T)) / 2 + rafa_weight * (F.mse_loss(fi, zt) + F.mse_loss(ft, zt))

    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    names = {id(p): n for n, p in student.named_parameters()}
    out = {"losses": []}
    for i, (batch, z) in enumerate(zip(batches, zs)):
        opt.zero_grad()
        loss = loss_of(batch, z)
        loss.backward()
        if i == 0:
            out["grads"] = {names[id(p)]: (p.grad.numpy().copy() if p.grad is not None else np.zeros(p.shape, np.float32))
                            for p in student.parameters()}
        opt.step()
        out["losses"].append(loss.item())
    if eval_batch is not None:
        with torch.no_grad():
            out["eval_loss"] = loss_of(eval_batch, zs[0]).item()
    out["params"] = {k: v.detach().numpy().copy() for k, v in student.state_dict().items()}
    return out


def wait_until_blocked(proc, workdir, timeout: float = 300.0):
    """Wait until `tests/train_driver.py --block-finalize-at N` (`proc`) is blocked mid-save: it has written
    `workdir/finalize_blocked` (a path or epath). Returns that marker; fails with the driver's stderr if the
    driver exited first, or on `timeout` (s)."""
    marker = workdir / "finalize_blocked"
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "timeout"
    return marker


def kill_9(proc) -> None:
    """SIGKILL `proc` (no chance to clean up, as a preempted host) and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
