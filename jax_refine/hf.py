"""Hugging Face CLIP checkpoints in and out of our NNX `CLIP` (no torch needed).

- `load_pretrained(name_or_path)`: a local directory with `config.json` + `model.safetensors`
  (or a sharded `model.safetensors.index.json`, or `pytorch_model.bin`), or a hub id fetched (and
  cached) through `huggingface_hub`. The model is built abstractly first and every tensor goes
  straight into its final sharding.
- `save_pretrained(model, out_dir)`: `config.json` + `model.safetensors` (+ tokenizer files) that
  `transformers.CLIPModel.from_pretrained(out_dir)` opens with no missing or unexpected keys.

Names and layouts are mapped by the regex table in `jax_refine.hf_names`.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from jax.experimental import multihost_utils
import safetensors
import safetensors.numpy
from transformers import CLIPConfig
from transformers.utils import logging as hf_logging

from jax_refine import hf_names, outputs
from jax_refine.model import CLIP

ShardingFn = Callable[[str, tuple], "jax.sharding.Sharding | None"]
CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
PACKAGED_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# --------------------------------------------------------------------------------------- config
def clip_config_from(obj: Any):
    """A `transformers.CLIPConfig` from a CLIPConfig, a dict, a `config.json` path or a checkpoint dir.

    Raises ValueError for a non-CLIP config (e.g. model_type 'siglip' or 'bert') and FileNotFoundError
    for a missing file.
    """
    if isinstance(obj, CLIPConfig):
        return obj
    source = "config dict"
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        path = path / CONFIG if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        source = str(path)
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, Mapping):
        raise TypeError(f"cannot make a CLIPConfig from {type(obj).__name__}")
    model_type = obj.get("model_type", "clip")
    if model_type != "clip":
        raise ValueError(f"{source}: model_type is {model_type!r}, but jax_refine loads CLIP models only "
                         "(model_type 'clip', transformers.CLIPModel)")
    return CLIPConfig.from_dict(dict(obj))


# ------------------------------------------------------------------------------------- resolving
def _is_local_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name)


def _hub_download(repo_id: str, filename: str, required: bool) -> str | None:
    try:
        return huggingface_hub.hf_hub_download(repo_id, filename)
    except EntryNotFoundError as e:
        if required:
            raise FileNotFoundError(f"{repo_id}: not a local directory, and {filename} could not be found in "
                                    f"the Hugging Face hub cache or downloaded ({type(e).__name__})") from None
    except (HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, OSError) as e:
        if required:
            raise FileNotFoundError(f"{repo_id}: not a local directory and not fetchable from the Hugging Face "
                                    f"hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return None


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint directory: `name_or_path` itself, or the hub snapshot of that repo id (cached)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if _is_local_path(name) or not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"{name}: no such checkpoint directory (and not a Hugging Face hub id)")
    config = _hub_download(name, CONFIG, required=True)
    for weights in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN):
        got = _hub_download(name, weights, required=False)
        if got and weights == SAFETENSORS_INDEX:
            for shard in sorted(set(json.loads(Path(got).read_text())["weight_map"].values())):
                _hub_download(name, shard, required=True)
        if got:
            break
    for extra in (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json"):
        _hub_download(name, extra, required=False)
    return Path(config).parent


# --------------------------------------------------------------------------------------- reading
class _Safetensors:
    """Lazy reader over one or more safetensors files: `shapes` from headers, `get(key)` as numpy."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safetensors.safe_open(file, framework="numpy") as f:
                for key in f.keys():
                    self.where[key] = file
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        with safetensors.safe_open(self.where[key], framework="numpy") as f:
            if f.get_slice(key).get_dtype() != "BF16":
                return f.get_tensor(key)
        return _read_bf16(self.where[key], key)


def _read_bf16(file: Path, key: str) -> np.ndarray:
    """A BF16 tensor straight from the safetensors layout (the numpy backend has no bfloat16)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))[key]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_: Any) -> np.ndarray:
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    return np.array(view)


class _TorchUnpickler(pickle.Unpickler):
    """Rebuilds the numpy tensors of a torch zip checkpoint; refuses every other global."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *_: data
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")

    def persistent_load(self, pid: tuple) -> np.ndarray:
        kind, dtype, key, _location, _numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        return np.frombuffer(raw, dtype=dtype)


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    """`pytorch_model.bin` -> {name: numpy}. Reads the zip format without torch; torch for anything else."""
    try:
        with zipfile.ZipFile(file) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            with archive.open(pkl) as f:
                state = _TorchUnpickler(f, archive, pkl[: -len("data.pkl")]).load()
        return {k: np.asarray(v) for k, v in state.items()}
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, ValueError, TypeError) as e:
        try:
            import torch  # optional and heavy: only for the old non-zip PyTorch format
        except ImportError:
            raise ValueError(f"{file}: cannot read this PyTorch checkpoint without torch ({e})") from None
        state = torch.load(file, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


class _TorchBin:
    def __init__(self, file: Path):
        self.tensors = _read_torch_bin(file)
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}

    def get(self, key: str) -> np.ndarray:
        return self.tensors[key]


