"""Preference data: pairs and K-wise rankings of completions, grouped by prompt.

The format that ``textgym rm`` (reward-model training) and DPO (``agents.dpo``) read. Records come
through :func:`textgym.prompts.load_records` (a file: .jsonl, .json, .csv, .parquet; a Hugging Face
dataset name or directory; a spec ``{"dataset": ..., "split": ..., "config": ...}``; a Dataset, a
DataFrame or a list of records), each either a pair ``{"prompt", "chosen", "rejected"}`` or a
ranking ``{"prompt", "completions", "ranks"}`` (rank 0 is best; ties are an error) or
``{"prompt", "completions", "scores"}`` (higher is better; completions with equal scores are not
compared). A record with both ``scores`` and ``ranks`` uses the scores, after checking that the
ranks agree with them. A ranking of K completions gives its C(K, 2) comparisons.

People's labels (``textgym label``) and a simulated labeller's (``textgym iterate``) are such
records with a few more fields: ``answer`` (``"best"``: ``scores`` 1 for the chosen completion, 0
for the others; ``"rank"``: ``ranks``; ``"tie"`` and ``"skip"``: no comparison, kept in the file so
that labelling resumes after them and agreement counts ties), ``item`` (which shown item) and
``labeller`` (who answered). A ``tie`` or ``skip`` record is read and dropped: it holds no
comparison. :func:`agreement` compares labellers who answered the same items.
"""

from __future__ import annotations

import math
import numbers
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from textgym.prompts import json_lines_numbered, load_records


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


# A labelled record's answer (module docstring): the two that hold no comparison come last.
ANSWERS = ("best", "rank", "tie", "skip")
NO_COMPARISON = ("tie", "skip")


def record_comparisons(record: Any, where: str) -> tuple[str, list[str], list[tuple[int, int]]]:
    """``(prompt, completions, comparisons)`` of one pair or ranking record (a labelled tie or skip:
    no comparisons)."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} is a {type(record).__name__}, not a record with named fields")
    keys = sorted(k for k, v in record.items() if not _missing(v))
    present = {k: record[k] for k in keys}
    answer = present.get("answer")
    if answer is not None and answer not in ANSWERS:
        raise ValueError(f"{where}: answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
    if answer in NO_COMPARISON:
        texts = present.get("completions")
        if not isinstance(present.get("prompt"), str) or not isinstance(texts, (list, tuple)) or len(texts) < 2 \
                or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{where}: a {answer} answer needs a prompt and at least 2 completions (strings); "
                             f"its fields are {keys}")
        return present["prompt"], list(texts), []
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
    numbered = _numbered_records(source, split)
    if not numbered:
        raise ValueError(f"no preference records in {source!r}")
    groups: dict[str, PreferenceGroup] = {}
    dropped = 0
    for where, record in numbered:
        prompt, texts, comparisons = record_comparisons(record, where)
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


def _numbered_records(source: Any, split: str | None) -> list[tuple[str, Any]]:
    """``(where, record)``: a JSON Lines file's records named by file and line, others by index."""
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".jsonl" and Path(source).is_file():
        return [(f"file {os.fspath(source)!r}, line {n}", r) for n, r in json_lines_numbered(source)]
    return [(f"preference record {i}", r) for i, r in enumerate(load_records(source, split, what="preference"))]


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



# --- labels: people's and a simulated labeller's ----------------------------------------------------


def label_record(item: int, prompt: str, completions: Sequence[str], answer: str, *, labeller: str,
                 best: int | None = None, ranks: Sequence[int] | None = None, **extra: Any) -> dict:
    """The preference record of one answer (module docstring), checked: ``best`` (an index) for
    ``answer="best"``, ``ranks`` (0 is best, distinct) for ``"rank"``, neither for ``"tie"`` or
    ``"skip"``. ``extra`` fields (seconds taken, a time stamp) are kept as they are."""
    k = len(completions)
    if answer not in ANSWERS:
        raise ValueError(f"answer must be one of {', '.join(ANSWERS)}, got {answer!r}")
    record: dict[str, Any] = {"item": int(item), "labeller": labeller, "answer": answer, "prompt": prompt,
                              "completions": list(completions)}
    if answer == "best":
        if isinstance(best, bool) or not isinstance(best, numbers.Integral) or not 0 <= best < k:
            raise ValueError(f"best must be the index of one of the {k} completions (0..{k - 1}), got {best!r}")
        record["scores"] = [1 if j == best else 0 for j in range(k)]
    elif answer == "rank":
        if ranks is None or sorted(ranks) != list(range(k)) or \
                not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in ranks):
            raise ValueError(f"ranks must order the {k} completions, each of 0..{k - 1} once, got {ranks!r}")
        record["ranks"] = [int(r) for r in ranks]
    elif best is not None or ranks is not None:
        raise ValueError(f"a {answer} answer takes neither best nor ranks")
    return {**record, **extra}


