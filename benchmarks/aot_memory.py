"""Ahead-of-time per-device memory of the compiled CLIP-Refine step for large CLIPs on big meshes, on CPU.

    python benchmarks/aot_memory.py                                   # ViT-L/14-336 and bigG/14, gpu8 + tpu_pod
    python benchmarks/aot_memory.py --models bigg14 --presets gpu8 --remat full save_dots --out mem.jsonl
    python benchmarks/aot_memory.py --report mem.jsonl                # the table of earlier runs
    python benchmarks/aot_memory.py --models vitl14 --presets gpu1 --remat full --dtype float32 \
        --grad-accum 1 2 4 8 16 --out accum.jsonl                       # one GPU, exact accumulation (docs/grad_accum.md)

No weights are made: the train state and the batch are `jax.ShapeDtypeStruct`s with their shardings, and
`jit(step).lower(...).compile().memory_analysis()` gives each device's bytes. Fake CPU devices stand in for
the accelerators (`--xla_force_host_platform_device_count`, set here before JAX starts): the mesh presets of
jax_refine/config_base.py are `gpu1` = 1 device; `gpu8` = 8 devices, data 1 x fsdp 8; `tpu_pod` =
`--pod-devices` (64) devices, data 16 x fsdp 4. XLA:CPU's buffer assignment stands in for the GPU/TPU compiler's, so read the numbers as
estimates (the argument bytes are exact; temporaries depend on the backend's fusion and scheduling).
Per-device total = arguments + temporaries + outputs - outputs aliased to donated arguments.
FLOPs: `flops_model` is the analytic matmul count of benchmarks/clip_sizes.py (the step as run); `flops_xla` is
`compiled.cost_analysis()["flops"]`, which counts each while loop's body ONCE (scan over layers, scan over
micro-batches), so with scan it is far below the step's real work: kept for reference only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESET_DEVICES = {"cpu": 8, "gpu1": 1, "gpu8": 8, "tpu_pod": None}  # None: --pod-devices; cpu: data parallel over 8


def _setup_devices(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def measure(model: str, preset: str, devices: int, remat: str, scan: bool, batch: int, dtype: str,
            grad_accum: int = 1) -> dict:
    """Compile the step for abstract inputs and return its per-device memory analysis (bytes) and timings."""
    import jax
    import jax.numpy as jnp

    from benchmarks.clip_sizes import clip_refine_step_flops, clip_size
    from jax_refine.config_base import get_config
    from jax_refine import sharding as shd, train

    c = get_config(preset)
    spec = clip_size(model)
    c.model.random_init = spec
    c.model.dtype, c.model.remat, c.model.scan_layers = dtype, remat, scan
    c.train.batch_size, c.train.num_steps, c.train.grad_accum = batch, 1, grad_accum
    mesh = shd.make_mesh(c.mesh.shape, jax.devices()[:devices])
    t0 = time.perf_counter()
    trainer = train.build_trainer(c, mesh, total_steps=1)
    saved = trainer.abstract_saved()
    teacher = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           trainer.setup.abstract_params, trainer.state_sh.teacher)
    state = saved.replace(teacher=teacher)
    size, length = trainer.setup.model.image_size, trainer.setup.model.text_length
    batch_in = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=shd.batch_sharding(mesh, 4)),
                "input_ids": jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=shd.batch_sharding(mesh, 2)),
                "attention_mask": jax.ShapeDtypeStruct((batch, length), jnp.int32,
                                                       sharding=shd.batch_sharding(mesh, 2))}
    lowered = trainer.step_fn.lower(state, batch_in, jax.random.key(0))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_params = sum(int(a.size) for a in jax.tree.leaves(trainer.setup.abstract_params))
    get = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    total = get["argument"] + get["temp"] + get["output"] - get["alias"]
    return {"model": model, "preset": preset, "devices": devices, "mesh": dict(mesh.shape), "remat": remat,
            "scan_layers": scan, "batch": batch, "grad_accum": grad_accum, "dtype": dtype, "params": n_params, **get,
            "total": total, "flops_model": clip_refine_step_flops(spec, batch, length, grad_accum),
            "flops_xla": float(cost.get("flops", float("nan"))), "lower_s": t1 - t0, "compile_s": t2 - t1}


def table(rows: list[dict]) -> str:
    gib = 2.0**30
    lines = ["| model | preset (mesh) | remat | grad_accum | params | arguments GiB | temporaries GiB "
             "| total GiB/device | step TFLOPs (model) | compile s (CPU) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1"
        flops = r.get("flops_model")
        lines.append(f"| {r['model']} | {r['preset']} ({r['devices']} dev: {mesh}) | {r['remat']} | "
                     f"{r.get('grad_accum', 1)} | {r['params'] / 1e9:.2f} B | {r['argument'] / gib:.2f} | "
                     f"{r['temp'] / gib:.2f} | {r['total'] / gib:.2f} | "
                     f"{'' if flops is None else f'{flops / 1e12:.0f}'} | {r['compile_s']:.0f} |")
    if rows:
        r = rows[0]
        lines.append(f"\nGlobal batch {r['batch']}, {r['dtype']} compute, fp32 parameters, AdamW moments and teacher; "
                     f"scan over layers: {r['scan_layers']}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vitl14_336", "bigg14"])
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESET_DEVICES), default=["gpu8", "tpu_pod"])
    ap.add_argument("--remat", nargs="+", choices=("none", "full", "save_dots"), default=["none", "full", "save_dots"])
    ap.add_argument("--no-scan", action="store_true", help="unrolled layers (much slower to compile)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--grad-accum", type=int, nargs="+", default=[1], help="config.train.grad_accum values")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--pod-devices", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per compiled step")
    ap.add_argument("--report", type=Path, default=None, help="only print the table of this JSON-lines file")
    args = ap.parse_args()
    if args.report:
        print(table([json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]))
        return
    _setup_devices(max(8, args.pod_devices))
    rows = []
    for model in args.models:
        for preset in args.presets:
            for remat in args.remat:
                for accum in args.grad_accum:
                    n = PRESET_DEVICES[preset] or args.pod_devices
                    what = f"{model} {preset} remat={remat} grad_accum={accum}"
                    try:
                        row = measure(model, preset, n, remat, not args.no_scan, args.batch, args.dtype, accum)
                    except Exception as e:  # one failed compile (e.g. out of host memory) must not lose the others
                        print(f"[aot] {what}: failed: {type(e).__name__}: {str(e)[:300]}", file=sys.stderr, flush=True)
                        continue
                    rows.append(row)
                    print(f"[aot] {what}: {row['total'] / 2**30:.2f} GiB/device (compile {row['compile_s']:.0f}s)",
                          flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
