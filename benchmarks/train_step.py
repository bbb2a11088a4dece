"""Train-step benchmark: our jitted CLIP-Refine step vs PyTorch (eager and torch.compile), CPU or GPU.

    python benchmarks/train_step.py --platform gpu --precision bf16 --model vitb32 --batch 512 --steps 10
    python benchmarks/train_step.py --platform cpu --model tiny --batch 8 --steps 2 --no-torch-compile
    python benchmarks/train_step.py --side jax --attention cudnn --out results.jsonl   # one run, appended (GPU)
    python benchmarks/train_step.py --report results.jsonl                             # the table so far

The step (CLIP-Refine, design.md): student forward + backward, frozen teacher forward, HyCD + RaFA, AdamW
(lr 1e-6, weight decay 0.1). The batch is on the device before timing; `--warmup` steps run first, then
`--steps` steps are timed with one synchronisation at the end (`block_until_ready` / `cuda.synchronize`).
Each side runs in its own child process: ours (jax_refine.train's jitted, donated step on one device),
PyTorch eager (transformers' CLIPModel with its default SDPA attention, the same loss equations, AdamW,
fused on CUDA) and torch.compile of the same loss function.

Precision: bf16 = bf16 compute with fp32 parameters (jax: `model.dtype=bfloat16`; torch: autocast);
tf32 = fp32 with TF32 matmuls; highest = fp32 matmuls throughout.
CPU s/step: the process's CPU time (all threads) per timed step: on a shared CPU it is steadier than wall time.
Compile time: jax's `lower().compile()`; torch: the first step (torch.compile compiles there).
Peak device memory: jax `device.memory_stats()['peak_bytes_in_use']`, torch `cuda.max_memory_allocated()`;
on CPU the process's peak RSS. Model FLOPs are counted analytically (benchmarks/clip_sizes.py:
4 x forward matmul FLOPs, i.e. student forward + backward = 3x, teacher = 1x), not taken from XLA's cost
analysis (which leaves out library GEMMs on GPU). MFU is against a matmul rate each jax run measures with
`jnp.dot` of two square matrices in the run's precision (8192 on GPU, 2048 on CPU).
`--attention cudnn` (GPU only) and `xla_padded` (the same padded program on XLA) pad each tower's tokens to an
even length (`padded_length`); the run prints and records the lengths, and its model FLOPs stay those of the real
lengths (the padded rows are not useful work).
"""
from __future__ import annotations

import argparse
import json
import os
import platform as platform_lib
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.clip_sizes import SIZE_NAMES, clip_refine_step_flops, clip_size  # noqa: E402

SIDES = ("jax", "torch", "torch_compile")
TEXT_LENGTH = 77