def simulated_ranks(scores: Sequence[float], temperature: float, rng: np.random.Generator) -> list[int]:
    """A noisy labeller's ranking of completions with true ``scores`` (rank 0 best): a draw of the
    Plackett-Luce model with utilities ``score / temperature`` (sorting the utilities plus Gumbel
    noise), so any two completions are ordered as Bradley-Terry says, ``P(a above b) =
    sigmoid((score_a - score_b) / temperature)``, and labellers disagree as people do on close
    calls. ``temperature`` 0: ordered by score, equal scores in random order."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    s = np.asarray(scores, dtype=np.float64)
    gumbel = rng.gumbel(size=len(s))
    # temperature 0: by score, the noise only breaking ties (np.lexsort sorts by its last key first)
    order = np.argsort(-(s / temperature + gumbel), kind="stable") if temperature > 0 else np.lexsort((gumbel, -s))
    ranks = np.empty(len(s), dtype=int)
    ranks[order] = np.arange(len(s))
    return ranks.tolist()


def _relations(record: Mapping) -> dict[tuple[int, int], int]:
    """``{(i, j): +1 (i better), -1 (j better) or 0 (tie)}`` for the pairs i < j a label decides."""
    k = len(record["completions"])
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    answer = record.get("answer")
    if answer == "skip":
        return {}
    if answer == "tie":
        return dict.fromkeys(pairs, 0)
    if record.get("scores") is not None:
        s = record["scores"]
        if answer == "best":  # only the chosen one against each other one is decided
            top = max(range(k), key=lambda j: s[j])
            return {(i, j): (1 if i == top else -1) for i, j in pairs if top in (i, j)}
        return {(i, j): int(np.sign(s[i] - s[j])) for i, j in pairs}
    r = record["ranks"]
    return {(i, j): (1 if r[i] < r[j] else -1) for i, j in pairs}


def agreement(records: Sequence[Mapping]) -> dict:
    """How often labellers who answered the same item agree: over every two labellers and every
    pair of completions of an item that both decided (one better, or a tie), the fraction decided
    alike. Records are labelled ones (``item`` and ``labeller``); a labeller's later answer to an
    item replaces an earlier one, skips decide nothing. Returns ``{"agreement", "comparisons",
    "shared_items", "labellers", "pairs": {"a / b": {"agreement", "comparisons", "items"}}}``
    (agreement None where nothing was compared)."""
    answers: dict[int, dict[str, Mapping]] = {}
    for record in records:
        answers.setdefault(int(record["item"]), {})[str(record["labeller"])] = record
    pairs: dict[str, dict[str, int]] = {}
    for by_labeller in answers.values():
        names = sorted(by_labeller)
        relations = {name: _relations(by_labeller[name]) for name in names}
        for a_index, a in enumerate(names):
            for b in names[a_index + 1:]:
                common = relations[a].keys() & relations[b].keys()
                tally = pairs.setdefault(f"{a} / {b}", {"same": 0, "comparisons": 0, "items": 0})
                tally["items"] += 1
                tally["comparisons"] += len(common)
                tally["same"] += sum(relations[a][p] == relations[b][p] for p in common)
    same, total = sum(t["same"] for t in pairs.values()), sum(t["comparisons"] for t in pairs.values())
    return {
        "agreement": same / total if total else None, "comparisons": total,
        "shared_items": sum(len(v) > 1 for v in answers.values()),
        "labellers": sorted({name for v in answers.values() for name in v}),
        "pairs": {key: {"agreement": t["same"] / t["comparisons"] if t["comparisons"] else None,
                        "comparisons": t["comparisons"], "items": t["items"]} for key, t in sorted(pairs.items())},
    }
