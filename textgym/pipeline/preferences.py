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

import gymnasium as gym
import numpy as np
import torch

from textgym import models, sampling
from textgym.envs import core_of
from textgym.pipeline.evaluate import target_env
from textgym.prompts import PromptSet, load_prompts, sentiment_prompts

__all__ = ["synthesize", "sample_items", "complete_k", "to_pairs", "write_jsonl"]


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
    """Sample ``k`` completions per prompt from ``model`` and score them with the ``gold`` reward.

    Completions are played through textgym's one sampling path (``textgym.sampling``) on a
    ``textgym/TextGen-v0`` engine whose reward is ``gold``: the full distribution (temperature 1, no
    top-k/top-p), one KV-cached forward per token, the score on the finished completion exactly as
    an RL run would score it.

    :param model: a model name or directory (``textgym.models.load``).
    :param prompts: anything ``textgym.prompts.load_prompts`` takes (default: the shipped movie-review
        openings, train split); their metadata columns are passed to the gold reward.
    :param k: completions per prompt (>= 2).
    :param gold: a registered reward name or a reward callable.
    :param max_new_tokens: the length limit of a completion.
    :param seed: the sampling seed; the same arguments give the same records.
    :param batch_size: prompts played at once (``batch_size * k`` engine rows).
    :param device: where the model runs.
    :return: one record per prompt: ``{"prompt", "completions", "scores", "ranks"}`` with rank 0 for
        the best score; equal scores get consecutive ranks in sample order (``textgym.pipeline.rm``
        compares by scores, so it does not compare them). Prompts whose ``k`` completions all score
        the same are dropped.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2 to rank completions, got {k!r}")
    for key, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    prompt_set = sentiment_prompts("train") if prompts is None else load_prompts(prompts)
    env = gym.make_vec("textgym/TextGen-v0", num_envs=min(batch_size, len(prompt_set)) * k,
                       vectorization_mode="vector_entry_point", model=model, reward=gold, prompts=prompt_set,
                       max_new_tokens=max_new_tokens, device=device)
    groups = complete_k(core_of(env), prompt_set, range(len(prompt_set)), k, seed=seed)
    records = []
    for i, group in enumerate(groups):
        record = _ranking(prompt_set.prompts[i], [e["completion"] for e in group], [e["score"] for e in group])
        if record is not None:
            records.append(record)
    return records


def complete_k(core, pool: PromptSet, indices: Sequence[int], k: int, *, seed: int = 0,
               progress: bool = False) -> list[list[dict]]:
    """``k`` completions of each prompt ``pool[i]`` for ``i`` in ``indices``, sampled from the
    engine's acting distribution (``textgym.sampling.complete_prompts``, the prompt's metadata passed
    to the reward): the final infos, one list of ``k`` per index, in order."""
    rows = [i for i in indices for _ in range(k)]  # each prompt k times, adjacent
    infos = sampling.complete_prompts(core, PromptSet([pool.prompts[i] for i in rows], pool.metadata_for(rows)),
                                      seed=seed, progress=progress)
    return [infos[j * k:(j + 1) * k] for j in range(len(infos) // k)]


def sample_items(target: str, n: int, k: int, *, seed: int = 0, split: str = "train", gold: Any = None,
                 env_id: str | None = None, env_kwargs: dict | None = None, n_envs: int = 16,
                 progress: bool = False) -> list[dict]:
    """Items to rank: ``n`` prompts, drawn at random without replacement from the ``split`` prompts
    of ``target``'s env, each with ``k`` completions sampled from its acting policy (a run
    directory's final model in its own env, or a model name or path, as ``textgym eval`` plays
    them; through ``textgym.sampling``).

    :param gold: a reward (name or ``{name:, kwargs:}``) that also scores every completion
        (``"scores"`` in the items; a simulated labeller ranks by them); None: the env's own reward
        scores them and the scores are not returned.
    :param env_kwargs: settings on top of the target's env (``max_new_tokens``, ...).
    :return: ``[{"item": 0.., "prompt", "completions"[, "scores"]}]``, the same for the same arguments.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an integer >= 2 completions per item, got {k!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1 items, got {n!r}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid: train, test")
    env_id, kwargs, _ = target_env(target, env_id)
    kwargs = {**kwargs, **(env_kwargs or {})}
    if gold is not None:
        spec: dict[str, Any] = {"name": gold} if isinstance(gold, str) else dict(gold)
        kwargs.update(reward=spec["name"], reward_kwargs=dict(spec.get("kwargs", {})))
    vec = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="vector_entry_point", **kwargs)
    core = core_of(vec)
    pool = core.prompts if split == "train" else core.test_prompts
    if n > len(pool):
        raise ValueError(f"n={n} items need as many distinct prompts, but the {split} split has {len(pool)}")
    chosen = np.random.default_rng(seed).choice(len(pool), size=n, replace=False).tolist()
    items = []
    for item, (index, group) in enumerate(zip(chosen, complete_k(core, pool, chosen, k, seed=seed,
                                                                 progress=progress))):
        record: dict[str, Any] = {"item": item, "prompt": pool.prompts[index],
                                  "completions": [e["completion"] for e in group]}
        if gold is not None:
            record["scores"] = [float(e["score"]) for e in group]
        items.append(record)
    return items


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
