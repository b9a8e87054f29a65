"""Playing fresh episodes with an engine's acting distribution, without touching its training state.

Every consumer that wants "completions of these prompts" or "n episodes of this policy" comes
here: held-out evaluation, the benchmarks, ``textgym demo`` and ``agents.evaluate``. Episodes are played on an
``evaluation_copy`` of the engine (own rows, KV caches and frozen KL coefficient) with a
``torch.Generator`` of their own, so the running episodes, caches, KL controller and global RNGs of
the engine being evaluated stay exactly as they were: measuring does not change what is measured.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from textgym.envs.core import TextGenCore
from textgym.prompts import PromptSet

MODES = ("sample", "greedy", "random")


@torch.no_grad()
def play(core: TextGenCore, next_prompt: Callable[[int], int | None], *, prompts: PromptSet | None = None,
         seed: int = 0, greedy: bool = False, n_rows: int | None = None, mode: str | None = None,
         progress: int | None = None, tokens: bool = False) -> list[tuple[int, dict]]:
    """Play episodes on an evaluation copy of ``core`` with ``n_rows`` rows (default ``core.n``).

    ``next_prompt(row)`` gives the index (into ``prompts``, default ``core.prompts``) of the next
    episode's prompt for that row, or None when the row is done. ``mode``: ``"sample"`` (default)
    from the acting distribution, ``"greedy"`` its argmax (also ``greedy=True``), ``"random"``
    uniform token ids (a baseline). ``progress``: show a progress bar over that many episodes.
    ``tokens``: each final info also carries the episode's token ids and per-token log-probs
    (``EpisodeScoring.episode_tokens``). Returns ``(row, final info)`` in the order episodes ended.
    """
    mode = mode or ("greedy" if greedy else "sample")
    if mode not in MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; valid: {', '.join(MODES)}")
    engine = core.evaluation_copy(n_rows)
    if prompts is not None:
        engine.prompts = prompts
    gen = torch.Generator(device=core.device).manual_seed(seed)
    finished: list[tuple[int, dict]] = []
    bar = tqdm(total=progress, unit="episode", disable=not progress, desc=f"{mode} episodes")

    def start(rows: list[int]) -> None:
        for row in rows:
            index = next_prompt(row)
            if index is not None:
                engine.reset_rows([row], [None], {"prompt_index": index})

    start(list(range(engine.n)))
    while engine.live.any():
        if mode == "random":
            engine.ensure_started()
            actions = torch.randint(engine.vocab, (engine.n,), generator=gen, device=core.device)
        else:
            logits = engine.acting_logits()
            if mode == "greedy":
                actions = logits.argmax(-1)
            else:
                actions = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)
        _, _, infos = engine.step(actions.cpu().numpy(), engine.live.copy())
        if tokens:  # before the rows restart
            infos = {row: {**info, **engine.scoring.episode_tokens(row)} for row, info in infos.items()}
        finished.extend(sorted(infos.items()))
        bar.update(len(infos))
        start(sorted(infos))
    bar.close()
    return finished


def episode_return(core: TextGenCore, info: dict) -> float:
    """The undiscounted return of a finished episode as training sees it, from its final info:
    ``score_scale * score - kl_coef * KL`` with the KL in the reward (per-token mode pays the same
    sum over the steps), the scaled score alone with the KL in the loss."""
    coef = info["kl_coef"] if core.cfg.kl_in == "reward" else 0.0
    return core.cfg.score_scale * info["score"] - coef * info["kl"]


# Rows of an evaluation batch: decoding is memory-bound, so more rows per forward cost little more
# than fewer (SmolLM2 on 2 CPU cores: 94 tokens/s at 16 rows, 158 at 64).
EVALUATION_ROWS = 64


def complete_prompts(core: TextGenCore, prompts: PromptSet, *, seed: int = 0, greedy: bool = False,
                     tokens: bool = False, progress: bool = False) -> list[dict]:
    """One completion per prompt of ``prompts`` (played ``max(core.n, EVALUATION_ROWS)`` at a time,
    each row taking the next prompt as it finishes); the final infos in prompt order. ``tokens``
    and ``progress`` as in ``play``."""
    queue = iter(range(len(prompts)))
    order: dict[int, list[int]] = {}

    def next_prompt(row: int) -> int | None:
        index = next(queue, None)
        if index is not None:
            order.setdefault(row, []).append(index)
        return index

    played = play(core, next_prompt, prompts=prompts, seed=seed, greedy=greedy, tokens=tokens,
                  n_rows=min(max(core.n, EVALUATION_ROWS), max(len(prompts), 1)),
                  progress=len(prompts) if progress else None)
    results: list[dict | None] = [None] * len(prompts)
    taken = {row: iter(indices) for row, indices in order.items()}
    for row, info in played:
        results[next(taken[row])] = info
    return results  # type: ignore[return-value]


def episodes_per_row(core: TextGenCore, n_episodes: int, *, seed: int = 0, greedy: bool = False,
                     prompts: PromptSet | None = None, mode: str | None = None,
                     progress: bool = False) -> list[dict]:
    """``n_episodes`` episodes on prompts drawn at random from ``prompts`` (default
    ``core.prompts``), spread over the rows as stable-baselines3's ``evaluate_policy`` does: row
    ``i`` plays ``(n_episodes + i) // n`` of them, so short episodes are not over-represented (the
    first episodes to finish are the short ones). Row ``i`` draws its prompts with its own RNG,
    seeded by ``(seed, i)``. ``mode`` as in ``play``."""
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, (int, np.integer)) or n_episodes < 1:
        raise ValueError(f"n_episodes must be an integer >= 1, got {n_episodes!r}")
    n = core.n
    targets = [(n_episodes + i) // n for i in range(n)]
    rngs = [np.random.default_rng([seed, i]) for i in range(n)]
    counts = [0] * n

    def next_prompt(row: int) -> int | None:
        if counts[row] >= targets[row]:
            return None
        counts[row] += 1
        return int(rngs[row].integers(len(pool)))

    pool = core.prompts if prompts is None else prompts
    played = play(core, next_prompt, prompts=prompts, seed=seed, greedy=greedy, mode=mode,
                  progress=n_episodes if progress else None)
    return [info for _, info in sorted(played, key=lambda item: item[0])]

