"""What a run reads is what the user gave it (issue 23): each case of a user's fault trial, reproduced as the
trial did it (the CLI where it used the CLI), with the new behaviour asserted: data, config, prepared sets,
evaluation caches and checkpoints are checked by content, not by name.

Real COCO photos come from ../shared/data/coco_mini and CIFAR-10 photos from ../shared/data/cifar10 (copied
into temporary directories before anything is changed); models are tiny random CLIPs.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from test_faults import cli_error, coco_json, copy_set, snapshot, untouched  # noqa: F401 - fixtures
from train_helpers import SyntheticIterator, tiny_config

from jax_refine import checkpoint as ckpt, cli, sharding as shd, train, workdir as workdir_lib

pytestmark = pytest.mark.slow  # training runs, resumes and exports: not in the fast tier

ONE = {"data": 1, "fsdp": 1, "tensor": 1}


def _mesh():
    return shd.make_mesh(ONE, jax.devices()[:1])


def _train_argv(workdir, annotations, images, steps: int) -> list[str]:
    """The trial's command: tiny_test on a COCO-format caption set read in place."""
    return ["train", "--config", "tiny_test", "--workdir", str(workdir), "--config.data.source=coco_json",
            f"--config.data.annotations={annotations}", f"--config.data.images={images}",
            "--config.data.split=train", "--config.data.train_fraction=1.0", f"--config.train.num_steps={steps}",
            "--config.checkpoint.every_steps=2"]


def _steps(workdir: Path) -> list[int]:
    return sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())


# ---------------------------------------------------------- 1. a run's identity includes its data
def test_resume_with_other_data_is_refused_and_the_same_data_spelled_otherwise_is_accepted(
        coco_json, tmp_path, capsys, monkeypatch, untouched):
    a, b = tmp_path / "a", tmp_path / "b"
    copy_set(coco_json, a / "data")
    # b: another caption set under the same relative path (the first 8 photos' captions only)
    copy_set(coco_json, b / "data", lambda doc, _: doc.update(
        annotations=[x for x in doc["annotations"] if x["image_id"] in {im["id"] for im in doc["images"][:8]}]))
    work = tmp_path / "run"
    rel = ("data/captions_val2017.json", "data/images")
    monkeypatch.chdir(a)
    assert cli.main(_train_argv(work, *rel, steps=2)) == 0
    saved = json.loads((work / workdir_lib.CONFIG_FILE).read_text())
    assert saved["data"]["annotations"] == rel[0]  # as the user typed it; resolved under data_identity
    assert saved[workdir_lib.DATA_KEY]["annotations"] == str(a / rel[0])
    assert saved[workdir_lib.DATA_KEY]["num_photos"] == 12
    guarded = snapshot(work)
    capsys.readouterr()

    monkeypatch.chdir(b)  # the same relative paths name other data here
    err = cli_error(_train_argv(work, *rel, steps=4), capsys)
    assert err.startswith(f"error: resume of {work} with other data: data annotations: {a / rel[0]} -> {b / rel[0]}")
    assert snapshot(work) == guarded

    monkeypatch.chdir(a)  # the caption file shrunk in place: 12 photos -> 8 photos with captions
    original = (a / rel[0]).read_bytes()
    doc = json.loads(original)
    keep = {im["id"] for im in doc["images"][:8]}
    doc.update(images=doc["images"][:8], annotations=[x for x in doc["annotations"] if x["image_id"] in keep])
    (a / rel[0]).write_text(json.dumps(doc))
    err = cli_error(_train_argv(work, *rel, steps=4), capsys)
    assert err.startswith(f"error: resume of {work} with other data: caption file {a / rel[0]} changed (content key ")
    assert "photos under" in err and "(12 -> 8 used" in err
    assert snapshot(work) == guarded

    (a / rel[0]).write_bytes(original)  # the same bytes again, reached by an absolute path through a symlink
    (tmp_path / "link").symlink_to(a / "data")
    argv = _train_argv(work, tmp_path / "link" / "captions_val2017.json", tmp_path / "link" / "images", steps=4)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"resumed from {work / 'checkpoints'}/2" in out and _steps(work) == [2, 4]


