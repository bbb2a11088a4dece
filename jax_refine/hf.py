"""Hugging Face checkpoint files, for every model family: resolution, weight readers, one load loop, one writer.

- `resolve_checkpoint(name_or_path)`: a local directory, or a hub id fetched (and cached) through
  `huggingface_hub` (config, one weights format, tokenizer files).
- Readers (`SafetensorsReader`, `TorchBinReader`, `open_weights(dir)`): lazy `shapes {name: shape}` and
  `get(name) -> numpy`, no torch needed.
- `load_weights(module, reader, names, source, shardings=)`: the one loop that fills an abstract NNX
  module from a reader through a family's `NameMap` (checked: missing / unexpected / mis-shaped keys in one
  line), each tensor placed straight into its final sharding. `state_dict(model, names)` is the way back.
- `write_checkpoint(model, out_dir, tensors, write_extras)`: config + `model.safetensors` (+ the family's
  processor and tokenizer files), replaced atomically, written by process 0.
Which family a directory holds, and loading / saving a model by family: `jax_refine.models.registry`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import jax
import ml_dtypes
import numpy as np
from flax import nnx
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from jax.experimental import multihost_utils
import safetensors
import safetensors.numpy

from jax_refine import outputs

ShardingFn = Callable[[str, tuple], "jax.sharding.Sharding | None"]
CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Fetched from the hub when present: every family's tokenizer and processor files.
HUB_EXTRAS = ("vocab.json", "merges.txt", "spiece.model", "tokenizer_config.json", "special_tokens_map.json",
              OPEN_CLIP_CONFIG)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# ------------------------------------------------------------------------------------- resolving
def read_config(obj: Any, filename: str = CONFIG, what: str = "config") -> tuple[Any, str]:
    """`(obj, source)`: a dict or config object as given (source "`what` dict"), or the JSON of a file path or of
    `filename` in a directory (source: the file). One-line FileNotFoundError for a missing file, ValueError for
    bad JSON; the caller checks what the dict holds."""
    if not isinstance(obj, (str, os.PathLike)):
        return obj, f"{what} dict"
    path = Path(obj)
    path = path / filename if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _is_local_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.path.exists(name)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face hub repo id (`org/name`) and not as a local path."""
    return not _is_local_path(name) and bool(_HUB_ID.fullmatch(name))


def hub_download(repo_id: str, filename: str, required: bool) -> str | None:
    """`filename` of hub repo `repo_id` from the cache or the network; None when absent and not `required`,
    else a one-line FileNotFoundError naming the repo."""
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


def resolve_checkpoint(name_or_path: str | os.PathLike, *, weights: bool = True) -> Path:
    """A local checkpoint directory: `name_or_path` itself, or the hub snapshot of that repo id (cached).

    `weights=False` fetches only the config, tokenizer and processor files (`HUB_EXTRAS`): what an export
    copies from a run's start checkpoint, without the weights."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not is_hub_id(name):
        raise FileNotFoundError(f"{name}: no such checkpoint directory (and not a Hugging Face hub id)")
    config = hub_download(name, CONFIG, required=False) or hub_download(name, OPEN_CLIP_CONFIG, required=True)
    for file in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, *OPEN_CLIP_WEIGHTS) if weights else ():
        got = hub_download(name, file, required=False)
        if got and file == SAFETENSORS_INDEX:
            for shard in sorted(set(json.loads(Path(got).read_text())["weight_map"].values())):
                hub_download(name, shard, required=True)
        if got:
            break
    for extra in HUB_EXTRAS:
        hub_download(name, extra, required=False)
    return Path(config).parent


# --------------------------------------------------------------------------------------- reading
class SafetensorsReader:
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


def read_torch_bin(file: Path) -> dict[str, np.ndarray]:
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


class TorchBinReader:
    """A torch state dict file read whole: `shapes`, `get(key)` as numpy."""

    def __init__(self, file: Path):
        self.tensors = read_torch_bin(file)
        self.shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}

    def get(self, key: str) -> np.ndarray:
        return self.tensors[key]


def open_weights(directory: Path) -> SafetensorsReader | TorchBinReader:
    """The reader of an HF checkpoint directory's weights: safetensors, a sharded index, or `pytorch_model.bin`."""
    if (directory / SAFETENSORS).is_file():
        return SafetensorsReader([directory / SAFETENSORS])
    if (directory / SAFETENSORS_INDEX).is_file():
        index = json.loads((directory / SAFETENSORS_INDEX).read_text())["weight_map"]
        files = [directory / f for f in sorted(set(index.values()))]
        if missing := [f for f in files if not f.is_file()]:
            raise FileNotFoundError(f"{missing[0]}: shard named in {SAFETENSORS_INDEX} not found")
        return SafetensorsReader(files)
    if (directory / TORCH_BIN).is_file():
        return TorchBinReader(directory / TORCH_BIN)
    raise FileNotFoundError(f"{directory}: no weights file ({SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN})")



