"""`python -m jax_refine feature-stats` and RaFA's precomputed prior: the file's statistics against NumPy on the
features the model's own encode functions give for real COCO photos and captions; a train step draws z from
them; every bad prior parameter or stats file is a one-line error naming the key or file before the first step."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_helpers import set_dotted, synthetic_batch, tiny_config
from jax_refine import cli, feature_stats, objectives, stats_file, train
from jax_refine import config_base as default  # the base config, `--config default`
from jax_refine.models import registry

pytestmark = pytest.mark.slow  # the command and train steps on a tiny model: not in the fast tier

N_PHOTOS = 5


def _spec(coco_mini_dir) -> str:
    return f"coco_json:{coco_mini_dir}/annotations/captions_train2017.json:{coco_mini_dir}/train2017"


def _run(tmp_path, coco_mini_dir, out, *overrides, extra=()) -> int:
    return cli.main(["feature-stats", "--config", "tiny_test", "--out", str(out), "--data", _spec(coco_mini_dir),
                     "--max-examples", str(N_PHOTOS), f"--config.workdir={tmp_path / 'wd'}",
                     "--config.eval.progress=False", *extra, *overrides])


def _model_features(config, coco_mini_dir) -> tuple[np.ndarray, np.ndarray, float]:
    """Image (N, D) and caption (T, D) features of the first N_PHOTOS photos through the model's encode functions
    (the random init of config.seed built directly), and its logit scale (log)."""
    from jax_refine import preprocess
    from jax_refine.data import retrieval

    start = train.start_model(config)
    family, model_config = start.family, start.model_config
    model = family.create(model_config, seed=int(config.seed))
    prep = registry.preprocessing(model)
    data = retrieval.load_retrieval(_spec(coco_mini_dir), batch_size=64, prep=prep, max_examples=N_PHOTOS)
    images = [b["image"][b["mask"]] for b in data.image_batches()]
    image = np.asarray(model.encode_image(jnp.asarray(np.concatenate(images))), np.float64)
    text = np.asarray(model.encode_text(jnp.asarray(data.texts["input_ids"]), jnp.asarray(data.texts["attention_mask"])),
                      np.float64)
    return image, text, float(model.logit_scale[...])


@pytest.mark.parametrize("overrides, regime", [((), "raw"), (("--config.method.normalize=True",), "unit"),
                                                (("--config.method.feature_scale=teacher",), "scaled")])
def test_stats_file_equals_numpy_on_the_models_features(tmp_path, coco_mini_dir, overrides, regime):
    out = tmp_path / "stats.npz"
    assert _run(tmp_path, coco_mini_dir, out, *overrides) == 0
    image, text, log_scale = _model_features(tiny_config(tmp_path), coco_mini_dir)
    assert len(image) == N_PHOTOS and len(text) >= N_PHOTOS
    if regime != "raw":
        image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))
    c = np.sqrt(np.exp(log_scale)) if regime == "scaled" else None
    if c is not None:
        image, text = c * image, c * text
    # pooled: each modality weighs one half, as in a training batch of B photos and B captions
    rows = np.concatenate([image, text])
    weights = np.concatenate([np.full(len(image), 0.5 / len(image)), np.full(len(text), 0.5 / len(text))])
    pooled_mean = np.average(rows, axis=0, weights=weights)
    pooled_std = np.sqrt(np.average((rows - pooled_mean) ** 2, axis=0, weights=weights))
    with np.load(out) as f:
        got = {k: f[k] for k in f.files}
    want = {"mean": pooled_mean, "std": pooled_std, "image_mean": image.mean(0), "image_std": image.std(0),
            "text_mean": text.mean(0), "text_std": text.std(0)}
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=2e-4, atol=2e-5 * np.abs(v).max(), err_msg=k)
    meta = json.loads(str(got["meta"]))
    assert (meta["regime"], meta["images"], meta["captions"], meta["dim"]) == (regime, N_PHOTOS, len(text), 24)
    assert meta["model"] == "random_init (seed 0)" and meta["data"] == _spec(coco_mini_dir)
    assert meta["scale"] == (None if c is None else pytest.approx(c, rel=1e-6))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["stats.npz"]  # no temporary left


def _write(path, meta=None, **arrays):
    stats_file.write_stats(path, {k: np.asarray(v, np.float32) for k, v in arrays.items()},
                              meta if meta is not None else {"regime": "raw", "feature_scale": None})
    return path


def _precomputed(path, **overrides):
    c = default.get_config().method
    c.prior = "precomputed"
    if path is not None:
        c.prior_params.path = str(path)
    return set_dotted(c, overrides)


def test_precomputed_prior_draws_z_with_the_files_mean_and_std(tmp_path):
    d = 24
    rng = np.random.default_rng(0)
    mean, std = rng.normal(size=d), rng.uniform(0.2, 3.0, size=d)
    path = _write(tmp_path / "s.npz", mean=mean, std=std, image_mean=mean, image_std=std, text_mean=mean,
                  text_std=std)
    from jax_refine import step as step_lib

    c = objectives.resolve_method(_precomputed(path))
    key = jax.random.key(7)
    z = np.asarray(step_lib.step_reference(key, (4, d), c))
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (4, d)), np.float64)
    np.testing.assert_allclose(z, np.float32(mean) + np.float32(std) * noise, rtol=1e-6, atol=1e-6)
    big = np.asarray(step_lib.step_reference(key, (40_000, d), c), np.float64)
    assert np.all(np.abs(big.mean(0) - mean) < 5 * std / np.sqrt(len(big)))
    assert np.all(np.abs(big.std(0) / std - 1) < 5 / np.sqrt(2 * len(big)))


def test_train_step_with_the_precomputed_prior_uses_the_files_z(tmp_path, coco_mini_dir):
    """The stats of the start model (feature_scale teacher), then one train step of RaFA only: its rafa term equals
    NumPy's on the step's features and z = mean + std * (the step's normal draws)."""
    from flax import nnx

    from jax_refine import sharding as shd, step as step_lib

    out = tmp_path / "stats.npz"
    assert _run(tmp_path, coco_mini_dir, out, "--config.method.feature_scale=teacher") == 0
    config = tiny_config(tmp_path / "wd", **{"method.name": "rafa", "method.feature_scale": "teacher",
                                             "method.prior": "precomputed", "method.prior_params.path": str(out)})
    mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    trainer = train.build_trainer(config, mesh, 1)
    state = trainer.init_state()
    batch = synthetic_batch(0, 8)
    model = nnx.merge(trainer.setup.graphdef, state.params, trainer.setup.rest)
    fi, ft = (np.asarray(x, np.float64) for x in model(batch["image"], batch["input_ids"], batch["attention_mask"]))
    c = np.exp(0.5 * float(state.params["logit_scale"]))
    key = trainer.step_key(np.asarray(jax.device_get(state.rng)), 0)
    with np.load(out) as f:
        mean, std = f["mean"].astype(np.float64), f["std"].astype(np.float64)
    z = mean + std * np.asarray(jax.random.normal(jax.random.fold_in(key, 0), fi.shape), np.float64)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    want = np.mean((c * unit(fi) - z) ** 2) + np.mean((c * unit(ft) - z) ** 2)
    _, metrics = trainer.step_fn(state, shd.host_to_global(batch, mesh), key)
    assert float(metrics["rafa"]) == pytest.approx(want, rel=1e-4)


# ----------------------------------------------------------------- issue 25: bad prior parameters, bad files
@pytest.mark.parametrize("overrides, message", [
    ({"prior_params.std": -1.0}, r"^config\.method\.prior_params\.std=-1\.0 is invalid: must be finite and > 0$"),
    ({"prior_params.std": 0.0}, r"^config\.method\.prior_params\.std=0\.0 is invalid"),
    ({"prior_params.std": float("nan")}, r"^config\.method\.prior_params\.std=nan is invalid"),
    ({"prior_params.std": float("inf")}, r"^config\.method\.prior_params\.std=inf is invalid"),
    ({"prior_params.mean": float("inf")}, r"^config\.method\.prior_params\.mean=inf is invalid: must be finite$"),
    ({"prior": "uniform", "prior_params.low": 1.0, "prior_params.high": 1.0}, r"uniform needs low < high"),
    ({"prior": "uniform", "prior_params.high": float("inf")}, r"prior_params\.high=inf is invalid"),
    ({"prior": "gaussian"}, r"^config\.method\.prior: unknown prior 'gaussian'"),
    ({"prior_params.path": "s.npz"}, r"path='s\.npz' is read only by prior=precomputed"),
])
def test_bad_prior_parameters_are_one_line_errors_naming_the_key(overrides, message):
    c = set_dotted(default.get_config().method, overrides)
    with pytest.raises(ValueError, match=message):
        objectives.get_objective(c)


def test_bad_stats_files_are_one_line_errors_naming_the_file(tmp_path):
    d = np.ones(24)
    cases = {
        "missing.npz": None,
        "text.npz": lambda p: p.write_text("not an npz"),
        "no_std.npz": lambda p: np.savez(p, mean=d),
        "zero_std.npz": lambda p: np.savez(p, mean=d, std=np.r_[d[:-1], 0.0]),
        "nan_mean.npz": lambda p: np.savez(p, mean=np.r_[d[:-1], np.nan], std=d),
        "2d.npz": lambda p: np.savez(p, mean=np.ones((2, 12)), std=np.ones((2, 12))),
        "unit.npz": lambda p: _write(p, {"regime": "unit", "feature_scale": None}, mean=d, std=d),
    }
    messages = {"missing.npz": "no such file", "text.npz": "not a readable npz file", "no_std.npz": "has no std",
                "zero_std.npz": "std finite and > 0", "nan_mean.npz": "mean must be finite", "2d.npz": "shape (D,)",
                "unit.npz": "holds statistics of unit features but this run's RaFA compares raw features"}
    for name, make in cases.items():
        path = tmp_path / name
        if make is not None:
            make(path)
        with pytest.raises(ValueError) as e:
            objectives.get_objective(_precomputed(path))
        line = str(e.value)
        assert "\n" not in line and line.startswith(f"config.method.prior_params.path={path}: "), line
        assert messages[name] in line, line
    with pytest.raises(ValueError, match="needs config.method.prior_params.path=FILE"):
        objectives.get_objective(_precomputed(None))
    scaled = _write(tmp_path / "scaled.npz", {"regime": "scaled", "feature_scale": "teacher"}, mean=d, std=d)
    with pytest.raises(ValueError, match=r"scaled \(feature_scale='teacher'\) features but this run's RaFA compares "
                                         r"scaled \(feature_scale=2\.0\)"):
        objectives.get_objective(_precomputed(scaled, feature_scale=2.0))
    assert objectives.get_objective(_precomputed(scaled, feature_scale="teacher")).needs_reference


def test_a_mean_of_the_wrong_length_is_refused_before_the_first_step(tmp_path):
    """The model's D is known once it is built: build_trainer draws a reference (no step runs) and says which
    file or key has the wrong length."""
    path = _write(tmp_path / "s.npz", mean=np.zeros(7), std=np.ones(7))
    config = tiny_config(tmp_path / "wd", **{"method.prior": "precomputed", "method.prior_params.path": str(path)})
    with pytest.raises(ValueError, match=rf"^config\.method\.prior_params\.path={path}: mean has length 7 but the "
                                         r"model's features have D=24"):  # (JAX appends a note after the line)
        train.build_trainer(config, None, 1)
    c = default.get_config().method
    c.prior, c.prior_params = "precomputed", {"mean": np.zeros(7), "std": np.ones(7)}
    with pytest.raises(ValueError, match=r"^config\.method\.prior_params\.mean: mean has length 7 .* D=24$"):
        objectives.reference(jax.random.key(0), (2, 24), c)


def test_command_refuses_an_existing_out_and_never_leaves_half_a_file(tmp_path, coco_mini_dir, monkeypatch, capsys):
    out = tmp_path / "stats.npz"
    out.write_text("keep me")
    assert _run(tmp_path, coco_mini_dir, out) == 2
    assert "--out" in capsys.readouterr().err and out.read_text() == "keep me"

    def broken_savez(file, **arrays):
        with open(file, "wb") as f:
            f.write(b"PK half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="No space left"):
        stats_file.write_stats(out, {"mean": np.zeros(3), "std": np.ones(3)}, {})
    assert out.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]


def test_default_caption_set_is_the_runs_training_split(tmp_path, coco_mini_dir):
    """Without --data, the command embeds config.data: for coco_json the run's own split of the file (train_fraction,
    split_seed), every caption of each of its photos."""
    from jax_refine import preprocess
    from jax_refine.data import sources

    ann, images = coco_mini_dir / "annotations" / "captions_train2017.json", coco_mini_dir / "train2017"
    config = tiny_config(tmp_path, **{"data.source": "coco_json", "data.annotations": str(ann),
                                      "data.images": str(images), "data.train_fraction": 0.5, "data.split_seed": 3})
    got, name = feature_stats.caption_set(config, None, preprocess.Preprocessing(image_size=32), 8, None)
    doc = json.loads(ann.read_text())
    by_id = {}
    for a in doc["annotations"]:
        by_id.setdefault(a["image_id"], []).append(a["caption"])
    ids = sorted(i["id"] for i in doc["images"] if i["id"] in by_id)
    chosen = sorted(np.random.default_rng(3).permutation(len(ids))[: len(ids) // 2])  # the reference's split
    assert got.num_images == len(chosen) and name.endswith("[captions_train2017[train]]")
    assert sorted(got.captions) == sorted(c for i in chosen for c in by_id[ids[i]])
    image_index = np.concatenate([b["image_index"][b["mask"]] for b in got.image_batches()])
    assert sorted(image_index) == list(range(len(chosen)))
    assert sources.coco_json_split(ann, images, "train", train_fraction=0.5, split_seed=3).keys == tuple(
        str(ids[i]) for i in chosen)
