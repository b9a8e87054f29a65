"""RL agents for textgym environments: stable-baselines3 algorithms over one thin LM policy.

    from textgym import agents      # always safe; ``import agents`` works too where nothing else owns that name
    model = agents.make("ppo", "textgym/Sentiment-v0", n_envs=8)  # or a2c, nlpo, grpo, rloo, reinforce++, trpo
    # offline, from a dataset: agents.make("ilql", env, data="recording_dir"), or "dpo" on preferences
    model.learn(2048, progress_bar=True)
    model.save("ppo_sentiment")
    model = agents.load("ppo_sentiment", env="textgym/Sentiment-v0", n_envs=8)

This folder is installed as ``textgym.agents`` only, so it can never overwrite another
distribution's top-level ``agents`` package (the openai-agents SDK installs one). In a source
checkout, where this folder also sits on the path as ``agents``, the short name is made an alias of
``textgym.agents`` (and its submodules), so there is only ever one copy of each class and registry.
"""

import sys

if __name__ != "textgym.agents":  # imported by the short name ``agents`` from a source checkout
    import textgym.agents  # noqa: F401  (the one copy; the loop below names it by its short name too)

    for _name, _module in list(sys.modules.items()):
        if _name == "textgym.agents" or _name.startswith("textgym.agents."):
            sys.modules[_name[len("textgym."):]] = _module
else:
    from . import serialization
    from .a2c import A2C
    from .buffer import EpisodeRolloutBuffer
    from .common import LMAlgorithm
    from .constructor import constructor_parameters
    from .critic_free import CriticFreeAlgorithm
    from .dpo import DPO
    from .evaluate import evaluate
    from .grpo import GRPO
    from .ilql import ILQL
    from .nlpo import NLPO, NLPOPolicy
    from .offline import OfflineAlgorithm
    from .policy import LMActorCriticPolicy
    from .ppo import PPO
    from .registry import accepted_hyperparameters, get_class, load, make, names, register
    from .reinforce_pp import ReinforcePP
    from .rloo import RLOO
    from .trpo import TRPO
    from .vec_env import LMVecEnv, as_vec_env

    __all__ = ["A2C", "DPO", "GRPO", "ILQL", "NLPO", "OfflineAlgorithm", "PPO", "RLOO", "CriticFreeAlgorithm",
               "EpisodeRolloutBuffer",
               "LMActorCriticPolicy", "LMAlgorithm", "LMVecEnv", "NLPOPolicy", "ReinforcePP", "TRPO",
               "accepted_hyperparameters", "as_vec_env", "constructor_parameters", "evaluate", "get_class", "load",
               "make", "names", "register",
               "serialization"]
