"""The evaluation suite: zero-shot classification, image-text retrieval and feature-space metrics of a
CLIP, and `compare` of several models in one table with pictures.

`evaluate(model, config.eval)` returns the result dict described in `jax_refine/report.py`;
`compare(models, config, out_dir)` runs it on several models and writes one table plus pictures. Sets come
from `config.eval` (read by `jax_refine.data`) or are given as `ZeroShotTask` / `RetrievalTask` objects;
embeddings go through `embeddings.extract` and a content-keyed cache. The suite and its specs:
docs/evaluation.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jax_refine import checkpoint
from jax_refine import embeddings as emb_lib
from jax_refine import metrics, preprocess, report
from jax_refine.models import registry

log = logging.getLogger(__name__)

TEMPLATES_FILE = Path(__file__).resolve().parent / "assets" / "templates.json"
RETRIEVAL_KS = (1, 5, 10)

Batches = Iterable[Mapping[str, np.ndarray]]


@dataclasses.dataclass
class ZeroShotTask:
    """A zero-shot set: `images(prep)` yields `{"image": (b, S, S, 3) f32, "label": (b,) i32}` preprocessed as
    `prep` (the model's `preprocess.Preprocessing`) says."""

    name: str
    images: Callable[[preprocess.Preprocessing], Batches]
    classnames: Sequence[str]
    num_examples: int | None = None
    split: str = "test"
    content: str | None = None  # key of the files read (fingerprint.files_key via the data package); cache key


@dataclasses.dataclass
class RetrievalTask:
    """A caption set: `images(prep)` yields `{"image": (b, S, S, 3), "image_index": (b,)}` and
    `captions[j]` belongs to image `caption_image_index[j]` (every caption of every image)."""

    name: str
    images: Callable[[preprocess.Preprocessing], Batches]
    captions: Sequence[str]
    caption_image_index: np.ndarray
    num_images: int | None = None
    split: str = "test"
    content: str | None = None  # key of the files read (caption file and photos); cache key


def _array_batches(name: str, arrays: Mapping[str, np.ndarray]) -> Callable[[preprocess.Preprocessing], Batches]:
    """`images(prep)` over in-memory images `(N, S, S, 3)` already preprocessed for the model; a size other
    than `prep.image_size` is an error (the mean/std and resize cannot be checked: they are the caller's)."""
    have = int(np.shape(arrays["image"])[1])

    def images(prep: preprocess.Preprocessing) -> Batches:
        size = prep.image_size
        if size != have:
            raise ValueError(f"dataset {name!r}: images are {have}x{have} but the model takes {size}x{size}")
        return emb_lib.iterate_arrays(arrays, 256)

    return images


def _arrays_content(arrays: Mapping[str, np.ndarray]) -> str:
    """A hash of in-memory arrays' names, shapes, dtypes and bytes (their cache key in place of files)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.shape}:{a.dtype}".encode())
        h.update(a.tobytes())
    return "arrays:" + h.hexdigest()[:16]


def zero_shot_from_arrays(name: str, images: np.ndarray, labels: np.ndarray, classnames: Sequence[str]
                          ) -> ZeroShotTask:
    """A zero-shot task from preprocessed images `(N, S, S, 3)` f32 and labels `(N,)` (e.g. for the demo)."""
    arrays = {"image": np.asarray(images, np.float32), "label": np.asarray(labels, np.int32)}
    return ZeroShotTask(name, _array_batches(name, arrays), list(classnames), len(arrays["label"]),
                        content=_arrays_content(arrays))


def retrieval_from_arrays(name: str, images: np.ndarray, captions: Sequence[str],
                          caption_image_index: np.ndarray) -> RetrievalTask:
    """A retrieval task from preprocessed images `(N, S, S, 3)` and captions with their image index `(M,)`."""
    arrays = {"image": np.asarray(images, np.float32), "image_index": np.arange(len(images), dtype=np.int32)}
    return RetrievalTask(name, _array_batches(name, arrays), list(captions), np.asarray(caption_image_index),
                         len(images), content=_arrays_content(arrays))


# --------------------------------------------------------------------------------------------------
# Scores from embeddings (pure numpy/jax; the metric definitions live in jax_refine.metrics)
# --------------------------------------------------------------------------------------------------

def normalize(x: np.ndarray) -> np.ndarray:
    """Rows of `x (N, D)` scaled to unit L2 norm."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ensemble_class_embeddings(template_embeddings: np.ndarray) -> np.ndarray:
    """CLIP's prompt ensemble: `(C, T, D)` text embeddings -> `(C, D)`: normalize each, average over the
    T templates, normalize again (the recipe of `metrics.zero_shot_logits`; used here for the pictures
    and feature metrics, which need one text embedding per class)."""
    return normalize(normalize(template_embeddings).mean(axis=1))


def zero_shot_scores(image_features: np.ndarray, labels: np.ndarray, class_embeddings: np.ndarray
                     ) -> dict[str, float]:
    """Top-1 / top-5 accuracy in % of images `(N, D)`, labels `(N,)`, against class embeddings `(C, D)` or
    per-template text embeddings `(C, T, D)` (CLIP's ensemble, done by `metrics.zero_shot_logits`)."""
    logits = metrics.zero_shot_logits(image_features, class_embeddings)
    acc = metrics.zero_shot_accuracy(logits, np.asarray(labels, np.int32), ks=(1, 5))
    return {k: 100.0 * float(v) for k, v in acc.items()}


def retrieval_scores(image_features: np.ndarray, text_features: np.ndarray, caption_image_index: np.ndarray,
                     ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, dict[str, float]]:
    """Recall@k in % both ways: `{"i2t": {"R@1", ...}, "t2i": {...}}` (a hit if any correct caption /
    the caption's image is in the top k)."""
    rec = metrics.recall_at_k(image_features, text_features, np.asarray(caption_image_index, np.int32),
                              ks=tuple(int(k) for k in ks))
    return {d: {f"R@{k}": 100.0 * float(rec[f"{d}_R@{k}"]) for k in ks} for d in ("i2t", "t2i")}


def feature_scores(image_features: np.ndarray, text_features: np.ndarray, caption_image_index: np.ndarray
                   ) -> dict[str, float]:
    """Modality gap (centroid distance and MSE form), alignment over positive pairs (each text with its
    image) and uniformity of each modality, on L2-normalized embeddings."""
    img, txt = normalize(image_features), normalize(text_features)
    paired_img = img[np.asarray(caption_image_index)]
    return {
        "modality_gap": float(metrics.modality_gap(img, txt)),
        "modality_gap_mse": float(metrics.modality_gap_mse(img, txt)),
        "alignment": float(metrics.alignment(paired_img, txt)),
        "uniformity_image": float(metrics.uniformity(img)),
        "uniformity_text": float(metrics.uniformity(txt)),
    }


# --------------------------------------------------------------------------------------------------
# Templates and datasets from the config
# --------------------------------------------------------------------------------------------------

def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Prompt templates: "single" -> ("a photo of a {}.",), "openai" -> the 80-template ensemble, any other
    key of the packaged `assets/templates.json`, a text file (one template a line), or a sequence."""
    if isinstance(spec, str):
        packaged = json.loads(TEMPLATES_FILE.read_text(encoding="utf-8"))
        if spec in packaged:
            templates = tuple(packaged[spec])
        elif Path(spec).is_file():
            templates = tuple(t.strip() for t in Path(spec).read_text().splitlines() if t.strip())
        else:
            raise ValueError(f"config.eval.templates={spec!r}: expected one of {sorted(packaged)}, a template "
                             "file or a list of templates")
    else:
        templates = tuple(spec)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"config.eval.templates: every template needs a '{{}}' for the class name, got "
                         f"{bad[0] if bad else 'none'!r}")
    return templates


def templates_name(spec: str | Sequence[str]) -> str:
    """A short label for the templates in cache keys and reports."""
    return spec if isinstance(spec, str) else "custom:" + emb_lib.cache_key(templates=list(spec))


def _image_key(prep: preprocess.Preprocessing) -> dict[str, Any]:
    """The preprocessing fields that change image embeddings (cache key)."""
    return {"size": prep.image_size, "resize": prep.resize, "mean": prep.mean, "std": prep.std}


def _process() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def zero_shot_task(spec: str, eval_config: Any) -> ZeroShotTask:
    """A zero-shot task from a config entry: a TFDS catalog name ("cifar10", ...) or "folder:<dir>".

    Images are read by `jax_refine.data.classification` (this host's slice, `eval_config.batch_size`
    split over hosts), once per preprocessing; the first load (CLIP's) checks the set and its class names.
    """
    from jax_refine.data import classification  # TensorFlow: imported only when a dataset is read

    index, count = _process()
    batch = max(1, int(eval_config.get("batch_size", 256)) // count)
    loaded: dict[preprocess.Preprocessing, Any] = {}

    def load(prep: preprocess.Preprocessing) -> Any:
        if prep not in loaded:
            loaded[prep] = classification.load_classification(
                spec, batch_size=batch, prep=prep, max_examples=eval_config.get("max_examples"),
                process_index=index, process_count=count)
        return loaded[prep]

    first = load(preprocess.Preprocessing())
    if not first.num_examples:
        raise ValueError(f"zero-shot dataset {spec!r} is empty")
    return ZeroShotTask(spec, lambda prep: load(prep).batches(), list(first.class_names), first.num_examples,
                        split=classification.EVAL_SPLITS.get(spec, "all"), content=first.content)


def retrieval_task(spec: str, eval_config: Any) -> RetrievalTask:
    """A retrieval task from a config entry ("coco_karpathy_test", "coco_json:<annotations>:<images>", ...),
    read by `jax_refine.data.retrieval` (every caption of every image)."""
    from jax_refine.data import retrieval  # TensorFlow: imported only when a dataset is read

    index, count = _process()
    batch = max(1, int(eval_config.get("batch_size", 256)) // count)
    loaded: dict[preprocess.Preprocessing, Any] = {}

    def load(prep: preprocess.Preprocessing) -> Any:
        if prep not in loaded:  # captions only: the texts are tokenized by the model's tokenizer at embedding
            loaded[prep] = retrieval.load_retrieval(spec, batch_size=batch, prep=prep,
                                                    max_examples=eval_config.get("max_examples"),
                                                    process_index=index, process_count=count)
        return loaded[prep]

    first = load(preprocess.Preprocessing())
    if not first.num_images:
        raise ValueError(f"retrieval dataset {spec!r} has no images")
    return RetrievalTask(spec, lambda prep: load(prep).image_batches(), list(first.captions),
                         np.asarray(first.texts["caption_image_index"]), first.num_images, content=first.content)


# --------------------------------------------------------------------------------------------------
# Embeddings of one model on one set (cached)
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Context:
    model: nnx.Module
    mesh: Mesh | None
    batch_size: int
    cache_dir: str | None
    prep: preprocess.Preprocessing  # the model's image and text preprocessing
    tokenizer: Any
    max_examples: int | None
    progress: bool
    fingerprint: str | None = None

    def key(self, **fields: Any) -> dict[str, Any]:
        if self.cache_dir is not None and self.fingerprint is None:
            self.fingerprint = emb_lib.model_fingerprint(self.model)
        return dict(model=self.fingerprint, n=self.max_examples, **fields)


def _take(batches: Batches, limit: int | None) -> Iterable[dict[str, np.ndarray]]:
    """The first `limit` rows of a batch stream (all when None)."""
    seen = 0
    for batch in batches:
        if limit is not None and seen >= limit:
            return
        n = len(next(iter(batch.values())))
        keep = n if limit is None else min(n, limit - seen)
        yield {k: np.asarray(v)[:keep] for k, v in batch.items()}
        seen += keep


def _image_embeddings(ctx: _Context, name: str, split: str, images: Callable[[int], Batches],
                      total: int | None, content: str | None) -> dict[str, np.ndarray]:
    def compute() -> dict[str, np.ndarray]:
        n = total if ctx.max_examples is None or total is None else min(total, ctx.max_examples)
        feats, extras = emb_lib.extract(ctx.model, _take(images(ctx.prep), ctx.max_examples), "image", mesh=ctx.mesh,
                                        batch_size=ctx.batch_size, total=n, desc=f"{name} images",
                                        progress=ctx.progress)
        return {"features": feats, **extras}

    return emb_lib.cached(ctx.cache_dir, compute, **ctx.key(dataset=name, split=split, kind="image",
                                                            content=content, **_image_key(ctx.prep)))


def _text_embeddings(ctx: _Context, name: str, texts: Sequence[str], **key: Any) -> np.ndarray:
    def compute() -> dict[str, np.ndarray]:
        # Each process embeds an equal, padded share of the texts; "row" restores the order after gathering.
        index, count = _process()
        per = -(-len(texts) // count)
        rows = np.arange(index * per, (index + 1) * per)
        valid = rows < len(texts)
        rows = np.where(valid, rows, 0)
        mine = [texts[r] for r in rows] if len(texts) else []
        tokens = ctx.prep.tokenize(mine, ctx.tokenizer)  # SigLIP: an all-ones mask (it attends to its pads)
        arrays = {**tokens, "row": rows, "mask": valid}
        feats, extra = emb_lib.extract(ctx.model, emb_lib.iterate_arrays(arrays, ctx.batch_size), "text",
                                       mesh=ctx.mesh, batch_size=ctx.batch_size, total=len(mine),
                                       desc=f"{name} texts", progress=ctx.progress)
        return {"features": feats[np.argsort(extra["row"], kind="stable")]}

    texts_id = emb_lib.cache_key(texts=list(texts))
    return emb_lib.cached(ctx.cache_dir, compute, **ctx.key(dataset=name, kind="text", texts=texts_id,
                                                                tokenizer=ctx.prep.tokenizer,
                                                                text_length=ctx.prep.text_length,
                                                                padding=ctx.prep.padding, **key)
                          )["features"]


def class_embeddings(ctx: _Context, dataset: ZeroShotTask, templates: Sequence[str], templates_label: str
                     ) -> np.ndarray:
    """Text embeddings `(C, T, D)` of every class name in every template (unnormalized)."""
    prompts = [t.format(c) for c in dataset.classnames for t in templates]
    feats = _text_embeddings(ctx, dataset.name, prompts, split="classes", templates=templates_label)
    return feats.reshape(len(dataset.classnames), len(templates), -1)


def _zero_shot(ctx: _Context, dataset: ZeroShotTask, templates: Sequence[str], templates_label: str
               ) -> tuple[dict[str, Any], dict[str, float], Any]:
    from jax_refine import plots  # matplotlib (heavy): imported on use, not with this module

    if not dataset.classnames:
        raise ValueError(f"zero-shot dataset {dataset.name!r}: no class names (add classnames.txt or a "
                         "class-names file for it)")
    img = _image_embeddings(ctx, dataset.name, dataset.split, dataset.images, dataset.num_examples, dataset.content)
    if "label" not in img:
        raise ValueError(f"zero-shot dataset {dataset.name!r}: batches have no 'label'")
    feats, labels = img["features"], img["label"].astype(np.int32)
    num_classes = len(dataset.classnames)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"zero-shot dataset {dataset.name!r}: label {int(labels.max())} but only {num_classes} "
                         "class names")
    per_template = class_embeddings(ctx, dataset, templates, templates_label)
    scores = zero_shot_scores(feats, labels, per_template)
    cls = ensemble_class_embeddings(per_template)
    result = {**scores, "n": int(len(labels)), "num_classes": num_classes}
    # Each image paired with its class's text embedding, for the feature metrics and pictures.
    pairs = plots.Embeddings(feats, cls[labels], np.arange(len(labels)))
    return result, feature_scores(pairs.image, pairs.text, pairs.caption_image_index), pairs


def _retrieval(ctx: _Context, dataset: RetrievalTask) -> tuple[dict[str, Any], dict[str, float], Any]:
    from jax_refine import plots  # matplotlib (heavy): imported on use, not with this module

    img = _image_embeddings(ctx, dataset.name, dataset.split, dataset.images, dataset.num_images, dataset.content)
    if "image_index" not in img:
        raise ValueError(f"retrieval dataset {dataset.name!r}: image batches have no 'image_index'")
    # Keep the captions of the images we embedded, renumbered to rows of the image embeddings.
    row_of = {int(i): r for r, i in enumerate(img["image_index"])}
    cap_idx = np.asarray(dataset.caption_image_index)
    keep = [j for j, i in enumerate(cap_idx) if int(i) in row_of]
    if not keep:
        raise ValueError(f"retrieval dataset {dataset.name!r}: no captions for the {len(row_of)} images embedded")
    captions = [dataset.captions[j] for j in keep]
    rows = np.array([row_of[int(cap_idx[j])] for j in keep], np.int32)
    txt = _text_embeddings(ctx, dataset.name, captions, split=dataset.split)
    result = {**retrieval_scores(img["features"], txt, rows), "n_images": int(len(row_of)),
              "n_captions": int(len(captions))}
    return result, feature_scores(img["features"], txt, rows), plots.Embeddings(img["features"], txt, rows)


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------

def run_suite(model: nnx.Module, eval_config: Any, *, name: str = "model", mesh: Mesh | None = None,
              tokenizer: Any = None, prep: preprocess.Preprocessing | None = None,
              zero_shot: Sequence[ZeroShotTask] | None = None,
              retrieval: Sequence[RetrievalTask] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The suite on one model -> `(result, pairs)`; `pairs[dataset]` is a `plots.Embeddings` of the
    embeddings behind the feature metrics (for the pictures).

    `eval_config`: the `config.eval` section (batch_size, templates, zero_shot, retrieval, max_examples,
    cache_dir, progress). `zero_shot` / `retrieval`: already-built sets instead of the config's names.
    `prep`: how images and texts are prepared (default `registry.preprocessing(model)`: the model's size,
    mean/std, resize, text length; a SigLIP model needs `prep` with its `tokenizer_source`, or `tokenizer`).
    `tokenizer`: overrides `prep.get_tokenizer()`.
    """
    prep = prep if prep is not None else registry.preprocessing(model)
    if zero_shot is None:
        zero_shot = [zero_shot_task(s, eval_config) for s in eval_config.get("zero_shot", ())]
    if retrieval is None:
        retrieval = [retrieval_task(s, eval_config) for s in eval_config.get("retrieval", ())]
    if not zero_shot and not retrieval:
        raise ValueError("config.eval: nothing to evaluate (zero_shot and retrieval are both empty)")
    mesh = mesh or emb_lib.default_mesh()
    ctx = _Context(emb_lib.place_model(model, mesh), mesh, int(eval_config.get("batch_size", 256)),
                   eval_config.get("cache_dir"), prep, tokenizer if tokenizer is not None else prep.get_tokenizer(),
                   eval_config.get("max_examples"), bool(eval_config.get("progress", True)))
    templates_spec = eval_config.get("templates", "single")
    templates = resolve_templates(templates_spec)
    result: dict[str, Any] = {"model": name, "templates": templates_name(templates_spec), "zero_shot": {},
                              "zero_shot_mean": None, "retrieval": {}, "features": {}}
    pairs: dict[str, Any] = {}
    for ds in zero_shot:
        result["zero_shot"][ds.name], result["features"][ds.name], pairs[ds.name] = _zero_shot(
            ctx, ds, templates, templates_name(templates_spec))
        log.info("%s zero-shot %s: top-1 %.2f", name, ds.name, result["zero_shot"][ds.name]["top1"])
    if result["zero_shot"]:
        zs = result["zero_shot"].values()
        result["zero_shot_mean"] = {k: float(np.mean([r[k] for r in zs])) for k in ("top1", "top5")}
    for ds in retrieval:
        result["retrieval"][ds.name], result["features"][ds.name], pairs[ds.name] = _retrieval(ctx, ds)
        log.info("%s retrieval %s: I->T R@1 %.2f", name, ds.name, result["retrieval"][ds.name]["i2t"]["R@1"])
    return result, pairs


def evaluate(model: nnx.Module, eval_config: Any, *, name: str = "model", mesh: Mesh | None = None,
             tokenizer: Any = None, prep: preprocess.Preprocessing | None = None, out_dir: str | Path | None = None,
             zero_shot: Sequence[ZeroShotTask] | None = None,
             retrieval: Sequence[RetrievalTask] | None = None) -> dict[str, Any]:
    """Zero-shot, retrieval and feature metrics of one model (result dict: see jax_refine/report.py).

    With `out_dir`, also writes report.md / report.json and (if `eval_config.plots`) the PNGs there.
    """
    result, pairs = run_suite(model, eval_config, name=name, mesh=mesh, tokenizer=tokenizer, prep=prep,
                              zero_shot=zero_shot, retrieval=retrieval)
    if out_dir is not None:
        _write(out_dir, [result], {name: pairs}, bool(eval_config.get("plots", True)))
    return result


def _pictures(out_dir: Path, results: Sequence[Mapping[str, Any]], pairs_by_model: Mapping[str, Mapping[str, Any]]
              ) -> list[Path]:
    """PNGs for each retrieval set all models share, or for the first shared zero-shot set if none."""
    from jax_refine import plots  # matplotlib (heavy): imported on use, not with this module

    shared = [d for d in next(iter(pairs_by_model.values())) if all(d in p for p in pairs_by_model.values())]
    chosen = [d for d in shared if d in results[0]["retrieval"]] or shared[:1]
    paths: list[Path] = []
    for dataset in chosen:
        prefix = "".join(c if c.isalnum() else "_" for c in report.short_name(dataset)) + "_"
        paths += plots.make_plots({m: p[dataset] for m, p in pairs_by_model.items()}, out_dir, prefix=prefix)
    return paths


def _write(out_dir: str | Path, results: Sequence[dict[str, Any]], pairs_by_model: Mapping[str, Any],
           with_plots: bool) -> dict[str, Any]:
    out = Path(out_dir)
    pictures = _pictures(out, results, pairs_by_model) if with_plots else []
    paths = report.write_report(results, out, pictures=pictures,
                                title="Comparison" if len(results) > 1 else f"Evaluation of {results[0]['model']}")
    return {**paths, "pictures": pictures}


# --------------------------------------------------------------------------------------------------
# Models and compare
# --------------------------------------------------------------------------------------------------




def _split_name(spec: Any, index: int) -> tuple[str, Any]:
    """`(name, source)` from a spec: ("name", source), "NAME=PATH", a path/hub id, or a model."""
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ValueError(f"compare: model #{index} must be (name, model or path), got {len(spec)} items")
        return str(spec[0]), spec[1]
    if isinstance(spec, nnx.Module):
        return f"model_{index}", spec
    text = str(spec)
    name, sep, path = text.partition("=")
    if sep and name and "/" not in name:
        return name, path
    return model_name(text), text


def model_name(source: str) -> str:
    """A table name for a model path or hub id: its last component, or `workdir/hf`, `workdir/<step>` for
    a training run's export or step directory."""
    p = Path(source)
    if p.name in ("hf", "export") or p.name.isdigit():
        return f"{p.parent.name}/{p.name}"
    return p.name or source


def preprocessing_of(model: nnx.Module, source: Any) -> preprocess.Preprocessing:
    """`model`'s preprocessing with the tokenizer of `source`, the checkpoint it came from (a directory or hub
    id: SigLIP's spiece.model; CLIP's BPE from there or the packaged one; for a training workdir, its start
    checkpoint: `checkpoint.tokenizer_source`); none for an in-memory model."""
    return registry.preprocessing(model, checkpoint.tokenizer_source(source))


def config_dtype(config: Any) -> str:
    """The compute dtype a config asks for (`config.model.dtype`, default float32), for `checkpoint.load_model`."""
    model_cfg = config.get("model", {}) if hasattr(config, "get") else {}
    return str(model_cfg.get("dtype", "float32") or "float32")


def compare(checkpoints: Sequence[Any] | Mapping[str, Any], config: Any, out_dir: str | Path, *,
            mesh: Mesh | None = None, tokenizer: Any = None,
            zero_shot: Sequence[ZeroShotTask] | None = None,
            retrieval: Sequence[RetrievalTask] | None = None) -> dict[str, Any]:
    """The suite on two or more models -> one table with differences against the first, plus pictures.

    `checkpoints`: HF directories, hub ids, training workdirs / Orbax step dirs, "NAME=PATH" strings,
    `(name, model_or_path)` pairs, in-memory models, or a `{name: model_or_path}` mapping. `config`: the
    full config (its `eval` section says what to run, `model.dtype` the compute dtype).
    Writes `out_dir/report.md`, `report.json` and the PNGs; returns
    `{"results": [...], "markdown": path, "json": path, "pictures": [paths]}`.
    Models are loaded one at a time, so only one is in memory unless they were passed in memory.
    """
    specs = list(checkpoints.items()) if isinstance(checkpoints, Mapping) else list(checkpoints)
    if len(specs) < 1:
        raise ValueError("compare: no models given")
    named = [_split_name(s, i) for i, s in enumerate(specs)]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"compare: model names must be unique, got {names} (use NAME=PATH)")
    eval_config = config.eval if hasattr(config, "eval") else config["eval"]
    if zero_shot is None:  # build the sets once, shared by all models
        zero_shot = [zero_shot_task(s, eval_config) for s in eval_config.get("zero_shot", ())]
    if retrieval is None:
        retrieval = [retrieval_task(s, eval_config) for s in eval_config.get("retrieval", ())]
    results, pairs_by_model = [], {}
    for name, source in named:
        model = checkpoint.load_model(source, dtype=config_dtype(config))
        result, pairs = run_suite(model, eval_config, name=name, mesh=mesh, tokenizer=tokenizer,
                                  prep=preprocessing_of(model, source), zero_shot=zero_shot, retrieval=retrieval)
        results.append(result)
        pairs_by_model[name] = pairs
        del model
    written = _write(out_dir, results, pairs_by_model, bool(eval_config.get("plots", True)))
    return {"results": results, **written}
