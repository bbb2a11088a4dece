"""What every config builds on (big_vision's configs/common.py): the base config `get_config` (CLIP-Refine,
ViT-B/32, COCO Captions, the paper's hyper-parameters: 1 epoch, global batch 512, AdamW lr 1e-6, weight decay 0.1,
constant lr, fp32), the mesh presets, `parse_arg` for a config's ARG, and ConfigError.

A config of your own starts from it: `from jax_refine import config_base; c = config_base.get_config()`.
Its sections (model, method, data, train, optimizer, mesh, checkpoint, log, eval) are the schema every config is
checked against. Imports nothing of jax_refine: the configs/ files and config.py (the loader) both depend on it.
"""
from __future__ import annotations

from collections.abc import Sequence

import ml_collections


class ConfigError(ValueError):
    """A config file, argument or override that cannot be used; the message names the file or key."""


# `--config default:PRESET` (demo, study too) or `--config clip_refine:mesh=PRESET`: mesh axis sizes
# (data x fsdp x tensor; -1 takes all remaining devices). The paper's fp32 compute is kept; add
# `--config.model.dtype=bfloat16` for speed on GPUs/TPUs.
MESH_PRESETS = {
    "cpu": {"data": -1, "fsdp": 1, "tensor": 1},  # the default: this machine's devices (also the tests' fake ones)
    "gpu1": {"data": 1, "fsdp": 1, "tensor": 1},  # one CUDA GPU
    "gpu8": {"data": 1, "fsdp": 8, "tensor": 1},  # one host with 8 GPUs: FSDP over NVLink
    "tpu_pod": {"data": -1, "fsdp": 4, "tensor": 1},  # a TPU pod slice, all hosts: FSDP inside groups of 4 chips
}


def apply_preset(config: ml_collections.ConfigDict, preset: str | None) -> ml_collections.ConfigDict:
    """Set `config.mesh.shape` from a named preset (None or "" keeps it)."""
    if not preset:
        return config
    if preset not in MESH_PRESETS:
        raise ValueError(f"unknown mesh preset {preset!r}; choose one of {sorted(MESH_PRESETS)}")
    config.mesh.shape = ml_collections.ConfigDict(MESH_PRESETS[preset])
    return config


