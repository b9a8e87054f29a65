"""``textgym/Sentiment-v0``: continue movie-review openings with positive sentiment."""

from __future__ import annotations

from typing import Any

from textgym import models
from textgym.envs.textgen import TextGenEnv, TextGenVectorEnv
from textgym.prompts import sentiment_prompts

DEFAULTS: dict[str, Any] = dict(
    model=models.SMOLLM2, reward="vader", max_new_tokens=20, max_prompt_tokens=40, kl_coef=0.05,
)


def sentiment_kwargs(split: str = "train", **kwargs: Any) -> dict[str, Any]:
    """TextGen keyword arguments of the sentiment task; ``kwargs`` override the defaults. The
    held-out prompts are the test split whatever ``split`` the episodes draw from."""
    merged = {**DEFAULTS, **kwargs}
    merged.setdefault("prompts", sentiment_prompts(split))
    merged.setdefault("test_prompts", sentiment_prompts("test"))
    return merged


class SentimentEnv(TextGenEnv):
    """Write a positive continuation of a movie-review opening: the offline analogue of RL4LMs'
    IMDB task.

    ## Description
    Prompts are openings of movie reviews written for textgym (200 train, 50 test; ``split``). The
    policy (default SmolLM2-135M-Instruct, offline from PyPI) continues them; VADER's compound
    sentiment of the continuation, in [-1, 1], is the score.

    ## Action Space, Observation Space, Reward, Episode End
    As ``textgym/TextGen-v0``, with ``max_prompt_tokens=40``, ``max_new_tokens=20``, ``kl_coef=0.05``.

    ## Arguments
    ``split`` ("train" or "test") and every ``textgym/TextGen-v0`` argument, which override the
    defaults above (e.g. ``model="textgym/tiny"`` for a fast run).

    ## Version History
    - v0: initial version.
    """

    env_id = "textgym/Sentiment-v0"

    def __init__(self, split: str = "train", **kwargs: Any):
        super().__init__(**sentiment_kwargs(split, **kwargs))


class SentimentVectorEnv(TextGenVectorEnv):
    """Batched ``textgym/Sentiment-v0`` (see ``TextGenVectorEnv``)."""

    env_id = "textgym/Sentiment-v0"

    def __init__(self, num_envs: int = 1, split: str = "train", **kwargs: Any):
        super().__init__(num_envs, **sentiment_kwargs(split, **kwargs))
