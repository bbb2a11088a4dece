"""Zero-shot classification sets: TFDS catalog sets by name or local class folders; class names.

`load_classification("cifar10", batch_size=...)` or `load_classification("folder:/data/cifar10/test", ...)`
(a directory with one sub-folder per class, sorted folder order = label order; an optional
`classnames.txt` there gives the prompt name of each folder, one per line, in that order).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from jax_refine import fingerprint, preprocess
from jax_refine.data import decoding, hosts, sources
from jax_refine.data.tf_runtime import tf, tfds

ASSETS = Path(__file__).resolve().parents[1] / "assets"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# The split used for zero-shot evaluation of each catalog set (eurosat only has "train" in TFDS).
EVAL_SPLITS = {
    "imagenet2012": "validation", "cifar10": "test", "cifar100": "test", "food101": "validation",
    "oxford_flowers102": "test", "oxford_iiit_pet": "test", "caltech101": "test", "dtd": "test",
    "eurosat": "train", "sun397": "test", "stanford_cars": "test", "cars196": "test", "fgvc_aircraft": "test",
    "caltech_birds2011": "test", "ucf101": "test",
}


def class_names(name: str) -> list[str] | None:
    """The packaged prompt names of catalog set `name` in label order, or None if we ship none."""
    path = ASSETS / "classnames" / f"{name}.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else None


@dataclasses.dataclass
class ClassificationSet:
    """A zero-shot set on this host. `batches()` yields `num_batches` batches
    {"image": (b,S,S,3) f32, "label": (b,) i32, "mask": (b,) bool}; padded rows and unreadable images have
    mask False. `num_examples` counts the whole set (all hosts)."""

    name: str
    class_names: list[str]
    num_examples: int
    batch_size: int
    num_batches: int
    prep: preprocess.Preprocessing  # the model's image size, resize mode and mean/std
    _records: Callable[[], "tf.data.Dataset"]
    num_parallel_calls: int = -1
    _stats: dict = dataclasses.field(default_factory=lambda: {"skipped_bad_image": 0})
    content: str = ""  # fingerprint.files_key of every file read (photos with their class folders, or shards)

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        return decoding.eval_batches(self._records(), batch_size=self.batch_size, prep=self.prep,
                                     num_batches=self.num_batches, meta=("label",), stats=self._stats,
                                     num_parallel_calls=self.num_parallel_calls)

    def stats(self) -> dict[str, int]:
        return dict(self._stats)


def _catalog_set(name, *, split, data_dir, manual_dir, try_gcs, max_examples, process_index, process_count):
    builder = sources.open_catalog(name, data_dir=data_dir, manual_dir=manual_dir, try_gcs=try_gcs)
    split = split or EVAL_SPLITS.get(name)
    if split is None:
        raise ValueError(f"no default evaluation split for {name!r}: pass split=...")
    sources.check_split(builder, split)
    label_key = "label"
    if label_key not in builder.info.features:
        raise ValueError(f"{name} has no 'label' feature: not a classification dataset")
    if max_examples:
        split = f"{split}[:{max_examples}]"
    splits = tfds.even_splits(split, process_count) if process_count > 1 else [split]
    sizes = [sources.num_records(builder, s) for s in splits]
    label_names = builder.info.features[label_key].names
    names = class_names(name) or class_names(sources.CATALOG_ALIASES.get(name, name))
    if names is None or len(names) != len(label_names):
        names = [n.replace("_", " ") for n in label_names]

    # Video sets (ucf101) are evaluated on their middle frame, as the reference does (CoOp's UCF101 midframes).
    image_key = "image" if "image" in builder.info.features else "video"
    if image_key not in builder.info.features:
        raise ValueError(f"{name} has neither an 'image' nor a 'video' feature: not an image classification set")

    def frame(x):
        return x if image_key == "image" else x[tf.shape(x)[0] // 2]

    def records():
        ds = builder.as_dataset(split=splits[process_index], decoders={image_key: tfds.decode.SkipDecoding()},
                                read_config=tfds.ReadConfig(add_tfds_id=True))
        return ds.map(lambda ex: {"image": frame(ex[image_key]), "key": ex["tfds_id"], "label": ex[label_key]})

    return names, sum(sizes), max(sizes), records, sources.builder_content(builder)


def list_class_folder(directory: str | Path) -> tuple[list[str], list[str], list[int]]:
    """(class names, image paths, labels) of a class-folder directory; classnames.txt overrides folder names."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"class-folder directory not found: {root} (pass folder:<dir with one folder per class>)")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class sub-folders")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(p) for p in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    names = [f.name.replace("_", " ") for f in folders]
    names_file = root / "classnames.txt"
    if names_file.is_file():
        names = [n for n in names_file.read_text(encoding="utf-8").splitlines() if n.strip()]
        if len(names) != len(folders):
            raise ValueError(f"{names_file}: {len(names)} names for {len(folders)} class folders")
    return names, paths, labels


def folder_content(directory: str | Path, paths: list[str]) -> str:
    """The content key of a class-folder set: every photo by its path under ``directory`` (so its class
    folder, i.e. its label) and stat, and the bytes of ``classnames.txt`` (absent: the folder names)."""
    names_file = Path(directory) / "classnames.txt"
    return (fingerprint.files_key(paths, root=directory) + ":"
            + fingerprint.files_key([names_file], root=directory, content=True))


def _folder_set(directory, *, max_examples, process_index, process_count):
    names, paths, labels = list_class_folder(directory)
    content = folder_content(directory, paths)
    if max_examples and max_examples < len(paths):  # a fixed random subset, every class represented
        keep = np.sort(np.random.default_rng(0).permutation(len(paths))[:max_examples])
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    bounds = [hosts.host_range(len(paths), i, process_count) for i in range(process_count)]
    start, stop = bounds[process_index]

    def records():
        return decoding.read_image_files(paths[start:stop], {"label": np.asarray(labels[start:stop], np.int64)})

    return names, len(paths), max(b - a for a, b in bounds), records, content


def load_classification(spec: str, *, batch_size: int, prep: preprocess.Preprocessing | None = None,
                        image_size: int | None = None, split: str | None = None,
                        data_dir: str | None = None, manual_dir: str | None = None, try_gcs: bool = False,
                        process_index: int = 0, process_count: int = 1, max_examples: int | None = None,
                        num_parallel_calls: int = -1) -> ClassificationSet:
    """A zero-shot set: a catalog name ("cifar10", "imagenet2012", ...) or "folder:<dir>" (class folders).

    `batch_size` is per host; `split` defaults to `EVAL_SPLITS[name]`; `max_examples` cuts the set.
    `prep`: the model's preprocessing (or CLIP's at `image_size`, default 224).
    """
    prep = preprocess.preprocessing_arg(prep, image_size)
    hosts.check_process(process_index, process_count)
    if spec.startswith("folder:"):
        name = spec[len("folder:"):]
        names, total, per_host, records, content = _folder_set(name, max_examples=max_examples,
                                                      process_index=process_index, process_count=process_count)
    else:
        name = spec
        names, total, per_host, records, content = _catalog_set(
            spec, split=split, data_dir=data_dir, manual_dir=manual_dir, try_gcs=try_gcs,
            max_examples=max_examples, process_index=process_index, process_count=process_count)
    return ClassificationSet(name=name, class_names=names, num_examples=total, batch_size=batch_size,
                             num_batches=max(1, math.ceil(per_host / batch_size)), prep=prep,
                             _records=records, num_parallel_calls=num_parallel_calls, content=content)
