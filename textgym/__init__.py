"""textgym: text generation by a causal language model as a Gymnasium environment, for RLHF."""

from textgym import kl, models, rewards
from textgym.envs import ENV_IDS, TextGenEnv, TextGenVectorEnv, register_envs

register_envs()

__version__ = "0.1.0"
__all__ = ["ENV_IDS", "TextGenEnv", "TextGenVectorEnv", "kl", "models", "rewards", "__version__"]