# ------------------------------------------- 2. the saved config is written only after the restore
def test_a_refused_resume_changes_nothing_in_the_workdir(tmp_path, untouched):
    run = tmp_path / "run"
    config = tiny_config(run, **{"train.num_steps": 2, "checkpoint.async_save": False})
    train.train(config, data_iter=SyntheticIterator(8), mesh=_mesh())
    guarded = snapshot(run)
    before = (run / workdir_lib.CONFIG_FILE).read_bytes()

    bigger = tiny_config(run, **{"train.num_steps": 4, "model.random_init.vision_config.hidden_size": 64})
    with pytest.raises(ckpt.ModelMismatchError, match="is from another model size"):  # allowed, refused later
        train.train(bigger, data_iter=SyntheticIterator(8), mesh=_mesh(), allow_config_change=True)
    assert (run / workdir_lib.CONFIG_FILE).read_bytes() == before and snapshot(run) == guarded

    again = tiny_config(run, **{"train.num_steps": 4, "checkpoint.async_save": False})
    assert train.train(again, data_iter=SyntheticIterator(8), mesh=_mesh())["steps"] == 4  # the original command
    assert json.loads((run / workdir_lib.CONFIG_FILE).read_text())["train"]["num_steps"] == 4


# ------------------------------------------------------------- 3. prepared data keyed by every photo
def _same_size_other_photo(path: Path) -> None:
    """Replace ``path`` by another photo of the same byte size (its middle 64 bytes inverted), written
    aside and renamed in, as a tool saving a file does."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(x ^ 0xFF for x in data[mid:mid + 64])
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def test_prepare_data_sees_a_replaced_photo_of_the_same_size_and_photos_in_sub_folders(
        coco_json, tmp_path, capsys, untouched):
    import tensorflow_datasets as tfds

    from jax_refine.data import prepare_coco_json

    def into_sub_folder(doc, images):  # the first photo lives in a sub-folder of the image directory
        (images / "sub").mkdir()
        name = doc["images"][0]["file_name"]
        os.replace(images / name, images / "sub" / name)
        doc["images"][0]["file_name"] = f"sub/{name}"

    ann, img = copy_set(coco_json, tmp_path / "set", into_sub_folder)
    doc = json.loads(ann.read_text())
    data_dir = tmp_path / "tfds"
    first = prepare_coco_json(ann, img, data_dir)
    capsys.readouterr()
    for name in (doc["images"][0]["file_name"], doc["images"][5]["file_name"]):  # in the sub-folder, at the top
        photo = img / name
        size = photo.stat().st_size
        _same_size_other_photo(photo)
        assert photo.stat().st_size == size
        again = prepare_coco_json(ann, img, data_dir)
        said = capsys.readouterr().out
        assert again != first and f"{ann}: content differs from the prepared " in said, said
        named = said.split("content differs from the prepared ", 1)[1].split(" in ", 1)[0].split(", ")
        assert first.parent.name in named, said  # every earlier prepared set is listed, sorted by its key
        stored = {ex["image/filename"].decode(): ex["image"] for ex in tfds.builder_from_directory(str(again))
                  .as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()}).as_numpy_iterator()}
        assert stored[name] == photo.read_bytes()  # the new photo's bytes, not the old one's
        first = again
    assert prepare_coco_json(ann, img, data_dir) == first  # unchanged content: reused, nothing said
    assert "content differs" not in capsys.readouterr().out


# ----------------------------------------------------------- 3. the evaluation cache keyed by content
def test_eval_cache_re_embeds_swapped_class_folders_and_a_rewritten_photo(
        cifar10_dir, tiny_hf_clip_dir, tmp_path, capsys, untouched):
    from jax_refine import evaluate
    from jax_refine.models import registry
    from jax_refine import config_base as default  # the base config, `--config default`

    folders = tmp_path / "classes"
    for name, n in (("cat", 3), ("ship", 4)):  # 7 photos: top-1 k/7 and (7-k)/7 always differ
        (folders / name).mkdir(parents=True)
        for k in range(n):
            shutil.copy(cifar10_dir / "test" / name / f"{k:04d}.jpg", folders / name / f"{k:04d}.jpg")
    model = registry.load(str(tiny_hf_clip_dir))
    config = default.get_config().eval
    config.zero_shot, config.retrieval, config.batch_size, config.progress = (f"folder:{folders}",), (), 8, False

    def top1(cache_dir):
        config.cache_dir = None if cache_dir is None else str(cache_dir)
        result, _ = evaluate.run_suite(model, config)
        return result["zero_shot"][f"folder:{folders}"]["top1"]

    cache = tmp_path / "cache"
    before = top1(cache)
    assert top1(cache) == before
    os.rename(folders / "cat", folders / "tmp")  # swap the two class folders: every label changes
    os.rename(folders / "ship", folders / "cat")
    os.rename(folders / "tmp", folders / "ship")
    capsys.readouterr()
    swapped = top1(cache)
    assert "its files changed since" in capsys.readouterr().out
    assert swapped == top1(None) and swapped != before  # as an uncached evaluation of these files
    _same_size_other_photo(folders / "cat" / "0000.jpg")
    capsys.readouterr()
    rewritten = top1(cache)
    assert "embedding anew" in capsys.readouterr().out and rewritten == top1(None)


# -------------------------------------------------------------------- 4. checkpoint checksum manifest
def _flip_64_bytes(step_dir: Path) -> Path:
    """Invert 64 bytes in the middle of the largest params data file of a step (as the trial did)."""
    target = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(x ^ 0xFF for x in data[mid:mid + 64])
    target.write_bytes(bytes(data))
    return target


def test_flipped_bytes_in_the_latest_checkpoint_fall_back_to_the_previous_step(tmp_path, capsys, untouched):
    run = tmp_path / "run"
    config = tiny_config(run, **{"train.num_steps": 4, "checkpoint.max_to_keep": 3})  # async saves, as by default
    train.train(config, data_iter=SyntheticIterator(8), mesh=_mesh())
    manifests = {s: json.loads((run / "checkpoints" / str(s) / ckpt.MANIFEST_FILE).read_text()) for s in (2, 4)}
    for s, m in manifests.items():  # every file of the step listed, with its size and sha256
        files = sorted(str(p.relative_to(run / "checkpoints" / str(s))) for p in (run / "checkpoints" / str(s))
                       .rglob("*") if p.is_file() and p.name != ckpt.MANIFEST_FILE)
        assert sorted(m["files"]) == files
    import hashlib

    some = sorted(manifests[4]["files"])[0]
    assert manifests[4]["files"][some][1] == hashlib.sha256((run / "checkpoints" / "4" / some).read_bytes()).hexdigest()

    reference = ckpt.make_manager(run / "checkpoints", read_only=True, async_save=False)
    abstract = train.build_trainer(config, _mesh(), 4).abstract_saved()
    step2 = reference.restore(2, args=ckpt.ocp.args.Composite(params=ckpt.ocp.args.StandardRestore(abstract.params)))
    reference.close()
    flipped = _flip_64_bytes(run / "checkpoints" / "4")
    capsys.readouterr()

    # export reads the newest intact step, naming the file that changed
    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"skipping damaged checkpoint step 4: {flipped}: checksum differs" in said
    from jax_refine.models import registry
    from jax_refine.train_state import split_model

    exported = split_model(registry.load(str(out)))[1]
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(step2["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # a resume moves step 4 aside (kept) and goes on from step 2
    result = train.train(tiny_config(run, **{"train.num_steps": 6, "checkpoint.max_to_keep": 3}),
                         data_iter=SyntheticIterator(8), mesh=_mesh())
    said = capsys.readouterr().out
    assert f"[train] skipping damaged checkpoint step 4: {flipped}: checksum differs" in said
    assert f"resumed from {run / 'checkpoints'}/2" in said and result["steps"] == 6
    assert (run / ckpt.SKIPPED_SUBDIR / "4").is_dir() and _steps(run) == [2, 4, 6]
    assert all((run / "checkpoints" / str(s) / ckpt.MANIFEST_FILE).is_file() for s in (2, 4, 6))


def test_a_step_without_manifest_is_read_with_one_line(tmp_path, capsys, untouched):
    """A run killed between Orbax's commit and the manifest: the step is whole (the commit is a rename)."""
    run = tmp_path / "run"
    config = tiny_config(run, **{"train.num_steps": 2, "checkpoint.async_save": False})
    train.train(config, data_iter=SyntheticIterator(8), mesh=_mesh())
    (run / "checkpoints" / "2" / ckpt.MANIFEST_FILE).unlink()
    (run / "checkpoints" / "2" / (ckpt.MANIFEST_FILE + ".tmp")).write_bytes(b"")  # cut while writing it
    capsys.readouterr()
    result = train.train(tiny_config(run, **{"train.num_steps": 4}), data_iter=SyntheticIterator(8), mesh=_mesh())
    said = capsys.readouterr().out
    assert f"checkpoint step 2 has no {ckpt.MANIFEST_FILE}" in said and "resumed from" in said
    assert result["steps"] == 4


