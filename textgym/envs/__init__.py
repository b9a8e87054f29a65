"""Gymnasium environments, registered in the ``textgym`` namespace on ``import textgym``."""

from typing import Any

import gymnasium as gym

from textgym.envs.config import TextGenConfig
from textgym.envs.core import TextGenCore
from textgym.envs.sentiment import SentimentEnv, SentimentVectorEnv
from textgym.envs.textgen import TextGenEnv, TextGenVectorEnv

ENV_IDS = ("textgym/TextGen-v0", "textgym/Sentiment-v0")


def register_envs() -> None:
    for env_id, cls in (("textgym/TextGen-v0", "TextGen"), ("textgym/Sentiment-v0", "Sentiment")):
        if env_id not in gym.registry:
            module = "textgym.envs." + ("textgen" if cls == "TextGen" else "sentiment")
            gym.register(
                id=env_id, entry_point=f"{module}:{cls}Env", vector_entry_point=f"{module}:{cls}VectorEnv",
                disable_env_checker=False,
            )


def core_of(env: Any) -> TextGenCore:
    """The engine under a textgym env or vector env (``gym.make``/``gym.make_vec``, wrappers included)."""
    unwrapped = getattr(env, "unwrapped", None)
    if not isinstance(unwrapped, (TextGenEnv, TextGenVectorEnv)):
        raise ValueError(f"not a textgym env: {type(unwrapped or env).__name__}; textgym envs: {', '.join(ENV_IDS)}")
    return unwrapped.core


__all__ = ["ENV_IDS", "SentimentEnv", "SentimentVectorEnv", "TextGenConfig", "TextGenCore", "TextGenEnv",
           "TextGenVectorEnv", "core_of", "register_envs"]
