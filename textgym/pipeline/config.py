"""Configs as dataclasses that double as YAML files and command-line overrides.

Every config of the command line (``train``, ``sft``, ``rm``) is a dataclass. ``load_config``
builds one from a YAML file (optional) and ``key=value`` overrides (``agent.algo=a2c``,
``env.kwargs.max_new_tokens=16``), validating every key and type: an unknown key or a wrong type
raises ``ConfigError`` naming the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string (it wants ``1.0e-5``); configs are full of such numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def yaml_load_file(path: str | Path) -> Any:
    """The YAML file at ``path``; any error is a ``ConfigError`` naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as f:  # a named stream: YAML errors cite the file, not <unicode string>
            return yaml.load(f, Loader=_Loader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None


# Loader options that run code shipped with a model, dataset or file. A config may come from
# someone else (``textgym eval RUN_DIR`` and ``--resume`` read the run's own config.yaml), so no
# config may set them; a Python caller can still pass them explicitly.
CODE_EXECUTING_OPTIONS = {  # name -> (why it is refused, the values that are harmless)
    "trust_remote_code": ("it runs Python code shipped with a model or dataset", (None, False)),
    "custom_objects": ("it replaces objects when unpickling", (None, {})),
    "weights_only": ("weights_only=false unpickles (runs) whatever a .bin file holds", (None, True)),
}


def check_no_code_options(data: Any, key: str = "", where: str = "config") -> None:
    """Refuse any code-executing loader option (``CODE_EXECUTING_OPTIONS``) anywhere in ``data``."""
    if isinstance(data, dict):
        for name, value in data.items():
            path = f"{key}.{name}" if key else str(name)
            if name in CODE_EXECUTING_OPTIONS and not any(
                    value is safe or (type(value) is type(safe) and value == safe)
                    for safe in CODE_EXECUTING_OPTIONS[name][1]):
                raise ConfigError(
                    f"{where} key {path!r} is refused: {CODE_EXECUTING_OPTIONS[name][0]}, so configs and run "
                    f"directories may not set it to {value!r}. Pass {name}= from Python if you trust the source."
                )
            check_no_code_options(value, path, where)
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            check_no_code_options(value, f"{key}[{i}]", where)


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict, checking keys and types."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys of {where}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{prefix}{name}")
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _convert(hint: Any, value: Any, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r} must be {_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return value
    return value


def _name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    return " or ".join(names) + (" or null" if type(None) in typing.get_args(hint) else "")


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a": {"b": 1}, "c": ["x", "y"]}`` (values parsed as YAML)."""
    result: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. agent.algo=a2c)")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return result


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge: ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def defaults(cls: type) -> dict:
    """The default values of ``cls``'s fields as a nested dict (fields without a default left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = (dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type)
                           else value)
    return out


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Any:
    """``cls`` from its defaults, updated by ``base`` (a dict), by the YAML file at ``path``, then by
    ``overrides``. Mappings merge key by key, so ``agent.hyperparameters.n_steps=8`` keeps the other
    default hyperparameters."""
    data: dict = merge(defaults(cls), base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        loaded = yaml_load_file(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        check_no_code_options(loaded, where=f"config file {str(path)!r}:")
        data = merge(data, loaded)
    parsed = parse_overrides(overrides or [])
    check_no_code_options(parsed, where="override")
    data = merge(data, parsed)
    check_no_code_options(data)
    return from_dict(cls, data)


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
