"""Evaluation metrics of generated text and of rankings: diversity, perplexity, rank correlation,
and Elo ratings with bootstrap confidence intervals. Plain Python and numpy; Spearman's rho from
scipy."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

__all__ = ["distinct_n", "perplexity", "spearman", "elo_ratings", "elo_bootstrap"]

Match = tuple[str, str, float]  # (player a, player b, score of a: 1 win, 0.5 draw, 0 loss)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over ``texts`` (whitespace tokens; n-grams never span texts).
    0.0 when there is no n-gram."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text.split()
        grams = list(zip(*(tokens[i:] for i in range(n))))
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def perplexity(ref_logprobs_sum: Sequence[float], n_tokens: Sequence[int]) -> float:
    """``exp(-sum(log-probs) / sum(tokens))``: token-weighted, so long texts count more. NaN
    without tokens (so that an evaluation of empty completions still reports)."""
    if len(ref_logprobs_sum) != len(n_tokens):
        raise ValueError(f"{len(ref_logprobs_sum)} log-prob sums but {len(n_tokens)} token counts")
    count = sum(n_tokens)
    if count <= 0:
        return float("nan")
    return math.exp(-sum(ref_logprobs_sum) / count)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either input is constant."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values but y has {len(y)}")
    if len(x) < 2:
        return float("nan")
    from scipy.stats import spearmanr  # imported here: scipy's import is slow and only this needs it

    return float(spearmanr(x, y)[0])


def elo_ratings(players: Sequence[str], matches: Sequence[Match], k: float = 16, initial: float = 1000,
                rounds: int = 1, seed: int | None = None) -> dict[str, float]:
    """Sequential Elo updates over ``matches`` (``(a, b, score_of_a)``), ``rounds`` passes.

    Each match moves ``a`` by ``k * (score - expected)`` and ``b`` by the opposite, with
    ``expected = 1 / (1 + 10 ** ((r_b - r_a) / 400))``. Elo depends on the order of matches:
    without ``seed`` they are played in the given order; with it, shuffled each round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    ratings = {p: float(initial) for p in players}
    for a, b, score in matches:
        for p in (a, b):
            if p not in ratings:
                raise ValueError(f"match ({a!r}, {b!r}, {score!r}) has unknown player {p!r}; players: {list(players)}")
        if not 0 <= score <= 1:
            raise ValueError(f"match ({a!r}, {b!r}, {score!r}): the score must be in [0, 1]")
    rng = random.Random(seed) if seed is not None else None
    order = list(matches)
    for _ in range(rounds):
        if rng is not None:
            rng.shuffle(order)
        for a, b, score in order:
            expected = 1 / (1 + 10 ** ((ratings[b] - ratings[a]) / 400))
            delta = k * (score - expected)
            ratings[a] += delta
            ratings[b] -= delta
    return ratings


def elo_bootstrap(players: Sequence[str], matches: Sequence[Match], n_bootstrap: int = 200, seed: int = 0,
                  ci: float = 0.95, **elo_kwargs) -> dict[str, dict[str, float]]:
    """Elo ``rating`` of every player on all matches, with a percentile ``low``/``high`` confidence
    interval from ``n_bootstrap`` resamples of the matches (with replacement). ``elo_kwargs`` go to
    :func:`elo_ratings`. The interval need not contain the rating (Elo is order-dependent)."""
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    point = elo_ratings(players, matches, **elo_kwargs)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {p: [] for p in players}
    for _ in range(n_bootstrap):
        idx: np.ndarray | list[int] = rng.integers(0, len(matches), len(matches)) if matches else []
        for p, r in elo_ratings(players, [matches[i] for i in idx], **elo_kwargs).items():
            samples[p].append(r)
    tail = (1 - ci) / 2 * 100
    return {
        p: {"rating": point[p], "low": float(np.percentile(samples[p], tail)),
            "high": float(np.percentile(samples[p], 100 - tail))}
        for p in players
    }
