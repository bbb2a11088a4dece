"""Fault injection (issue 15): each fault a new user met, injected on purpose.

Every test asserts the new behaviour -- a one-line error naming the file/key/value at fault, or the
fallback -- and, through the `untouched` fixture, that no file outside the test's own temporary
directory changed (the repository, ~/tensorflow_datasets, the shared real data). Real COCO photos come
from ../shared/data/coco_mini (copied before anything is corrupted); models are tiny random CLIPs.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, SHARED_DATA
from train_helpers import SyntheticIterator, kill_9, tiny_config, wait_until_blocked

from jax_refine import checkpoint as ckpt, cli, objectives, sharding as shd, train, workdir as workdir_lib
from jax_refine.config import ConfigError, load_config, shipped_configs

pytestmark = pytest.mark.slow  # subprocess CLIs, training runs and kills: not in the fast tier

COCO = SHARED_DATA / "coco_mini"
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
SKIP_DIRS = {"__pycache__", ".pytest_cache"}


# ------------------------------------------------------------------------------------------- helpers
def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime_ns)} of every file and directory under `roots` (caches skipped)."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
            for name in dirnames + filenames:
                p = Path(dirpath, name)
                st = p.lstat()
                out[str(p)] = (st.st_size if p.is_file() else 0, st.st_mtime_ns if p.is_file() else 0)
    return out


@pytest.fixture
def untouched():
    """Fails the test if anything in the repository, ~/tensorflow_datasets or the shared data changed."""
    roots = (REPO_ROOT, Path.home() / "tensorflow_datasets", COCO)
    before = snapshot(*roots)
    yield
    after = snapshot(*roots)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"files outside the test's temporary directory changed: {changed[:5]}"


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI in this process; it must fail with exit 2 and exactly one `error:` line (+ the help hint)."""
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 2 and err[0].startswith("error: ") and err[1].startswith("(see `python -m jax_refine"), err
    return err[0]


@pytest.fixture(scope="module")
def coco_json(tmp_path_factory):
    """The first 12 captioned real COCO val2017 photos and their captions, copied into a temporary dir."""
    if not COCO.is_dir():
        pytest.skip(f"real data not found at {COCO}")
    root = tmp_path_factory.mktemp("coco")
    doc = json.loads((COCO / "annotations" / "captions_val2017.json").read_text())
    images = doc["images"][:12]
    ids = {im["id"] for im in images}
    (root / "images").mkdir()
    for im in images:
        shutil.copy(COCO / "val2017" / im["file_name"], root / "images" / im["file_name"])
    doc = {"images": images, "annotations": [a for a in doc["annotations"] if a["image_id"] in ids]}
    (root / "captions_val2017.json").write_text(json.dumps(doc))
    return root


def copy_set(src: Path, dst: Path, edit=None) -> tuple[Path, Path]:
    """A copy of a caption set; `edit(doc, image_dir)` may change the JSON and the photos."""
    shutil.copytree(src / "images", dst / "images")
    doc = json.loads((src / "captions_val2017.json").read_text())
    if edit is not None:
        edit(doc, dst / "images")
    (dst / "captions_val2017.json").write_text(json.dumps(doc))
    return dst / "captions_val2017.json", dst / "images"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 4 steps with checkpoints at steps 2 and 4 (synthetic data, one device)."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(root / "run", **{"train.num_steps": 4, "checkpoint.async_save": False})
    train.train(config, data_iter=SyntheticIterator(8), mesh=shd.make_mesh(ONE, jax.devices()[:1]))
    return root / "run"


