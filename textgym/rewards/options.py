"""Checks of the options and metadata that the built-in rewards take."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any


def _choice(arg: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    if value not in choices:
        raise ValueError(f"invalid {arg} {value!r}; valid choices: {', '.join(map(repr, choices))}")
    return value


def _finite(arg: str, value: Any) -> float:
    """Return ``value`` as float if it is a finite real number, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{arg} must be a finite number, got {value!r}")
    return float(value)


def _texts(prompts: list[str], completions: list[str], include_prompt: bool) -> list[str]:
    """The texts to score: completions, or prompt + completion."""
    return [p + c for p, c in zip(prompts, completions)] if include_prompt else completions


def _references(name: str, metadata: Mapping[str, Any], n: int) -> list[list[str]]:
    """Per-sample reference lists from ``metadata['references']``."""
    if metadata.get("references") is None:
        raise ValueError(
            f"reward {name!r} needs metadata `references` "
            "(one reference string or list of reference strings per completion)"
        )
    refs = metadata["references"]
    if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) != n:
        raise ValueError(f"reward {name!r}: metadata `references` must be a list of {n} entries")
    out: list[list[str]] = []
    for i, ref in enumerate(refs):
        ref_list = [ref] if isinstance(ref, str) else list(ref)
        if not ref_list or not all(isinstance(r, str) for r in ref_list):
            raise ValueError(
                f"reward {name!r}: references[{i}] must be a string "
                f"or a non-empty list of strings, got {ref!r}"
            )
        out.append(ref_list)
    return out
