"""Held-out evaluation: completions of fixed prompts, scored by every configured reward, with the
KL to the reference, perplexity under the reference, distinct-1/2 and length."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from textgym import metrics, models, precision, rewards, sampling
from textgym.envs import core_of
from textgym.envs.core import TextGenCore
from textgym.pipeline.config import load_config
from textgym.pipeline.train_config import TrainConfig
from textgym.prompts import PromptSet, load_prompts


def generate(core: TextGenCore, prompts: PromptSet, seed: int = 0) -> list[dict]:
    """Sample one completion per prompt from the core's acting distribution (the full LM
    distribution, or NLPO's masked one), many rows at a time (``sampling.complete_prompts``);
    returns the final-step infos in prompt order. Runs on an evaluation copy: ``core``'s episodes,
    caches and KL controller are left untouched (see ``textgym.sampling``)."""
    return sampling.complete_prompts(core, prompts, seed=seed)


def summarise(episodes: list[dict], extra_rewards: dict[str, Any] | None = None,
              prompts: PromptSet | None = None) -> dict:
    """Mean figures over ``episodes`` (infos from ``generate``), plus each of ``extra_rewards``
    (name -> reward) on the same completions."""
    completions = [e["completion"] for e in episodes]
    lengths = [e["length"] for e in episodes]
    out = {
        "n": len(episodes),
        "score": float(np.mean([e["score"] for e in episodes])),
        # spread over the completions, for the interval of a change of the mean (metrics.difference_ci)
        "score_std": float(np.std([e["score"] for e in episodes], ddof=1)) if len(episodes) > 1 else float("nan"),
        "kl": float(np.mean([e["kl"] for e in episodes])),
        "perplexity_ref": metrics.perplexity([e["ref_logprob"] for e in episodes], lengths),
        "distinct_1": metrics.distinct_n(completions, 1),
        "distinct_2": metrics.distinct_n(completions, 2),
        "length": float(np.mean(lengths)),
    }
    if extra_rewards:
        texts = [e["prompt"] for e in episodes]
        meta = prompts.metadata_for(list(range(len(episodes)))) if prompts is not None else {}
        for name, reward in extra_rewards.items():
            out[f"reward/{name}"] = float(np.mean(reward(texts, completions, **meta)))
    return out


def make_rewards(specs: list[str | dict[str, Any]]) -> dict[str, Any]:
    """``["length", {"name": "keyword", "kwargs": {...}}]`` -> ``{label: reward}``."""
    out: dict[str, Any] = {}
    for spec in specs:
        if isinstance(spec, str):
            out[spec] = rewards.make(spec)
        elif isinstance(spec, dict) and "name" in spec:
            label = spec.get("label", spec["name"])
            out[label] = rewards.make(spec["name"], **spec.get("kwargs", {}))
        else:
            raise ValueError(f"reward spec must be a name or {{name: ..., kwargs: ...}}, got {spec!r}")
    return out


def held_out_prompts(core: TextGenCore, source: Any = None, n: int | None = None) -> PromptSet:
    """The evaluation prompts: ``source`` if given, else the env's own held-out split
    (``core.test_prompts``); the first ``n`` of them."""
    prompts = load_prompts(source) if source is not None else core.test_prompts
    return prompts if n is None else prompts.head(n)


def target_env(target: str, env_id: str | None = None, ref: str | None = None) -> tuple[str, dict, TrainConfig | None]:
    """The env that plays ``target``: for a run directory (from ``textgym train``) its env id and
    settings with its final model as the policy and its reference (``env.kwargs.ref_model``, else
    its base model; ``ref`` overrides), and its config; for a model name or path, ``env_id`` (default
    ``textgym/Sentiment-v0``) with that model as the policy and ``ref`` (default: itself) as the
    reference, and None. Returns ``(env_id, env kwargs, run config or None)``."""
    path = Path(target)
    if (path / "config.yaml").exists():
        cfg = load_config(TrainConfig, path / "config.yaml")
        if not (path / "final_model" / "config.json").exists():
            raise FileNotFoundError(f"run {target!r} has no final_model/ yet: finish or resume it first")
        # The run's own reference: the one its env was given (textgym iterate's rounds keep the first
        # round's base), else its base model.
        kwargs = {**cfg.env_kwargs(), "model": str(path / "final_model"),
                  "ref_model": ref or cfg.env.kwargs.get("ref_model") or cfg.model.name}
        quantize = kwargs.pop("quantize", None)
        if quantize is not None and isinstance(kwargs["ref_model"], str):
            # The run acted over a quantized base (textgym.quantization), its reference too; its final
            # model is saved in float, base dequantized plus the adapters' delta, and is played so:
            # quantizing it again would round that delta away. The reference is the quantized base again.
            kwargs["ref_model"], _ = models.load(kwargs["ref_model"], device=precision.default_device(),
                                                 dtype=precision.resolve_dtype(cfg.model.dtype), quantize=quantize)
        return env_id or cfg.env.id, kwargs, cfg
    return env_id or "textgym/Sentiment-v0", {"model": target, "ref_model": ref}, None


def evaluate_target(target: str, *, env_id: str | None = None, n: int | None = None, ref: str | None = None,
                    seed: int = 0, n_envs: int | None = None, out: str | None = None) -> dict:
    """``textgym eval``: evaluate a run directory's final model against its base model, or any
    model (against ``ref``, default itself). Writes JSON with the metrics and every episode.

    A run directory is evaluated as the run's own final evaluation was (its env, prompts, seed and
    ``n_envs``, default the run's), so the figures reproduce the run's ``summary.json``."""
    for key, value in (("n", n), ("n_envs", n_envs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    path = Path(target)
    source, extra, samples = None, [], 1
    env_id, kwargs, cfg = target_env(target, env_id, ref)
    if cfg is not None:
        n = cfg.training.eval_n if n is None else n
        n_envs = cfg.env.n_envs if n_envs is None else n_envs
        source, extra, samples = cfg.training.eval_prompts, cfg.reward.eval, cfg.training.eval_samples
        out = out or str(path / "eval.json")
    else:
        out = out or "eval.json"
        n_envs = 16 if n_envs is None else n_envs
    vec = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="vector_entry_point", **kwargs)
    core = core_of(vec)
    prompts = held_out_prompts(core, source, n).repeat(samples)  # a run's eval_samples completions of each
    episodes = generate(core, prompts, seed=seed)
    summary = summarise(episodes, make_rewards(extra), prompts)
    report = {"target": target, "env": env_id, "metrics": summary, "episodes": episodes}
    Path(out).write_text(json.dumps(report, indent=1))
    return {"metrics": summary, "json": out}
