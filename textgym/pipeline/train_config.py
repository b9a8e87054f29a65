"""``textgym train``'s config (``TrainConfig``): sections model, env, reward, agent, training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from textgym import agents
from textgym.pipeline.config import ConfigError, load_config, yaml_load_file


@dataclass
class ModelSection:
    """The policy LM (``name``: anything ``textgym.models.load`` accepts) and optional LoRA."""

    name: str = "textgym/smollm2-135m"
    # peft.LoraConfig options; null = full fine-tuning. LoRA keeps one LM copy in memory (the
    # reference is the adapter-free model) and makes an update about twice as fast on a CPU.
    lora: dict | None = field(default_factory=lambda: {"r": 16})


@dataclass
class EnvSection:
    """The environment: a textgym env id, batched as ``n_envs`` rows; ``kwargs`` are its arguments."""

    id: str = "textgym/Sentiment-v0"
    n_envs: int = 16
    kwargs: dict = field(default_factory=lambda: {"max_new_tokens": 20, "max_prompt_tokens": 40, "kl_coef": 0.05})


@dataclass
class RewardSection:
    """The reward the agent optimises, and extra rewards reported at evaluation."""

    name: str = "vader"
    kwargs: dict = field(default_factory=dict)
    eval: list = field(default_factory=lambda: ["length"])  # names or {name:, kwargs:} reported by evaluations


@dataclass
class AgentSection:
    """The algorithm (``agents.names()``) and its hyperparameters (see ``agents.PPO`` etc.)."""

    algo: str = "ppo"
    hyperparameters: dict = field(default_factory=lambda: {
        "learning_rate": 3e-4, "n_steps": 20, "batch_size": 80, "n_epochs": 4, "target_kl": 0.1,
    })


@dataclass
class TrainingSection:
    """Length of the run, evaluation and output."""

    iterations: int = 20
    seed: int = 0
    output_dir: str = "runs/sentiment"
    eval_prompts: str | None = None  # held-out prompts; null: the env's test split (or its prompts)
    eval_n: int = 32
    eval_every: int = 5
    samples: int = 8

    def validate(self) -> None:
        for key in ("iterations", "eval_n", "eval_every", "samples"):
            if getattr(self, key) < (0 if key == "eval_every" else 1):
                raise ConfigError(f"training.{key} must be >= 1, got {getattr(self, key)!r}")


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

    def validate(self) -> None:
        if self.agent.algo not in agents.names():
            raise ConfigError(f"agent.algo {self.agent.algo!r} is not an algorithm; valid: {', '.join(agents.names())}")
        reserved = sorted({"model", "reward", "reward_kwargs"} & set(self.env.kwargs))
        if reserved:
            raise ConfigError(
                f"env.kwargs.{reserved[0]} is set by the {reserved[0].split('_')[0]} section, not env.kwargs"
            )
        if isinstance(self.env.n_envs, bool) or not isinstance(self.env.n_envs, int) or self.env.n_envs < 1:
            raise ConfigError(f"env.n_envs must be an integer >= 1, got {self.env.n_envs!r}")
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
