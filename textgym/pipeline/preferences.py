"""Synthetic preference data: sample K completions per prompt and rank them with a gold reward.

A stand-in for human labels (as in Gao et al. 2023's "gold reward model" set-up): the reward model
trained on these rankings (``textgym.pipeline.rm``) can be checked against the gold reward it imitates. ::

    records = synthesize("textgym/smollm2-135m", k=4)      # [{"prompt", "completions", "scores", "ranks"}]
    write_jsonl(to_pairs(records), "data/prefs.jsonl")     # or write the rankings themselves
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from textgym import models, rewards
from textgym.prompts import load_prompts, sentiment_prompts

__all__ = ["synthesize", "to_pairs", "write_jsonl"]


def synthesize(
    model: str | os.PathLike = models.SMOLLM2,
    prompts: Any = None,
    k: int = 4,
    gold: Any = "vader",
    max_new_tokens: int = 20,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Sample ``k`` completions per prompt from ``model`` (the full distribution: temperature 1, no
    top-k/top-p) and score them with the ``gold`` reward (a registered name or a reward callable).

    ``prompts``: anything ``textgym.prompts.load_prompts`` takes (default: the shipped movie-review
    openings, train split); their metadata columns are passed to the gold reward. ``batch_size``:
    prompts per ``generate`` call, each repeated ``k`` times. The same arguments give the same records.

    Returns one record per prompt: ``{"prompt", "completions", "scores", "ranks"}`` with rank 0 for
    the best score; equal scores get consecutive ranks in sample order (``textgym.pipeline.rm`` compares by
    scores, so it does not compare them). Prompts whose ``k`` completions all score the same are dropped.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 to rank completions, got {k}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    prompt_set = sentiment_prompts("train") if prompts is None else load_prompts(prompts)
    lm, tokenizer = models.load(model, device=device)  # left padding, pad token set
    reward = rewards.as_reward(gold)
    records = []
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        for start in range(0, len(prompt_set), batch_size):
            indices = list(range(start, min(start + batch_size, len(prompt_set))))
            rows = [i for i in indices for _ in range(k)]
            texts = [prompt_set.prompts[i] for i in rows]
            batch = tokenizer(texts, return_tensors="pt", padding=True).to(lm.device)
            with torch.no_grad():
                out = lm.generate(
                    **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                )
            completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            scores = reward(texts, completions, **prompt_set.metadata_for(rows))
            for n, i in enumerate(indices):
                group = slice(n * k, (n + 1) * k)
                record = _ranking(prompt_set.prompts[i], completions[group], scores[group])
                if record is not None:
                    records.append(record)
    return records


def _ranking(prompt: str, completions: list[str], scores: list[float]) -> dict | None:
    if len(set(scores)) < 2:
        return None
    order = sorted(range(len(scores)), key=lambda j: -scores[j])  # stable: ties in sample order
    ranks = [0] * len(scores)
    for rank, j in enumerate(order):
        ranks[j] = rank
    return {"prompt": prompt, "completions": list(completions), "scores": list(scores), "ranks": ranks}


def to_pairs(records: Sequence[dict], all_pairs: bool = False) -> list[dict]:
    """Ranking records -> ``{"prompt", "chosen", "rejected"}`` records: the best against the worst
    completion of each prompt, or with ``all_pairs`` every pair whose scores (or, without scores,
    ranks) differ, better first."""
    pairs: list[dict] = []
    for record in records:
        completions = record["completions"]
        # Higher is better: scores as they are, ranks negated.
        value = record.get("scores") or [-r for r in record["ranks"]]
        order = sorted(range(len(completions)), key=lambda j: -value[j])
        if all_pairs:
            chosen = [(a, b) for n, a in enumerate(order) for b in order[n + 1:] if value[a] > value[b]]
        else:
            chosen = [(order[0], order[-1])] if value[order[0]] > value[order[-1]] else []
        pairs.extend({"prompt": record["prompt"], "chosen": completions[a], "rejected": completions[b]}
                     for a, b in chosen)
    return pairs


def write_jsonl(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write one JSON object a line (parent directories created; the file replaced atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
    return path
