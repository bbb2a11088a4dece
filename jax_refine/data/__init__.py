"""TFDS input pipelines (tf.data, CPU-only TensorFlow): training pairs, zero-shot sets, retrieval sets.

Training (trainer):
    make_train_iterator(data_config, *, global_batch_size, prep=None, seed=0,
                        process_index=0, process_count=1, tokenizer=None) -> TrainIterator
        prep: the model's `preprocess.Preprocessing` (size, resize, mean/std, tokenizer, text length); every
        loader here takes it (None: CLIP's; image_size= / max_length= give CLIP's at another size).
        data_config: jax_refine/config_base.py `c.data` (source tfds|tfds_dir|coco_json, name, split, data_dir,
        manual_dir, annotations, images, train_fraction, split_seed, try_gcs, caption_mode random|all,
        shuffle_buffer, num_parallel_calls, prefetch). coco_json is read in place (split "train"/"val" at
        random, seed split_seed), each epoch a full permutation keyed by (seed, epoch). Endless; next() -> per-host numpy batch
        {"image": (b,H,W,3) f32 normalized, "input_ids": (b,L) i32, "attention_mask": (b,L) i32},
        b = global_batch_size // process_count. Attributes: num_examples, steps_per_epoch (global
        batches per epoch). get_state() -> JSON-able dict; set_state(dict); stats() -> {"skipped_no_caption",
        "skipped_bad_image", "batches", "epoch"}.
    (per-host batches become global arrays with sharding.host_to_global(batch, mesh)).
    prepare_coco_json(annotations, images, out_dir, *, name=None, split="train") -> Path of the TFDS dataset dir.

Evaluation (evaluator):
    load_classification(spec, *, batch_size, prep=None, split=None, data_dir=None, manual_dir=None,
                        try_gcs=False, process_index=0, process_count=1, max_examples=None) -> ClassificationSet
        spec: catalog name ("cifar10", "imagenet2012", ...) or "folder:<dir>". .class_names, .num_examples,
        .num_batches, .batches() -> {"image": (b,H,W,3) f32, "label": (b,) i32, "mask": (b,) bool}, .stats().
    load_retrieval(spec, *, batch_size, prep=None, tokenizer=None, data_dir=None,
                   try_gcs=False, process_index=0, process_count=1, max_examples=None) -> RetrievalSet
        spec: "coco_karpathy_test" | "tfds:<name>:<split>" | "tfds_dir:<dir>[:<split>]" |
        "coco_json:<annotations.json>:<image dir>". .num_images, .texts {"input_ids", "attention_mask":
        (T,L) i32, "caption_image_index": (T,) i32}, .captions, .num_batches,
        .image_batches() -> {"image", "image_index": (b,) i32, "mask": (b,) bool}, .stats().
    class_names(name) -> list[str] | None (prompt templates: `jax_refine.evaluate.resolve_templates`).
Every host yields the same number of eval batches (padding rows have mask False).
"""
from jax_refine.data.classification import ClassificationSet, class_names, load_classification
from jax_refine.data.coco_captions_builder import prepare_coco_json
from jax_refine.data.coco_format import read_coco_json
from jax_refine.data.retrieval import RetrievalSet, load_retrieval
from jax_refine.data.training import TrainIterator, make_train_iterator

__all__ = [
    "ClassificationSet", "RetrievalSet", "TrainIterator", "class_names", "load_classification", "load_retrieval",
    "make_train_iterator", "prepare_coco_json", "read_coco_json",
]
