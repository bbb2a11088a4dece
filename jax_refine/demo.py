"""The offline demo: generate the synthetic world, pre-train a small CLIP on it, refine it three ways, compare
the four models (see the config `demo`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ml_collections

from jax_refine import evaluate, outputs, train
from jax_refine.data import synthetic_world

REPO_ROOT = Path(__file__).resolve().parents[1]


def _abs(path: str) -> str:
    """Demo paths are relative to the repository root, wherever the command runs from."""
    p = Path(path)
    return str(p if p.is_absolute() else REPO_ROOT / p)


def make_world(config: ml_collections.ConfigDict) -> synthetic_world.World:
    """The demo's synthetic world (`config.world`), generated once and cached under `world.cache_dir`."""
    w = config.world
    sizes = {split: int(w[split]) for split in synthetic_world.SPLITS}
    return synthetic_world.write_world(_abs(w.cache_dir), int(w.seed), sizes, image_size=int(w.image_size),
                                       zero_shot_tasks=tuple(w.zero_shot_tasks))


def stage_config(config: ml_collections.ConfigDict, stage: str, out_dir: Path, world: synthetic_world.World
                 ) -> ml_collections.ConfigDict:
    """The training config of one demo stage: `config` with `config.demo.<stage>` applied, training on the
    world's split `config.demo.<stage>.split`."""
    if stage not in config.demo:
        raise ValueError(f"demo stage {stage!r} has no config.demo.{stage} section")
    spec = config.demo[stage]
    c = ml_collections.ConfigDict(config.to_dict())
    del c["demo"], c["world"]
    c.workdir = str(out_dir / stage)
    c.method.name = spec.method
    c.method.normalize = bool(spec.normalize)
    c.data.annotations = str(world.annotations(spec.split))
    c.data.images = str(world.images(spec.split))
    c.data.data_dir = str(out_dir / "tfds")  # the caption sets are prepared as TFDS datasets here
    c.train.epochs = int(spec.epochs)
    c.optimizer.lr = float(spec.lr)
    c.optimizer.weight_decay = float(spec.weight_decay)
    c.optimizer.schedule = spec.schedule
    c.optimizer.warmup_steps = int(spec.warmup_steps)
    if spec.start == "random":
        c.model.name_or_path = ""
    else:  # start from an earlier stage's export (also the frozen teacher)
        c.model.random_init = None
        c.model.name_or_path = str(out_dir / spec.start / "hf")
    return c


def eval_config(config: ml_collections.ConfigDict, world: synthetic_world.World) -> ml_collections.ConfigDict:
    """`config` evaluating on the world's test split: one zero-shot set per attribute, and retrieval."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.eval.zero_shot = tuple(f"folder:{world.zero_shot(task)}" for task in config.world.zero_shot_tasks)
    c.eval.retrieval = (f"coco_json:{world.annotations('test')}:{world.images('test')}",)
    return c


def run_demo(config: ml_collections.ConfigDict, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Generate (or reuse) the world, run the trainings and the comparison; returns `evaluate.compare`'s
    result plus timings (seconds per stage) and the world's directory.

    Everything is written into a new directory beside `out_dir` that replaces it at the end (see
    `jax_refine.outputs`: a non-empty `out_dir` needs `overwrite`, and is never a foreign workdir or repo).
    """
    target = Path(out_dir).absolute()
    with outputs.output_dir(target, kind="demo", overwrite=overwrite, mark=True) as tmp:
        result = _run_demo(config, tmp)
    return outputs.rebase(result, tmp, target)


def _run_demo(config: ml_collections.ConfigDict, out: Path) -> dict[str, Any]:
    timings = {}
    t0 = time.perf_counter()
    world = make_world(config)
    timings["world"] = time.perf_counter() - t0
    print(f"synthetic world: {world.root}", flush=True)
    for stage in config.demo.stages:
        spec = config.demo[stage]
        t0 = time.perf_counter()
        print(f"\n=== demo stage: {spec.name} ({spec.method}, normalize={spec.normalize}) ===", flush=True)
        train.train(stage_config(config, stage, out, world))
        timings[stage] = time.perf_counter() - t0
    t0 = time.perf_counter()
    print(f"\n=== demo stage: evaluation of the {len(config.demo.stages)} models ===", flush=True)
    models = {config.demo[s].name: str(out / s / "hf") for s in config.demo.stages}
    result = evaluate.compare(models, eval_config(config, world), out / "report")
    timings["evaluate"] = time.perf_counter() - t0
    return {**result, "timings": timings, "world": str(world.root)}
