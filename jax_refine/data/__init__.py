"""TFDS input pipelines (tf.data, CPU-only TensorFlow): training pairs, zero-shot sets, retrieval sets.

The trainer calls `make_train_iterator` (endless, resumable per-host numpy batches) and `prepare_coco_json`;
the evaluator `load_classification`, `load_retrieval` and `class_names`. Their signatures, batch layouts and
specs: docs/data.md, "API".
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
