"""The real-data study (config `study`): pre-train on Flickr8k, refine with every method and seed, evaluate,
write one table of mean +- std over seeds (markdown + JSON) and the pictures.

Every stage's output lives under `out/` keyed by a hash of the settings it depends on, so a rerun skips what
is done (the pre-trained model, the lr selection, each refined model and its evaluation).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from jax_refine import checkpoint, evaluate, plots, preprocess
from jax_refine import train as train_lib
from jax_refine.data import classification, coco_format, sources

log = logging.getLogger(__name__)

METHOD_NAMES = {"clip_refine": "CLIP-Refine", "contrastive": "Contrastive FT", "self_kd": "Self-KD",
                "hycd": "HyCD only", "rafa": "RaFA only", "feature_distill": "Feature distill.",
                "logit_distill": "Logit distill.", "m2_mix": "m2-mix"}
FLICKR, COCO, CIFAR = "flickr8k_test", "coco_val", "cifar10_test"
PRETRAIN_LOGIT_SCALE_INIT = float(np.log(1 / 0.07))  # transformers.CLIPConfig's logit_scale_init_value


def _key(*parts: Any) -> str:
    """A short hash of JSON-able settings (the cache key of a stage)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _say(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class StudyData:
    """The study's caption sets (COCO JSONs with absolute file names, images dir "/") and eval specs."""
    pretrain: str
    refine: str
    val: str
    flickr_test: str
    coco_val: str
    cifar_test: str
    counts: dict


def _write_coco(records: Sequence[Mapping], path: Path) -> str:
    """`records` ({"path", "captions": [(id, text)]}) as a COCO captions JSON whose file names are absolute."""
    return str(coco_format.write_coco_json(path, ({"file_name": str(Path(r["path"]).absolute()),
                                                   "captions": [t for _, t in r["captions"]]} for r in records)))


def _cifar_records(cifar_train: Path, per_class: int) -> list[dict]:
    """`per_class` CIFAR-10 train photos per class (the first files), each with 5 template captions."""
    templates = evaluate.resolve_templates("openai")
    names, paths, labels = classification.list_class_folder(cifar_train)
    rng = np.random.default_rng(0)
    taken: dict[int, int] = {}
    records = []
    for p, y in zip(paths, labels):
        if taken.get(y, 0) >= per_class:
            continue
        taken[y] = taken.get(y, 0) + 1
        chosen = rng.choice(len(templates), 5, replace=False)
        records.append({"path": p, "captions": [(int(j), templates[j].format(names[y])) for j in chosen]})
    return records


def _resized(records: Sequence[Mapping], size: int, cache: Path, counts: dict) -> list[dict]:
    """`records` with each photo decoded, resized and center-cropped once to `size` (the pipeline's own
    `resize_crop`, so the pixels are those it would compute) and stored losslessly as PNG under `cache`;
    a photo that does not decode is dropped and counted in `counts["skipped_bad_image"]`."""
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for r in records:
        dst = cache / (Path(r["path"]).stem + ".png")
        if not dst.is_file():
            try:
                pixels = preprocess.decode_resize_crop(Path(r["path"]).read_bytes(), size)
            except (OSError, ValueError) as e:
                counts["skipped_bad_image"] = counts.get("skipped_bad_image", 0) + 1
                log.warning("skipping %s: %s", r["path"], e)
                continue
            Image.fromarray(pixels).save(dst)
        out.append({**r, "path": str(dst)})
    return out


def prepare_data(config: ml_collections.ConfigDict, data_dir: Path, out: Path) -> StudyData:
    """Read Flickr8k / coco_mini / CIFAR-10 under `data_dir`; write the training sets under `out/data`."""
    s = config.study
    fl = data_dir / "flickr8k"
    token, images = fl / "Flickr8k.token.txt", fl / "images"
    for need in (token, images, data_dir / "coco_mini" / "annotations", data_dir / "cifar10" / "test"):
        if not need.exists():
            raise FileNotFoundError(f"study data not found: {need} (pass --data-dir DIR holding flickr8k/, "
                                    "coco_mini/ and cifar10/)")
    counts: dict[str, Any] = {}
    cut = int(s.flickr_photos) or None

    def split(name: str) -> list[dict]:
        c: dict[str, int] = {}
        recs = sources.read_captions(token, images, format="flickr", split=name, counts=c)[:cut]
        counts[f"flickr8k_{name}"] = {"photos": len(recs), "captions": sum(len(r["captions"]) for r in recs), **c}
        return recs

    train, dev, test = split("train"), split("dev"), split("test")
    n_pre = int(s.pretrain_flickr_photos) or len(train)
    if not 0 < n_pre <= len(train):
        raise ValueError(f"config.study.pretrain_flickr_photos={n_pre}: must be between 1 and {len(train)} "
                         "(Flickr8k train photos)")
    coco_ann = data_dir / "coco_mini" / "annotations" / "captions_val2017.json"
    coco = sources.read_captions(coco_ann, data_dir / "coco_mini" / "val2017", format="coco")
    coco = [r for r in coco if r["captions"]][: int(s.coco_images) or None]
    size = int(config.model.random_init["vision_config"]["image_size"])
    if s.resize_images:
        _say(f"  decoding and resizing the Flickr8k and COCO photos to {size} px once (cached)")
        train, dev, test = (_resized(x, size, out / "data" / f"flickr8k_{size}px", counts) for x in (train, dev, test))
        coco = _resized(coco, size, out / "data" / f"coco_val_{size}px", counts)
    cifar = _cifar_records(data_dir / "cifar10" / "train", int(s.cifar_per_class)) if s.cifar_per_class else []
    counts["cifar10_train_mixed_in"] = len(cifar)
    n_val = int(s.val_photos)
    if not 0 < n_val < len(dev):
        raise ValueError(f"config.study.val_photos={n_val}: must be between 1 and {len(dev) - 1} (dev photos)")
    # refinement set: the Flickr8k train photos held out of pre-training plus the dev photos outside the
    # validation slice, so the refined captions are disjoint from pre-training (the paper: COCO after WIT)
    pre_flickr, refine_set = train[:n_pre], train[n_pre:] + dev[:-n_val]
    counts["pretrain_flickr_photos"], counts["refine_photos"], counts["val_photos"] = n_pre, len(refine_set), n_val
    if s.pretrain_every_caption:  # one entry per caption: each photo is seen with all 5 captions per epoch
        pre_flickr = [{**r, "captions": [c]} for r in pre_flickr for c in r["captions"]]
    counts["pretrain_entries"] = {"flickr8k": len(pre_flickr), "cifar10": len(cifar)}
    d = out / "data"
    name = (f"flickr8k_train{'_cut' + str(cut) if cut else ''}_{n_pre}{'_every' if s.pretrain_every_caption else ''}"
            f"_cifar{int(s.cifar_per_class)}")
    return StudyData(
        pretrain=_write_coco(pre_flickr + cifar, d / f"{name}.json"),
        refine=_write_coco(refine_set, d / f"flickr8k_refine_{len(train) - n_pre}train_{len(dev) - n_val}dev.json"),
        val=_write_coco(dev[-n_val:], d / f"flickr8k_dev_val_{n_val}.json"),
        flickr_test=f"coco_json:{_write_coco(test, d / f'flickr8k_test_{len(test)}.json')}:/",
        coco_val=f"coco_json:{_write_coco(coco, d / f'coco_val_{len(coco)}.json')}:/",
        cifar_test=f"folder:{data_dir / 'cifar10/test'}", counts=counts)


# ------------------------------------------------------------------------------------------ training
def _train_config(config: ml_collections.ConfigDict, workdir: Path, annotations: str, *, method: str, lr: float,
                  seed: int, stage: Mapping, start: str, regime: Mapping | None = None) -> ml_collections.ConfigDict:
    """A trainer config for one run: `start` is "" (random init) or the HF dir of the pre-trained model;
    `regime` the `config.method` keys of a refinement regime (`study.regimes`)."""
    c = ml_collections.ConfigDict(config.to_dict())
    del c["study"]
    c.workdir = str(workdir)
    c.seed = int(seed)
    c.method.name = method
    c.data.annotations, c.data.images = annotations, "/"
    c.data.data_dir = str(workdir.parent.parent / "tfds")
    c.train.batch_size = int(stage["batch_size"])
    c.train.epochs = int(stage["epochs"])
    c.optimizer.lr = float(lr)
    c.optimizer.weight_decay = float(stage["weight_decay"])
    c.optimizer.schedule = stage.get("schedule", "constant")
    c.optimizer.warmup_steps = int(stage.get("warmup_steps", 0))
    # one lax.scan over each tower's blocks: the same parameters and numbers, a faster compile (every lr of
    # the selection grid is a new program)
    c.model.scan_layers = bool(stage.get("scan_layers", c.model.scan_layers))
    if stage.get("normalize") is not None:
        c.method.normalize = bool(stage["normalize"])
    for k, v in (regime or {}).items():  # a refinement regime: normalize, feature_scale, prior, prior_params
        if isinstance(v, Mapping):
            c.method[k].update(dict(v))
        else:
            c.method[k] = v
    if start:
        c.model.random_init = None
        c.model.name_or_path = start
    return c


def _run(config: ml_collections.ConfigDict, label: str) -> str:
    """Train `config` unless its HF export exists; returns the export dir."""
    hf = Path(config.workdir) / "hf"
    if (hf / "config.json").is_file():
        _say(f"{label}: cached ({hf})")
        return str(hf)
    t0 = time.perf_counter()
    _say(f"{label}: training ({config.method.name}, lr {config.optimizer.lr:g}, seed {config.seed})")
    out = train_lib.train(config)
    _say(f"{label}: done in {time.perf_counter() - t0:.0f}s, {out['steps']} steps")
    return out["hf_dir"]


# ---------------------------------------------------------------------------------------- evaluation
def _tasks(config: ml_collections.ConfigDict, data: StudyData) -> dict[str, Any]:
    s, e = config.study, config.eval

    def task(builder, spec, name, limit):
        t = builder(spec, {**e.to_dict(), "max_examples": limit or None})
        return dataclasses.replace(t, name=name)

    return {"flickr": task(evaluate.retrieval_task, data.flickr_test, FLICKR, None),
            "coco": task(evaluate.retrieval_task, data.coco_val, COCO, None),
            "cifar": task(evaluate.zero_shot_task, data.cifar_test, CIFAR, int(s.cifar_test_examples))}


def _evaluate(model_dir: str, config: ml_collections.ConfigDict, tasks: Mapping[str, Any], cache: Path,
              with_pairs: bool = False) -> tuple[dict, dict]:
    """Scores of one model: CIFAR zero-shot (single prompt and the 80-template ensemble), retrieval and
    feature metrics on Flickr8k test and COCO val. Cached in `cache` (JSON) unless `with_pairs`."""
    if cache.is_file() and not with_pairs:
        return json.loads(cache.read_text()), {}
    model = checkpoint.load_model(model_dir, dtype=evaluate.config_dtype(config))
    e = ml_collections.ConfigDict({**config.eval.to_dict(), "max_examples": None,
                                   "cache_dir": str(cache.parent / "embeddings")})
    res, pairs = evaluate.run_suite(model, e, name=model_dir, zero_shot=[tasks["cifar"]],
                                    retrieval=[tasks["flickr"], tasks["coco"]])
    e.templates = "openai"
    ens, _ = evaluate.run_suite(model, e, name=model_dir, zero_shot=[tasks["cifar"]], retrieval=[])
    scores = {"cifar_single": res["zero_shot"][CIFAR]["top1"], "cifar_ensemble": ens["zero_shot"][CIFAR]["top1"]}
    for ds in (FLICKR, COCO):
        for way in ("t2i", "i2t"):
            for k in ("R@1", "R@5", "R@10"):
                scores[f"{ds}/{way}/{k}"] = res["retrieval"][ds][way][k]
    f = res["features"][FLICKR]
    scores.update(gap=f["modality_gap"], gap_mse=f["modality_gap_mse"], alignment=f["alignment"],
                  uniformity_image=f["uniformity_image"], uniformity_text=f["uniformity_text"])
    # the raw (unnormalized) feature norms: what the "raw" regime's terms see (the reference: ~10 and ~8)
    scores.update(norm_image=float(np.linalg.norm(pairs[FLICKR].image, axis=-1).mean()),
                  norm_text=float(np.linalg.norm(pairs[FLICKR].text, axis=-1).mean()),
                  logit_scale=float(np.exp(np.asarray(model.logit_scale[...]))))  # exp of the learned log scale
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(scores, indent=1))
    return scores, pairs


