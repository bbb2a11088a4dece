"""Input pipeline throughput at 224 px on this machine, next to the train step's consumption rate.

    python benchmarks/input_pipeline.py [--images 512] [--batch 64] [--train-step-rate EX_PER_S]

Builds a COCO-format caption set of 640x480 JPEGs (COCO-like sizes, made from the real CIFAR-10 photos in
../shared/data when present, else noise), prepares it with our TFDS builder in a temp dir, and times
(1) the training iterator (decode, resize, crop, normalize, tokenize) and (2) the class-folder eval
loader. `--train-step-rate` is the trainer's examples/s (its benchmark prints it) for the last column.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/input_pipeline.py` from a checkout
CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"


def make_images(out: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    sources = sorted(CIFAR.glob("*/000[0-9].jpg")) if CIFAR.is_dir() else []
    names = []
    for k in range(n):
        if sources:
            with Image.open(sources[k % len(sources)]) as im:
                img = im.convert("RGB").resize((640, 480), Image.Resampling.BICUBIC)
        else:
            img = Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8))
        cls = f"class_{k % 10}"
        (out / cls).mkdir(parents=True, exist_ok=True)
        img.save(out / cls / f"{k:05d}.jpg", quality=90)
        names.append(f"{cls}/{k:05d}.jpg")
    return names


def rate(iterator, batch: int, steps: int) -> float:
    next(iterator)  # warm-up: graph building, first fills
    t = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-step-rate", type=float, default=None, help="train step examples/s (trainer benchmark)")
    args = ap.parse_args()
    from jax_refine.data import load_classification, make_train_iterator

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = make_images(tmp / "images", args.images)
        doc = {"images": [{"id": i, "file_name": f} for i, f in enumerate(names)],
               "annotations": [{"image_id": i, "caption": f"a photo of object number {i} on a table."}
                               for i in range(len(names))]}
        (tmp / "captions.json").write_text(json.dumps(doc))
        cfg = {"source": "coco_json", "annotations": str(tmp / "captions.json"), "images": str(tmp / "images"),
               "data_dir": str(tmp / "tfds"), "shuffle_buffer": 1000}
        train = make_train_iterator(cfg, global_batch_size=args.batch, image_size=224, seed=0)
        steps = max(1, min(train.steps_per_epoch * 2, 12))
        r_train = rate(train, args.batch, steps)
        ev = load_classification(f"folder:{tmp / 'images'}", batch_size=args.batch, image_size=224)
        r_eval = rate(iter(ev.batches()), args.batch, max(1, ev.num_batches - 1))
    consume = f"{args.train_step_rate:.1f}" if args.train_step_rate else "n/a (pass --train-step-rate)"
    print(f"\ninput pipeline, 224 px, 640x480 JPEG sources, {os.cpu_count()} CPU cores, batch {args.batch}")
    print(f"| {'pipeline':<38} | {'examples/s':>10} | train step consumes (ex/s) |")
    print(f"|{'-' * 40}|{'-' * 12}|{'-' * 28}|")
    print(f"| {'train: decode+resize+crop+tokenize':<38} | {r_train:>10.1f} | {consume:<26} |")
    print(f"| {'eval: class folder decode+resize+crop':<38} | {r_eval:>10.1f} | {'':<26} |")


if __name__ == "__main__":
    main()
