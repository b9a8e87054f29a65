"""Preference data: pairs and K-wise rankings of completions, grouped by prompt.

The format that ``textgym rm`` (reward-model training) and DPO (``agents.dpo``) read. Records come
through :func:`textgym.prompts.load_records` (a file: .jsonl, .json, .csv, .parquet; a Hugging Face
dataset name or directory; a spec ``{"dataset": ..., "split": ..., "config": ...}``; a Dataset, a
DataFrame or a list of records), each either a pair ``{"prompt", "chosen", "rejected"}`` or a
ranking ``{"prompt", "completions", "ranks"}`` (rank 0 is best; ties are an error) or
``{"prompt", "completions", "scores"}`` (higher is better; completions with equal scores are not
compared). A record with both ``scores`` and ``ranks`` uses the scores, after checking that the
ranks agree with them. A ranking of K completions gives its C(K, 2) comparisons.
"""

from __future__ import annotations

import math
import numbers
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from textgym.prompts import load_records


def comparisons_from_ranks(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """All ``(winner, loser)`` index pairs of a ranking (rank 0 is best). Tied ranks: ValueError."""
    ranks = list(ranks)
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in ranks):
        raise ValueError(f"ranks must be integers, got {ranks}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks {ranks} contain ties; give each completion a distinct rank")
    n = len(ranks)
    return [(i, j) if ranks[i] < ranks[j] else (j, i) for i in range(n) for j in range(i + 1, n)]


def comparisons_from_scores(scores: Sequence[float]) -> list[tuple[int, int]]:
    """``(winner, loser)`` pairs of all completions with different scores (higher is better)."""
    n = len(scores)
    return [
        (i, j) if scores[i] > scores[j] else (j, i)
        for i in range(n) for j in range(i + 1, n) if scores[i] != scores[j]
    ]


@dataclass
class PreferenceGroup:
    """One prompt, its distinct completions and the ``(winner, loser)`` comparisons among them."""

    prompt: str
    completions: list[str] = field(default_factory=list)
    comparisons: list[tuple[int, int]] = field(default_factory=list)

    def index(self, completion: str) -> int:
        if completion not in self.completions:
            self.completions.append(completion)
        return self.completions.index(completion)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _record_comparisons(record: Any, where: str) -> tuple[str, list[str], list[tuple[int, int]]]:
    """``(prompt, completions, comparisons)`` of one pair or ranking record."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} is a {type(record).__name__}, not a record with named fields")
    keys = sorted(k for k, v in record.items() if not _missing(v))
    present = {k: record[k] for k in keys}
    if "completions" in present:
        needed, kind = ["prompt", "completions"], "ranking"
    elif "chosen" in present or "rejected" in present:
        needed, kind = ["prompt", "chosen", "rejected"], "pair"
    else:
        raise ValueError(
            f"{where} is neither a pair {{prompt, chosen, rejected}} nor a ranking "
            f"{{prompt, completions, ranks or scores}}; its fields are {keys}"
        )
    lacking = [k for k in needed if k not in present]
    if kind == "ranking" and "ranks" not in present and "scores" not in present:
        lacking.append("ranks or scores")
    if lacking:
        raise ValueError(f"{where} ({kind}) lacks {', '.join(lacking)}; its fields are {keys}")
    prompt = present["prompt"]
    texts = [present["chosen"], present["rejected"]] if kind == "pair" else present["completions"]
    if (not isinstance(prompt, str) or not isinstance(texts, (list, tuple))
            or not all(isinstance(t, str) for t in texts)):
        raise ValueError(f"{where}: prompt and completions must be strings, got {dict(present)!r}")
    if kind == "pair":
        return prompt, list(texts), [(0, 1)]
    if len(texts) < 2:
        raise ValueError(f"{where}: a ranking needs at least 2 completions, got {len(texts)}")
    ranks, scores = present.get("ranks"), present.get("scores")
    for key, values in (("ranks", ranks), ("scores", scores)):
        if values is not None and (not isinstance(values, (list, tuple)) or len(values) != len(texts)):
            raise ValueError(
                f"{where}: {key} must be a list with one entry per completion ({len(texts)}), got {values!r}"
            )
    try:
        by_rank = comparisons_from_ranks(ranks) if ranks is not None else None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
    if scores is None:
        assert by_rank is not None  # a ranking record has ranks or scores
        return prompt, list(texts), by_rank
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        raise ValueError(f"{where}: scores must be finite numbers, got {scores!r}")
    by_score = comparisons_from_scores(scores)
    if not by_score:
        raise ValueError(f"{where}: all scores are equal ({scores[0]}), so it holds no comparison")
    if by_rank is not None and ranks is not None and not set(by_score) <= set(by_rank):
        raise ValueError(f"{where}: ranks {list(ranks)} disagree with scores {list(scores)}")
    return prompt, list(texts), by_score


def load_preferences(source: Any, split: str | None = None) -> list[PreferenceGroup]:
    """Read preference records (by :func:`textgym.prompts.load_records`; pairs and rankings,
    detected per record) and group them by prompt,
    in order of first appearance. Equal completion texts of a prompt are merged; comparisons of a
    completion with itself (e.g. chosen == rejected) are dropped with a warning."""
    records = load_records(source, split, what="preference")
    if not records:
        raise ValueError(f"no preference records in {source!r}")
    groups: dict[str, PreferenceGroup] = {}
    dropped = 0
    for i, record in enumerate(records):
        prompt, texts, comparisons = _record_comparisons(record, f"preference record {i}")
        group = groups.setdefault(prompt, PreferenceGroup(prompt))
        index = [group.index(t) for t in texts]
        for w, lose in comparisons:
            if index[w] == index[lose]:
                dropped += 1
            else:
                group.comparisons.append((index[w], index[lose]))
    if dropped:
        warnings.warn(f"dropped {dropped} comparison(s) of a completion with an identical one", stacklevel=2)
    result = [g for g in groups.values() if g.comparisons]
    if not result:
        raise ValueError(f"no comparisons in {source!r}")
    return result


def split_groups(groups: list[PreferenceGroup], fraction: float, seed: int) -> tuple[list, list]:
    """``(train, held_out)``: a random ``fraction`` of the prompts (at least one if fraction > 0)."""
    if fraction <= 0:
        return list(groups), []
    if len(groups) < 2:
        raise ValueError(f"cannot hold out prompts for evaluation from {len(groups)} prompt; give eval_data")
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    held = set(order[:n_eval])
    return [g for i, g in enumerate(groups) if i not in held], [g for i, g in enumerate(groups) if i in held]