def _prior_stats(config: ml_collections.ConfigDict, pretrained: str, annotations: str, regime: Mapping,
                 out: Path) -> str:
    """The precomputed prior of `regime`: the pre-trained model's (the teacher's) per-dimension feature mean and
    std on the refinement captions `annotations`, in the feature space of `regime` (`feature-stats`, i.e.
    `feature_stats.compute_feature_stats`), cached by model, data and feature space -> the npz path."""
    from jax_refine import feature_stats

    space = {k: v for k, v in regime.items() if k not in ("prior", "prior_params")}
    path = out / f"stats_{_key(pretrained, annotations, space)}.npz"
    if not path.is_file():
        c = _train_config(config, out, annotations, method="clip_refine", lr=0.0, seed=0, stage=config.study.refine,
                          start=pretrained, regime=space)
        meta = feature_stats.compute_feature_stats(c, path, progress=False)
        _say(f"  prior: the teacher's {meta['regime']} feature statistics on {meta['images']} photos and "
             f"{meta['captions']} captions of the refinement set -> {path}")
    return str(path)


# ------------------------------------------------------------------------------------- lr selection
def selection_score(recalls: Mapping[str, Any]) -> tuple[float, float]:
    """The lr-selection criterion on the validation slice and its noise, both in points of %.

    `recalls`: a retrieval result ({"i2t": {"R@1"}, "t2i": {"R@1"}, "n_images", "n_captions"}, recalls in %).
    Score: (I->T R@1 + T->I R@1) / 2. Noise: the binomial standard error of that mean, each recall a rate
    over its own queries (photos for I->T, captions for T->I), the two taken as independent.
    """
    p_i, p_t = recalls["i2t"]["R@1"] / 100.0, recalls["t2i"]["R@1"] / 100.0
    var = p_i * (1 - p_i) / int(recalls["n_images"]) + p_t * (1 - p_t) / int(recalls["n_captions"])
    return 100.0 * (p_i + p_t) / 2, 100.0 * 0.5 * float(np.sqrt(var))


