"""Configs and command-line overrides.

A config is a Python module with `get_config(arg=None) -> ml_collections.ConfigDict` (ml_collections style,
as in big_vision): one shipped in the top-level `configs/` folder given by name (`clip_refine:model=vitb16`), or
a file given by path (`my_config.py:ARG`); both start from `jax_refine.config_base`. Overrides use the dotted
path of a field: `--config.train.batch_size=256 --config.mesh.shape.fsdp=4 --config.train.freeze='("^vision/",)'`.
An override of a key that does not exist is an error with a did-you-mean suggestion, never ignored.
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import ml_collections

from jax_refine import config_base
from jax_refine.config_base import ConfigError  # what every caller catches; defined beside parse_arg

# Names of the per-experiment config files that `clip_refine` replaced; they still work as config names,
# and `OLD_NAME:PRESET` is `clip_refine:...,mesh=PRESET`.
OLD_CONFIG_NAMES = {
    f"{method}_{model}_coco": f"clip_refine:method={method},model={model}"
    for method, model in (("clip_refine", "vitb32"), ("clip_refine", "vitb16"), ("clip_refine", "vitl14"),
                          ("contrastive", "vitb32"), ("self_kd", "vitb32"), ("feature_distill", "vitb32"),
                          ("logit_distill", "vitb32"), ("hycd", "vitb32"), ("rafa", "vitb32"), ("m2_mix", "vitb32"))
}


def configs_dir() -> Path:
    """The shipped configs' folder: the installed wheel's copy (`jax_refine/configs/`, mapped from the top-level
    `configs/` by pyproject.toml) or, in a clone, `configs/` beside the package."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    # default.py, not the folder: a clone may keep a stale jax_refine/configs/__pycache__ from the old layout
    return installed if (installed / "default.py").is_file() else package.parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs in `configs_dir()`."""
    return sorted(p.stem for p in configs_dir().glob("*.py") if not p.name.startswith("_"))


def _known() -> str:
    return f"shipped configs: {', '.join(shipped_configs())}; old names like {next(iter(OLD_CONFIG_NAMES))}"


def _import_file(path: Path, name: str) -> ModuleType:
    """The config file `path` executed as module `name` (importlib's recipe for importing a source file)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an imported module is: dataclasses and pickle look classes up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _load_file(path: Path, name: str) -> ModuleType:
    """`_import_file(path, name)`; an error inside the file is a ConfigError naming it."""
    try:
        return _import_file(path, name)
    except ImportError as e:
        hint = " (the base config is `from jax_refine import config_base`, `config_base.get_config()`)" \
            if e.name in ("configs", "jax_refine.configs") else ""  # a file written for an older layout
        raise ConfigError(f"cannot load config file {path}: {type(e).__name__}: {e}{hint}") from e
    except (SyntaxError, NameError, AttributeError) as e:  # a mistake inside the user's file
        raise ConfigError(f"cannot load config file {path}: {type(e).__name__}: {e}") from e


@functools.cache
def shipped_module(name: str) -> ModuleType:
    """The module of the shipped config `name` (e.g. `shipped_module("tiny_test").TINY_CLIP`), loaded by path
    from `configs_dir()` once. Raises ConfigError for a name that is not shipped."""
    if name not in shipped_configs():
        raise ConfigError(f"unknown config {name!r} ({_known()}; or a file path)")
    return _load_file(configs_dir() / f"{name}.py", f"jax_refine_shipped_config_{name}")


def load_config_file(spec: str | Path) -> ml_collections.ConfigDict:
    """The config of `spec`: `NAME[:ARG]` (a config shipped in configs/, or an old name in `OLD_CONFIG_NAMES`)
    or `PATH.py[:ARG]` (any file; a spec with a `/` or a `.py` suffix is a path).

    Calls `get_config(ARG)`, or `get_config()` without ARG. Raises ConfigError naming the config.
    """
    name, _, arg = str(spec).partition(":")
    if name in OLD_CONFIG_NAMES:  # an old per-experiment name; its ARG was a mesh preset
        name, _, alias_arg = OLD_CONFIG_NAMES[name].partition(":")
        arg = ",".join(filter(None, (alias_arg, arg and f"mesh={arg}")))
    if "/" in name or name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file not found: {name} ({_known()})")
        module, where = _load_file(path, f"jax_refine_config_{path.stem}"), str(path)
    else:
        module, where = shipped_module(name), name
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {where} has no get_config() function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{where}: get_config({arg!r}) failed: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{where}: get_config() must return an ml_collections.ConfigDict")
    return config


def _parse_value(text: str):
    """Python literal if it parses as one (`256`, `1e-6`, `True`, `None`, `('a', 'b')`), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _field_type(node: ml_collections.ConfigDict, leaf: str) -> type | None:
    """The type ``node.leaf`` holds (a ``placeholder(T)`` still None: T)."""
    try:
        return node.get_type(leaf)
    except (KeyError, AttributeError):
        return None if node[leaf] is None else type(node[leaf])


def _is_bool_field(node: ml_collections.ConfigDict, leaf: str) -> bool:
    """Whether ``node.leaf`` holds a bool, or is a ``placeholder(bool)`` still None."""
    return _field_type(node, leaf) is bool


def _float_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply `config.a.b=value` (or `a.b=value`) strings to a copy of `config`.

    Raises ConfigError naming the key for unknown keys and values of the wrong type.
    """
    config = ml_collections.ConfigDict(config.to_dict(preserve_field_references=True))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.removeprefix("--").removeprefix("config.")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form --config.KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} in override {item!r}"
                                  + _did_you_mean(part, node))
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown config key {key!r} in override {item!r}" + _did_you_mean(leaf, node))
        value = _parse_value(text)
        if _is_bool_field(node, leaf) and text.strip().lower() in ("true", "false"):
            value = text.strip().lower() == "true"  # false, FALSE, False alike (a shell user types any)
        elif _field_type(node, leaf) is float and isinstance(value, str):
            value = _float_or_text(text)  # inf, nan: a number, refused by check_values with the rule it breaks
        if isinstance(node[leaf], str) and not isinstance(value, str):
            value = text  # a string field keeps the text as typed (e.g. --config.workdir=123)
        if isinstance(node[leaf], tuple) and isinstance(value, (str, list)):
            value = (value,) if isinstance(value, str) else tuple(value)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"bad value for config key {key!r}: {text!r} ({e})") from e
    return config