def parse_arg(arg: str | None, source: str, **choices: Sequence[str]) -> dict[str, str]:
    """A config's `get_config(arg)` argument, big_vision style: `"model=vitb16,method=contrastive"` ->
    `{"model": "vitb16", "method": "contrastive", ...}` for the keys of `choices` (key -> allowed values;
    a key not in `arg` takes its first value). Raises ConfigError naming `source`, the key and the choices.
    """
    values = {key: allowed[0] for key, allowed in choices.items()}
    given: dict[str, str] = {}
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in choices:
            raise ConfigError(f"config {source}: unknown argument {item!r}; expected KEY=VALUE with KEY one of "
                              f"{', '.join(choices)}")
        if key in given:  # the later one would silently win
            raise ConfigError(f"config {source}: {key} is given twice ({key}={given[key]}, {key}={value}); "
                              "give it once")
        given[key] = value
        if value not in choices[key]:
            raise ConfigError(f"config {source}: {key}={value!r} is not one of {', '.join(choices[key])}")
        values[key] = value
    return values


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """The base config; `preset` is a mesh preset of MESH_PRESETS (cpu, gpu1, gpu8, tpu_pod)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "outputs/clip_refine_vitb32_coco"

    # --- model -------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = "openai/clip-vit-base-patch32"  # hub id or local HF directory
    # Random initialisation instead of a checkpoint: a dict of `transformers.CLIPConfig` kwargs
    # (text_config, vision_config, projection_dim, ...). Used by the offline demo's pre-training.
    c.model.random_init = ml_collections.config_dict.placeholder(dict)
    c.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    c.model.attention = "xla"  # xla | cudnn (cuDNN fused attention: GPU, bf16; pads tokens) | xla_padded (on XLA)
    c.model.remat = "none"  # per-block rematerialisation: none | full | save_dots (keep projection matmuls)
    c.model.scan_layers = False  # one lax.scan over each tower's blocks (faster compile; same params/checkpoints)

    # --- method (see jax_refine/objectives.py: one weighted sum of named terms) ---------------
    # `name` is a preset: it sets the default term weights, alpha and normalize (objectives.PRESETS); any of
    # these left at None takes the preset's value, a value set here or on the command line wins.
    c.method = ml_collections.ConfigDict()
    c.method.name = "clip_refine"  # clip_refine|hycd|rafa|contrastive|sigmoid|self_kd|feature_distill|logit_distill|m2_mix
    # L = sum_t weights.t * L_t; None: the preset's weight (clip_refine: kd 1, rafa 1, the rest 0)
    c.method.weights = ml_collections.ConfigDict(
        {t: ml_collections.config_dict.placeholder(float)
         for t in ("contrastive", "sigmoid", "kd", "rafa", "feature", "logit", "m2")})
    c.method.alpha = ml_collections.config_dict.placeholder(float)  # HyCD identity weight; None: preset (0.5; self_kd 0)
    c.method.temperature = 1.0  # HyCD / KD temperature T
    c.method.prior = "normal"  # RaFA prior: normal|uniform|precomputed|fixed
    # normal: mean, std; uniform: low, high (None: 0, 1); fixed: mean; precomputed: path = a `feature-stats` file
    # (its pooled per-dimension mean and std) or mean/std arrays of shape (D,) (objectives.prior_params)
    c.method.prior_params = ml_collections.ConfigDict(
        {"mean": 0.0, "std": 1.0, "low": ml_collections.config_dict.placeholder(float),
         "high": ml_collections.config_dict.placeholder(float), "path": ml_collections.config_dict.placeholder(str)})
    # L2-normalize features before every term (m2 always does); None: preset (False, as the reference; m2_mix True)
    c.method.normalize = ml_collections.config_dict.placeholder(bool)
    # Unit features times a scale c for every feature term (contrastive, kd, rafa, feature, logit; student and
    # teacher): a number > 0, or "teacher" for c = sqrt(exp(teacher logit_scale)) (HyCD's logits are then the
    # teacher's CLIP logits: the reference's regime on any model). None: `normalize` decides. RaFA's z unscaled.
    c.method.feature_scale = ml_collections.config_dict.placeholder(object)
    c.method.m2_beta = 0.5  # m^2-mix ratio lam ~ Beta(b, b) (Oh et al.'s scripts/m2mix.sh: beta2 0.5)

    # --- data (see jax_refine/data/) -----------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # The paper's training set: COCO Captions 2017 train read in place from captions_train2017.json (our COCO-json
    # reader), 99% / 1% of its images at random (seed 42) for train / val as the reference splits it, and each
    # epoch a full random permutation keyed by (seed, epoch) (the last partial batch dropped). Point annotations
    # and images at your copy. Option: TFDS's coco_captions (COCO 2014, Karpathy splits) with
    # source="tfds", name="coco_captions", split="train+restval" (~113k images; read through a shuffle buffer).
    c.data.source = "coco_json"  # coco_json (COCO-format captions JSON + image dir) | tfds (catalog) | tfds_dir
    c.data.name = "coco_captions"  # source=tfds: the catalog name
    c.data.split = "train"  # coco_json: "train" | "val" (the 1%); tfds: a TFDS split like "train+restval"
    c.data.annotations = "data/coco/annotations/captions_train2017.json"  # coco_json: captions JSON
    c.data.images = "data/coco/train2017"  # coco_json: image directory
    c.data.train_fraction = 0.99  # coco_json: share of the images in "train" (the reference's train_val_split_ratio)
    c.data.split_seed = 42  # coco_json: seed of the random train/val split
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds / tfds_dir: TFDS data directory
    c.data.manual_dir = ml_collections.config_dict.placeholder(str)
    c.data.try_gcs = False
    c.data.caption_mode = "random"  # random: one random caption per image per epoch | all: every caption
    c.data.shuffle_buffer = 10_000  # tfds / tfds_dir only (TFRecords have no random access)
    c.data.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE
    c.data.prefetch = 2
    c.data.fast_decode = False  # JPEG decoded at 1/2-1/8 DCT scale before the exact resize (data/decoding.py)

    # --- training ------------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 512  # global batch, over all hosts and devices
    c.train.epochs = 1
    c.train.num_steps = ml_collections.config_dict.placeholder(int)  # overrides epochs when set
    c.train.grad_accum = 1
    c.train.clip_norm = ml_collections.config_dict.placeholder(float)
    c.train.freeze = ()  # regexes (re.search) over param paths like "vision/layers/0/attn/qkv", e.g. ("^vision/",)
    c.train.export_hf = True  # write the refined model in HF format to workdir/hf at the end
    # Divergence guard: stop (before saving) at a non-finite loss or gradient norm, or a loss above divergence_factor
    # x the median of its last divergence_window steps, or a gradient norm above divergence_grad_norm_factor x its
    # own (0: non-finite only); the error names the step to resume from. The gradient norm's factor is far larger:
    # under Adam a lone gradient spike at a normal loss is harmless (the demo's pre-training has 101x ones)
    c.train.divergence_factor = 100.0
    c.train.divergence_grad_norm_factor = 1e4
    c.train.divergence_window = 20

    # --- optimizer -----------------------------------------------------------------------------
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 1e-6
    c.optimizer.weight_decay = 0.1
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.schedule = "constant"  # constant | warmup_cosine
    c.optimizer.warmup_steps = 0

    # --- mesh and sharding ---------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    # Axis sizes; -1 takes all remaining devices. data x fsdp x tensor must equal the device count.
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Logical axis name -> mesh axis (or None: replicated). One table for the whole model.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", None),
        ("proj", None),
        ("norm", None),
        ("patch", None),
        ("pos", None),
    )

    # --- checkpoints ---------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    # --- logging -------------------------------------------------------------------------------
    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.tensorboard = True

    # --- evaluation (see jax_refine/evaluate.py) -----------------------------------------------
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    # reference: "a photo of {}" (the reference's prompt, no article, no period: compare with the paper) |
    # single: "a photo of a {}." | openai: the 80-template ensemble
    c.eval.templates = "reference"
    # The reference's 12 zero-shot sets, in the paper's order (its average is over exactly these). TFDS catalog
    # names; FGVC Aircraft is not in the TFDS 4.9 catalog: a class folder of its test images (variants.txt
    # order; point the path at yours). cifar10 / cifar100 and any "folder:<dir>" can be added as options.
    c.eval.zero_shot = (
        "folder:data/fgvc_aircraft/test", "caltech_birds2011", "stanford_cars", "caltech101", "dtd", "eurosat",
        "oxford_flowers102", "food101", "imagenet2012", "oxford_iiit_pet", "sun397", "ucf101",
    )
    # COCO (Karpathy 5k test, TFDS catalog), Flickr8k and Flickr30k (1k test each, Karpathy's split JSON and the
    # photos: point the paths at yours) as in the reference. Also "coco_json:<annotations.json>:<image_dir>" and
    # "flickr:<Flickr8k.token.txt>:<split list|train|dev|test>:<image_dir>" (jax_refine/data/retrieval.py).
    c.eval.retrieval = ("coco_karpathy_test",
                        "karpathy:data/dataset_flickr8k.json:test:data/flickr8k/images",
                        "karpathy:data/dataset_flickr30k.json:test:data/flickr30k/images")
    c.eval.max_examples = ml_collections.config_dict.placeholder(int)  # cut each set (quick looks)
    # npz embedding cache, keyed by (model fingerprint, dataset, split, n, templates); None: no cache
    c.eval.cache_dir = ml_collections.config_dict.placeholder(str)
    c.eval.plots = True  # PCA (and UMAP if umap-learn is installed) + similarity histogram PNGs
    c.eval.progress = True  # tqdm bars during embedding extraction
    c.eval.every_steps = 0  # during training: the suite every N steps and at the end (0: off), kind "eval" rows
    return apply_preset(c, preset)
