"""Configs as dataclasses that double as YAML files and command-line overrides.

Every config of the command line (``train``, ``sft``, ``rm``, ``bench rewards``) is a dataclass
whose fields are declared once, TRL-style, with :func:`option`: type (the annotation), default,
help and bounds. One loader (:func:`from_dict`, behind :func:`load_config`) enforces all of it and
raises ``ConfigError`` naming the key, the bad value and what is valid; the same declarations
generate ``textgym train --help`` (:func:`describe`). ``load_config`` builds a config from its
defaults, a YAML file (optional) and ``key=value`` overrides (``agent.algo=a2c``,
``env.kwargs.max_new_tokens=16``); :func:`validated` applies the same checks to a config built in
Python.

A rule that no single field can state (two fields that must agree, a value derived from another)
lives in the config's ``resolve()`` method, which the loader calls once every field has passed its
own checks: that is the only other place a config is checked.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Union

import yaml

MISSING: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type or out of its range."""


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


# --- declaring fields ---------------------------------------------------------------------------


def option(default: Any = MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
           gt: float | None = None, lt: float | None = None, choices: Iterable | Callable[[], Iterable] | None = None,
           nonempty: bool = False, what: str | None = None) -> Any:
    """A config field declared once: its default, its help and what values are valid.

    :param default: the default value (a mapping or list is copied for each config).
    :param help: one line for ``--help`` and the docs.
    :param min: smallest valid value (inclusive); ``gt``: the value must be greater than this.
    :param max: largest valid value (inclusive); ``lt``: the value must be less than this.
    :param choices: the valid values, or a function returning them (for registries that grow).
    :param nonempty: refuse null, ``""`` and empty lists (a required setting, or one that may not be blank).
    :param what: the valid values in words, for error messages (``"an algorithm"``).
    """
    metadata = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "choices": choices,
                "nonempty": nonempty, "what": what}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def keyed_sections(help: str, *, keys: Callable[[], Iterable[str]], check: Callable[[str, Any, str], dict],
                   default: Callable[[], dict], label: str) -> Any:
    """A field holding sub-sections named by a registry (``agent.ppo``, ``agent.grpo``): in YAML and
    overrides each sub-section is a key of the enclosing section, not of this field.

    :param keys: the valid sub-section names (called at load time, so registrations count).
    :param check: ``check(name, value, key) -> value``: checks one sub-section (``key`` is its full key).
    :param default: the sub-sections a config starts with.
    :param label: how ``--help`` names a sub-section (``"<algo>"``).
    """
    return dataclasses.field(default_factory=default, metadata={
        "help": help, "keyed_sections": keys, "check": check, "label": label})


def _keyed(cls: type) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(cls) if "keyed_sections" in f.metadata), None)


# --- the loader ---------------------------------------------------------------------------------


def from_dict(cls: type, data: dict | None, prefix: str = "", *, owner: str | None = None) -> Any:
    """Build dataclass ``cls`` from a (nested) dict, enforcing every field's declaration (key, type,
    bounds, choices), then the config's ``resolve()``. Errors name the key as ``prefix + name``;
    range errors also name the config (``owner``, default: ``cls``'s name for a top-level config)."""
    owner = (cls.__name__ if not prefix else "") if owner is None else owner
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    keyed = _keyed(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f is not keyed}
    section_names = list(keyed.metadata["keyed_sections"]()) if keyed else []
    unknown = sorted(set(data) - set(fields) - set(section_names), key=str)
    if unknown:
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"unknown config key {prefix + str(unknown[0])!r}; valid keys of {where}: "
                          f"{', '.join([*fields, *section_names])}")
    hints = typing.get_type_hints(cls)
    values = {name: convert(hints[name], data[name], f"{prefix}{name}", owner) for name in fields if name in data}
    if keyed:
        sections = field_default(keyed)
        for name in section_names:
            if name in data:
                sections[name] = keyed.metadata["check"](name, data[name], f"{prefix}{name}")
        values[keyed.name] = sections
    obj = cls(**values)
    for name, f in fields.items():
        check_value(f, getattr(obj, name), _label(owner, prefix + name))
    if hasattr(obj, "resolve"):
        obj.resolve()
    return obj


def _label(owner: str, key: str) -> str:
    return f"{owner}.{key}" if owner else key