# Names people type for our keys (other libraries' spellings) -> our key.
ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "batchsize": "batch_size", "bs": "batch_size",
           "steps": "num_steps", "max_steps": "num_steps", "num_epochs": "epochs"}


def _did_you_mean(name: str, node: ml_collections.ConfigDict) -> str:
    if ALIASES.get(name) in node:
        return f"; did you mean {ALIASES[name]!r}?"
    close = difflib.get_close_matches(name, list(node.keys()), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(node.keys()))}"


# Sections only some configs have (checked by their own users), and keys whose contents are free-form.
EXTRA_SECTIONS = ("demo", "world", "study")
FREE_FORM = ("model.random_init", "method.prior_params")


def check_schema(config: ml_collections.ConfigDict, source: str,
                 schema: ml_collections.ConfigDict | None = None, prefix: str = "") -> None:
    """Raise ConfigError for a key of `config` that the base config (jax_refine/config_base.py) does not have
    (did-you-mean).

    `source` names the file in the message. Sections in EXTRA_SECTIONS and keys in FREE_FORM are not checked.
    """
    schema = config_base.get_config() if schema is None else schema
    for key in config.keys():
        dotted = f"{prefix}{key}"
        if not prefix and key in EXTRA_SECTIONS or dotted in FREE_FORM:
            continue
        if key not in schema:
            raise ConfigError(f"{source}: unknown config key {dotted!r}" + _did_you_mean(key, schema))
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(schema[key], ml_collections.ConfigDict):
            check_schema(config[key], source, schema[key], dotted + ".")


# (dotted key, test, what it must be): checked before anything is built; absent keys are skipped.
def _int_at_least(n):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= n


VALUE_CHECKS = (
    ("optimizer.lr", lambda v: v > 0, "> 0"),
    ("optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optimizer.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optimizer.eps", lambda v: v > 0, "> 0"),
    ("optimizer.warmup_steps", _int_at_least(0), "an integer >= 0"),
    ("optimizer.schedule", lambda v: v in ("constant", "warmup_cosine"), "constant or warmup_cosine"),
    ("train.batch_size", _int_at_least(1), "an integer >= 1"),
    ("train.epochs", _int_at_least(1), "an integer >= 1"),
    ("train.num_steps", lambda v: v is None or _int_at_least(1)(v), "None or an integer >= 1"),
    ("train.grad_accum", _int_at_least(1), "an integer >= 1"),
    ("train.clip_norm", lambda v: v is None or v > 0, "None or > 0"),
    ("train.divergence_factor", lambda v: v >= 0, ">= 0 (0: stop on non-finite values only)"),
    ("train.divergence_grad_norm_factor", lambda v: v >= 0, ">= 0 (0: stop on a non-finite gradient norm only)"),
    ("train.divergence_window", _int_at_least(1), "an integer >= 1"),
    ("method.alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("method.temperature", lambda v: v > 0, "> 0"),
    ("method.m2_beta", lambda v: v > 0, "> 0"),
    ("model.dtype", lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16"),
    ("data.caption_mode", lambda v: v in ("random", "all"), "random or all"),
    ("data.shuffle_buffer", _int_at_least(0), "an integer >= 0"),
    ("checkpoint.every_steps", _int_at_least(1), "an integer >= 1"),
    ("checkpoint.max_to_keep", _int_at_least(1), "an integer >= 1"),
    ("log.every_steps", _int_at_least(1), "an integer >= 1"),
    ("eval.batch_size", _int_at_least(1), "an integer >= 1"),
    ("eval.max_examples", lambda v: v is None or _int_at_least(1)(v), "None or an integer >= 1"),
)


def _finite(value) -> bool:
    """False for a NaN or infinite float (``inf > 0`` holds: every range check needs this too)."""
    return not isinstance(value, float) or math.isfinite(value)


def check_values(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming the first key whose value is out of range (lr <= 0, batch_size < 1, ...) or,
    for a number, not finite (inf, nan)."""
    for key, ok, what in VALUE_CHECKS:
        node = config
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        else:
            try:
                good = ok(node)
            except TypeError:
                good = False
            if not _finite(node):
                raise ConfigError(f"config.{key}={node!r} is invalid: must be a finite number, {what}")
            if not good:
                raise ConfigError(f"config.{key}={node!r} is invalid: must be {what}")


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """`load_config_file(path)`, checked against the base config's keys (jax_refine/config_base.py), then
    `apply_overrides`, then `check_values`."""
    config = load_config_file(path)
    check_schema(config, str(path).partition(":")[0])
    config = apply_overrides(config, overrides)
    check_values(config)
    return config
