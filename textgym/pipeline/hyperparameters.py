"""Each algorithm's hyperparameters, read from its constructor: the one source of their names,
types, defaults and help.

An algorithm's hyperparameters are the keyword arguments its constructor chain takes
(``agents.accepted_hyperparameters``) less those ``textgym train`` sets itself
(``NOT_HYPERPARAMETERS``); a hyperparameter's type is its annotation in the most derived
constructor that names it, narrowed to what a YAML value can be (``float | Schedule`` -> ``float``),
its default that constructor's default, and its help the ``:param:`` line of the first class in the
chain that documents it. So a new algorithm, or a new argument of one, needs no config edit.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from textgym import agents
from textgym.pipeline.config import ConfigError, convert, type_name

# Constructor arguments of the algorithms that textgym train sets itself.
NOT_HYPERPARAMETERS = {"policy": "the algorithm's LM policy", "env": "the env section", "device": "the env's model",
                       "seed": "training.seed", "lora": "model.lora", "tensorboard_log": "training.output_dir",
                       **dict.fromkeys(("_init_setup_model", "monitor_wrapper", "support_multi_env",
                                        "supported_action_spaces", "rollout_buffer_class"), "stable-baselines3")}

_YAML_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Hyperparameter:
    """One keyword argument of an algorithm's constructor.

    :param name: the argument's name.
    :param hint: the values a config may give it: its annotation narrowed to YAML types; ``Any``
        where the annotation names none (then any value passes to the constructor, which checks it).
    :param default: the constructor's default (``inspect.Parameter.empty`` when it has none).
    :param help: its ``:param:`` text, or "".
    """

    name: str
    hint: Any
    default: Any
    help: str


def of(algo: str) -> dict[str, Hyperparameter]:
    """The hyperparameters of registered algorithm ``algo``, by name (sorted)."""
    cls = agents.get_class(algo)
    return _of_class(cls, frozenset(agents.accepted_hyperparameters(algo) - set(NOT_HYPERPARAMETERS)))


@functools.cache
def _of_class(cls: type, names: frozenset[str]) -> dict[str, Hyperparameter]:
    found = {name: Hyperparameter(name, yaml_hint(_hints(p.init).get(name, Any)), p.default, _doc(cls, name))
             for name, p in agents.constructor_parameters(cls).items() if name in names}
    return dict(sorted(found.items()))


def _hints(init: Any) -> dict[str, Any]:
    """``init``'s annotations, evaluated; one that cannot be (a name imported only for type
    checkers, as in stable-baselines3's A2C) counts as ``Any``."""
    try:
        return typing.get_type_hints(init)
    except Exception:  # any annotation that fails: evaluate them one by one
        out = {}
        for name, annotation in getattr(init, "__annotations__", {}).items():
            try:
                out[name] = eval(annotation, init.__globals__) if isinstance(annotation, str) else annotation
            except Exception:
                out[name] = Any
        return out


def yaml_hint(hint: Any) -> Any:
    """``hint`` narrowed to what a YAML value can be: ``float | Schedule`` -> ``float``; ``Any`` when
    nothing of it can come from YAML."""
    if hint in _YAML_TYPES or hint in (dict, list):
        return hint
    origin = typing.get_origin(hint)
    if origin in (dict, list):
        return hint
    if origin in (Union, types.UnionType):
        kept = [a for a in typing.get_args(hint) if yaml_hint(a) is not Any]
        if not kept or kept == [type(None)]:
            return Any
        return functools.reduce(operator.or_, kept)
    return Any


def _doc(cls: type, name: str) -> str:
    pattern = re.compile(rf":param {re.escape(name)}:(.*?)(?=\n\s*:param|\n\s*:return|\n\s*\n|\Z)", re.S)
    for klass in cls.__mro__:
        for doc in (klass.__doc__, getattr(klass.__dict__.get("__init__"), "__doc__", None)):
            match = pattern.search(doc or "")
            if match:
                return " ".join(match.group(1).split())
    return ""


def check(algo: str, values: Any, prefix: str) -> dict:
    """``values`` checked as hyperparameters of ``algo``: each a hyperparameter of it, of its type
    (converted: an int where a float is due becomes a float). ``prefix`` names the mapping in
    errors (``"agent.hyperparameters."``)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.')} must be a mapping of {algo}'s hyperparameters, got {values!r}")
    specs = of(algo)
    out = {}
    for name, value in values.items():
        if name in NOT_HYPERPARAMETERS:
            raise ConfigError(f"{prefix}{name} is set by textgym train ({NOT_HYPERPARAMETERS[name]}), "
                              "not by the config")
        if name not in specs:
            takers = [a for a in agents.names() if a != algo and name in of(a)]
            where = (f"of {algo}, only of {', '.join(takers)} (agent.<algo> keeps a setting for one algorithm)"
                     if takers else "of any algorithm")
            raise ConfigError(f"{prefix}{name} is not a hyperparameter {where}; valid for {algo}: {', '.join(specs)}")
        out[name] = convert(specs[name].hint, value, f"{prefix}{name}")
        if name == "learning_rate":
            _check_learning_rate(out[name], f"{prefix}{name}")
    return out


def _check_learning_rate(value: Any, key: str) -> None:
    """A learning rate is a finite number > 0 (0 would train nothing without a word; a negative one
    fails inside torch's optimizer, naming no key), or null: the default by model size."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be a finite number > 0 (or null: the default by model size and LoRA), "
                          f"got {value!r}")


def describe(width: int = 100) -> str:
    """Every algorithm's hyperparameters for ``--help``: per name, which algorithms take it with
    what type, default and help (one line per variant)."""
    variants: dict[str, dict[tuple, list[str]]] = {}
    for algo in agents.names():
        for hp in of(algo).values():
            default = "required" if hp.default is inspect.Parameter.empty else f"default {hp.default!r}"
            variants.setdefault(hp.name, {}).setdefault((type_name(hp.hint), default, hp.help), []).append(algo)
    lines = []
    for name in sorted(variants):
        lines.append(f"  {name}")
        for (kind, default, help_), algos in variants[name].items():
            text = f"{', '.join(algos)} ({kind}; {default})" + (f": {help_}" if help_ else "")
            lines.append(textwrap.fill(text, width=width, initial_indent="      ", subsequent_indent="          "))
    return "\n".join(lines)