def check_value(f: dataclasses.Field, value: Any, label: str) -> None:
    """Enforce ``f``'s declared ``nonempty``, ``choices`` and bounds (see :func:`option`) on ``value``."""
    meta = f.metadata
    if meta.get("nonempty") and (value is None or (isinstance(value, (str, list, dict)) and not value)):
        raise ConfigError(f"{label} must be {meta.get('what') or 'set (not empty)'}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None:
        valid = list(choices() if callable(choices) else choices)
        if value not in valid:
            raise ConfigError(f"{label} {value!r} is not {meta.get('what') or 'valid'}; "
                              f"valid: {', '.join(map(str, valid))}")
    bounds = {k: meta.get(k) for k in ("min", "max", "gt", "lt")}
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    finite = isinstance(value, int) or math.isfinite(value)
    if not finite or not all(limit is None or compare(value, limit) for compare, limit in (
            (operator.ge, bounds["min"]), (operator.le, bounds["max"]),
            (operator.gt, bounds["gt"]), (operator.lt, bounds["lt"]))):
        kind = "an integer" if isinstance(value, int) else ("a finite number" if not finite else "a number")
        raise ConfigError(f"{label} must be {kind}{describe_range(**bounds)}, got {value!r}")


def describe_range(min: float | None = None, max: float | None = None, gt: float | None = None,
                   lt: float | None = None) -> str:
    """`` >= 1``, `` in [0, 1)``, or ``""`` without bounds."""
    low = (f"[{min:g}", f">= {min:g}") if min is not None else (f"({gt:g}", f"> {gt:g}") if gt is not None else None
    high = (f"{max:g}]", f"<= {max:g}") if max is not None else (f"{lt:g})", f"< {lt:g}") if lt is not None else None
    if low and high:
        return f" in {low[0]}, {high[0]}"
    bound = low or high
    return f" {bound[1]}" if bound else ""


def convert(hint: Any, value: Any, key: str, owner: str = "") -> Any:
    """``value`` as type ``hint`` (an int becomes a float where a float is due), or ``ConfigError``."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".", owner=owner)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option_ in options:
            if option_ is type(None):
                continue
            try:
                return convert(option_, value, key, owner)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r} must be {type_name(hint).replace(' | ', ' or ')}, got {value!r}")
    if hint is Any:
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [convert(item, v, f"{key}[{i}]", owner) for i, v in enumerate(value)]
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
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"config key {key!r} must be null, got {value!r}")
        return None
    return value


_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "str", dict: "mapping", list: "list",
               type(None): "null", Any: "any"}


def type_name(hint: Any) -> str:
    """``int``, ``float | null``, ``list``, ``mapping``...: how ``--help`` and errors name a type."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        return " | ".join([type_name(a) for a in args if a is not type(None)]
                          + (["null"] if type(None) in args else []))
    if origin in (list, tuple) and typing.get_args(hint):
        return f"list of {type_name(typing.get_args(hint)[0])}"
    return _TYPE_NAMES.get(origin or hint, getattr(hint, "__name__", str(hint)))


def validated(obj: Any) -> Any:
    """``obj`` (a config built in Python) checked by the loader, as a config loaded from YAML would
    be: a checked copy, or ``ConfigError``."""
    return from_dict(type(obj), to_dict(obj))


# --- dicts, files and overrides -----------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """A config as the nested dict its YAML file holds (keyed sub-sections at their section's level)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name))
            if "keyed_sections" in f.metadata:
                out.update(value)
            else:
                out[f.name] = value
        return out
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return copy.deepcopy(obj)


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


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (its factory called), or ``ConfigError`` for a required one."""
    if f.default is not MISSING:
        return f.default
    if callable(f.default_factory):
        return f.default_factory()
    raise ConfigError(f"{f.name} has no default: it must be set")


def defaults(cls: type) -> dict:
    """The default values of ``cls``'s fields as a nested dict (fields without a default left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not MISSING:
            out[f.name] = copy.deepcopy(f.default)
        elif callable(f.default_factory):
            value = to_dict(f.default_factory())
            if "keyed_sections" in f.metadata:
                out.update(value)
            else:
                out[f.name] = value
    return out


def read_layers(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """What a YAML file (optional) and ``key=value`` overrides set, merged, without defaults; any
    code-executing option in them refused."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        loaded = yaml_load_file(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        check_no_code_options(loaded, where=f"config file {str(path)!r}:")
        data = loaded
    parsed = parse_overrides(overrides or [])
    check_no_code_options(parsed, where="override")
    return merge(data, parsed)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Any:
    """``cls`` from its defaults, updated by ``base`` (a dict), by the YAML file at ``path``, then by
    ``overrides``. Mappings merge key by key, so ``agent.hyperparameters.n_steps=8`` keeps the other
    hyperparameters."""
    data = merge(merge(defaults(cls), base or {}), read_layers(path, overrides))
    check_no_code_options(data)
    return from_dict(cls, data)


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


# --- help ---------------------------------------------------------------------------------------


def describe(cls: type, prefix: str = "", width: int = 100) -> str:
    """Every key of config ``cls`` with its type, default, valid values and help, one entry each:
    the text of ``--help``, generated from the declarations."""
    lines = []
    hints = typing.get_type_hints(cls)

    def entry(text: str) -> None:
        lines.append(textwrap.fill(text, width=width, initial_indent="  ", subsequent_indent="      "))

    for f in dataclasses.fields(cls):
        key, hint, meta = prefix + f.name, hints[f.name], f.metadata
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            lines.append(describe(hint, key + ".", width))
            continue
        default = field_default(f)
        if "keyed_sections" in meta:
            entry(f"{prefix}{meta['label']} (mapping; one of {', '.join(meta['keyed_sections']())}): {meta['help']}")
            for name, value in default.items():
                entry(f"    {prefix}{name} default {_show(value)}")
            continue
        facts = [type_name(hint), f"default {_show(default)}"]
        bounds = describe_range(**{k: meta.get(k) for k in ("min", "max", "gt", "lt")}).strip()
        if bounds:
            facts.append(bounds)
        if meta.get("choices") is not None:
            choices = meta["choices"]
            facts.append("one of " + ", ".join(map(str, choices() if callable(choices) else choices)))
        if meta.get("nonempty"):
            facts.append("required" if default in (None, "", [], {}) else "not empty")
        entry(f"{key} ({'; '.join(facts)})" + (f": {meta['help']}" if meta.get("help") else ""))
    return "\n".join(lines)


def _show(value: Any) -> str:
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**6, sort_keys=False)
    return text.strip().removesuffix("...").strip()  # a lone scalar is dumped as a document: "20\n...\n"
