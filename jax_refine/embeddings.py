"""Embedding extraction for evaluation: jitted, sharded over the mesh's data axes, with a progress bar
and an npz cache.

Batches of any size stream in (numpy, from the data pipeline or in-memory arrays), are re-cut into
fixed global batches of `batch_size` (rounded up to a multiple of the data axes), the last partial
batch is padded and the padding dropped, so one compiled program serves the whole set. Parameters
stay where they are if they already live on the mesh (e.g. FSDP-sharded), else they are replicated.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jax_refine import sharding
from jax_refine.hf import to_host

# Model inputs per tower; any other key in a batch (label, image_index, ...) is carried along.
INPUT_KEYS = {"image": ("image",), "text": ("input_ids", "attention_mask")}


def default_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """All devices (or `devices`) on the data axis: `(data=n, fsdp=1, tensor=1)`."""
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)


def _gather_hosts(x: np.ndarray) -> np.ndarray:
    """Concatenate every process's `x (b, ...)` in process order (the global batch's row order)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def model_fingerprint(model: nnx.Module) -> str:
    """A 16-hex-digit hash of a model's config, compute dtype and every parameter value (cache key)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(getattr(model, "_config_json", type(model).__name__).encode())
    h.update(str(jnp.dtype(getattr(model, "dtype", jnp.float32))).encode())
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.ascontiguousarray(to_host(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{arr.shape}:{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _encode(graphdef: nnx.GraphDef, state: nnx.State, inputs: dict[str, jax.Array], kind: str) -> jax.Array:
    model = nnx.merge(graphdef, state)
    if kind == "image":
        out = model.encode_image(inputs["image"])
    else:
        out = model.encode_text(inputs["input_ids"], inputs.get("attention_mask"))
    return out.astype(jnp.float32)


_encode_jit = jax.jit(_encode, static_argnames=("graphdef", "kind"))


def _place_state(state: nnx.State, mesh: Mesh) -> nnx.State:
    """Keep leaves already on `mesh`'s devices; replicate the others onto the mesh."""
    devices = set(mesh.devices.flat)
    rep = sharding.replicated(mesh)

    def place(x):
        if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
            return x
        return jax.device_put(x, rep)

    return jax.tree.map(place, state)


def place_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """`model` with every parameter on `mesh` (kept if already there, else replicated), so repeated
    `extract` calls do not copy the weights again."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _place_state(state, mesh))


def _rebatch(batches: Iterable[Mapping[str, np.ndarray]], size: int
             ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Re-cut a stream of dict batches into `(batch of exactly size rows, number of real rows)`."""
    buf: dict[str, list[np.ndarray]] = {}
    held = 0
    for batch in batches:
        n = len(next(iter(batch.values())))
        for k, v in batch.items():
            buf.setdefault(k, []).append(np.asarray(v))
        held += n
        while held >= size:
            joined = {k: np.concatenate(v) for k, v in buf.items()}
            yield {k: v[:size] for k, v in joined.items()}, size
            buf = {k: [v[size:]] for k, v in joined.items()}
            held -= size
    if held:
        joined = {k: np.concatenate(v) for k, v in buf.items()}
        pad = size - held
        yield {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in joined.items()}, held


