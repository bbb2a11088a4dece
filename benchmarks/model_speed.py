"""Forward and forward+backward speed of our NNX CLIP vs transformers' PyTorch CLIPModel (same config).

    .venv/bin/python benchmarks/model_speed.py --size vit_b32 --layers 12 --batch 16 --dtype float32

Prints one table row per (framework, pass): median milliseconds over `--reps` runs after warm-up.
Uses the test fixtures' config sizes (`tests/hf_fixtures.py`); random weights, random inputs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from hf_fixtures import SIZES, hf_clip_config  # noqa: E402

from jax_refine.models.clip.modeling import create_clip  # noqa: E402


def _time(fn, reps: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="vit_b32", choices=sorted(SIZES))
    p.add_argument("--layers", type=int, default=12, help="layers per tower")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()

    config = hf_clip_config(args.size, num_hidden_layers=args.layers)
    config.vision_config.num_hidden_layers = args.layers
    size, length = config.vision_config.image_size, 77
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(args.batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(0, 49406, (args.batch, length)).astype(np.int32)
    ids[:, -1] = 49407
    mask = np.ones_like(ids)

    model = create_clip(config, dtype=jnp.dtype(args.dtype))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, pixels, ids, mask):
        fi, ft = nnx.merge(graphdef, params)(pixels, ids, mask)
        return jnp.sum(fi.astype(jnp.float32) * ft.astype(jnp.float32))

    fwd = jax.jit(loss)
    bwd = jax.jit(jax.grad(loss))
    x = (jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    rows = [("jax", "forward", _time(lambda: fwd(params, *x).block_until_ready(), args.reps)),
            ("jax", "fwd+bwd", _time(lambda: jax.block_until_ready(bwd(params, *x)), args.reps))]

    from transformers import CLIPModel

    tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    ref = CLIPModel(config).to(tdtype)
    tp = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(tdtype)
    ti, tm = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def torch_loss():
        fi = ref.get_image_features(pixel_values=tp).pooler_output
        ft = ref.get_text_features(input_ids=ti, attention_mask=tm).pooler_output
        return (fi.float() * ft.float()).sum()

    def torch_fwd():
        with torch.no_grad():
            torch_loss()

    def torch_bwd():
        ref.zero_grad(set_to_none=True)
        torch_loss().backward()

    rows += [("torch", "forward", _time(torch_fwd, args.reps)), ("torch", "fwd+bwd", _time(torch_bwd, args.reps))]
    print(f"CLIP {args.size} layers={args.layers} batch={args.batch} dtype={args.dtype} "
          f"backend={jax.default_backend()} torch_threads={torch.get_num_threads()}")
    print(f"{'framework':<10}{'pass':<10}{'ms (median)':>12}")
    for fw, name, ms in rows:
        print(f"{fw:<10}{name:<10}{ms:>12.1f}")


if __name__ == "__main__":
    main()
