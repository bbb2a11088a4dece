"""Write the demo's COCO-format caption sets for the bundled CIFAR-10 photos (run once; outputs committed).

CIFAR-10 has no human captions, so each photo gets 5 distinct captions drawn (seeded) from OpenAI's 80
ImageNet prompt templates filled with its class name, e.g. "a blurry photo of a frog.".

    python tools/make_demo_data.py            # writes demo_data/captions_{pretrain,refine,test}.json
"""
from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo_data"
SPLITS = {  # name: (photo folder, first index, end index) per class
    "pretrain": ("cifar10/train", 0, 250),
    "refine": ("cifar10/train", 250, 400),
    "test": ("cifar10/test", 0, 20),
}
CAPTIONS_PER_IMAGE = 5


def caption_set(folder: str, start: int, end: int, templates: list[str], rng: random.Random) -> dict:
    """A COCO captions dict: `images` [{id, file_name}] and `annotations` [{id, image_id, caption}]."""
    images, annotations = [], []
    for class_dir in sorted((DEMO / folder).iterdir()):
        name = class_dir.name.replace("_", " ")
        for path in sorted(class_dir.glob("*.jpg"))[start:end]:
            image_id = len(images)
            images.append({"id": image_id, "file_name": f"{class_dir.name}/{path.name}"})
            for template in rng.sample(templates, CAPTIONS_PER_IMAGE):
                annotations.append({"id": len(annotations), "image_id": image_id, "caption": template.format(name)})
    return {"info": {"description": f"CIFAR-10 {folder} photos {start}-{end - 1} per class, template captions"},
            "images": images, "annotations": annotations}


def main() -> None:
    templates = json.loads((ROOT / "jax_refine/assets/templates.json").read_text())["openai"]
    for split, (folder, start, end) in SPLITS.items():
        data = caption_set(folder, start, end, templates, random.Random(f"demo-{split}"))
        out = DEMO / f"captions_{split}.json"
        out.write_text(json.dumps(data, separators=(",", ":")))
        print(f"{out}: {len(data['images'])} images, {len(data['annotations'])} captions")


if __name__ == "__main__":
    main()
