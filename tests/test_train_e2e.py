"""train(config) end to end on real photos through the data package: metrics, TensorBoard, HF export."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from train_helpers import tiny_config

from jax_refine import checkpoint as ckpt, sharding as shd, train
from jax_refine.models.clip.params import hf_state_dict

pytestmark = pytest.mark.slow  # a training run end to end: not in the fast tier


def _coco_set(cifar10_dir, out, per_class=2):
    """A COCO-format caption set from real CIFAR-10 photos: `a photo of a {class}.` per image."""
    images, annotations = [], []
    (out / "images").mkdir(parents=True)
    classes = sorted(p.name for p in (cifar10_dir / "test").iterdir())[:8]
    for c in classes:
        for src in sorted((cifar10_dir / "test" / c).iterdir())[:per_class]:
            i = len(images)
            shutil.copy(src, out / "images" / f"{i:04d}.jpg")
            images.append({"id": i, "file_name": f"{i:04d}.jpg", "width": 32, "height": 32})
            annotations.append({"id": i, "image_id": i, "caption": f"a photo of a {c}."})
    (out / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return out / "captions.json", out / "images"


def test_train_on_coco_format_photos_exports_hf(cifar10_dir, tmp_path):
    ann, images = _coco_set(cifar10_dir, tmp_path / "data")
    config = tiny_config(tmp_path / "run", **{"train.num_steps": 3, "train.export_hf": True,
                                              "log.tensorboard": True, "data.source": "coco_json",
                                              "data.annotations": str(ann), "data.images": str(images),
                                              "data.data_dir": str(tmp_path / "tfds"), "data.shuffle_buffer": 16,
                                              "data.split": "train"})
    mesh = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    out = train.train(config, mesh=mesh)
    assert out["steps"] == 3 and np.isfinite(out["metrics"]["loss"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "kd", "rafa", "modality_gap", "grad_norm", "lr", "examples_per_sec",
            "data/skipped_bad_image"} <= set(rows[-1])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))

    import torch
    from transformers import CLIPModel

    exported = CLIPModel.from_pretrained(out["hf_dir"], torch_dtype=torch.float32).state_dict()
    ours = hf_state_dict(ckpt.load_model(tmp_path / "run"))
    for k, v in ours.items():
        np.testing.assert_array_equal(exported[k].numpy(), v, err_msg=k)
