"""``textgym train``'s config (``TrainConfig``): sections model, env, reward, agent, training.

Every key is declared once below (type, default, help, bounds); ``textgym train --help`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from textgym import agents
from textgym.pipeline.config import ConfigError, load_config, option, yaml_load_file


@dataclass
class ModelSection:
    """The policy LM and optional LoRA."""

    name: str = option("textgym/smollm2-135m", "the policy LM: anything textgym.models.load accepts (a textgym "
                       "name, a model directory or a hub id)", nonempty=True, what="a model name or path")
    # LoRA keeps one LM copy in memory (the reference is the adapter-free model) and makes an
    # update about twice as fast on a CPU.
    lora: dict | None = option({"r": 16}, "peft.LoraConfig options (LoRA adapters are trained, the LM is frozen); "
                               "null: full fine-tuning")


@dataclass
class EnvSection:
    """The environment: a textgym env id, batched as ``n_envs`` rows; ``kwargs`` are its arguments."""

    id: str = option("textgym/Sentiment-v0", "the env id (textgym list shows them)", nonempty=True,
                     what="an env id")
    n_envs: int = option(16, "episodes generated together, one row of a batch each", min=1)
    kwargs: dict = option({"max_new_tokens": 20, "max_prompt_tokens": 40, "kl_coef": 0.05},
                          "the env's keyword arguments (max_new_tokens, kl_coef, prompts, ...: see TextGenEnv); "
                          "model, reward and reward_kwargs come from their sections")


@dataclass
class RewardSection:
    """The reward the agent optimises, and extra rewards reported at evaluation."""

    name: str = option("vader", "the registered reward the agent optimises (textgym list shows them)",
                       nonempty=True, what="a reward name")
    kwargs: dict = option({}, "the reward's options")
    eval: list = option(["length"], "rewards also reported by the evaluations: names or {name:, kwargs:, label:}")


@dataclass
class AgentSection:
    """The algorithm (``agents.names()``) and its hyperparameters (see ``agents.PPO`` etc.)."""

    algo: str = option("ppo", "the algorithm (--algo is a shortcut)", choices=agents.names, what="an algorithm")
    hyperparameters: dict = option({"learning_rate": 3e-4, "n_steps": 20, "batch_size": 80, "n_epochs": 4,
                                    "target_kl": 0.1}, "keyword arguments of the algorithm's constructor")


@dataclass
class TrainingSection:
    """Length of the run, evaluation and output."""

    iterations: int = option(20, "RL iterations, each one rollout and one update", min=1)
    seed: int = option(0, "seed of the agent, the env and the evaluations")
    output_dir: str = option("runs/sentiment", "the run directory", nonempty=True, what="a directory path")
    eval_prompts: str | None = option(None, "held-out prompts (anything textgym.prompts.load_prompts reads); "
                                      "null: the env's test split (or its prompts)")
    eval_n: int = option(32, "held-out prompts per evaluation", min=1)
    eval_every: int = option(5, "evaluate every this many iterations; 0: only before and after training", min=0)
    samples: int = option(8, "held-out completions written to samples_before/after.jsonl", min=1)


# Constructor arguments of the algorithms that textgym train sets itself.
NOT_HYPERPARAMETERS = {"policy": "the algorithm's LM policy", "env": "the env section", "device": "the env's model",
                       "seed": "training.seed", "lora": "model.lora", "tensorboard_log": "training.output_dir",
                       **dict.fromkeys(("_init_setup_model", "monitor_wrapper", "support_multi_env",
                                        "supported_action_spaces", "rollout_buffer_class"), "stable-baselines3")}


@dataclass
class TrainConfig:
    """``textgym train``'s config: sections model, env, reward, agent, training."""

    model: ModelSection = field(default_factory=ModelSection)
    env: EnvSection = field(default_factory=EnvSection)
    reward: RewardSection = field(default_factory=RewardSection)
    agent: AgentSection = field(default_factory=AgentSection)
    training: TrainingSection = field(default_factory=TrainingSection)

    def resolve(self) -> None:
        """Checks across sections: the env's model and reward come from their own sections; the
        hyperparameters are the algorithms'."""
        reserved = sorted({"model", "reward", "reward_kwargs"} & set(self.env.kwargs))
        if reserved:
            raise ConfigError(
                f"env.kwargs.{reserved[0]} is set by the {reserved[0].split('_')[0]} section, not env.kwargs"
            )
        set_elsewhere = sorted(set(self.agent.hyperparameters) & set(NOT_HYPERPARAMETERS))
        if set_elsewhere:
            raise ConfigError(f"agent.hyperparameters.{set_elsewhere[0]} is set by textgym train "
                              f"({NOT_HYPERPARAMETERS[set_elsewhere[0]]}), not by the config")
        # A misspelt hyperparameter is an error; one that only another algorithm takes (PPO's
        # batch_size under --algo a2c) is set aside with a warning when the run starts.
        known = set().union(*(agents.accepted_hyperparameters(a) for a in agents.names())) - set(NOT_HYPERPARAMETERS)
        unknown = sorted(set(self.agent.hyperparameters) - known)
        if unknown:
            valid = sorted(agents.accepted_hyperparameters(self.agent.algo) - set(NOT_HYPERPARAMETERS))
            raise ConfigError(f"agent.hyperparameters.{unknown[0]} is not a hyperparameter of any algorithm; "
                              f"valid for {self.agent.algo}: {', '.join(valid)}")

    def env_kwargs(self) -> dict:
        return {**self.env.kwargs, "model": self.model.name, "reward": self.reward.name,
                "reward_kwargs": dict(self.reward.kwargs)}


def config_from_cli(path: str | None, overrides: list[str], algo: str | None = None,
                    resume: bool = False) -> TrainConfig:
    """The config of ``textgym train [CONFIG] [--algo A] [key=value ...]``. With ``resume``, the
    file and overrides apply on top of the run's saved config.yaml (``Run`` then refuses any change
    but ``RESUMABLE_KEYS``)."""
    overrides = list(overrides) + ([f"agent.algo={algo}"] if algo else [])
    cfg = load_config(TrainConfig, path, overrides)
    saved = Path(cfg.training.output_dir) / "config.yaml"
    if resume and saved.exists():
        cfg = load_config(TrainConfig, path, overrides, base=yaml_load_file(saved))
    return cfg