# -------------------------------------------------------------------------------------------- table
COLUMNS = (("cifar_single", "C10 ZS"), ("cifar_ensemble", "C10 ZS (80 tmpl)"),
           (f"{FLICKR}/t2i/R@1", "F8k T->I R@1"), (f"{FLICKR}/t2i/R@5", "R@5"), (f"{FLICKR}/t2i/R@10", "R@10"),
           (f"{FLICKR}/i2t/R@1", "F8k I->T R@1"), (f"{FLICKR}/i2t/R@5", "R@5"), (f"{FLICKR}/i2t/R@10", "R@10"),
           (f"{COCO}/t2i/R@1", "COCO T->I R@1"), (f"{COCO}/i2t/R@1", "COCO I->T R@1"),
           ("gap", "gap"), ("alignment", "align"), ("uniformity_image", "unif img"), ("uniformity_text", "unif txt"))
# the ablation's narrower table: zero-shot both ways, R@1 and R@10 both ways, COCO R@1, the geometry, the norms
ABLATION_COLUMNS = (("cifar_single", "C10 ZS"), ("cifar_ensemble", "C10 ZS (80)"),
                    (f"{FLICKR}/t2i/R@1", "F8k T->I R@1"), (f"{FLICKR}/t2i/R@10", "R@10"),
                    (f"{FLICKR}/i2t/R@1", "F8k I->T R@1"), (f"{FLICKR}/i2t/R@10", "R@10"),
                    (f"{COCO}/t2i/R@1", "COCO T->I R@1"), (f"{COCO}/i2t/R@1", "COCO I->T R@1"),
                    ("gap", "gap"), ("alignment", "align"), ("uniformity_image", "unif img"),
                    ("uniformity_text", "unif txt"), ("norm_image", "|img|"), ("norm_text", "|txt|"))
