"""The synthetic world of the demo: deterministic, cached, and its captions describe its pictures.

The caption checks measure the rendered pixels (background colours from the picture's edge, connected
components of the other pixels, their hue, bounding box, fill ratio and position) and read the captions
with the vocabulary below, written here independently of the generator's tables.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from jax_refine.data import coco_format, read_coco_json, synthetic_world

# What the words mean (English, not the generator's tables): word -> attribute value.
COLOUR_OF = {"red": "red", "crimson": "red", "scarlet": "red", "orange": "orange", "amber": "orange",
             "tangerine": "orange", "yellow": "yellow", "golden": "yellow", "lemon": "yellow",
             "green": "green", "emerald": "green", "grass": "green", "blue": "blue", "navy": "blue",
             "azure": "blue", "purple": "purple", "violet": "purple", "lilac": "purple"}
HUE_OF = {"red": 0, "orange": 30, "yellow": 55, "green": 125, "blue": 228, "purple": 285}  # degrees
SHAPE_OF = {"circle": "circle", "circles": "circle", "disc": "circle", "discs": "circle", "dot": "circle",
            "dots": "circle", "round": "circle", "square": "square", "squares": "square", "box": "square",
            "boxes": "square", "block": "square", "blocks": "square", "triangle": "triangle",
            "triangles": "triangle", "triangular": "triangle", "wedge": "triangle", "wedges": "triangle"}
SIZE_OF = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
           "huge": "large"}
SIDE_OF = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
BACKGROUND_OF = {"plain": "plain", "blank": "plain", "solid": "plain", "striped": "striped", "stripy": "striped",
                 "lined": "striped", "dotted": "dotted", "spotted": "dotted", "polka-dot": "dotted",
                 "checkered": "checkered", "chequered": "checkered", "tiled": "checkered"}
PLURAL_NOUNS = {"circles", "discs", "dots", "shapes", "squares", "boxes", "blocks", "triangles", "wedges", "objects"}


def read_caption(text: str) -> dict:
    """The attributes a caption states (absent ones are missing from the dict)."""
    words = re.findall(r"[a-z0-9-]+", text.lower())
    out: dict = {}
    if {"two", "2", "pair"} & set(words):
        out["count"] = 2
    elif {"three", "3", "trio"} & set(words):
        out["count"] = 3
    else:
        out["count"] = 1
        assert not PLURAL_NOUNS & set(words), f"one object but a plural noun: {text!r}"
    for key, table in (("colour", COLOUR_OF), ("shape", SHAPE_OF), ("size", SIZE_OF), ("position", SIDE_OF),
                       ("background", BACKGROUND_OF)):
        said = {table[w] for w in words if w in table}
        assert len(said) <= 1, f"{text!r} says two different {key}s: {said}"
        if said:
            out[key] = said.pop()
    return out


def measure(path: Path) -> dict:
    """The attributes of a picture, from its pixels alone."""
    px = np.asarray(Image.open(path).convert("RGB"), np.int32)
    h, w, _ = px.shape
    code = (px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]
    edge = np.concatenate([code[0], code[-1], code[:, 0], code[:, -1]])
    background = np.isin(code, np.unique(edge))
    objects = ~background
    labels, count = ndimage.label(objects)
    assert count >= 1, f"{path}: no object pixels"
    colours = np.unique(code[objects])
    assert len(colours) == 1, f"{path}: objects in {len(colours)} colours"
    rgb = px[objects][0] / 255.0
    hue = colorsys.rgb_to_hsv(*rgb)[0] * 360
    colour = min(HUE_OF, key=lambda c: min(abs(hue - HUE_OF[c]), 360 - abs(hue - HUE_OF[c])))
    shapes, sizes = set(), set()
    for box in ndimage.find_objects(labels):
        comp = objects[box]
        fill = comp.mean()
        top, bottom = comp[0].sum(), comp[-1].sum()
        if fill > 0.93:
            shapes.add("square")
        elif fill > 0.65:
            shapes.add("circle")
        elif bottom > 2 * top and bottom >= 0.8 * comp.shape[1]:
            shapes.add("triangle")
        else:
            shapes.add(f"unknown (fill {fill:.2f})")
        sizes.add("small" if max(comp.shape) < 14 else "large")
    ys, xs = np.nonzero(objects)
    sides = {s for s, ok in (("left", xs.max() < w // 2), ("right", xs.min() >= w // 2),
                             ("top", ys.max() < h // 2), ("bottom", ys.min() >= h // 2)) if ok}
    bg_codes, bg_counts = np.unique(code[background], return_counts=True)
    if len(bg_codes) == 1:
        pattern = "plain"
    else:
        rows = all(len(np.unique(code[y][background[y]])) <= 1 for y in range(h))
        cols = all(len(np.unique(code[:, x][background[:, x]])) <= 1 for x in range(w))
        minority = bg_counts.min() / bg_counts.sum()
        pattern = "striped" if rows or cols else "dotted" if minority < 0.25 else "checkered"
    assert len(shapes) == 1 and len(sizes) == 1, f"{path}: objects differ: {shapes} {sizes}"
    return {"count": count, "colour": colour, "shape": shapes.pop(), "size": sizes.pop(), "sides": sides,
            "background": pattern}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world.write_world(tmp_path_factory.mktemp("world"), seed=3,
                                       sizes={"pretrain": 30, "refine": 20, "test": 120})


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path, world):
    sizes = {"pretrain": 30, "refine": 20, "test": 120}
    again = synthetic_world.write_world(tmp_path / "a", seed=3, sizes=sizes)
    assert _tree_digest(again.root) == _tree_digest(world.root)
    other = synthetic_world.write_world(tmp_path / "b", seed=4, sizes=sizes)
    a, b = (sorted(p.read_bytes() for p in w.images("test").iterdir()) for w in (world, other))
    assert len(a) == len(b) == 120 and len(set(a) & set(b)) < 5  # (1-object plain scenes may coincide)
    assert world.annotations("test").read_text() != other.annotations("test").read_text()
    # the splits of one world are different pictures
    pre = {p.read_bytes() for p in world.images("pretrain").iterdir()}
    assert not pre & {p.read_bytes() for p in world.images("test").iterdir()}


def test_cached_world_is_reused_and_keyed(tmp_path):
    sizes = {"test": 10}
    first = synthetic_world.write_world(tmp_path, seed=0, sizes=sizes)
    stamp = first.annotations("test").stat().st_mtime_ns
    assert synthetic_world.write_world(tmp_path, seed=0, sizes=sizes).root == first.root
    assert first.annotations("test").stat().st_mtime_ns == stamp  # not written again
    assert synthetic_world.write_world(tmp_path, seed=1, sizes=sizes).root != first.root
    assert f"v{synthetic_world.GENERATOR_VERSION}" in first.root.name
    with pytest.raises(ValueError, match="unknown split"):
        synthetic_world.write_world(tmp_path, seed=0, sizes={"tset": 10})


def test_captions_describe_the_pictures(world):
    for split in ("pretrain", "test"):
        images = read_coco_json(world.annotations(split), world.images(split))
        assert len(images) == {"pretrain": 30, "test": 120}[split]
        stated_total = 0
        for im in images:
            seen = measure(Path(im["path"]))
            assert len(im["captions"]) == 5 and len({t for _, t in im["captions"]}) == 5
            for _, text in im["captions"]:
                said = read_caption(text)
                stated_total += len(said)
                where = f"{im['file_name']}: {text!r} vs pixels {seen}"
                assert said["count"] == seen["count"], where
                for key in ("colour", "shape", "size", "background"):
                    if key in said:
                        assert said[key] == seen[key], where
                if "position" in said:
                    assert said["position"] in seen["sides"], where
            first = read_caption(im["captions"][0][1])  # the first caption states every attribute
            assert set(first) == {"count", "colour", "shape", "size", "position", "background"}, first
        assert stated_total > 3.5 * 5 * len(images)  # the checks above were not vacuous


def test_zero_shot_folders_hold_their_class(world):
    """Each class folder holds the test pictures whose pixels show the class its prompt names."""
    for task in ("shape", "colour", "count", "size", "position", "background"):
        folder = world.zero_shot(task)
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        prompts = (folder / "classnames.txt").read_text().splitlines()
        assert len(prompts) == len(classes) >= 2, task
        total = 0
        for cls, prompt in zip(classes, prompts):
            said = read_caption(f"a photo of a {prompt}.")
            assert task in said, (task, prompt)
            for path in sorted((folder / cls).iterdir()):
                seen, total = measure(path), total + 1
                if task == "position":
                    assert said[task] in seen["sides"], (path, prompt, seen)
                else:
                    assert said[task] == seen[task], (path, prompt, seen)
        assert total == 120, task


def test_coco_json_is_valid_for_prepare(world):
    doc = json.loads(world.annotations("refine").read_text())
    assert len(doc["images"]) == 20 and len(doc["annotations"]) == 100
    assert {a["image_id"] for a in doc["annotations"]} == {im["id"] for im in doc["images"]}


def test_coco_format_writes_what_the_coco_reader_and_the_format_expect(tmp_path):
    (tmp_path / "img").mkdir()
    path = coco_format.write_coco_json(tmp_path / "sub" / "caps.json", [
        {"file_name": "a.png", "width": 8, "captions": ["one", "two"]},
        {"file_name": "b.png", "width": 9, "captions": ["three"]}], info={"description": "tiny"})
    assert json.loads(path.read_text()) == {  # COCO's caption layout, written out by hand
        "info": {"description": "tiny"},
        "images": [{"id": 0, "file_name": "a.png", "width": 8}, {"id": 1, "file_name": "b.png", "width": 9}],
        "annotations": [{"id": 0, "image_id": 0, "caption": "one"}, {"id": 1, "image_id": 0, "caption": "two"},
                        {"id": 2, "image_id": 1, "caption": "three"}]}
    assert read_coco_json(path, tmp_path / "img") == [
        {"id": 0, "file_name": "a.png", "path": str(tmp_path / "img" / "a.png"), "captions": [(0, "one"), (1, "two")]},
        {"id": 1, "file_name": "b.png", "path": str(tmp_path / "img" / "b.png"), "captions": [(2, "three")]}]