# --------------------------------------------------------------- 5. train adopts no foreign folder
def test_train_refuses_a_foreign_folder_and_an_empty_workdir(tmp_path, capsys, monkeypatch, untouched):
    other = tmp_path / "other_tool"
    for step in ("100", "200"):  # another tool's checkpoints
        (other / "checkpoints" / step).mkdir(parents=True)
        (other / "checkpoints" / step / "weights.bin").write_bytes(b"theirs")
    guarded = snapshot(other)
    err = cli_error(["train", "--config", "tiny_test", "--workdir", str(other)], capsys)
    assert err == (f"error: workdir {other} is not empty and is not a jax_refine workdir (it holds checkpoints; no "
                   f"{workdir_lib.CONFIG_FILE}): give the run a new or empty directory")
    assert snapshot(other) == guarded and not (tmp_path / ckpt.SKIPPED_SUBDIR).exists()

    monkeypatch.chdir(tmp_path)
    err = cli_error(["train", "--config", "tiny_test", "--config.workdir="], capsys)
    assert err == "error: config.workdir is empty (''): give the run its own directory (--workdir DIR or " \
                  "--config.workdir=DIR)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other_tool"]

    # a run stopped before its record leaves its lock and an empty checkpoints folder: still ours
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / workdir_lib.LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    assert workdir_lib.check_workdir(str(mine)) == workdir_lib.as_path(mine)


