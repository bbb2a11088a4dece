"""Time and per-device temp memory of the CLIP-Refine loss (value and grad): plain vs `losses.sharded`,
and `metrics.recall_at_k` at a few chunk sizes. Prints a table.

    python benchmarks/bench_losses.py --batch 512 --dim 512 --devices 8   # fake CPU devices
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def _time(f, *args, reps: int = 3) -> float:
    import jax

    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - t) / reps * 1e3


def _temp_mb(f, *args) -> float:
    stats = f.lower(*args).compile().memory_analysis()
    return getattr(stats, "temp_size_in_bytes", float("nan")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5000)
    a = p.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={a.devices}")
    import jax
    from jax.sharding import AxisType

    from jax_refine import losses, metrics

    k = jax.random.split(jax.random.key(0), 6)
    fi, ft, gi, gt = (jax.random.normal(x, (a.batch, a.dim)) for x in k[:4])
    z = losses.sample_reference(k[4], (a.batch, a.dim))
    n = len(jax.devices())
    mesh = jax.make_mesh((n, 1), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    rows = [("loss", "variant", "ms", "temp MB/device")]
    variants = (("plain", losses.clip_refine_loss), (f"sharded x{n}", losses.sharded(losses.clip_refine_loss, mesh)))
    for name, fn in variants:
        step = jax.jit(jax.value_and_grad(lambda x, y: fn(x, y, gi, gt, z)[0], (0, 1)))
        rows.append(("clip_refine v+g", name, f"{_time(step, fi, ft):.1f}", f"{_temp_mb(step, fi, ft):.1f}"))
    img = jax.random.normal(k[5], (a.images, a.dim))
    cap = jax.numpy.arange(a.captions) % a.images
    txt = img[cap] + jax.random.normal(k[0], (a.captions, a.dim))
    for chunk in (128, 1024):
        f = jax.jit(lambda i, t, c, cs=chunk: metrics.recall_at_k(i, t, c, chunk_size=cs))
        rows.append((f"recall_at_k {a.images}x{a.captions}", f"chunk {chunk}", f"{_time(f, img, txt, cap):.1f}",
                     f"{_temp_mb(f, img, txt, cap):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