# ---------------------------------------------------------------------- 1. outputs never delete
def test_export_never_replaces_a_repo_or_workdir_and_needs_overwrite(trained, tmp_path, capsys, untouched):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "code.py").write_text("print('mine')\n")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("keep me")
    guarded = snapshot(repo, plain, trained)

    err = cli_error(["export", "--checkpoint", str(trained), "--out", str(repo), "--overwrite"], capsys)
    assert "is or holds a git repository" in err and "never replaced, even with --overwrite" in err
    err = cli_error(["export", "--checkpoint", str(trained), "--out", str(trained), "--overwrite"], capsys)
    assert err.startswith(f"error: refusing to write export output to {trained}: it is or holds a training workdir")
    err = cli_error(["export", "--checkpoint", str(trained), "--out", str(plain)], capsys)
    assert err == f"error: {plain} already exists and is not empty: pass --overwrite to replace it, or choose another --out"
    assert snapshot(repo, plain, trained) == guarded  # nothing touched, no temp dir left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "repo"]

    assert cli.main(["export", "--checkpoint", str(trained), "--out", str(plain), "--overwrite"]) == 0
    assert not (plain / "notes.txt").exists() and (plain / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert plain.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in plain.iterdir())
    from transformers import CLIPProcessor  # the export is a complete HF directory, processor included

    processor = CLIPProcessor.from_pretrained(plain)
    size = json.loads((plain / "config.json").read_text())["vision_config"]["image_size"]
    pixels = processor(images=[np.zeros((50, 70, 3), np.uint8)], text=["a dog"], return_tensors="np")
    assert pixels["pixel_values"].shape == (1, 3, size, size)