# ------------------------------------------------------------------------------------- name maps
@dataclasses.dataclass(frozen=True)
class NameMap:
    """How one family names and lays out its parameters in a checkpoint format (built by the family's
    `params.py`). Our paths are `/`-joined (`vision/layers/3/attn/qkv`); a `kind` names a layout.

    names(path) -> (kind, checkpoint names: several for a parameter fused from several tensors);
    shapes(path, shape) -> [(checkpoint name, checkpoint shape)] of each piece;
    to_ours(kind, tensor, our_shape) -> one piece in our layout; to_hf(kind, array, piece_shape, index) ->
    piece `index` of our array in the checkpoint's layout; piece_index(kind, index) -> where piece `index`
    sits inside our array (`()` = all of it); ignored: checkpoint names that are never parameters.
    """

    names: Callable[[str], tuple[str, list[str]]]
    shapes: Callable[[str, tuple[int, ...]], Iterable[tuple[str, tuple[int, ...]]]]
    to_ours: Callable[[str, np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[str, np.ndarray, tuple[int, ...], int], np.ndarray]
    piece_index: Callable[[str, int], tuple]
    ignored: re.Pattern | None = None


def flat_params(state: Any) -> Iterator[tuple[str, Any]]:
    """`(path "a/b/0/c", variable)` of every variable in an `nnx.State`."""
    for path, var in nnx.to_flat_state(state):
        yield "/".join(str(p) for p in path), var


def _short(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_keys(source: Any, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
               ignored: re.Pattern | None = None) -> None:
    """One-line ValueError naming the missing / unexpected / mis-shaped keys of `source`, if any."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected and not (ignored and ignored.fullmatch(k))]
    bad = [f"{k} {shapes[k]} != {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    problems = [f"{len(v)} {what}: {_short(v)}" for what, v in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad)) if v]
    if problems:
        raise ValueError(f"{source}: checkpoint does not match its config: " + "; ".join(problems))


def sharding_fn(shardings: Any) -> ShardingFn:
    """Normalize `shardings` (None, a callable, a mapping or `nnx.State` by path) to a callable."""
    if shardings is None:
        return lambda path, names: None
    if callable(shardings):
        return shardings
    if isinstance(shardings, nnx.State):
        shardings = {p: getattr(v, "value", v) for p, v in flat_params(shardings)}
    return lambda path, names: shardings.get(path)


# --------------------------------------------------------------------------------------- loading
def load_weights(module: nnx.Module, reader: Any, names: NameMap, source: Any, *, shardings: Any = None
                 ) -> nnx.Module:
    """`module` (abstract, from `nnx.eval_shape`; its parameter dtypes are the storage dtypes) with every
    parameter read from `reader` (`shapes`, `get(name)`) through `names`; returns the merged module.

    `shardings`: None (default device), a callable `(param_path, logical_names) -> Sharding | None`, or a
    mapping / `nnx.State` of shardings by parameter path. Each parameter is assembled on the host and placed
    directly into its sharding. `source` names the checkpoint in errors.
    """
    graphdef, state = nnx.split(module)
    params = list(flat_params(state))
    sharding_for = sharding_fn(shardings)
    expected = {k: s for path, var in params for k, s in names.shapes(path, tuple(var.shape))}
    check_keys(source, reader.shapes, expected, names.ignored)
    for path, var in params:
        kind, keys = names.names(path)
        host = np.empty(var.shape, np.dtype(var.dtype))
        for i, key in enumerate(keys):
            host[names.piece_index(kind, i)] = names.to_ours(kind, reader.get(key), tuple(var.shape))
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


def state_dict(model: nnx.Module, names: NameMap) -> dict[str, np.ndarray]:
    """The model's parameters as checkpoint tensors `{name: numpy}` (C-contiguous) through `names`."""
    out = {}
    for path, var in flat_params(nnx.state(model, nnx.Param)):
        a = to_host(var[...])
        kind, _ = names.names(path)
        for i, (key, shape) in enumerate(names.shapes(path, a.shape)):
            out[key] = names.to_hf(kind, a, shape, i)
    return out


def write_checkpoint(model: nnx.Module, out_dir: str | os.PathLike, tensors: Callable[[], dict[str, np.ndarray]],
                     write_extras: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """`config.json` (the model's transformers config) + `model.safetensors` (`tensors()`), then
    `write_extras(dir)` (processor, tokenizer files), into `out_dir`, replaced atomically through
    `jax_refine.outputs.output_dir` (kind "export").

    `overwrite=False` refuses a non-empty `out_dir`; a training workdir, checkpoint or git repository is never
    replaced. Under multi-host every process calls this (`tensors()` gathers) and process 0 writes.
    """
    out = Path(out_dir).expanduser().absolute()
    outputs.check_target(out, kind="export", overwrite=overwrite)
    arrays = tensors()
    if jax.process_index() != 0:
        return out
    with outputs.output_dir(out, kind="export", overwrite=overwrite) as tmp:
        config = model.config
        config.dtype = str(next(iter(arrays.values())).dtype)
        config.save_pretrained(tmp)
        safetensors.numpy.save_file(arrays, tmp / SAFETENSORS, metadata={"format": "pt"})
        write_extras(tmp)
    return out
