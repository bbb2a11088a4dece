"""Training input pipeline throughput (examples/s) per core count, on real COCO photos read in place.

    python benchmarks/input_pipeline.py [--cores 1,2] [--variants exact,draft,resized] [--batch 64]
                                        [--steps 16] [--repeats 3] [--train-step-rate EX_PER_S]

The photos are the 159 captioned COCO 2017 photos of ../shared/data/coco_mini (mostly 640x480 / 640x427,
read in place, never copied), listed `--images` times over in a temporary COCO captions JSON (absolute
file names) so an epoch is longer than the timed batches. Each core count runs in its own process pinned
to the first N cores (`os.sched_setaffinity`, like `taskset -c 0,..,N-1`), each variant `--repeats` times
on a fresh iterator (2 warm-up batches, then `--steps` timed batches); the table gives the median, the
per-core rate, the examples per CPU-second of the process (user + system time of all its threads: what
one core would give without other load) and the 1-minute load average before/after. Variants, all at 224 px with tokenization:
  exact    data.source=coco_json, the CLIPImageProcessor pixels (the default)
  draft    the same with data.fast_decode=True (JPEG DCT-domain downscale, then the exact resize)
  resized  prepare-data --image-size 224 (photos stored shortest side 224, JPEG q95), data.source=tfds_dir
  eval     the evaluation loader (`load_classification("folder:coco_mini")`, all 239 photos, exact pixels,
           no tokenization), one pass after its first batch; not run unless named in --variants
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python benchmarks/input_pipeline.py` from a checkout
COCO = ROOT.parent / "shared" / "data" / "coco_mini"
VARIANTS = ("exact", "draft", "resized", "eval")


def write_captions(out: Path, copies: int) -> Path:
    """A COCO captions JSON naming the captioned coco_mini photos by absolute path, `copies` times over."""
    images, anns = [], []
    for split in ("train2017", "val2017"):
        doc = json.loads((COCO / "annotations" / f"captions_{split}.json").read_text())
        caps: dict[int, list[str]] = {}
        for a in doc["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        for im in doc["images"]:
            if im["id"] in caps:
                images.append((str((COCO / split / im["file_name"]).resolve()), caps[im["id"]]))
    doc = {"images": [], "annotations": []}
    for c in range(copies):
        for k, (path, caps) in enumerate(images):
            i = c * len(images) + k
            doc["images"].append({"id": i, "file_name": path})
            doc["annotations"] += [{"image_id": i, "caption": t} for t in caps]
    (out / "captions.json").write_text(json.dumps(doc))
    return out / "captions.json"


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def time_variant(cfg: dict, batch: int, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """`repeats` fresh training iterators (2 warm-up batches, then `steps` timed batches): examples per wall
    second and examples per CPU second of this process (the per-core capacity, insensitive to other load)."""
    from jax_refine.data import make_train_iterator

    rates, per_cpu = [], []
    for r in range(repeats):
        it = make_train_iterator(cfg, global_batch_size=batch, image_size=224, seed=r)
        next(it), next(it)
        t, c = time.perf_counter(), _cpu_seconds()
        for _ in range(steps):
            next(it)
        rates.append(steps * batch / (time.perf_counter() - t))
        per_cpu.append(steps * batch / (_cpu_seconds() - c))
        del it
    return rates, per_cpu


def time_eval(cfg: dict, batch: int, steps: int, repeats: int) -> tuple[list[float], list[float]]:
    """Like `time_variant` for the class-folder evaluation loader over coco_mini (one pass, first batch untimed)."""
    del cfg, steps
    from jax_refine.data import load_classification

    rates, per_cpu = [], []
    for _ in range(repeats):
        ev = load_classification(f"folder:{COCO}", batch_size=batch, image_size=224)
        it = iter(ev.batches())
        next(it)
        t, c = time.perf_counter(), _cpu_seconds()
        n = sum(int(b["mask"].sum()) for b in it)
        rates.append(n / (time.perf_counter() - t))
        per_cpu.append(n / (_cpu_seconds() - c))
    return rates, per_cpu


def run_one(args) -> None:
    """This process, pinned to `args.cores` cores: print one JSON line per variant."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    from jax_refine.data import prepare_coco_json

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann = write_captions(tmp, args.images)
        base = {"source": "coco_json", "annotations": str(ann), "images": str(COCO), "train_fraction": 1.0}
        for v in args.variants.split(","):
            if v == "exact":
                cfg = dict(base)
            elif v == "draft":
                cfg = {**base, "fast_decode": True}
            elif v == "resized":
                t = time.perf_counter()
                out = prepare_coco_json(ann, COCO, tmp / "tfds", image_size=224)
                prep = time.perf_counter() - t
                print(f"[bench] prepare-data --image-size 224: {prep:.1f} s for {159 * args.images} photos",
                      file=sys.stderr)
                cfg = {"source": "tfds_dir", "data_dir": str(out), "shuffle_buffer": 1000}
            elif v == "eval":
                cfg = {}
            else:
                raise SystemExit(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
            load0 = os.getloadavg()[0]
            rates, per_cpu = (time_eval if v == "eval" else time_variant)(cfg, args.batch, args.steps, args.repeats)
            print(json.dumps({"variant": v, "cores": args.cores, "rates": rates, "per_cpu": per_cpu,
                              "load": [load0, os.getloadavg()[0]]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cores", default="1,2", help="core counts, each in its own pinned process (default 1,2)")
    ap.add_argument("--variants", default="exact,draft,resized", help="of " + ", ".join(VARIANTS))
    ap.add_argument("--images", type=int, default=8, help="times the 159 photos are listed (default 8: 1272)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16, help="timed batches per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-step-rate", type=float, default=None, help="train step examples/s, for the last column")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.cores = int(args.cores)
        run_one(args)
        sys.stdout.flush()
        os._exit(0)  # not a normal exit: TF's numpy_function threads can hang interpreter shutdown
    rows = []
    for n in [int(c) for c in args.cores.split(",")]:
        cmd = [sys.executable, __file__, "--child", "--cores", str(n), "--variants", args.variants, "--images",
               str(args.images), "--batch", str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    consume = f"{args.train_step_rate:.0f}" if args.train_step_rate else "n/a"
    print(f"\ntraining input pipeline, 224 px, COCO photos (mostly 640x480/640x427), batch {args.batch}, "
          f"median of {args.repeats} x {args.steps} batches; train step consumes {consume} ex/s")
    print("| variant | cores | examples/s (median) | per core | all repeats | examples per CPU-second | "
          "load avg before/after |")
    print("|---|---:|---:|---:|---|---:|---|")
    for r in sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), r["cores"])):
        med = statistics.median(r["rates"])
        print(f"| {r['variant']} | {r['cores']} | {med:.0f} | {med / r['cores']:.0f} | "
              f"{', '.join(f'{x:.0f}' for x in r['rates'])} | {statistics.median(r['per_cpu']):.0f} | "
              f"{r['load'][0]:.2f} / {r['load'][1]:.2f} |")


if __name__ == "__main__":
    main()
