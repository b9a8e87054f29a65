"""An algorithm's constructor parameters, read once for the registry (``accepted_hyperparameters``),
``textgym train --help`` and the config checks (``textgym.pipeline.hyperparameters``) and saving
(``agents.serialization``): the keyword parameters of every ``__init__`` along the class's MRO, the
most derived declaration of each winning, with the defaults a class declares in
``hyperparameter_defaults`` (how GRPO, RLOO and REINFORCE++ change a default of the critic-free
base without repeating its constructor).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConstructorParameter:
    """One keyword parameter: its name, default (``inspect.Parameter.empty`` if required) and the
    ``__init__`` that declares it (whose annotations type it)."""

    name: str
    default: Any
    init: Any


def constructor_parameters(cls: type) -> dict[str, ConstructorParameter]:
    """``cls``'s keyword parameters by name, in MRO order (module docstring)."""
    found: dict[str, ConstructorParameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self" or p.name in found:
                continue
            found[p.name] = ConstructorParameter(p.name, p.default, init)
    for name, default in getattr(cls, "hyperparameter_defaults", {}).items():
        if name not in found:
            raise TypeError(f"{cls.__name__}.hyperparameter_defaults names {name!r}, which no constructor takes")
        found[name] = ConstructorParameter(name, default, found[name].init)
    return found
