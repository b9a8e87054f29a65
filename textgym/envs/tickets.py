"""Tickets: how an agent's policy reads what the engine's KV-cached step already computed for the
observation it was handed (next-token logits, last hidden states, the nucleus mask) instead of
recomputing it. Whoever hands out an observation names the rows it shows (``name_rows``), and
``cached_outputs`` serves those rows only while the engine has not moved on since (its
``version``): nothing else is ever served, so an observation without a current ticket is computed
afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class EngineRows:
    """Rows of one engine named as they stood at one moment: the ticket with which the holder of an
    observation of them reads the engine's cached outputs for it (``TextGenCore.cached_outputs``).

    :param engine: the engine whose rows these are.
    :param rows: the row indices, in the observation's order.
    :param version: the engine's ``version`` when they were named; the ticket is stale once the
        engine has moved on (a step, a reset, a stop).
    """

    engine: Any = field(repr=False)
    rows: tuple[int, ...]
    version: int


@dataclass(frozen=True, eq=False)
class CachedOutputs:
    """What the engine's KV-cached decoding computed for the current state of some rows.

    :param logits: the policy LM's next-token logits ``[k, V]`` (fp32), unmasked.
    :param states: the policy LM's last hidden states ``[k, H]``, or None when the engine does not
        keep them (``IncrementalLM.hidden``).
    :param allowed: with a nucleus mask (``set_nucleus_mask``), the allowed tokens ``[k, V]``; else None.
    """

    logits: torch.Tensor
    states: torch.Tensor | None
    allowed: torch.Tensor | None


def name_rows(engine: Any, rows=None) -> EngineRows:
    """A ticket for the current state of ``rows`` (default: all), to be handed out with their
    observation (see ``cached_outputs``)."""
    rows = range(engine.n) if rows is None else rows
    return EngineRows(engine, tuple(int(r) for r in rows), engine.version)


def _current(engine: Any, named: EngineRows) -> bool:
    if named.engine is not engine:
        raise ValueError("these EngineRows name the rows of another engine: ask the engine that named them")
    return named.version == engine.version and bool(engine.live[list(named.rows)].all())


def _index(engine: Any, rows: tuple[int, ...]):
    """Index of ``rows`` into the decoders' ``[n, ...]`` tensors (all rows: no copy)."""
    return slice(None) if rows == tuple(range(engine.n)) else torch.as_tensor(rows, device=engine.device)


def cached_outputs(engine: Any, named: EngineRows) -> CachedOutputs | None:
    """The outputs the KV-cached step computed for the current observations of the rows
    ``named`` names (pending prompts are encoded first), or None when the ticket is stale: the
    engine moved on since the rows were named, or one of them is not running. Nothing else is
    ever served: an observation without a current ticket must be computed afresh."""
    if not _current(engine, named):
        return None
    engine.ensure_started()
    index = _index(engine, named.rows)
    states = engine.policy.states[index] if engine.policy.states is not None else None
    allowed = engine.acting.nucleus_allowed(index) if engine.acting.nucleus is not None else None
    return CachedOutputs(engine.policy.logits[index], states, allowed)


def cached_states(engine: Any, named: EngineRows) -> tuple[np.ndarray, torch.Tensor] | None:
    """For a bootstrap: ``(started, states)``, where ``started`` (bool ``[k]``) marks the named
    rows whose prompts are encoded and ``states`` are their cached last hidden states. Rows
    reset by the last step (pending) are left unencoded: their episodes just ended, so their
    bootstrap is multiplied by ``1 - done = 0``, and their prompts are encoded when first needed,
    with the weights of then. None when the ticket is stale or no hidden states are kept."""
    if not _current(engine, named) or engine.policy.states is None:
        return None
    started = ~engine.pending[list(named.rows)]
    rows = torch.as_tensor(np.asarray(named.rows)[started], dtype=torch.long, device=engine.device)
    return started, engine.policy.states[rows]