def _open_weights(directory: Path) -> _Safetensors | _TorchBin:
    if (directory / SAFETENSORS).is_file():
        return _Safetensors([directory / SAFETENSORS])
    if (directory / SAFETENSORS_INDEX).is_file():
        index = json.loads((directory / SAFETENSORS_INDEX).read_text())["weight_map"]
        files = [directory / f for f in sorted(set(index.values()))]
        if missing := [f for f in files if not f.is_file()]:
            raise FileNotFoundError(f"{missing[0]}: shard named in {SAFETENSORS_INDEX} not found")
        return _Safetensors(files)
    if (directory / TORCH_BIN).is_file():
        return _TorchBin(directory / TORCH_BIN)
    raise FileNotFoundError(f"{directory}: no weights file ({SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})")


# --------------------------------------------------------------------------------------- loading
def _flat_params(state: Any) -> Iterator[tuple[str, Any]]:
    for path, var in nnx.to_flat_state(state):
        yield "/".join(str(p) for p in path), var


def _short(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _check_keys(source: Path, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    """One-line ValueError naming the missing / unexpected / mis-shaped keys, if any."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected and not hf_names.IGNORED.fullmatch(k)]
    bad = [f"{k} {shapes[k]} != {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = [f"{len(v)} {what}: {_short(v)}" for what, v in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad)) if v]
    if problems:
        raise ValueError(f"{source}: checkpoint does not match its config.json: " + "; ".join(problems))


def _sharding_fn(shardings: Any) -> ShardingFn:
    """Normalize `shardings` (None, a callable, a mapping or `nnx.State` by path) to a callable."""
    if shardings is None:
        return lambda path, names: None
    if callable(shardings):
        return shardings
    if isinstance(shardings, nnx.State):
        shardings = {p: getattr(v, "value", v) for p, v in _flat_params(shardings)}
    return lambda path, names: shardings.get(path)


def load_pretrained(name_or_path: str | os.PathLike, dtype: Any = jnp.float32, *, shardings: Any = None,
                    param_dtype: Any = jnp.float32) -> CLIP:
    """A `CLIP` with the weights of a HF checkpoint (local dir or hub id). `dtype`: compute dtype.

    `shardings`: None (default device), a callable `(param_path, logical_names) -> Sharding | None`, or a
    mapping / `nnx.State` of shardings by parameter path (`vision/layers/0/attn/qkv`). Each parameter is
    assembled on the host and placed directly into its sharding.
    """
    directory = resolve_checkpoint(name_or_path)
    config = clip_config_from(directory)
    reader = _open_weights(directory)
    abstract = nnx.eval_shape(lambda: CLIP(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    channels = config.vision_config.num_channels
    params = list(_flat_params(state))
    sharding_for = _sharding_fn(shardings)
    expected = {k: s for path, var in params for k, s in hf_names.hf_shapes(path, var.shape, channels)}
    _check_keys(directory, reader.shapes, expected)
    for path, var in params:
        kind, keys = hf_names.hf_names(path)
        host = np.empty(var.shape, np.dtype(var.dtype))
        for i, key in enumerate(keys):
            host[hf_names.piece_index(kind, i)] = hf_names.to_ours(kind, reader.get(key), var.shape)
        sharding = sharding_for(path, tuple(var.get_metadata().get("out_sharding") or ()))
        if sharding is None:
            var.set_value(jax.device_put(host))
        else:
            var.set_value(jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx]))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------- saving
def to_host(x: jax.Array) -> np.ndarray:
    """`x` as one numpy array on this host (gathered from every process when it spans several)."""
    if not getattr(x, "is_fully_addressable", True):
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def hf_state_dict(model: CLIP) -> dict[str, np.ndarray]:
    """The model's parameters as HF `CLIPModel` tensors {name: numpy} (C-contiguous)."""
    out = {}
    channels = model.config.vision_config.num_channels
    for path, var in _flat_params(nnx.state(model, nnx.Param)):
        a = to_host(var[...])
        kind, _ = hf_names.hf_names(path)
        for i, (key, shape) in enumerate(hf_names.hf_shapes(path, a.shape, channels)):
            out[key] = hf_names.to_hf(kind, a, shape, i)
    return out


def save_pretrained(model: CLIP, out_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
                    overwrite: bool = True) -> Path:
    """Write `config.json` + `model.safetensors` + `preprocessor_config.json` + `vocab.json`/`merges.txt` to
    `out_dir`, replaced atomically through `jax_refine.outputs.output_dir` (kind "export").

    `overwrite=False` refuses a non-empty `out_dir`; a training workdir, checkpoint or git repository is never
    replaced. Tokenizer files come from `tokenizer_dir` when given, else the packaged ones. Under multi-host,
    every process must call this (parameters are gathered) and process 0 writes.
    """
    out = Path(out_dir).expanduser().absolute()
    outputs.check_target(out, kind="export", overwrite=overwrite)
    tensors = hf_state_dict(model)
    if jax.process_index() != 0:
        return out
    with outputs.output_dir(out, kind="export", overwrite=overwrite) as tmp:
        config = model.config
        config.dtype = str(next(iter(tensors.values())).dtype)
        config.save_pretrained(tmp)
        safetensors.numpy.save_file(tensors, tmp / SAFETENSORS, metadata={"format": "pt"})
        size = int(config.vision_config.image_size)  # CLIP's resize-shortest-edge + center crop at this size
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # not its "torchvision not installed, using the PIL backend" warning
        try:  # imported here, under the raised verbosity: looking the class up is what warns
            from transformers import CLIPImageProcessor

            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        finally:
            hf_logging.set_verbosity(verbosity)
        processor.save_pretrained(tmp)
        source = Path(tokenizer_dir) if tokenizer_dir is not None else PACKAGED_TOKENIZER
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
    return out
