"""Train-step benchmark: our jitted CLIP-Refine step vs the PyTorch reference step, ViT-B/32, batch 32.

    .venv/bin/python benchmarks/train_step.py [--batch 32] [--steps 3] [--layers 12]

Each side runs in its own child process (so peak RSS is per side): ours (jax_refine.train's jitted step
on one device: student + teacher forward, backward, AdamW) and PyTorch's (transformers' CLIPModel, the
same CLIP-Refine loss from design.md, torch.optim.AdamW). Prints samples/s, the ratio, achieved FLOP/s
(XLA cost analysis of the compiled step) against a measured matmul peak, peak memory, and, when below
target, where our step's time goes (forward / teacher / backward / optimizer, timed by sub-programs,
and a profiler trace of one step summed by XLA op kind).
Targets (issue 5): ratio >= 1.0 and >= 80% of the matmul peak. `--breakdown` forces the breakdown.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _model_config(layers: int) -> dict:
    """ViT-B/32 with `layers` per tower: transformers' CLIPConfig defaults are ViT-B/32 (widths 512/768,
    heads 8/12, patch 32, 224 px, projection 512, vocabulary 49408, 77 positions)."""
    return {"text_config": {"num_hidden_layers": layers}, "vision_config": {"num_hidden_layers": layers}}


def _batch(b: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 49405, size=(b, 77)).astype(np.int32)
    ends = rng.integers(5, 77, size=b)
    mask = (np.arange(77)[None] <= ends[:, None]).astype(np.int32)
    ids[:, 0], ids[np.arange(b), ends] = 49406, 49407
    return {"image": rng.normal(size=(b, 224, 224, 3)).astype(np.float32),
            "input_ids": np.where(mask == 1, ids, 49407).astype(np.int32), "attention_mask": mask}


def _timed(fn, steps: int) -> float:
    fn()  # warm-up (and compile)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT))
    from configs.default import get_config
    from jax_refine import sharding as shd, train

    # matmul peak: a large f32 matmul, jitted
    n = 4096
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    peak = 2 * n**3 / _timed(lambda: mm(a, a).block_until_ready(), 3)

    c = get_config()
    c.model.random_init = _model_config(args.layers)
    c.train.batch_size, c.train.num_steps, c.optimizer.lr = args.batch, 10, 1e-6
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    trainer = train.build_trainer(c, mesh, total_steps=10)
    state = trainer.init_state()
    batch = shd.host_to_global(_batch(args.batch), mesh)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = trainer.step_fn.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    info = train.describe_compiled(compiled, args.batch)
    holder = {"state": state}

    def step():
        holder["state"], m = compiled(holder["state"], batch, key)
        m["loss"].block_until_ready()

    dt = _timed(step, args.steps)
    out = {"step_s": dt, "samples_per_s": args.batch / dt, "flops": info.get("flops", float("nan")),
           "matmul_peak": peak, "compile_s": compile_s,
           "xla_bytes": info.get("argument_size_in_bytes", 0) + info.get("temp_size_in_bytes", 0),
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if args.breakdown:
        out["breakdown"] = _breakdown(trainer, holder["state"], batch, args.steps)
        out["profile"] = _profile(lambda: step())
    return out


def _op_kind(name: str) -> str:
    """XLA:CPU thunk name -> what it does (matmul library call, layout copy, elementwise loop, ...)."""
    for prefix, kind in (("ynn_", "matmul (YNNPACK)"), ("xnn_", "matmul (XNNPACK)"), ("onednn", "matmul (oneDNN)"),
                         ("dot", "matmul (Eigen)"), ("copy", "layout copies / transposes"),
                         ("transpose", "layout copies / transposes"), ("wrapped_broadcast", "broadcasts"),
                         ("reduce", "reductions"), ("scatter", "scatter"), ("gather", "gather")):
        if name.startswith(prefix) or prefix in name.split(".")[0]:
            return kind
    return "other fusions (elementwise, softmax, LayerNorm)"


def _profile(step) -> dict:
    """Trace one full step with the JAX profiler and sum XLA:CPU thunk times (ms) by kind, plus the top ops."""
    import collections
    import gzip
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            step()
        trace = json.load(gzip.open(next(Path(tmp).rglob("*.trace.json.gz"))))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    by_op: collections.Counter = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and "dur" in e and not name.startswith(("$", "Thunk", "PjRt", "Execute")):
            by_op[name] += e["dur"] / 1000.0
    by_kind: collections.Counter = collections.Counter()
    for name, ms in by_op.items():
        by_kind[_op_kind(name)] += ms
    return {"by_kind": dict(by_kind.most_common()), "top_ops": dict(by_op.most_common(8))}


def _breakdown(trainer, state, batch, steps: int) -> dict:
    """Time sub-programs of the step: student forward, + teacher forward, value_and_grad, full step."""
    import jax
    import optax
    from flax import nnx

    from jax_refine import metrics, objectives

    g, rest = trainer.setup.graphdef, trainer.setup.rest

    def feats(p):
        return nnx.merge(g, p, rest)(batch["image"], batch["input_ids"], batch["attention_mask"])

    def loss(p, t):
        fi, ft = feats(p)
        gi, gt = jax.lax.stop_gradient(feats(t))
        z = jax.random.normal(jax.random.key(0), fi.shape)
        o = objectives.Outputs(fi, ft, gi, gt, z, p["logit_scale"], jax.random.key(1))
        return objectives.get_objective("clip_refine").fn(o, trainer.config.method)[0] + 0 * metrics.modality_gap(fi, ft)

    p, t = state["params"], state["teacher"]
    fwd = jax.jit(lambda p: feats(p))
    both = jax.jit(lambda p, t: loss(p, t))
    grad = jax.jit(jax.value_and_grad(loss))
    upd = jax.jit(lambda gr, s, p: optax.apply_updates(p, trainer.tx.update(gr, s, p)[0]))
    grads = grad(p, t)[1]
    res = {"student forward": _timed(lambda: jax.block_until_ready(fwd(p)), steps),
           "student + teacher forward": _timed(lambda: jax.block_until_ready(both(p, t)), steps),
           "forward + backward": _timed(lambda: jax.block_until_ready(grad(p, t)), steps),
           "optimizer update": _timed(lambda: jax.block_until_ready(upd(grads, state["opt_state"], p)), steps)}
    return res


def run_torch(args) -> dict:
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPModel

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    student = CLIPModel(CLIPConfig(**_model_config(args.layers))).train()
    teacher = copy.deepcopy(student).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    b = _batch(args.batch)
    pixels = torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy())
    ids, mask = torch.from_numpy(b["input_ids"].astype("int64")), torch.from_numpy(b["attention_mask"].astype("int64"))

    def feats(m):
        fi = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        return fi, m.text_projection(m.text_model(input_ids=ids, attention_mask=mask).pooler_output)

    def step():
        with torch.no_grad():
            gi, gt = feats(teacher)
        fi, ft = feats(student)
        eye = torch.eye(fi.shape[0])

        def kd(s, t):
            q = 0.5 * eye + 0.5 * F.softmax(t, dim=1)
            return F.kl_div(F.log_softmax(s, dim=1), q, reduction="batchmean")

        s, t = fi @ ft.T, gi @ gt.T
        z = torch.randn_like(fi)
        loss = (kd(s, t) + kd(s.T, t.T)) / 2 + F.mse_loss(fi, z) + F.mse_loss(ft, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    dt = _timed(step, args.steps)
    return {"step_s": dt, "samples_per_s": args.batch / dt,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--batch", str(args.batch), "--steps", str(args.steps),
           "--layers", str(args.layers)] + (["--breakdown"] if args.breakdown else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{side} benchmark failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--side", choices=("jax", "torch"), default=None)
    ap.add_argument("--breakdown", action="store_true", help="always time the step's parts")
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_jax(args) if args.side == "jax" else run_torch(args)))
        return
    ours = _child("jax", args)
    ref = _child("torch", args)
    gib, ratio = 2.0**30, ours["samples_per_s"] / ref["samples_per_s"]
    achieved = ours["flops"] / ours["step_s"]
    frac = achieved / ours["matmul_peak"]
    print(f"\nViT-B/32 ({args.layers} layers/tower), batch {args.batch}, {args.steps} timed steps, CPU")
    print(f"{'':28s}{'jax_refine':>14s}{'PyTorch':>14s}")
    print(f"{'step time (s)':28s}{ours['step_s']:14.3f}{ref['step_s']:14.3f}")
    print(f"{'samples/s':28s}{ours['samples_per_s']:14.2f}{ref['samples_per_s']:14.2f}")
    print(f"{'peak RSS (GiB)':28s}{ours['peak_rss'] / gib:14.2f}{ref['peak_rss'] / gib:14.2f}")
    print(f"{'XLA args+temp (GiB)':28s}{ours['xla_bytes'] / gib:14.2f}{'-':>14s}")
    print(f"{'ratio ours/PyTorch':28s}{ratio:14.2f}   (target >= 1.0)")
    print(f"{'step GFLOP (XLA)':28s}{ours['flops'] / 1e9:14.1f}   ({ours['flops'] / args.batch / 1e9:.1f} per sample)")
    print(f"{'achieved GFLOP/s':28s}{achieved / 1e9:14.1f}")
    print(f"{'matmul peak GFLOP/s':28s}{ours['matmul_peak'] / 1e9:14.1f}")
    print(f"{'fraction of peak':28s}{frac:14.1%}   (target >= 80%)")
    print(f"{'compile (s)':28s}{ours['compile_s']:14.1f}")
    if (ratio < 1.0 or frac < 0.8) and not args.breakdown:
        args.breakdown = True
        ours = _child("jax", args)
    if "breakdown" in ours:
        print("\nwhere our step's time goes (separately jitted sub-programs, s):")
        for k, v in ours["breakdown"].items():
            print(f"  {k:28s}{v:10.3f}")
        print(f"  {'full step':28s}{ours['step_s']:10.3f}")
    if "profile" in ours:
        print("\nprofile of one full step (XLA:CPU thunk time by kind, s; thunks can overlap):")
        for k, v in ours["profile"]["by_kind"].items():
            print(f"  {k:48s}{v / 1000:8.2f}")
        print("largest single ops (s):")
        for k, v in ours["profile"]["top_ops"].items():
            print(f"  {k:48s}{v / 1000:8.2f}")


if __name__ == "__main__":
    main()