def _batch(b: int, image_size: int, seed: int = 0) -> dict:
    """Random pixels (B, H, W, 3) f32 and captions of random lengths: BOS ... EOS, then EOS padding."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 49405, size=(b, TEXT_LENGTH)).astype(np.int32)
    ends = rng.integers(5, TEXT_LENGTH, size=b)
    mask = (np.arange(TEXT_LENGTH)[None] <= ends[:, None]).astype(np.int32)
    ids[:, 0], ids[np.arange(b), ends] = 49406, 49407
    return {"image": rng.normal(size=(b, image_size, image_size, 3)).astype(np.float32),
            "input_ids": np.where(mask == 1, ids, 49407).astype(np.int32), "attention_mask": mask}


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _result(args, framework: str, step_s: float, compile_s: float, peak_bytes: int, memory_kind: str,
            device: str, matmul_peak: float | None, **extra) -> dict:
    accum = args.grad_accum if framework == "jax" else 1  # the torch sides have no accumulation
    flops = clip_refine_step_flops(clip_size(args.model, args.layers), args.batch, TEXT_LENGTH, accum)
    return {"name": args.name or framework, "framework": framework, "model": args.model, "layers": args.layers,
            "batch": args.batch, "grad_accum": accum, "precision": args.precision, "platform": args.platform, "device": device,
            "steps": args.steps, "warmup": args.warmup, "step_s": step_s, "samples_per_s": args.batch / step_s,
            "compile_s": compile_s, "peak_bytes": peak_bytes, "memory_kind": memory_kind,
            "model_flops_per_step": flops, "achieved_flops": flops / step_s, "matmul_peak_flops": matmul_peak,
            **extra}


# -------------------------------------------------------------------------------------------------- jax
def _jax_matmul_peak(platform: str, precision: str) -> float:
    """FLOP/s of one jitted `jnp.dot` of two n x n matrices in the run's precision (n 8192 GPU, 2048 CPU)."""
    import jax
    import jax.numpy as jnp

    n = 8192 if platform == "gpu" else 2048
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda x, y: jnp.dot(x, y))
    mm(a, a).block_until_ready()
    reps = 20 if platform == "gpu" else 3
    t = time.perf_counter()
    for _ in range(reps):
        out = mm(a, a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def padded_lengths(args) -> dict[str, list[int]]:
    """`{"text": [77, padded], "image": [tokens, padded]}` for the padded attention modes, else {}."""
    from jax_refine.models.layers import PADDED_ATTENTION, padded_length

    if args.attention not in PADDED_ATTENTION:
        return {}
    vision = clip_size(args.model, args.layers)["vision_config"]
    image = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    return {"text": [TEXT_LENGTH, padded_length(TEXT_LENGTH)], "image": [image, padded_length(image)]}


def run_jax(args) -> dict:
    import jax

    if args.precision != "bf16":
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.precision == "tf32" else "highest")
    from jax_refine.config_base import get_config
    from jax_refine import profiling, sharding as shd, train

    if args.attention == "cudnn" and jax.default_backend() != "gpu":
        raise SystemExit(f"--attention cudnn needs a CUDA GPU (jax backend: {jax.default_backend()}); "
                         "--attention xla_padded runs the same padded program with XLA's attention")
    padded = padded_lengths(args)
    if padded:
        print(f"[bench] attention={args.attention}: tokens padded to an even length: "
              + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in padded.items()), flush=True)
    spec = clip_size(args.model, args.layers)
    c = get_config()
    c.model.random_init = spec
    c.model.dtype = "bfloat16" if args.precision == "bf16" else "float32"
    c.model.attention, c.model.remat, c.model.scan_layers = args.attention, args.remat, args.scan
    c.train.batch_size, c.train.num_steps, c.optimizer.lr = args.batch, 10, 1e-6
    c.train.grad_accum = args.grad_accum
    device = jax.devices()[0]
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [device])
    trainer = train.build_trainer(c, mesh, total_steps=10)
    state = trainer.init_state()
    batch = shd.host_to_global(_batch(args.batch, spec["vision_config"]["image_size"]), mesh)
    key = jax.random.key(0)
    jax.block_until_ready((state, batch))
    t0 = time.perf_counter()
    compiled = trainer.step_fn.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    info = profiling.describe_compiled(compiled, args.batch)
    holder = {"state": state}

    def step():
        holder["state"], m = compiled(holder["state"], batch, key)
        return m

    for _ in range(args.warmup):
        jax.block_until_ready(step())
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        m = step()
    jax.block_until_ready((holder["state"], m))
    step_s = (time.perf_counter() - t) / args.steps
    cpu_s = (time.process_time() - cpu) / args.steps
    stats = device.memory_stats() or {}
    peak, kind = (stats["peak_bytes_in_use"], "device") if "peak_bytes_in_use" in stats else (_rss(), "RSS")
    extra = {}
    if args.breakdown:
        extra["breakdown"] = _breakdown(trainer, holder["state"], batch, args.steps)
        extra["profile"] = _profile(lambda: jax.block_until_ready(step()))
    return _result(args, "jax", step_s, compile_s, int(peak), kind, f"{device.device_kind} ({jax.default_backend()})",
                   _jax_matmul_peak(args.platform, args.precision), loss=float(m["loss"]), cpu_s=cpu_s,
                   xla_flops=info.get("flops"), options={"attention": args.attention, "remat": args.remat,
                                                         "scan_layers": args.scan}, padded_lengths=padded,
                   versions={"jax": jax.__version__, "flax": __import__("flax").__version__}, **extra)


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
    """Trace one full step with the JAX profiler and sum XLA thunk times (ms) by kind, plus the top ops."""
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
    top: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, ms in by_op.items():
        by_kind[_op_kind(name)] += ms
        top[_op_kind(name)][name] = ms
    return {"by_kind": dict(by_kind.most_common()), "top_ops": dict(by_op.most_common(8)),
            "top_ops_by_kind": {kind: dict(ops.most_common(5)) for kind, ops in top.items()}}


