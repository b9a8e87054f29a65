"""``textgym train``'s config (``TrainConfig``): sections model, env, reward, agent, training.

Every key is declared once below (type, default, help, bounds); ``textgym train --help`` lists them.
The agent's hyperparameters are not declared here but read from the algorithms' constructors
(``textgym.pipeline.hyperparameters``), and checked against the chosen algorithm:

- ``agent.<algo>`` (``agent.ppo``, ``agent.grpo``, ...) holds one algorithm's hyperparameters and
  applies only when that algorithm runs, so one file can hold settings for several and ``--algo``
  switches between them. textgym's defaults for a short CPU run live there (``PRESETS``).
- ``agent.hyperparameters`` applies to the running algorithm, whichever it is, on top of its
  section: the place for ``key=value`` overrides (``agent.hyperparameters.learning_rate=1e-4``).
  Once loaded it holds every hyperparameter the run passes to the algorithm, so a run's
  ``config.yaml`` records them.

A hyperparameter the algorithm does not take, in either place, is an error naming those it takes
(and the algorithms that take it, if any): nothing is silently dropped when switching algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textgym import agents, precision
from textgym.pipeline import hyperparameters as algo_hyperparameters
from textgym.pipeline.config import ConfigError, keyed_sections, load_config, option, read_layers, yaml_load_file

# textgym train's defaults per algorithm: rollouts of 20-token completions, sized for a CPU (a PPO
# iteration is n_steps 20 x n_envs tokens in minibatches of 80). GRPO, RLOO and REINFORCE++ roll out
# whole episodes (no n_steps) and take one gradient step per rollout on all of it (batch_size None,
# 1 epoch): their advantages are noisy, and Adam's step has about the same size whatever the
# gradient's noise, so fewer steps on larger batches move the policy further for the KL they cost.
# The default run's settings come from the sweep of examples/sweep_default.yaml (README); the
# algorithm benchmark (examples/bench_algos.yaml) runs every algorithm with its defaults here.
_PPO: dict[str, Any] = {"learning_rate": 1e-3, "n_steps": 20, "batch_size": 80, "n_epochs": 2, "target_kl": 0.2}
_CRITIC_FREE: dict[str, Any] = {"learning_rate": 2e-3, "batch_size": None, "n_epochs": 1}
# TRPO: PPO's rollout; the learning rate is the critic's (the policy's step is the trust region's).
_TRPO: dict[str, Any] = {"learning_rate": 1e-3, "n_steps": 20, "batch_size": 80, "target_kl": 0.01}
# The offline algorithms (ILQL, DPO) learn from a dataset named by agent.<algo>.data: by default the
# recording that README "Learning offline" makes first (textgym record ... --out runs/sentiment_recording);
# an iteration is gradient_steps steps on batch_size examples.
RECORDING = "runs/sentiment_recording"
_ILQL: dict[str, Any] = {"data": RECORDING, "learning_rate": 1e-3, "batch_size": 16, "gradient_steps": 16}
_DPO: dict[str, Any] = {"data": RECORDING, "learning_rate": 5e-4, "batch_size": 8, "gradient_steps": 8}
PRESETS: dict[str, dict[str, Any]] = {"ppo": _PPO, "nlpo": _PPO, "a2c": {"learning_rate": 1e-3, "n_steps": 20},
           "grpo": _CRITIC_FREE, "rloo": _CRITIC_FREE, "reinforce++": _CRITIC_FREE, "trpo": _TRPO,
           "ilql": _ILQL, "dpo": _DPO}


@dataclass
class ModelSection:
    """The policy LM and optional LoRA."""

    name: str = option("textgym/smollm2-135m", "the policy LM: anything textgym.models.load accepts (a textgym "
                       "name, a model directory or a hub id)", nonempty=True, what="a model name or path")
    # LoRA keeps one LM copy in memory (the reference is the adapter-free model) and makes an
    # update about twice as fast on a CPU.
    lora: dict | None = option({"r": 16}, "peft.LoraConfig options (LoRA adapters are trained, the LM is frozen); "
                               "null: full fine-tuning")
    dtype: str = option("float32", "the models' precision (the env's dtype): bfloat16 or float16 load them so and run "
                        "every forward under autocast, the trained weights staying float32; log-probs and the KL "
                        "are float32 maths whatever it is", choices=tuple(precision.DTYPES), what="a precision")


@dataclass
class EnvSection:
    """The environment: a textgym env id, batched as ``n_envs`` rows; ``kwargs`` are its arguments."""

    id: str = option("textgym/Sentiment-v0", "the env id (textgym list shows them)", nonempty=True,
                     what="an env id")
    n_envs: int = option(32, "episodes generated together, one row of a batch each", min=1)
    kwargs: dict = option({"max_new_tokens": 20, "max_prompt_tokens": 40, "kl_coef": 0.1},
                          "the env's keyword arguments (max_new_tokens, kl_coef, prompts, ...: see TextGenEnv); "
                          "model, reward and reward_kwargs come from their sections")


@dataclass
class RewardSection:
    """The reward the agent optimises, and extra rewards reported at evaluation."""

    name: str = option("vader", "the registered reward the agent optimises (textgym list shows them)",
                       nonempty=True, what="a reward name")
    kwargs: dict = option({}, "the reward's options")
    eval: list = option(["length"], "rewards also reported by the evaluations: names or {name:, kwargs:, label:}")
    gold: str | dict | None = option(None, "a gold reward the evaluations also report (a name or {name:, kwargs:}): "
                                     "textgym train then warns when the proxy keeps rising while the gold score "
                                     "falls (reward hacking), and plots both in gold.png")

    def resolve(self) -> None:
        """The gold reward is reported as the evaluation reward labelled ``gold``."""
        if isinstance(self.gold, dict) and "name" not in self.gold:
            raise ConfigError(f"reward.gold must be a reward name or {{name:, kwargs:}}, got {self.gold!r}")
        labels = [e if isinstance(e, str) else e.get("label", e.get("name")) for e in self.eval if e is not None]
        if self.gold is not None and "gold" in labels:
            raise ConfigError("reward.eval already has a reward labelled 'gold': set the gold reward in reward.gold "
                              "only")

    def eval_specs(self) -> list:
        """The evaluation rewards, the gold one (labelled ``gold``) included."""
        if self.gold is None:
            return list(self.eval)
        gold = {"name": self.gold} if isinstance(self.gold, str) else dict(self.gold)
        return [*self.eval, {**gold, "label": "gold"}]


def _check_section(algo: str, values: object, key: str) -> dict:
    return algo_hyperparameters.check(algo, {} if values is None else values, key + ".")


@dataclass
class AgentSection:
    """The algorithm and its hyperparameters (module docstring)."""

    algo: str = option("reinforce++", "the algorithm (--algo is a shortcut)", choices=agents.names,
                       what="an algorithm")
    algorithms: dict = keyed_sections(
        "one algorithm's hyperparameters (agent.ppo.batch_size=80), applied only when it runs",
        keys=agents.names, check=_check_section, label="<algo>",
        default=lambda: {algo: dict(values) for algo, values in PRESETS.items()})
    hyperparameters: dict = option({}, "hyperparameters of the running algorithm, whichever it is, on top of "
                                   "agent.<algo>; once loaded, all that the run passes to it")

    def resolve(self) -> None:
        """The running algorithm's hyperparameters: its section, then ``hyperparameters`` on top,
        each checked against it."""
        self.hyperparameters = {**self.algorithms.get(self.algo, {}),
                                **algo_hyperparameters.check(self.algo, self.hyperparameters, "agent.hyperparameters.")}
        cls = agents.get_class(self.algo)
        if getattr(cls, "offline", False) and self.hyperparameters.get("data") is None:
            raise ConfigError(f"{self.algo} learns from a dataset: set agent.{self.algo}.data (or --algo {self.algo} "
                              f"agent.hyperparameters.data=...) to {getattr(cls, 'data_help', 'its dataset')}")


@dataclass
class TrainingSection:
    """Length of the run, evaluation and output."""

    iterations: int = option(22, "RL iterations, each one rollout and one update (an offline algorithm: "
                             "gradient_steps steps on its dataset)", min=1)
    seed: int = option(0, "seed of the agent, the env and the evaluations")
    output_dir: str = option("runs/sentiment", "the run directory", nonempty=True, what="a directory path")
    eval_prompts: str | None = option(None, "held-out prompts (anything textgym.prompts.load_prompts reads); "
                                      "null: the env's test split (or its prompts)")
    eval_n: int = option(48, "held-out prompts per evaluation", min=1)
    eval_samples: int = option(2, "completions of each held-out prompt per evaluation (independent samples: "
                               "more completions narrow the interval of the held-out gain)", min=1)
    eval_every: int = option(0, "evaluate every this many iterations; 0: only before and after training (the "
                             "default run's evaluation of 96 completions costs about two iterations)", min=0)
    samples: int = option(8, "held-out completions written to samples_before/after.jsonl", min=1)
    max_seconds: float | None = option(None, "a budget of wall time: the run ends after the first iteration that "
                                       "ends past this many seconds of iterations (evaluations before and after "
                                       "training not counted), or after training.iterations; null: no budget (the "
                                       "algorithm benchmark compares algorithms at equal wall time with it)", gt=0)


@dataclass
class TrainConfig:
    """``textgym train``'s config: sections model, env, reward, agent, training."""

    model: ModelSection = field(default_factory=ModelSection)
    env: EnvSection = field(default_factory=EnvSection)
    reward: RewardSection = field(default_factory=RewardSection)
    agent: AgentSection = field(default_factory=AgentSection)
    training: TrainingSection = field(default_factory=TrainingSection)

    def resolve(self) -> None:
        """The env's model and reward come from their own sections, never from ``env.kwargs``."""
        sections = {"model": "model", "dtype": "model", "reward": "reward", "reward_kwargs": "reward"}
        reserved = sorted(set(sections) & set(self.env.kwargs))
        if reserved:
            raise ConfigError(f"env.kwargs.{reserved[0]} is set by the {sections[reserved[0]]} section, not env.kwargs")

    def env_kwargs(self) -> dict:
        return {**self.env.kwargs, "model": self.model.name, "dtype": self.model.dtype, "reward": self.reward.name,
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
        base = yaml_load_file(saved)
        # Refused first: the saved agent.hyperparameters are the saved algorithm's, and would only
        # be reported as foreign to the requested one.
        was, asked = _algo_in(base), _algo_in(read_layers(path, overrides))
        if asked is not None and was is not None and asked != was:
            raise ConfigError(f"--resume continues the run with its saved config.yaml, so it cannot change "
                              f"agent.algo ({was!r} -> {asked!r}); start a new run (another training.output_dir) "
                              "to change it")
        cfg = load_config(TrainConfig, path, overrides, base=base)
    return cfg


def _algo_in(data: object) -> object:
    """``agent.algo`` as a raw config mapping sets it, or None."""
    agent = data.get("agent") if isinstance(data, dict) else None
    return agent.get("algo") if isinstance(agent, dict) else None
