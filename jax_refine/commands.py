"""The commands behind `python -m jax_refine` (argument parsing lives in cli.py).

Each takes the parsed `argparse.Namespace` and the list of `--config.KEY=VALUE` overrides and returns an
exit code. Each command imports the modules it runs inside its function: they load JAX, TensorFlow and
transformers (seconds), which `--help` and a bad argument should not wait for.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from jax_refine import outputs
from jax_refine import workdir as workdir_lib
from jax_refine.config import load_config

PREEMPTED_EXIT = 143  # 128 + SIGTERM: a scheduler sees the preemption (the checkpoint is saved; rerun resumes)
INTERRUPTED_EXIT = 130  # 128 + SIGINT: Ctrl-C saved the step and stopped, as a shell expects of an interrupt


def train(args, overrides: list[str]) -> int:
    config = load_config(args.config, overrides)
    from jax_refine import distributed
    from jax_refine import train as train_lib

    if args.workdir:
        config.workdir = args.workdir
    if args.coordinator or args.num_processes or args.process_id is not None:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    result = train_lib.train(config, allow_config_change=args.allow_config_change)
    if distributed.is_main():
        print(json.dumps({k: v for k, v in result.items() if k != "state"}, indent=1, default=str))
    if not result["preempted"]:
        return 0
    return INTERRUPTED_EXIT if result.get("signal") == "SIGINT" else PREEMPTED_EXIT


def resolved_config(spec: str, overrides: list[str]) -> dict:
    """The config of `spec` with overrides applied and `method` resolved (preset weights, alpha, normalize)."""
    from jax_refine import objectives

    config = load_config(spec, overrides)
    config.method = objectives.resolve_method(config.method)
    return config.to_dict()


def config(args, overrides: list[str]) -> int:
    print(json.dumps(resolved_config(args.spec, overrides), indent=1, sort_keys=False, default=str))
    return 0


def evaluate(args, overrides: list[str]) -> int:
    config = load_config(args.config, overrides)
    from jax_refine import checkpoint, evaluate as evaluate_lib

    source = args.model or config.model.name_or_path
    if not source:
        raise ValueError("evaluate: no model given; pass --model PATH (or set --config.model.name_or_path)")
    out = outputs.check_target(args.out or workdir_lib.as_path(config.workdir) / "eval", kind="report",
                               overwrite=args.overwrite)  # a report is local: a gs:// workdir needs --out
    model = checkpoint.load_model(source, dtype=evaluate_lib.config_dtype(config))
    with outputs.output_dir(out, kind="report", overwrite=args.overwrite) as tmp:
        evaluate_lib.evaluate(model, config.eval, name=evaluate_lib.model_name(str(source)), out_dir=tmp,
                              prep=evaluate_lib.preprocessing_of(model, source))
    print((out / "report.md").read_text())
    print(f"report: {out / 'report.md'}")
    return 0


def compare(args, overrides: list[str]) -> int:
    config = load_config(args.config, overrides)
    from jax_refine import evaluate as evaluate_lib

    out = outputs.check_target(args.out, kind="report", overwrite=args.overwrite)  # before the models run
    with outputs.output_dir(out, kind="report", overwrite=args.overwrite) as tmp:
        result = outputs.rebase(evaluate_lib.compare(args.models, config, tmp), tmp, out)
    print(Path(result["markdown"]).read_text())
    print(f"report: {result['markdown']}")
    return 0


def export(args, overrides: list[str]) -> int:
    from jax_refine import checkpoint, train

    if overrides:
        raise ValueError(f"export takes no config overrides, got {' '.join(overrides)}")
    out = outputs.check_target(args.out, kind="export", overwrite=args.overwrite)  # before the checkpoint is read
    model = checkpoint.load_model(args.checkpoint)
    # local, or to a bucket: written locally, then uploaded file by file (config.json last)
    out = train.export_hf(model, out, tokenizer_dir=_start_tokenizer_dir(args.checkpoint), overwrite=args.overwrite)
    print(f"exported {args.checkpoint} ({model.family}) -> {out}: {outputs.describe(workdir_lib.as_path(out))} "
          "(open with transformers.AutoModel.from_pretrained)")
    return 0


def _start_tokenizer_dir(source: str) -> Path | None:
    """The local directory holding the tokenizer files an export of `source` carries, as the trainer's own
    export does: the run's start checkpoint (`checkpoint.tokenizer_source`; for a hub id its small files are
    fetched or read from the cache, not its weights). None for a random-init run (CLIP's packaged BPE), and,
    with a line saying so, when the start checkpoint cannot be read here."""
    from jax_refine import checkpoint, hf

    start = checkpoint.tokenizer_source(source)
    if start is None:
        return None
    try:
        return hf.resolve_checkpoint(start, weights=False)
    except FileNotFoundError as e:
        print(f"[export] the tokenizer files of the start checkpoint are not copied: {e} (CLIP gets the packaged "
              "BPE files, SigLIP none: copy them beside the export)")
        return None


def prepare_data(args, overrides: list[str]) -> int:
    from jax_refine import data

    if overrides:
        raise ValueError(f"prepare-data takes no config overrides, got {' '.join(overrides)}")
    out = data.prepare_coco_json(args.annotations, args.images, args.out, name=args.name,
                                 format=getattr(args, "format", None), subset=getattr(args, "split", None),
                                 image_size=getattr(args, "image_size", None),
                                 image_format=getattr(args, "image_format", "jpeg"))
    print(f"prepared {out}; train from it with --config.data.source=tfds_dir "
          f"--config.data.data_dir={shlex.quote(str(out))} --config.data.split=train")
    return 0


def feature_stats(args, overrides: list[str]) -> int:
    config = load_config(args.config, overrides)
    out = Path(args.out)
    if out.is_dir() or (out.exists() and not args.overwrite):
        raise ValueError(f"feature-stats: --out {out} exists" + ("" if out.is_dir() else "; pass --overwrite to replace it"))
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"feature-stats: --max-examples={args.max_examples} must be >= 1")
    from jax_refine import feature_stats as stats_lib

    meta = stats_lib.compute_feature_stats(config, out, data_spec=args.data, max_examples=args.max_examples,
                                           progress=bool(config.eval.get("progress", True)))
    scale = "" if meta["scale"] is None else f" x {meta['scale']:.4g}"
    print(f"[feature-stats] wrote {out}: {meta['images']} images, {meta['captions']} captions of {meta['data']}, "
          f"D={meta['dim']}, {meta['regime']}{scale} features of {meta['model']}; train with "
          f"--config.method.prior=precomputed --config.method.prior_params.path={shlex.quote(str(out))}")
    return 0


def demo(args, overrides: list[str]) -> int:
    config = load_config(args.config, overrides)
    from jax_refine import demo as demo_lib

    result = demo_lib.run_demo(config, args.out, overwrite=args.overwrite)
    table = Path(result["markdown"]).read_text().split("## Details")[0].strip()
    print("\n" + table + "\n")
    times = ", ".join(f"{k} {v:.0f}s" for k, v in result["timings"].items())
    print(f"time: {times}")
    print(f"report: {result['markdown']}")
    for picture in result.get("pictures", []):
        print(f"picture: {picture}")
    return 0


def study(args, overrides: list[str]) -> int:
    config = load_config(args.config + (":quick" if args.quick else ":full" if args.full else ""), overrides)
    from jax_refine import study as study_lib

    result = study_lib.run_study(config, args.data_dir, args.out)
    print("\n" + Path(result["markdown"]).read_text())
    print(f"report: {result['markdown']}")
    return 0
