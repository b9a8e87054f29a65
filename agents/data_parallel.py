"""Minibatches of the global batch, for updates that run data-parallel (``textgym.distributed``).

With N ranks, each holds the rollout of its share of the env's rows. An update still takes the
steps one process would take on the whole (global) batch:

- **The same minibatches.** ``minibatches`` draws the global minibatches exactly as one process
  draws them from its buffer (the same shuffle of whole entries, episode segments or episodes,
  with numpy's global RNG, which every rank seeds alike): the ranks exchange their entries' lengths
  once per rollout (``rank_lengths``), lay them out in the single process's order (``global_order``), shuffle and cut,
  and each rank evaluates its own entries of every minibatch. So every rank takes every optimizer
  step. A rank with no entry in a minibatch evaluates a stand-in entry of its own that counts for
  nothing (``Share.stand_in``).
- **The same loss.** The losses are means over a minibatch (of transitions, completions or
  tokens). As a micro-batch's loss is its share of the minibatch's (``agents.update``), a rank's
  is its part's: its sum divided by the count of the *whole* minibatch (``Share.mean``,
  ``Share.total``). The sum of the ranks' gradients (``GradientStep.step``) is then the gradient of
  the minibatch's mean, and the sum of their logged figures is the minibatch's figure, the early
  stopping KL included, so every rank decides alike.
- **The same normalisation.** Advantages are normalised with the whole minibatch's mean and
  standard deviation (``Share.normalize``).

Without a process group all of this is the single process's own computation, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from textgym import distributed

UNITS = ("items", "tokens")


@dataclass(frozen=True)
class Share:
    """This rank's part of one minibatch: ``local[unit]`` of the minibatch's ``total[unit]``.

    Units: ``"items"``, the rows the losses average over (transitions for PPO and A2C, completions
    for the critic-free algorithms), and ``"tokens"``, the completion tokens (the same as items in a
    buffer of transitions). A stand-in part (the rank has no entry in the minibatch but evaluates
    one of its own to take part in the step) counts 0 and ``stand_in`` is True.
    """

    local: dict[str, int]
    total: dict[str, int]

    @property
    def stand_in(self) -> bool:
        return self.local["items"] == 0

    def mean(self, unit: str = "items") -> Callable[[torch.Tensor], torch.Tensor]:
        """The reduction giving this part's share of a mean over the minibatch: the sum over its
        rows divided by the minibatch's count (0 for a stand-in part)."""
        n = self.total[unit]
        if self.stand_in:
            return lambda values: values.sum() * 0.0
        return lambda values: values.sum() / n

    def totals(self) -> tuple[int, int] | None:
        """``(items, tokens)`` of the whole minibatch when it spans data-parallel ranks, else None
        (a single process counts the minibatch it holds)."""
        return (self.total["items"], self.total["tokens"]) if distributed.is_initialized() else None

    def normalize(self, values: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``(values - mean) / (std + eps)`` with the mean and (sample) standard deviation of the
        whole minibatch's ``values`` (one per item), as SB3 normalises advantages per minibatch."""
        if not distributed.is_initialized():
            return (values - values.mean()) / (values.std() + eps)
        n = self.total["items"]
        mine = 0.0 if self.stand_in else values.double().sum().item()
        mean = float(distributed.all_reduce_sum(mine)) / n
        mine = 0.0 if self.stand_in else (values.double() - mean).square().sum().item()
        std = math.sqrt(float(distributed.all_reduce_sum(mine)) / (n - 1)) if n > 1 else float("nan")
        return (values - mean) / (std + eps)


def whole(items: int, tokens: int) -> Share:
    """The share of a rank that holds the whole minibatch (a single process)."""
    counts = {"items": int(items), "tokens": int(tokens)}
    return Share(counts, dict(counts))


def share_of(data: Any) -> Share:
    """The ``Share`` a minibatch of textgym's buffers carries. Another buffer's minibatch (a
    ``rollout_buffer_class`` of one's own) is the whole minibatch, which only a single process has:
    data-parallel minibatches must be drawn over the global buffer, as textgym's buffers draw them."""
    share = getattr(data, "share", None)
    if isinstance(share, Share):
        return share
    if distributed.is_initialized():
        raise ValueError(f"data-parallel updates need textgym's rollout buffers, whose minibatches span the ranks; "
                         f"got minibatches of {type(data).__name__}")
    n = len(data.advantages)
    return whole(n, n)


def global_order(counts: list[int], rounds: int = 1) -> list[tuple[int, int]]:
    """``(rank, local index)`` of every entry of the global buffer, in the order one process holding
    every rank's rows stores them. A buffer filled in ``rounds`` rounds of one entry per row holds,
    per round, the rows of rank 0, then those of rank 1...; rank k's ``counts[k]`` entries are its
    rounds one after another. ``rounds=1``: rank 0's entries, then rank 1's..."""
    out: list[tuple[int, int]] = []
    for j in range(rounds):
        for k, count in enumerate(counts):
            per = count // rounds
            out.extend((k, j * per + i) for i in range(per))
    return out


def rank_lengths(lengths: np.ndarray) -> list[np.ndarray]:
    """Every rank's entries' lengths (``lengths``: this rank's), in rank order (one collective)."""
    return [np.asarray(x, dtype=np.int64) for x in distributed.all_gather_object(np.asarray(lengths).tolist())]


def minibatches(per_rank: list[np.ndarray], batch_size: int | None, rounds: int = 1,
                items_are_tokens: bool = False) -> Iterator[tuple[np.ndarray, Share]]:
    """This rank's entries of each minibatch (indices into its buffer) and its ``Share`` of it.
    ``per_rank``: every rank's entries' lengths in tokens (``rank_lengths``). Minibatches are whole
    entries in a random order (numpy's global RNG), each filled up to at least ``batch_size``
    tokens (None: one minibatch of everything), drawn over the global buffer (``global_order``,
    ``rounds`` as there). ``items_are_tokens``: the losses average over tokens (a buffer of
    transitions, one token each), else over entries. A part with no entry is a stand-in: entry 0,
    counting 0."""
    me = distributed.rank()
    order = global_order([len(x) for x in per_rank], rounds)
    owner = np.array([k for k, _ in order], dtype=np.int64)
    index = np.array([i for _, i in order], dtype=np.int64)
    sizes = np.array([per_rank[k][i] for k, i in order], dtype=np.int64)
    target = int(sizes.sum()) if batch_size is None else batch_size

    def part(chunk: list[int]) -> tuple[np.ndarray, Share]:
        members = np.array(chunk, dtype=np.int64)
        mine = members[owner[members] == me]
        tokens, all_tokens = int(sizes[mine].sum()), int(sizes[members].sum())
        items, all_items = (tokens, all_tokens) if items_are_tokens else (len(mine), len(members))
        share = Share({"items": items, "tokens": tokens}, {"items": all_items, "tokens": all_tokens})
        return (index[mine] if len(mine) else np.zeros(1, dtype=np.int64)), share

    chunk: list[int] = []
    size = 0
    for k in np.random.permutation(len(order)):
        chunk.append(int(k))
        size += int(sizes[k])
        if size >= target:
            yield part(chunk)
            chunk, size = [], 0
    if chunk:
        yield part(chunk)