def test_demo_compare_evaluate_refuse_a_nonempty_out(tmp_path, capsys, untouched):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    guarded = snapshot(out)
    for argv in (["demo", "--out", str(out)], ["compare", "a", "b", "--out", str(out)],
                 ["evaluate", "--model", str(tmp_path / "nothing"), "--out", str(out)]):
        err = cli_error(argv, capsys)
        assert err == f"error: {out} already exists and is not empty: pass --overwrite to replace it, or choose another --out"
    assert snapshot(out) == guarded and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_demo_help_counts_four_models(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "compare all four" in capsys.readouterr().out


# ------------------------------------------------------------------ 2. prepared data keyed by content
def test_prepared_dataset_is_keyed_by_content(coco_json, tmp_path, capsys, untouched):
    from jax_refine.data import prepare_coco_json

    data_dir = tmp_path / "tfds"
    ann_a, img_a = copy_set(coco_json, tmp_path / "a")
    ann_b, img_b = copy_set(coco_json, tmp_path / "b", lambda doc, _: doc.update(annotations=doc["annotations"][:20]))
    first = prepare_coco_json(ann_a, img_a, data_dir)
    assert "preparing anew" not in capsys.readouterr().out
    second = prepare_coco_json(ann_b, img_b, data_dir)  # same file name, other content
    said = capsys.readouterr().out
    assert second != first and second.parent.name.startswith("captions_val2017-")
    assert f"{ann_b}: content differs from the prepared {first.parent.name} in {data_dir}; preparing anew" in said
    assert prepare_coco_json(ann_a, img_a, data_dir) == first  # the same content is reused
    import tensorflow_datasets as tfds

    counts = [sum(len(ex["captions"]["text"]) for ex in tfds.builder_from_directory(str(d)).as_dataset(
        split="train").as_numpy_iterator()) for d in (first, second)]
    raw = json.loads(ann_a.read_text())["annotations"]
    assert counts == [len(raw), 20]


# ------------------------------------------------------- 3. data that cannot make a batch: error at start
def test_data_without_one_usable_pair_is_an_error_at_start(coco_json, tmp_path, capsys, untouched):
    ann, img = copy_set(coco_json, tmp_path / "nocap", lambda doc, _: doc.update(annotations=[]))
    rc = cli.main(["train", "--config", "tiny_test", "--workdir", str(tmp_path / "run"),
                   "--config.data.source=coco_json", f"--config.data.annotations={ann}",
                   f"--config.data.images={img}", f"--config.data.data_dir={tmp_path / 'tfds'}",
                   "--config.data.split=train"])
    err = capsys.readouterr().err.strip().splitlines()  # one line per missing input before the first step
    assert rc == 2 and err == [f"error: training data (config.data.source='coco_json'): {ann}: no usable image-caption "
                               "pair (12 images, 0 with a caption, 0 of those with an image file on disk)"], err

    def remove_photos(doc, images):
        for f in images.iterdir():
            f.unlink()

    ann, img = copy_set(coco_json, tmp_path / "nophoto", remove_photos)
    from jax_refine.data import make_train_iterator

    data = {"source": "coco_json", "annotations": str(ann), "images": str(img), "data_dir": str(tmp_path / "tfds"),
            "split": "train"}
    with pytest.raises(ValueError, match=r"no usable image-caption pair \(12 images, 12 with a caption, 0 of those"):
        make_train_iterator(data, global_batch_size=4, image_size=32)

    def garble(doc, images):  # photos exist but none decodes: the pipeline must stop, not spin
        for f in images.iterdir():
            f.write_bytes(b"not a jpeg")

    ann, img = copy_set(coco_json, tmp_path / "garbled", garble)
    it = make_train_iterator({**data, "annotations": str(ann), "images": str(img)}, global_batch_size=4, image_size=32)
    signal.alarm(300)  # a hang would be the old bug: fail instead of blocking the suite
    try:
        with pytest.raises(ValueError, match=r"cannot make one batch of 4: a whole epoch skipped 0 examples "
                                             r"without a caption and 12 with a missing or unreadable image"):
            next(it)
    finally:
        signal.alarm(0)


def test_empty_and_null_captions_are_skipped_and_counted(coco_json, tmp_path, caplog, untouched):
    from jax_refine.data import read_coco_json

    def blank(doc, _):
        for a, text in zip(doc["annotations"], (None, "", "   ", 7)):
            a["caption"] = text

    ann, img = copy_set(coco_json, tmp_path / "blank", blank)
    n = len(json.loads(ann.read_text())["annotations"])
    with caplog.at_level(logging.WARNING):
        records = read_coco_json(ann, img)
    texts = [t for r in records for _, t in r["captions"]]
    assert len(texts) == n - 4 and all(t.strip() and t != "None" for t in texts)
    assert f"{ann}: skipped 4 empty or null captions (of {n})" in caplog.text


# ---------------------------------------------------------------------- 4, 8. config files and values
@pytest.mark.parametrize("line, message", [
    ("c.optimizer.learning_rate = 1e-5", "unknown config key 'optimizer.learning_rate'; did you mean 'lr'?"),
    ("c.train.batchsize = 64", "unknown config key 'train.batchsize'; did you mean 'batch_size'?"),
    ("c.method.alfa = 0.3", "unknown config key 'method.alfa'; did you mean 'alpha'?"),
])
def test_config_file_typos_are_errors(tmp_path, line, message, untouched):
    path = tmp_path / "mine.py"
    path.write_text("from jax_refine.config import shipped_module\n\nbase = shipped_module('tiny_test').get_config\n\n\n"
                    "def get_config():\n    c = base()\n"
                    f"    {line}\n    return c\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: {message}"


def test_shipped_configs_and_the_demo_section_pass_the_schema():
    names = shipped_configs()
    assert {"default", "clip_refine", "demo", "study", "tiny_test"} <= set(names)
    for name in names + [f"clip_refine:method={m},model={v},data={d}" for m in objectives.PRESETS
                         for v in ("vitb32", "vitl14", "siglip_so400m") for d in ("coco", "coco_karpathy")
                         if m != "sigmoid" or v == "siglip_so400m"]:  # sigmoid needs SigLIP's logit bias
        load_config(name)  # no error


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-0.001", "config.optimizer.lr=-0.001 is invalid: must be > 0"),
    ("optimizer.weight_decay=-0.1", "config.optimizer.weight_decay=-0.1 is invalid: must be >= 0"),
    ("train.batch_size=0", "config.train.batch_size=0 is invalid: must be an integer >= 1"),
    ("train.batch_size=-8", "config.train.batch_size=-8 is invalid: must be an integer >= 1"),
    ("train.epochs=0", "config.train.epochs=0 is invalid: must be an integer >= 1"),
    ("method.alpha=1.5", "config.method.alpha=1.5 is invalid: must be in [0, 1]"),
    ("method.temperature=0.0", "config.method.temperature=0.0 is invalid: must be > 0"),
])
def test_bad_values_are_one_line_before_anything_compiles(override, message, tmp_path, capsys, untouched):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config("tiny_test", [f"--config.{override}"])
    if override.startswith("train.batch_size=-8"):  # and through the command line: exit 2, one line
        err = cli_error(["train", "--config", "tiny_test", "--workdir", str(tmp_path / "w"),
                         f"--config.{override}"], capsys)
        assert err == f"error: {message}" and not (tmp_path / "w").exists()


