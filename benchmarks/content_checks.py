"""The cost of issue 23's content checks on real-size cases: seconds of each key and checksum.

    python benchmarks/content_checks.py                      # both parts below
    python benchmarks/content_checks.py --skip-checkpoint    # only the Flickr8k file keys

1. File keys (``jax_refine.fingerprint``) on Flickr8k (8,091 photos under ../shared/data/flickr8k/images):
   the whole image folder by stat (what an evaluation cache of a class/photo folder and a prepared set's
   photos cost), the same photos by content (sha256: what hashing every photo would cost instead), and
   the prepare-data key of the Flickr8k train split (token file bytes + its 6,000 photos by stat).
2. Checkpoint manifests (``checkpoint.write_manifest`` / ``verify_manifest``) of a ViT-B/32-sized random
   params tree (151.3M float32 parameters, about 605 MB), saved by Orbax as the trainer saves its params
   item; ``--opt-state`` adds AdamW's two moments (3x the bytes: a training step as the trainer saves it).
Each timing is the best of ``--repeats`` runs (the page cache is warm after the first: the numbers are the
hashing cost, not the disk's).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
VITB32_PARAMS = 151_277_313  # transformers CLIPModel openai/clip-vit-base-patch32


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def file_keys(repeats: int) -> None:
    from jax_refine import fingerprint
    from jax_refine.data import coco_captions_builder, sources

    images = FLICKR / "images"
    files = fingerprint.tree_files(images)
    t_list = best(lambda: fingerprint.tree_files(images), repeats)
    t_stat = best(lambda: fingerprint.files_key(files, root=images), repeats)
    t_hash = best(lambda: fingerprint.files_key(files, root=images, content=True), repeats)
    mb = sum(os.path.getsize(f) for f in files) / 1e6
    print(f"flickr8k images: {len(files)} files, {mb:.0f} MB; listing {t_list:.3f} s; key by stat {t_stat:.3f} s; "
          f"key by sha256 {t_hash:.3f} s")
    tokens = FLICKR / "Flickr8k.token.txt"
    records = sources.read_captions(tokens, images, format="flickr", split="train")
    paths = [r["path"] for r in records]
    t_key = best(lambda: coco_captions_builder.content_key(tokens, images, paths), repeats)
    print(f"prepare-data key of the flickr8k train split ({len(paths)} photos + the token file): {t_key:.3f} s")


def manifests(repeats: int, opt_state: bool) -> None:
    import numpy as np
    import orbax.checkpoint as ocp

    from jax_refine import checkpoint as ckpt

    rng = np.random.default_rng(0)
    # 12 vision blocks (width 768) and 12 text blocks (width 512) of 12 w^2 weights; the rest in one leaf
    blocks = [12 * 768 * 768] * 12 + [12 * 512 * 512] * 12
    tree = {f"block_{i}": rng.standard_normal(n, np.float32) for i, n in enumerate(blocks)}
    tree["rest"] = rng.standard_normal(VITB32_PARAMS - sum(blocks), np.float32)
    items = {"params": tree}
    if opt_state:
        items.update(mu=tree, nu=tree)
    total = sum(a.nbytes for t in items.values() for a in t.values())
    with tempfile.TemporaryDirectory(prefix="jax_refine-manifest-") as tmp:
        handlers = {k: ocp.StandardCheckpointHandler() for k in items}
        mngr = ocp.CheckpointManager(Path(tmp) / "checkpoints", item_handlers=handlers,
                                     options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
        t0 = time.perf_counter()
        mngr.save(1, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()}))
        mngr.wait_until_finished()
        t_save = time.perf_counter() - t0
        mngr.close()
        step = Path(tmp) / "checkpoints" / "1"
        on_disk = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
        t_write = best(lambda: ckpt.write_manifest(step), repeats)
        t_verify = best(lambda: ckpt.verify_manifest(step), repeats)
    print(f"checkpoint of {total / 1e6:.0f} MB of float32 ({'params + 2 AdamW moments' if opt_state else 'params'}; "
          f"{on_disk / 1e6:.0f} MB on disk): Orbax save {t_save:.2f} s; write_manifest {t_write:.2f} s; "
          f"verify_manifest {t_verify:.2f} s ({os.cpu_count()} cores)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-checkpoint", action="store_true")
    p.add_argument("--opt-state", action="store_true", help="also the two AdamW moments (3x the bytes)")
    args = p.parse_args()
    if FLICKR.is_dir():
        file_keys(args.repeats)
    else:
        print(f"{FLICKR} not found: the Flickr8k part is skipped")
    if not args.skip_checkpoint:
        manifests(args.repeats, args.opt_state)


if __name__ == "__main__":
    main()