def _breakdown(trainer, state, batch, steps: int) -> dict:
    """Time sub-programs of the step (s): student forward, + teacher forward, value_and_grad, AdamW."""
    import jax
    import optax
    from flax import nnx

    from jax_refine import objectives

    g, rest = trainer.setup.graphdef, trainer.setup.rest

    def timed(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t) / steps

    def feats(p):
        return nnx.merge(g, p, rest)(batch["image"], batch["input_ids"], batch["attention_mask"])

    def loss(p, t):
        fi, ft = feats(p)
        gi, gt = jax.lax.stop_gradient(feats(t))
        z = jax.random.normal(jax.random.key(0), fi.shape)
        o = objectives.Outputs(fi, ft, gi, gt, z, p["logit_scale"], jax.random.key(1))
        return objectives.get_objective("clip_refine").fn(o, trainer.config.method)[0]

    p, t = state.params, state.teacher
    fwd = jax.jit(lambda p: feats(p))
    both = jax.jit(lambda p, t: loss(p, t))
    grad = jax.jit(jax.value_and_grad(loss))
    upd = jax.jit(lambda gr, s, p: optax.apply_updates(p, trainer.tx.update(gr, s, p)[0]))
    grads = grad(p, t)[1]
    return {"student forward": timed(lambda: jax.block_until_ready(fwd(p))),
            "student + teacher forward": timed(lambda: jax.block_until_ready(both(p, t))),
            "forward + backward": timed(lambda: jax.block_until_ready(grad(p, t))),
            "optimizer update": timed(lambda: jax.block_until_ready(upd(grads, state.opt_state, p)))}