THREE_DECIMALS = ("gap", "alignment", "uniformity_image", "uniformity_text")


def summarize(runs: Mapping[str, Sequence[Mapping[str, float]]], base: Mapping[str, float]) -> dict[str, Any]:
    """{method: {metric: {"mean", "std", "delta", "n"}}}: std is the sample std over seeds (0 for one seed),
    delta the mean minus the pre-trained model's value."""
    table = {}
    for method, seeds in runs.items():
        table[method] = {}
        for key in seeds[0]:
            v = np.asarray([s[key] for s in seeds], np.float64)
            table[method][key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                  "delta": float(v.mean() - base[key]), "n": int(len(v))}
    return table


def markdown(table: Mapping[str, Any], base: Mapping[str, float], columns: Sequence[tuple[str, str]] = COLUMNS,
             labels: Mapping[str, str] | None = None, extra: Mapping[str, Sequence[str]] | None = None) -> str:
    """The paper's layout: one row per method, `mean +- std (delta vs pre-trained)` per column.

    `labels`: row label per table key (default: the method's name); `extra`: {"header": [...], row key: [...]}
    cells put first (e.g. the regime and the lr)."""
    def fmt(key: str, x: float) -> str:
        return f"{x:.3f}" if key in THREE_DECIMALS else f"{x:.2f}"

    extra = extra or {}
    head = list(extra.get("header", ()))
    lines = ["| Method | " + "".join(f"{h} | " for h in head) + " | ".join(c for _, c in columns) + " |",
             "|---|" + "---|" * len(head) + "---:|" * len(columns),
             "| Pre-trained | " + "".join(" | " for _ in head) + " | ".join(fmt(k, base[k]) for k, _ in columns) + " |"]
    for row_key, row in table.items():
        cells = [f"{fmt(k, row[k]['mean'])} ± {fmt(k, row[k]['std'])} ({'+' if row[k]['delta'] >= 0 else ''}"
                 f"{fmt(k, row[k]['delta'])})" for k, _ in columns]
        label = (labels or {}).get(row_key, METHOD_NAMES.get(row_key, row_key))
        lines.append(f"| {label} | " + "".join(f"{x} | " for x in extra.get(row_key, ())) + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- study
def _regime_for(method: str, regime: Mapping[str, Any]) -> dict[str, Any]:
    """`regime` as `method` sees it: a method without a RaFA term ignores the prior, so its prior keys are
    dropped and the run (and its cache entry) is the same under every prior."""
    from jax_refine import objectives

    r = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in regime.items()}
    if objectives.resolve_method({"name": method, "weights": {}}).weights.rafa == 0.0:
        r.pop("prior", None)
        r.pop("prior_params", None)
    return r


