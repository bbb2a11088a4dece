"""Run the tiny trainer in a fresh process (for the kill -9, resume and multi-process tests).

usage: python train_driver.py WORKDIR --steps N [--devices D] [--block-finalize-at STEP]
       [--coordinator HOST:PORT --num-processes P --process-id I] [--mesh data,fsdp] [--export]

--block-finalize-at STEP: when Orbax is about to rename the finished temporary directory of STEP into
place, write WORKDIR/finalize_blocked and sleep, so the test can kill -9 the process mid-save.
Prints one JSON line with the losses and the final step at the end. WORKDIR may be a gs:// URL: with
JAX_REFINE_TEST_GCS_ROOT set, the bucket is the local stand-in of tests/gcs_standin.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--block-finalize-at", type=int, default=None)
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--mesh", default="-1,1")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--export", action="store_true", help="TensorBoard on and the HF export at the end")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    from train_helpers import xla_flags

    os.environ["XLA_FLAGS"] = xla_flags(args.devices)

    import jax
    from etils import epath

    import gcs_standin

    gcs_standin.activate_from_env()
    jax.config.update("jax_num_cpu_devices", args.devices)
    from jax_refine import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    if args.block_finalize_at is not None:
        import time

        from orbax.checkpoint._src.path import atomicity

        def blocking(original):
            async def finalize(self, *a, **k):
                if self.get_final().name == str(args.block_finalize_at):
                    (epath.Path(args.workdir) / "finalize_blocked").write_text(str(self.get()))
                    time.sleep(600)  # killed here: the data is written, the rename never happens
                return await original(self, *a, **k)
            return finalize

        for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
            cls.finalize = blocking(cls.finalize)

    from train_helpers import SyntheticIterator, tiny_config

    from jax_refine import sharding as shd, train

    data, fsdp = (int(v) for v in args.mesh.split(","))
    config = tiny_config(args.workdir, **{"train.num_steps": args.steps, "checkpoint.every_steps": args.every,
                                          "checkpoint.max_to_keep": 5,
                                          "train.export_hf": args.export, "log.tensorboard": args.export})
    mesh = shd.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1})
    out = train.train(config, data_iter=SyntheticIterator(int(config.train.batch_size)), mesh=mesh)
    if jax.process_index() == 0:
        text = (epath.Path(args.workdir) / "metrics.jsonl").read_text()
        losses = [json.loads(line)["loss"] for line in text.splitlines()]
        print("RESULT " + json.dumps({"losses": losses, "steps": out["steps"]}), flush=True)


if __name__ == "__main__":
    main()
