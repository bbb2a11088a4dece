"""GPU check of `attention=cudnn`: its features and gradients against the same padded program on XLA.

    python benchmarks/cudnn_check.py                       # on a GPU: the CLIP sizes, 2 layers, batch 8, bf16
    python benchmarks/cudnn_check.py --sizes tiny vitb16   # on CPU it compares xla_padded with xla only

For each size (both towers cut to `--layers` blocks, random weights, random captions of random lengths padded
to 77 tokens) it computes, in one jitted call per mode, the features and the gradient of a scalar of them for
`attention` = xla (the unpadded default), xla_padded and, where the backend is a GPU, cudnn (bf16 compute),
and prints per mode the padded lengths and the largest difference to xla_padded relative to its largest
value (features; gradients over all parameters). Exit status 1 if a value is not finite or a difference is
above `--tol` (default 3e-2: bf16 with differently ordered sums). CPU runs cannot call cuDNN.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import CLIPConfig  # noqa: E402

from benchmarks.clip_sizes import SIZE_NAMES, clip_size  # noqa: E402
from benchmarks.train_step import TEXT_LENGTH, _batch  # noqa: E402
from jax_refine.models.clip.modeling import create_clip  # noqa: E402
from jax_refine.models.layers import padded_length, with_options  # noqa: E402


def features_and_grads(model, batch: dict):
    """`((image (B, P), text (B, P)), gradients)` of `sum(fi * ft) + sum(fi^2)` in float32, one jitted call."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        fi, ft = nnx.merge(graphdef, p)(batch["image"], batch["input_ids"], batch["attention_mask"])
        fi, ft = fi.astype(jnp.float32), ft.astype(jnp.float32)
        return jnp.sum(fi * ft) + jnp.sum(jnp.square(fi)), (fi, ft)

    (_, feats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return jax.tree.map(np.asarray, feats), jax.tree.map(lambda g: np.asarray(g, np.float32), grads)


def rel_diff(a, b) -> float:
    """Largest |a - b| over the leaves of two trees, relative to the largest |b| of all leaves."""
    top = max(float(np.abs(x).max()) for x in jax.tree.leaves(b))
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) / top


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=SIZE_NAMES, default=[n for n in SIZE_NAMES if n != "tiny"],
                    help="model sizes (tiny's vision head dim 12 is not a multiple of 8: cuDNN refuses it)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tol", type=float, default=3e-2)
    args = ap.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    modes = ("xla", "cudnn") if on_gpu else ("xla",)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}; "
          f"bf16 compute, {args.layers} layers, batch {args.batch}; differences relative to xla_padded")
    print("| size | image tokens (padded) | text tokens (padded) | mode | features | gradients | finite |")
    print("|---|---|---|---|---:|---:|---|")
    failed = False
    for name in args.sizes:
        spec = clip_size(name, args.layers)
        vision = spec["vision_config"]
        image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        tokens = (f"{image_tokens} ({padded_length(image_tokens)}) | "
                  f"{TEXT_LENGTH} ({padded_length(TEXT_LENGTH)})")
        batch = _batch(args.batch, vision["image_size"])
        base = create_clip(CLIPConfig(**spec), seed=0, dtype=jnp.bfloat16, attention="xla_padded")
        ref = features_and_grads(base, batch)
        for mode in modes:
            try:
                got = features_and_grads(with_options(base, attention=mode), batch)
            except Exception as err:  # noqa: BLE001 - a kernel that refuses the shapes is a result to report
                print(f"| {name} | {tokens} | {mode} | failed: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:150]} | | |")
                failed = True
                continue
            finite = all(np.isfinite(x).all() for x in jax.tree.leaves(got))
            feat, grad = rel_diff(got[0], ref[0]), rel_diff(got[1], ref[1])
            failed |= not finite or feat > args.tol or grad > args.tol
            print(f"| {name} | {tokens} | {mode} | {feat:.2e} | {grad:.2e} | {finite} |", flush=True)
    print("FAILED" if failed else "all within tolerance")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
