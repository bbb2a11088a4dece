"""`jax-refine COMMAND` (or `python -m jax_refine COMMAND`): train, evaluate, compare, export, prepare-data,
feature-stats, config, study, demo.

Every command that takes `--config FILE[:PRESET]` also takes any number of overrides of the form
`--config.SECTION.KEY=VALUE` (see jax_refine/config_base.py for the keys). Errors in the input (a
missing file, an unknown key, a bad value) end with one line naming what is wrong and a pointer to --help;
an error anywhere else (a bug) keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from jax_refine import failures

PACKAGE_DIR = Path(__file__).resolve().parent

EPILOG = """configs (--config NAME[:ARG] or a file PATH.py[:ARG]; see configs/):
  clip_refine:model=vitb32,method=clip_refine,data=coco,mesh=cpu   the paper's experiments (these defaults)
  default, demo, study, tiny_test   (ARG: a mesh preset cpu|gpu1|gpu8|tpu_pod; study also `quick`, `full`)
config overrides:
  --config.KEY=VALUE       override any config field, e.g. --config.train.batch_size=256
                           --config.mesh.shape.fsdp=8 --config.method.alpha=0.3
"""


def _prog() -> str:
    """How the user started us: the `jax-refine` console script or `python -m jax_refine`."""
    return "jax-refine" if Path(sys.argv[0]).name == "jax-refine" else "python -m jax_refine"


class RepeatedFlag(ValueError):
    """An option given twice (argparse would keep the last one silently)."""


class _Once(argparse.Action):
    """Store an option's value, refusing a second one: `--config a --config b` is a mistake, not a choice."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = f"_given_{self.dest}"
        if getattr(namespace, seen, None) is not None:
            raise RepeatedFlag(f"{option_string} is given twice ({getattr(namespace, seen)} and {values}); give it once")
        setattr(namespace, seen, values)
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="CLIP-Refine (CVPR 2025) in JAX: refine a CLIP to close its modality gap, evaluate it.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.register("action", None, _Once)  # every option with a value: given at most once
        return parser

    t = add("train", "Train (refine) a CLIP with the method of a config; saves Orbax checkpoints and exports "
                     "the result in Hugging Face format to WORKDIR/hf. Re-running resumes from the last checkpoint.")
    t.add_argument("--config", required=True, help="config NAME[:ARG] or file PATH.py[:ARG], e.g. clip_refine:model=vitb16")
    t.add_argument("--workdir", help="where checkpoints, metrics and the export go (default: config.workdir)")
    t.add_argument("--coordinator", help="multi-host: host:port of process 0 (TPU pods find it themselves)")
    t.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    t.add_argument("--process-id", type=int, help="multi-host: this process's index")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the one the workdir was started with")

    e = add("evaluate", "Zero-shot classification, retrieval and modality-gap metrics of one model.")
    e.add_argument("--config", default="default", help="config whose `eval` section says what to run")
    e.add_argument("--model", help="HF directory, hub id, or a training workdir / Orbax step directory, local or "
                                  "gs://BUCKET/RUN[/checkpoints/STEP] (default: config.model.name_or_path)")
    e.add_argument("--out", help="local report directory (default: WORKDIR/eval; needed for a gs:// workdir)")
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (never a training workdir, checkpoint or git repository)")

    c = add("compare", "Evaluate two or more models on the same suite; one table (markdown + JSON) with the "
                       "differences to the first model, plus PCA and similarity-histogram pictures.")
    c.add_argument("models", nargs="+", help="models: HF directories, hub ids or training workdirs / step "
                                             "directories (local or gs://); NAME=PATH names a model in the table")
    c.add_argument("--config", default="default", help="config whose `eval` section says what to run")
    c.add_argument("--out", default="outputs/compare", help="local report directory (default: outputs/compare)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (never a training workdir, checkpoint or git repository)")

    x = add("export", "Write a training checkpoint as a Hugging Face CLIP directory (config.json + model.safetensors) "
                      "that transformers.CLIPModel.from_pretrained opens.")
    x.add_argument("--checkpoint", required=True, help="training workdir or one of its step directories (local or "
                                                       "gs://BUCKET/RUN[/checkpoints/STEP])")
    x.add_argument("--out", required=True, help="output directory, local or gs://BUCKET/DIR (uploaded file by file, "
                                                "config.json last)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (never a training workdir, checkpoint or git repository)")

    d = add("prepare-data", "Build a TFDS dataset from a caption set on disk, once, for training: COCO captions "
                            "JSON, a Flickr8k/30k token file (+ split list) or Karpathy's split JSON, plus an "
                            "image directory. Captions of missing photos and photos without captions are "
                            "skipped and counted.")
    d.add_argument("--annotations", required=True, help="captions file: COCO JSON, Flickr *.token.txt or "
                                                        "Karpathy dataset_*.json")
    d.add_argument("--images", required=True, help="directory holding the images named in the captions file")
    d.add_argument("--format", choices=("coco", "flickr", "karpathy"),
                   help="caption format (default: detected from the file)")
    d.add_argument("--split", help="which photos to take: flickr: a split-list file or train|dev|test (the "
                                   "Flickr8k list beside the token file; default all); karpathy: "
                                   "train|val|test|restval, joined with + (default test)")
    d.add_argument("--out", required=True, help="TFDS data_dir to write")
    d.add_argument("--name", help="dataset config name (default: the annotations file name)")
    d.add_argument("--image-size", type=int, help="store each photo with its shortest side resized to this many "
                                                 "pixels (the model's image size; JPEG q95), so training decodes "
                                                 "small images (default: the original bytes)")
    d.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg", help="of the resized photos")

    f = add("feature-stats", "Embed a caption set (every image and caption) with the run's start model and write the "
                             "per-dimension feature mean and std (image, text, pooled) that RaFA's "
                             "`--config.method.prior=precomputed --config.method.prior_params.path=FILE` reads, in "
                             "the feature regime of the run's config (raw, unit, or unit times method.feature_scale).")
    f.add_argument("--config", required=True, help="the run's config NAME[:ARG] or PATH.py[:ARG] (its model, data, "
                                                   "method.normalize / feature_scale)")
    f.add_argument("--out", required=True, help="the stats file to write (npz; written whole or not at all)")
    f.add_argument("--data", help="a caption set instead of config.data: coco_json:<json>:<images>, "
                                  "flickr:<token.txt>:<split>:<images>, karpathy:<json>:<split>:<images>, "
                                  "tfds_dir:<dir>[:<split>] or tfds:<name>:<split>")
    f.add_argument("--max-examples", type=int, help="the first N images (with all their captions)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    g = add("config", "Print the fully resolved config (the method's preset weights filled in, overrides applied) "
                      "as JSON, to see and diff exactly what a run will use.")
    g.add_argument("spec", help="config NAME[:ARG] or file PATH.py[:ARG], e.g. clip_refine:method=contrastive")

    s = add("study", "The real-data study: pre-train a small CLIP on Flickr8k train, refine it with CLIP-Refine "
                      "and the baselines (3 seeds) on Flickr8k dev, evaluate on Flickr8k test, COCO val and "
                      "CIFAR-10 test; one table (mean +- std) and pictures (config `study`).")
    s.add_argument("--data-dir", default="../shared/data", help="folder holding flickr8k/, coco_mini/, cifar10/")
    s.add_argument("--config", default="study", help="study config (default: study)")
    s.add_argument("--out", default="outputs/study", help="where models, table and pictures go")
    size = s.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed, a few steps (minutes)")
    size.add_argument("--full", action="store_true",
                      help="every method: HyCD only and RaFA only in every regime, all 8 methods in the reference's "
                           "regime (~2.5x the default's time)")

    m = add("demo", "The offline demo (the default of ./run.sh): generate a synthetic world of shapes with captions, "
                    "pre-train a small CLIP on it, refine it with CLIP-Refine (normalized and unnormalized features) "
                    "and with contrastive fine-tuning, compare all four.")
    m.add_argument("--config", default="demo", help="demo config (default: demo)")
    m.add_argument("--out", default="outputs/demo", help="where the report and pictures go (default: outputs/demo)")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (never a training workdir, checkpoint or git repository)")
    return p


def _split_overrides(rest: Sequence[str], parser: argparse.ArgumentParser, command: str) -> list[str]:
    overrides, unknown = [], []
    for arg in rest:
        (overrides if arg.startswith("--config.") else unknown).append(arg)
    if unknown:
        parser.error(f"unrecognized arguments for {command}: {' '.join(unknown)}")
    return overrides


def _is_input_error(err: Exception) -> bool:
    """A missing file, or a ValueError raised by this package's own checks (ConfigError, OutputError,
    CheckpointError, WorkdirError and the checks of data, sharding and objectives: each names the input at
    fault); a ValueError raised inside a library is a bug and keeps its traceback."""
    if isinstance(err, FileNotFoundError):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


# What `pip install 'jax_refine[train]'` adds, by the top-level module name a missing import reports (the
# core install has jax and numpy only: the losses and metrics). pyproject.toml's `train` extra lists them.
TRAIN_EXTRA_MODULES = frozenset({
    "absl", "etils", "flax", "huggingface_hub", "importlib_resources", "matplotlib", "ml_collections", "ml_dtypes",
    "optax", "orbax", "PIL", "safetensors", "sentencepiece", "tensorboardX", "tensorflow", "tensorflow_datasets",
    "tokenizers", "tqdm", "transformers"})
INSTALL_HINT = "pip install 'jax_refine[train]'  (from a clone: pip install '.[train]')"


def _missing_extra(err: ModuleNotFoundError) -> str | None:
    """The top-level name of a missing package of the `train` extra, or None (then it is a bug)."""
    top = (err.name or "").split(".")[0]
    return top if top in TRAIN_EXTRA_MODULES else None


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data: keep it quiet
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    parser = _parser()  # argparse only: --help works on the core install too
    try:
        args, rest = parser.parse_known_args(argv)
    except RepeatedFlag as err:
        print(f"error: {err}\n(see `{_prog()} --help`)", file=sys.stderr)
        return 2
    overrides = _split_overrides(rest, parser, args.command)
    try:
        from jax_refine import commands  # noqa: PLC0415 - needs the `train` extra; --help must not

        return getattr(commands, args.command.replace("-", "_"))(args, overrides) or 0
    except ModuleNotFoundError as err:
        missing = _missing_extra(err)
        if missing is None:
            raise
        print(f"error: `{args.command}` needs the package {missing!r}, which is not installed; install the "
              f"command line's dependencies with: {INSTALL_HINT}", file=sys.stderr)
        return 2
    except failures.RunStopped as err:  # one line per fault, no traceback (e.g. divergence, missing inputs)
        print("\n".join(f"error: {line}" for line in err.lines()), file=sys.stderr)
        return err.exit_code
    except (ValueError, FileNotFoundError) as err:
        if not _is_input_error(err):
            raise
        print(f"error: {failures.first_line(err)}\n(see `{_prog()} {args.command} --help`)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `jax-refine config ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