# ------------------------------------------------------------------------------------------------ torch
def _torch_matmul_peak(torch, dev: str, precision: str) -> float:
    n = 8192 if dev == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    reps = 20 if dev == "cuda" else 3
    a @ a
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    if dev == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def run_torch(args, compiled: bool) -> dict:
    """HF CLIPModel student + frozen copy as teacher, the CLIP-Refine loss from design.md, AdamW."""
    import contextlib
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPModel

    dev = "cuda" if args.platform == "gpu" else "cpu"
    if dev == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    if args.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    else:  # bf16 (autocast does the rest) or highest: exact fp32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    spec = clip_size(args.model, args.layers)
    student = CLIPModel(CLIPConfig(**spec)).to(dev).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                            **({"fused": True} if dev == "cuda" else {"foreach": True}))
    b = _batch(args.batch, spec["vision_config"]["image_size"])
    pixels = torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy()).to(dev)
    ids = torch.from_numpy(b["input_ids"].astype("int64")).to(dev)
    mask = torch.from_numpy(b["attention_mask"].astype("int64")).to(dev)
    autocast = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext

    def feats(m, pixels, ids, mask):
        fi = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        return fi.float(), m.text_projection(m.text_model(input_ids=ids, attention_mask=mask).pooler_output).float()

    def kd(s, t):
        eye = torch.eye(s.shape[0], device=s.device)
        q = 0.5 * eye + 0.5 * F.softmax(t, dim=1)
        return F.kl_div(F.log_softmax(s, dim=1), q, reduction="batchmean")

    def loss_fn(pixels, ids, mask):
        with autocast():
            with torch.no_grad():
                gi, gt = feats(teacher, pixels, ids, mask)
            fi, ft = feats(student, pixels, ids, mask)
        s, t = fi @ ft.T, gi @ gt.T
        z = torch.randn_like(fi)
        return (kd(s, t) + kd(s.T, t.T)) / 2 + F.mse_loss(fi, z) + F.mse_loss(ft, z)

    fn = torch.compile(loss_fn) if compiled else loss_fn

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def step():
        loss = fn(pixels, ids, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        step()
    sync()
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        loss = step()
    sync()
    step_s = (time.perf_counter() - t) / args.steps
    cpu_s = (time.process_time() - cpu) / args.steps
    peak, kind = (torch.cuda.max_memory_allocated(), "device") if dev == "cuda" else (_rss(), "RSS")
    device = torch.cuda.get_device_name() if dev == "cuda" else platform_lib.processor() or "cpu"
    return _result(args, "torch.compile" if compiled else "torch eager", step_s, first_s, int(peak), kind, device,
                   _torch_matmul_peak(torch, dev, args.precision), loss=loss.item(), cpu_s=cpu_s,
                   attention=getattr(student.config, "_attn_implementation", None),
                   versions={"torch": torch.__version__, "transformers": __import__("transformers").__version__})


# ----------------------------------------------------------------------------------------------- driver
def _child_args(args, side: str) -> list[str]:
    out = ["--side", side, "--platform", args.platform, "--precision", args.precision, "--model", args.model,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--attention", args.attention, "--remat", args.remat]
    out += ["--layers", str(args.layers)] if args.layers is not None else []
    out += ["--scan"] if args.scan else []
    out += ["--breakdown"] if args.breakdown else []
    return out


def _run_child(args, side: str, out: Path) -> None:
    """Run one side in a fresh process; its JSON line is appended to `out` (failures are reported, not fatal)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.platform == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), *_child_args(args, side), "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"[bench] {side} failed (exit {p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr, flush=True)


def load_results(path: Path) -> list[dict]:
    """The JSON lines of `path` (each one run); unreadable lines are counted and skipped."""
    rows, bad = [], 0
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
    if bad:
        print(f"[bench] {path}: skipped {bad} unreadable lines", file=sys.stderr)
    return rows


def _peak_for(rows: list[dict], row: dict) -> float | None:
    """The reference matmul rate for `row`'s precision: the best jnp.dot rate any jax run measured, else any."""
    same = [r for r in rows if r["precision"] == row["precision"] and r.get("matmul_peak_flops")]
    jax_rows = [r["matmul_peak_flops"] for r in same if r["framework"] == "jax"]
    rates = jax_rows or [r["matmul_peak_flops"] for r in same]
    return max(rates) if rates else None


def table(rows: list[dict]) -> str:
    """One markdown table of all runs, with each run's speed relative to torch.compile / eager (same precision)."""
    if not rows:
        return "(no results yet)"
    gib = 2.0**30
    r0 = rows[0]
    lines = [f"{r0['model']} ({r0.get('layers') or 'all'} layers), batch {r0['batch']}, {r0['steps']} timed steps "
             f"after {r0['warmup']} warm-up, {r0['device']}",
             "",
             "| run | precision | step ms | CPU s/step | samples/s | compile s | peak mem GiB | model TFLOP/s "
             "| % of matmul peak | vs torch.compile | vs eager |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = {fw: next((x["step_s"] for x in rows if x["framework"] == fw and x["precision"] == r["precision"]), None)
               for fw in ("torch.compile", "torch eager")}
        peak = _peak_for(rows, r)
        mfu = f"{100 * r['achieved_flops'] / peak:.1f}" if peak else "-"
        vs = [f"{ref[fw] / r['step_s']:.2f}x" if ref[fw] else "-" for fw in ("torch.compile", "torch eager")]
        mem = f"{r['peak_bytes'] / gib:.2f}" + ("" if r.get("memory_kind") == "device" else " (RSS)")
        cpu = f"{r['cpu_s']:.2f}" if r.get("cpu_s") is not None else "-"
        lines.append(f"| {r['name']} | {r['precision']} | {1e3 * r['step_s']:.1f} | {cpu} | {r['samples_per_s']:.1f} | "
                     f"{r['compile_s']:.1f} | {mem} | {r['achieved_flops'] / 1e12:.3g} | {mfu} | {vs[0]} | {vs[1]} |")
    peaks = sorted({(r["precision"], _peak_for(rows, r)) for r in rows if _peak_for(rows, r)})
    lines.append("")
    lines.append(f"Model FLOPs per step: {r0['model_flops_per_step'] / 1e12:.4g} TFLOP "
                 f"(4 x forward matmul FLOPs: student fwd + bwd = 3x, teacher fwd = 1x; benchmarks/clip_sizes.py). "
                 "Matmul peak measured with jnp.dot: "
                 + ", ".join(f"{p}: {v / 1e12:.3g} TFLOP/s" for p, v in peaks) + ".")
    for r in rows:
        if r.get("padded_lengths"):
            lines.append(f"{r['name']} pads the tokens (its FLOPs are counted at the real lengths): "
                         + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in r["padded_lengths"].items()) + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--precision", choices=("bf16", "tf32", "highest"), default="bf16")
    ap.add_argument("--model", choices=SIZE_NAMES, default="vitb32")
    ap.add_argument("--layers", type=int, default=None, help="cut both towers to this many blocks")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--grad-accum", type=int, default=1, help="jax: config.train.grad_accum (exact accumulation)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attention", choices=("xla", "cudnn", "xla_padded"), default="xla",
                    help="jax: attention implementation (cudnn: GPU; xla_padded: cudnn's padded program on XLA)")
    ap.add_argument("--remat", choices=("none", "full", "save_dots"), default="none", help="jax: per-block remat")
    ap.add_argument("--scan", action="store_true", help="jax: lax.scan over each tower's blocks")
    ap.add_argument("--side", choices=SIDES, default=None, help="run only this side, in this process")
    ap.add_argument("--no-torch-compile", action="store_true", help="skip torch.compile (slow on CPU)")
    ap.add_argument("--breakdown", action="store_true", help="jax: also time the step's parts and profile it")
    ap.add_argument("--name", default=None, help="row label in the table (default: the framework)")
    ap.add_argument("--out", type=Path, default=None, help="append each run's JSON line here "
                    "(default without --side: outputs/bench/train_step.jsonl, started afresh)")
    ap.add_argument("--report", type=Path, default=None, help="only print the table of this JSON-lines file")
    args = ap.parse_args()
    if args.report:
        print(table(load_results(args.report)))
        return
    if args.side:
        res = run_jax(args) if args.side == "jax" else run_torch(args, compiled=args.side == "torch_compile")
        line = json.dumps(res)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(line + "\n")
        print(line, flush=True)
        return
    out = args.out or ROOT / "outputs" / "bench" / "train_step.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.out is None and out.exists():
        out.unlink()
    for side in SIDES:
        if side == "torch_compile" and args.no_torch_compile:
            continue
        _run_child(args, side, out)
        print(table(load_results(out)) + "\n", flush=True)
    rows = load_results(out)
    for r in rows:
        if "breakdown" in r:
            print(f"where {r['name']}'s step time goes (separately jitted sub-programs, s):")
            for k, v in r["breakdown"].items():
                print(f"  {k:28s}{v:10.3f}")
            print("profile of one full step (XLA thunk time by kind, s; thunks can overlap):")
            for k, v in r["profile"]["by_kind"].items():
                print(f"  {k:48s}{v / 1000:8.2f}")
    print(f"JSON lines: {out}")


if __name__ == "__main__":
    main()