def extract(model: nnx.Module, batches: Iterable[Mapping[str, np.ndarray]], kind: str, *,
            mesh: Mesh | None = None, batch_size: int = 256, total: int | None = None,
            desc: str | None = None, progress: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Embed a stream of batches with one tower of `model`.

    `kind`: "image" (batches hold `image (b, H, W, 3)` float32 normalized) or "text" (`input_ids (b, L)`,
    `attention_mask (b, L)`). Other keys (e.g. `label (b,)`) are concatenated and returned as extras;
    a boolean `mask (b,)` (the data pipeline's padding / unreadable-image rows) drops its False rows.
    `mesh`: default all devices on the data axis; `batch_size` (default 256) is the global batch,
    rounded up to a multiple of the mesh's data axes; `total` (rows) sizes the progress bar.
    Returns `(embeddings (N, D) float32 unnormalized, extras {key: (N, ...)})`.
    """
    if kind not in INPUT_KEYS:
        raise ValueError(f"extract: kind must be 'image' or 'text', got {kind!r}")
    mesh = mesh or default_mesh()
    div = sharding.batch_divisor(mesh)
    size = -(-int(batch_size) // div) * div
    hosts = jax.process_count()  # multi-host: each process streams its own slice, size // hosts rows
    local = size // hosts
    graphdef, state = nnx.split(model)
    state = _place_state(state, mesh)
    outs: list[np.ndarray] = []
    extras: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=total, desc=desc or f"{kind} embeddings", unit="ex", disable=not progress, leave=False)
    with bar:
        for batch, real in _rebatch(batches, local):
            missing = [k for k in INPUT_KEYS[kind] if k not in batch and k != "attention_mask"]
            if missing:
                raise ValueError(f"extract({kind!r}): batch has no {missing[0]!r} (keys: {sorted(batch)})")
            inputs = {k: batch[k] for k in INPUT_KEYS[kind] if k in batch}
            rest = {k: v for k, v in batch.items() if k not in inputs}
            if hosts == 1:
                inputs = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in inputs.items()}
                rest = {k: v[:real] for k, v in rest.items()}
                emb = to_host(_encode_jit(graphdef, state, inputs, kind))[:real]
            else:  # padding rows of every host are dropped by the gathered "mask"
                rest["mask"] = np.asarray(rest.get("mask", True), bool) & (np.arange(local) < real)
                rest = {k: _gather_hosts(v) for k, v in rest.items()}
                emb = to_host(_encode_jit(graphdef, state, sharding.host_to_global(inputs, mesh), kind))
            outs.append(emb)
            for k, v in rest.items():
                extras.setdefault(k, []).append(v)
            bar.update(real)
    if not outs:
        raise ValueError(f"{desc or kind}: the dataset is empty (no examples to embed)")
    feats, extra = np.concatenate(outs), {k: np.concatenate(v) for k, v in extras.items()}
    if "mask" in extra:
        keep = extra.pop("mask").astype(bool)
        feats, extra = feats[keep], {k: v[keep] for k, v in extra.items()}
        if not len(feats):
            raise ValueError(f"{desc or kind}: the dataset is empty (every example masked out)")
    return feats, extra


def iterate_arrays(arrays: Mapping[str, np.ndarray], batch_size: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """In-memory arrays `{key: (N, ...)}` as a stream of batches of `batch_size` rows."""
    n = len(next(iter(arrays.values())))
    for i in range(0, n, batch_size):
        yield {k: np.asarray(v[i:i + batch_size]) for k, v in arrays.items()}


def cache_key(**fields: Any) -> str:
    """A short stable hash of the cache fields (fingerprint, dataset, split, n, templates, ...)."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _say_if_content_changed(cache_dir: Path, slug: str, key: Mapping[str, Any]) -> None:
    """Print one line when ``cache_dir`` holds embeddings of the same model and set whose files' content key
    differs from ``key["content"]`` (a photo, caption file or class folder changed): they are embedded anew."""
    if key.get("content") is None:
        return
    same = {k: v for k, v in json.loads(json.dumps(key, default=str)).items() if k != "content"}
    for old in sorted(cache_dir.glob(f"{slug}-*.npz")):
        try:
            with np.load(old, allow_pickle=False) as f:
                saved = json.loads(str(f["__key__"])) if "__key__" in f else {}
        except (OSError, ValueError):  # a foreign or damaged file: not ours to judge
            continue
        if saved.get("content") not in (None, key["content"]) and \
                {k: v for k, v in saved.items() if k != "content"} == same:
            print(f"[eval] {key.get('dataset')}: its files changed since {old} was cached (content "
                  f"{saved['content']} -> {key['content']}); embedding anew", flush=True)
            return


def cached(cache_dir: str | Path | None, compute: Callable[[], Mapping[str, np.ndarray]], **key: Any
           ) -> dict[str, np.ndarray]:
    """`compute()` once per `key`, stored as `cache_dir/<dataset>-<hash>.npz`; None: no cache.

    The file also stores the key as JSON, and a file whose key differs (hash collision, hand-edited)
    is recomputed. Writes go to a temporary file first, so a killed run never leaves a half file.
    """
    if cache_dir is None:
        return dict(compute())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key.get("dataset", "set")))[-60:]
    path = Path(cache_dir) / f"{slug}-{cache_key(**key)}.npz"
    key_json = json.dumps(key, sort_keys=True, default=str)
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if "__key__" in f and str(f["__key__"]) == key_json:
                return {k: f[k] for k in f.files if k != "__key__"}
    _say_if_content_changed(Path(cache_dir), slug, key)
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, __key__=np.asarray(key_json), **arrays)
        os.replace(tmp, path)
    return arrays