def run_study(config: ml_collections.ConfigDict, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run the whole study; returns {"markdown": path, "json": path, "pictures": [...], "timings": {...}}."""
    t_start = time.perf_counter()
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    s = config.study
    if s.compile_cache:  # identical steps (seeds of one method) and eval functions compile once
        jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _say("stage 1/5: reading Flickr8k, coco_mini, CIFAR-10")
    data = prepare_data(config, Path(data_dir).absolute(), out)
    for k, v in data.counts.items():
        _say(f"  {k}: {v}")
    tasks = _tasks(config, data)
    timings["data"] = time.perf_counter() - t0

    # 1. pre-train (cached by model, data and pre-training settings)
    t0 = time.perf_counter()
    model_cfg = config.model.to_dict()
    pre_key = _key(model_cfg, s.pretrain.to_dict(), data.pretrain, int(s.cifar_per_class), int(s.flickr_photos))
    _say(f"stage 2/5: pre-training from scratch on {data.counts['pretrain_flickr_photos']} Flickr8k + "
         f"{data.counts['cifar10_train_mixed_in']} CIFAR-10 photos ({data.counts['pretrain_entries']} entries "
         "an epoch)")
    pre_cfg = _train_config(config, out / "pretrain" / pre_key, data.pretrain, method="contrastive",
                            lr=s.pretrain.lr, seed=0, stage=s.pretrain, start="")
    pretrained = _run(pre_cfg, "pre-train")
    timings["pretrain"] = time.perf_counter() - t0
    ev_key = _key(config.eval.to_dict(), data.flickr_test, int(s.flickr_photos), int(s.coco_images),
                  int(s.cifar_test_examples))
    pics = {}
    base, pics["Pre-trained"] = _evaluate(pretrained, config, tasks, out / "eval" / f"pretrained_{pre_key}_{ev_key}.json",
                                          with_pairs=True)
    _say(f"  pre-trained: F8k R@1 T->I {base[f'{FLICKR}/t2i/R@1']:.2f} I->T {base[f'{FLICKR}/i2t/R@1']:.2f}, "
         f"R@10 T->I {base[f'{FLICKR}/t2i/R@10']:.2f} I->T {base[f'{FLICKR}/i2t/R@10']:.2f}, "
         f"C10 {base['cifar_single']:.2f} / {base['cifar_ensemble']:.2f} (80 tmpl), gap {base['gap']:.3f}, "
         f"raw norms image {base['norm_image']:.2f} text {base['norm_text']:.2f}, logit scale "
         f"{base['logit_scale']:.2f} (init {np.exp(PRETRAIN_LOGIT_SCALE_INIT):.2f})")

    # 2. the precomputed prior of each regime that asks for one (the teacher's feature statistics on the
    # refinement captions, in that regime's feature space)
    t0 = time.perf_counter()
    names = list(dict.fromkeys([*s.ablation.regimes, s.regime]))
    regimes = {}
    for name in names:
        if name not in s.regimes:
            raise ValueError(f"config.study.regime(s): unknown regime {name!r}; config.study.regimes has "
                             f"{sorted(s.regimes)}")
        regimes[name] = s.regimes[name].to_dict()
        if regimes[name].get("prior") == "precomputed":
            regimes[name]["prior_params"] = {"path": _prior_stats(config, pretrained, data.refine, regimes[name],
                                                                  out / "prior")}
    timings["prior"] = time.perf_counter() - t0

    def refine(method: str, regime: Mapping, lr: float, seed: int) -> str:
        c = _train_config(config, out / "refine", data.refine, method=method, lr=lr, seed=seed, stage=s.refine,
                          start=pretrained, regime=regime)
        key = _key(pre_key, c.method.to_dict(), c.optimizer.to_dict(), c.train.to_dict(), int(seed), data.refine)
        c.workdir = str(out / "refine" / f"{method}_s{seed}_{key}")
        return _run(c, f"{method} seed {seed}")

    # 3. per regime and method: the lr chosen on the validation slice (seed 0), then every seed at that lr
    val_task = dataclasses.replace(evaluate.retrieval_task(f"coco_json:{data.val}:/", config.eval),
                                   name="flickr8k_dev_val")
    lrs = [float(x) for x in s.select.lrs]
    # the ablation's methods two at a time (CLIP-Refine and contrastive FT first) in every regime, then the
    # full table's other methods: a run cut short still compares the first two methods across the regimes
    order = {m: i for i, m in enumerate(s.ablation.methods)}
    cells = sorted(((r, m) for m in s.ablation.methods for r in s.ablation.regimes),
                   key=lambda rm: (order[rm[1]] // 2, list(s.ablation.regimes).index(rm[0]), order[rm[1]]))
    cells += [(s.regime, m) for m in s.methods if (s.regime, m) not in cells]
    _say(f"stage 3/5: {len(cells)} (regime, method) cells: the lr of each from {lrs} on "
         f"{data.counts['val_photos']} held-out Flickr8k dev photos, then seeds {list(s.seeds)}; "
         f"{s.refine.epochs} epoch(s) of {data.counts['refine_photos']} photos at batch {s.refine.batch_size}")
    t0 = time.perf_counter()
    selections: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {}
    for regime_name, method in cells:
        regime = _regime_for(method, regimes[regime_name])
        cell = f"{regime_name}/{method}"
        sel_path = out / "select" / f"{_key(pre_key, method, regime, lrs, s.refine.to_dict(), data.val)}.json"
        if sel_path.is_file():
            sel = json.loads(sel_path.read_text())
        else:
            sel = {"criterion": "(I->T R@1 + T->I R@1) / 2 on the validation slice, seed 0; noise: its binomial "
                                "standard error", "scores": {}, "noise": {}}
            for lr in lrs:
                model = checkpoint.load_model(refine(method, regime, lr, 0), dtype=evaluate.config_dtype(config))
                e = ml_collections.ConfigDict({**config.eval.to_dict(), "max_examples": None, "cache_dir": None})
                r = evaluate.run_suite(model, e, retrieval=[val_task], zero_shot=[])[0]["retrieval"]["flickr8k_dev_val"]
                sel["scores"][f"{lr:g}"], sel["noise"][f"{lr:g}"] = selection_score(r)
            sel["lr"] = float(max(lrs, key=lambda x: sel["scores"][f"{x:g}"]))
            sel_path.parent.mkdir(parents=True, exist_ok=True)
            sel_path.write_text(json.dumps(sel, indent=1))
        selections[cell] = sel
        _say(f"  {cell}: lr {sel['lr']:g} (val scores " + ", ".join(
            f"{k}: {v:.2f} ± {sel['noise'][k]:.2f}" for k, v in sel["scores"].items()) + ")")
        for seed in s.seeds:
            model_dir = refine(method, regime, sel["lr"], seed)
            draw = regime_name == s.regime and seed == s.seeds[0] and method in s.picture_methods
            scores, pairs = _evaluate(model_dir, config, tasks, Path(model_dir).parent / f"eval_{ev_key}.json",
                                      with_pairs=draw)
            if draw:
                pics[METHOD_NAMES.get(method, method)] = pairs
            runs.setdefault(cell, []).append(scores)
            _say(f"  {cell} seed {seed}: F8k R@1 T->I {scores[f'{FLICKR}/t2i/R@1']:.2f} "
                 f"I->T {scores[f'{FLICKR}/i2t/R@1']:.2f}, C10 {scores['cifar_single']:.2f}, gap {scores['gap']:.3f}")
        timings["select_refine_evaluate"] = time.perf_counter() - t0
        write_report(out / "report", study=s, base=base, runs=runs, cells=cells, regimes=regimes,
                     selections=selections, data=data, timings=timings, config=config)

    # 4. the tables and the pictures
    _say("stage 5/5: tables and pictures")
    pictures = [str(x) for x in plots.make_plots({k: v[FLICKR] for k, v in pics.items()}, out / "report",
                                                  prefix="flickr8k_test_")]
    timings["total"] = time.perf_counter() - t_start
    paths = write_report(out / "report", study=s, base=base, runs=runs, cells=cells, regimes=regimes,
                         selections=selections, data=data, timings=timings, config=config, pictures=pictures)
    _say(f"done in {timings['total']:.0f}s")
    return {**{k: str(v) for k, v in paths.items()}, "pictures": pictures, "timings": timings,
            "table": summarize(runs, base)}


def write_report(report: Path, *, study: Any, base: Mapping, runs: Mapping[str, Sequence[Mapping]],
                 cells: Sequence[tuple[str, str]], regimes: Mapping, selections: Mapping, data: StudyData,
                 timings: Mapping[str, float], config: ml_collections.ConfigDict, pictures: Sequence[str] = ()
                 ) -> dict[str, Path]:
    """study.md and study.json under `report` from the cells done so far (`runs`; the study rewrites them
    after every cell, so a run cut short leaves the tables of what finished): the full table (every method
    in `study.regime`) and the ablation (regimes x methods)."""
    s = study
    report.mkdir(parents=True, exist_ok=True)
    table = summarize(runs, base)
    full = {m: table[f"{s.regime}/{m}"] for m in s.methods if f"{s.regime}/{m}" in table}
    ablation = {c: table[c] for c in (f"{r}/{m}" for r, m in cells
                                      if r in s.ablation.regimes and m in s.ablation.methods) if c in table}
    missing = [f"{r}/{m}" for r, m in cells if f"{r}/{m}" not in table]
    seeds = {c: len(v) for c, v in runs.items() if len(v) != len(s.seeds)}
    md = ["# Real-data study", "",
          f"## All methods in the regime `{s.regime}` ({regimes[s.regime]})", "",
          markdown(full, base, extra={"header": ["lr"], **{m: [f"{selections[f'{s.regime}/{m}']['lr']:g}"]
                                                           for m in full}}),
          "## Regime ablation", "", "; ".join(f"**{n}**: {r}" for n, r in regimes.items()), "",
          markdown(ablation, base, ABLATION_COLUMNS,
                   labels={c: f"{c.split('/')[0]} / {METHOD_NAMES.get(c.split('/')[1])}" for c in ablation},
                   extra={"header": ["lr"], **{c: [f"{selections[c]['lr']:g}"] for c in ablation}}),
          f"Mean ± sample std over seeds {list(s.seeds)} (change of the mean against the pre-trained model). "
          "Accuracies and recalls in %; gap, alignment, uniformity and the raw feature norms |img|, |txt| on "
          "Flickr8k test (the first four on normalized embeddings).",
          "lr selection (per regime and method, seed 0, score ± binomial standard error): " + "; ".join(
              f"{c}: " + ", ".join(f"{k} {v:.2f}±{sel['noise'][k]:.2f}" for k, v in sel["scores"].items())
              for c, sel in selections.items()),
          "Data: " + "; ".join(f"{k} {v}" for k, v in data.counts.items()),
          "Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())]
    if missing or seeds:
        md.append(f"**Incomplete**: cells not run yet {missing}; cells with fewer seeds {seeds}.")
    md += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in pictures]
    paths = {"markdown": report / "study.md", "json": report / "study.json"}
    paths["markdown"].write_text("\n".join(md) + "\n")
    paths["json"].write_text(json.dumps({"pretrained": base, "methods": full, "ablation": ablation, "runs": runs,
                                         "regimes": regimes, "regime": s.regime, "selection": selections,
                                         "missing": missing, "data": data.counts,
                                         "files": {"pretrain": data.pretrain, "refine": data.refine, "val": data.val},
                                         "timings": dict(timings), "config": config.to_dict()},
                                        indent=1, default=str))
    return paths