# ------------------------------------------------------------- 5. damaged checkpoints fall back
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _largest(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGES = {  # (what is done to step 4) -> the file the message must name
    "missing _METADATA": (lambda s: (s / "params" / "_METADATA").unlink(), "params/_METADATA: missing"),
    "truncated _CHECKPOINT_METADATA": (lambda s: _truncate(s / "_CHECKPOINT_METADATA"), "4/_CHECKPOINT_METADATA: not valid JSON"),
    "truncated _METADATA": (lambda s: _truncate(s / "opt_state" / "_METADATA"), "opt_state/_METADATA: not valid JSON"),
    "truncated _sharding": (lambda s: _truncate(s / "train" / "_sharding"), "train/_sharding: not valid JSON"),
    "truncated array_metadatas": (lambda s: _truncate(s / "params" / "array_metadatas" / "process_0"),
                                  "params/array_metadatas/process_0: not valid JSON"),
    "truncated manifest": (lambda s: _truncate(s / "params" / "manifest.ocdbt"), "checkpoints/4/params/"),
    "truncated shard": (lambda s: _truncate(_largest(s / "params" / "ocdbt.process_0" / "d")), "checkpoints/4/params/"),
    "empty top-level shard": (lambda s: _largest(s / "opt_state" / "d").write_bytes(b""), "opt_state/d/"),
    "truncated meta": (lambda s: _truncate(s / "meta" / "metadata"), "meta/metadata: not valid JSON"),
    "truncated data state": (lambda s: _truncate(s / "data" / "metadata"), "data/metadata: not valid JSON"),
}


def test_each_damaged_file_kind_falls_back_to_the_previous_step(trained, tmp_path, capsys, untouched):
    config = tiny_config(trained, **{"train.num_steps": 4, "checkpoint.async_save": False})
    abstract = train.build_trainer(config, shd.make_mesh(ONE, jax.devices()[:1]), 4).abstract_saved()

    def make(d):
        return ckpt.make_manager(d, async_save=False)

    reference = ckpt.make_manager(trained / "checkpoints", read_only=True, async_save=False)
    step2 = reference.restore(2, args=ckpt.ocp.args.Composite(params=ckpt.ocp.args.StandardRestore(abstract.params)))
    reference.close()
    for name, (damage, names) in DAMAGES.items():
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(trained, run)
        damage(run / "checkpoints" / "4")
        mngr, step, state, _ = ckpt.restore_latest_good(run / "checkpoints", abstract, make)
        mngr.close()
        said = capsys.readouterr().out
        assert step == 2, name
        line = next(ln for ln in said.splitlines() if ln.startswith("[train] skipping damaged checkpoint step 4: "))
        assert names in line, (name, line)
        assert (run / ckpt.SKIPPED_SUBDIR / "4").is_dir() and not (run / "checkpoints" / "4").exists()  # kept aside
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(step2["params"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_skips_a_damaged_step_and_export_names_the_file(trained, tmp_path, capsys, untouched):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "4" / "params" / "_METADATA").unlink()
    # export / evaluate read the newest intact step, saying which they skipped; a damaged step dir is one line
    err = cli_error(["export", "--checkpoint", str(run / "checkpoints" / "4"), "--out", str(tmp_path / "x")], capsys)
    assert err == f"error: {run / 'checkpoints' / '4' / 'params' / '_METADATA'}: missing"
    model = ckpt.load_model(run)
    assert "skipping damaged checkpoint step 4" in capsys.readouterr().out and model is not None

    # a resume with a longer run (allowed change) falls back to step 2, trains on, logs each step once
    config = tiny_config(run, **{"train.num_steps": 6, "checkpoint.async_save": False})
    result = train.train(config, data_iter=SyntheticIterator(8), mesh=shd.make_mesh(ONE, jax.devices()[:1]))
    said = capsys.readouterr().out
    assert "skipping damaged checkpoint step 4" in said and "resumed from" in said and result["steps"] == 6
    assert "dropped 2 lines of steps after 2" in said
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    for d in (run / "checkpoints").iterdir():  # every step damaged: one line naming them, nothing started
        if d.name.isdigit():
            (d / "meta" / "metadata").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint in .*step 6: .*meta/metadata: not valid"):
        train.train(config, data_iter=SyntheticIterator(8), mesh=shd.make_mesh(ONE, jax.devices()[:1]))


# ---------------------------------------------------- 6, 10. kill -9 mid-save, two runs, stale lock
def test_kill_9_mid_save_second_run_and_stale_lock(tmp_path, capsys, untouched):
    """A run blocked while writing step 4 holds the lock: a second run fails fast naming it; after kill -9
    the next run takes the stale lock over, resumes from step 2 and logs every step once."""
    work = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "train_driver.py"), str(work), "--steps", "6",
                             "--block-finalize-at", "4"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_until_blocked(proc, work, timeout=400)
        config = tiny_config(work, **{"train.num_steps": 6, "checkpoint.every_steps": 2, "checkpoint.max_to_keep": 5})
        mesh = shd.make_mesh(ONE, jax.devices()[:1])
        with pytest.raises(workdir_lib.WorkdirError, match=rf"^workdir {work} is in use by pid {proc.pid} on host "):
            train.train(config, data_iter=SyntheticIterator(8), mesh=mesh)
    finally:
        kill_9(proc)
    assert json.loads((work / "train.lock").read_text())["pid"] == proc.pid  # left behind by the killed run
    (work / "finalize_blocked").unlink()
    result = train.train(config, data_iter=SyntheticIterator(8), mesh=mesh)
    said = capsys.readouterr().out
    assert f"taking over the stale lock {work / 'train.lock'} of pid {proc.pid}" in said
    assert f"resumed from {work / 'checkpoints'}/2" in said and result["steps"] == 6
    steps = [json.loads(ln)["step"] for ln in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3, 4 of the killed run were dropped, not repeated
    assert not (work / "train.lock").exists()  # released at the end


# --------------------------------------------------------------------- 8. resume with another config
def test_resume_refuses_a_changed_config_naming_the_keys(trained, tmp_path, untouched):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    saved = json.loads((run / "config.resolved.json").read_text())
    assert saved["optimizer"]["lr"] == 1e-3 and saved["train"]["batch_size"] == 8  # recorded at start
    mesh = shd.make_mesh(ONE, jax.devices()[:1])
    for change, shown in (({"optimizer.lr": 1e-4}, "optimizer.lr: 0.001 -> 0.0001"),
                          ({"method.name": "contrastive"}, "method.name: 'clip_refine' -> 'contrastive'"),
                          ({"train.batch_size": 16, "optimizer.weight_decay": 0.0},
                           "optimizer.weight_decay: 0.1 -> 0.0, train.batch_size: 8 -> 16")):
        config = tiny_config(run, **{"train.num_steps": 6, **change})
        with pytest.raises(workdir_lib.WorkdirError, match=f"^{re.escape(f'resume of {run} with a changed config: {shown};')}"):
            train.train(config, data_iter=SyntheticIterator(8), mesh=mesh)
    assert json.loads((run / "config.resolved.json").read_text()) == saved  # not overwritten by a refused run
    assert not (run / "train.lock").exists()


# ------------------------------------------------------------------- 7. missing photos in evaluation
def test_evaluation_skips_and_counts_a_missing_photo(coco_json, tmp_path, caplog, untouched):
    from jax_refine.data import load_classification, load_retrieval

    ann, img = copy_set(coco_json, tmp_path / "set")
    doc = json.loads(ann.read_text())
    gone = img / doc["images"][3]["file_name"]
    gone.unlink()
    with caplog.at_level(logging.WARNING):
        rset = load_retrieval(f"coco_json:{ann}:{img}", batch_size=5, image_size=32)
        batches = list(rset.image_batches())
    masks = np.concatenate([b["mask"] for b in batches])
    indices = np.concatenate([b["image_index"] for b in batches])[masks]
    assert sorted(indices) == [i for i in range(12) if i != 3] and rset.stats()["skipped_bad_image"] == 1
    assert f"skipping missing or empty image file {gone}" in caplog.text

    folder = tmp_path / "classes"
    for k, im in enumerate(doc["images"][:6]):
        (folder / f"class{k % 2}").mkdir(parents=True, exist_ok=True)
        if im["file_name"] != gone.name:
            shutil.copy(img / im["file_name"], folder / f"class{k % 2}" / im["file_name"])
    zs = load_classification(f"folder:{folder}", batch_size=4, image_size=32)
    vanished = sorted(folder.rglob("*.jpg"))[0]
    vanished.unlink()  # gone between listing and reading
    got = sum(int(b["mask"].sum()) for b in zs.batches())
    assert got == zs.num_examples - 1 and zs.stats()["skipped_bad_image"] == 1
    assert f"skipping missing or empty image file {vanished}" in caplog.text


# --------------------------------------------------------------------- 9. offline: fail fast, no litter
def test_unprepared_catalog_dataset_offline_fails_fast_and_leaves_nothing(tmp_path, monkeypatch, untouched):
    from jax_refine.data import load_retrieval, sources

    monkeypatch.setattr(sources, "DOWNLOAD_PROBE", ("127.0.0.1", 9))  # nothing listens there: as if offline
    data_dir = tmp_path / "tfds"
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_retrieval("coco_karpathy_test", batch_size=4, data_dir=str(data_dir))
    message = str(info.value)
    assert time.perf_counter() - t0 < 60 and "\n" not in message
    assert message.startswith(f"TFDS dataset 'coco_captions' is not prepared under {data_dir} and cannot be "
                              "downloaded (offline: 127.0.0.1:9 unreachable); point to a prepared coco_captions "
                              "(training: --config.data.data_dir=DIR; evaluation: TFDS_DATA_DIR=DIR)")
    assert "download_and_prepare()" in message and not data_dir.exists()


# ------------------------------------------------------------------------ 10. SIGTERM exit status
def test_sigterm_saves_and_exits_143(coco_json, tmp_path, capsys, untouched):
    work = tmp_path / "run"
    metrics = work / "metrics.jsonl"

    def preempt():
        deadline = time.time() + 400
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=preempt, daemon=True).start()
    rc = cli.main(["train", "--config", "tiny_test", "--workdir", str(work), "--config.data.source=coco_json",
                   f"--config.data.annotations={coco_json / 'captions_val2017.json'}",
                   f"--config.data.images={coco_json / 'images'}", f"--config.data.data_dir={tmp_path / 'tfds'}",
                   "--config.data.split=train", "--config.train.num_steps=100000", "--config.checkpoint.every_steps=100000",
                   "--config.data.shuffle_buffer=16"])
    out = capsys.readouterr().out
    assert rc == 143, out[-2000:]
    saved = [int(d.name) for d in (work / "checkpoints").iterdir() if d.name.isdigit()]
    assert "SIGTERM: saved step" in out and len(saved) == 1 and 1 <= saved[0] < 100000


# ---------------------------------------------------------------- 10. run.sh keeps the caller's cwd
def _stand_in_venv(tmp_path: Path) -> Path:
    """A stand-in for run.sh's venv: this interpreter, marked as installed for both requirements files."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    digest = subprocess.run(["bash", "-c", "cat requirements*.txt | sha256sum | cut -c1-16"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    for name in ("requirements.txt", "requirements-test.txt"):
        (venv / f".installed-{digest}-{name}").touch()
    return venv


def test_run_sh_resolves_relative_paths_from_the_callers_directory(coco_json, tmp_path, untouched):
    venv = _stand_in_venv(tmp_path)
    caller = tmp_path / "caller"
    copy_set(coco_json, caller)
    out = subprocess.run([str(REPO_ROOT / "run.sh"), "prepare-data", "--annotations", "captions_val2017.json",
                          "--images", "images", "--out", "tfds"], cwd=caller, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "JAX_REFINE_VENV": str(venv)})
    assert out.returncode == 0, out.stderr[-2000:]
    (prepared,) = (caller / "tfds" / "coco_captions_json").glob("captions_val2017-*/1.0.0")
    assert f"prepared {prepared}" in out.stdout and "--config.data.split=train" in out.stdout


def test_run_sh_test_names_a_missing_test_file_in_one_line(tmp_path, untouched):
    # pytest-xdist swallows pytest's own "file or directory not found" (only "no tests ran", exit 5)
    venv = _stand_in_venv(tmp_path)
    for arg in ("tests/test_nope.py", "tests/test_nope.py::test_x"):
        out = subprocess.run([str(REPO_ROOT / "run.sh"), "test", arg], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "JAX_REFINE_VENV": str(venv)})
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [
            f"error: test file or folder not found: tests/test_nope.py (paths are relative to {REPO_ROOT})"], out