# ----------------------------------------------------------------------- 6. a torn metrics tail
def test_a_torn_metrics_line_is_cut_and_the_resume_goes_on(tmp_path, capsys, untouched):
    run = tmp_path / "run"
    train.train(tiny_config(run, **{"train.num_steps": 2, "checkpoint.async_save": False}),
                data_iter=SyntheticIterator(8), mesh=_mesh())
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "kind": "train", "lo')  # the crash cut this row mid-append
    capsys.readouterr()
    result = train.train(tiny_config(run, **{"train.num_steps": 4}), data_iter=SyntheticIterator(8), mesh=_mesh())
    said = [ln for ln in capsys.readouterr().out.splitlines() if "warning" in ln]
    assert len(said) == 1 and said[0].startswith(f"[train] warning: {metrics}: its last line is cut")
    assert result["steps"] == 4
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1, 2, 3, 4]

    lines = metrics.read_text().splitlines(keepends=True)  # a bad line inside the file is not a torn tail
    metrics.write_text("".join(lines[:1] + ["garbage\n"] + lines[1:]))
    with pytest.raises(workdir_lib.WorkdirError, match=rf"^{metrics}: line 2 is not a JSON row"):
        train.train(tiny_config(run, **{"train.num_steps": 6}), data_iter=SyntheticIterator(8), mesh=_mesh())


# ------------------------------------------------------------------------- the one file fingerprint
def test_files_key_is_the_same_for_any_spelling_and_changes_with_names_and_files(tmp_path, monkeypatch):
    from jax_refine import fingerprint

    root = tmp_path / "set"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "cat" / "1.jpg").write_bytes(b"meow")
    (root / "dog" / "2.jpg").write_bytes(b"woof")
    files = fingerprint.tree_files(root)
    assert files == [str(root / "cat" / "1.jpg"), str(root / "dog" / "2.jpg")]  # sub-folders, sorted
    key = fingerprint.files_key(files, root=root)
    (tmp_path / "link").symlink_to(root)
    monkeypatch.chdir(tmp_path)
    for spelled in ("set", "link", str(tmp_path / "link") + "/"):  # relative, through a symlink, absolute
        assert fingerprint.files_key(fingerprint.tree_files(spelled), root=spelled) == key
    os.rename(root / "cat", root / "kitten")  # a renamed class folder: another label
    assert fingerprint.files_key(fingerprint.tree_files(root), root=root) != key
    os.rename(root / "kitten", root / "cat")
    assert fingerprint.files_key(files, root=root) == key
    tmp = root / "cat" / "new"
    tmp.write_bytes(b"purr")  # same size, other bytes, renamed in
    os.replace(tmp, root / "cat" / "1.jpg")
    assert fingerprint.files_key(files, root=root) != key
    by_content = fingerprint.files_key(files, root=root, content=True)
    (root / "cat" / "1.jpg").write_bytes(b"purr")  # rewritten with the same bytes: same content key
    assert fingerprint.files_key(files, root=root, content=True) == by_content
    (root / "dog" / "2.jpg").unlink()
    assert fingerprint.files_key(files, root=root, content=True) != by_content  # a missing file counts
