"""``textgym record``: play a textgym env and keep its episodes as a dataset (``textgym.recordings``).

The policy is whatever acts in the env: an untrained model, a run's final model (its env and
settings come from the run), or, from Python, the engine of a live env or agent. Episodes are
played through textgym's one sampling path (``textgym.sampling``): the acting distribution, one
KV-cached forward per token, on an evaluation copy, so a live engine's own episodes, caches and KL
controller are untouched.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import gymnasium as gym

import textgym
from textgym import sampling
from textgym.envs import core_of
from textgym.envs.core import TextGenCore
from textgym.pipeline.evaluate import target_env
from textgym.recordings import Recording, ensure_new_directory, jsonable, load_recording, write_recording

SPLITS = ("train", "test")
# Settings that name data rather than describe it: a prompt set is written as its size.
_DATA_SETTINGS = ("prompts", "test_prompts")


def record(env: Any, out: str | Path, *, n_prompts: int | None = None, samples: int = 1, split: str = "train",
           seed: int = 0, env_id: str | None = None, policy: str | None = None, progress: bool = True) -> Recording:
    """Play ``samples`` episodes from each of the first ``n_prompts`` prompts (default: all) of the
    env's ``split`` (``"train"``: the prompts training draws from; ``"test"``: the held-out ones)
    and write them as a recording in ``out`` (a new or empty directory).

    :param env: a textgym env or vector env (``gym.make``/``gym.make_vec``), or an engine
        (``TextGenCore``, e.g. ``agent.core`` of a textgym agent): its acting distribution plays.
    :param samples: completions per prompt, adjacent in the recording (a prompt's ``samples``
        completions rank into preference data).
    :param seed: the sampling seed: the same env, prompts and seed give the same episodes.
    :param env_id: the env id written to ``recording.json`` (default: the env's spec id).
    :param policy: how the recording names its policy (default: the env's model setting).
    :return: the recording, as ``textgym.recordings.load_recording`` reads it back.
    """
    out = ensure_new_directory(out)  # before any episode is played
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    for key, value in (("samples", samples), ("n_prompts", n_prompts)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    core = env if isinstance(env, TextGenCore) else core_of(env)
    pool = core.prompts if split == "train" else core.test_prompts
    chosen = pool if n_prompts is None else pool.head(n_prompts)
    start = time.perf_counter()
    infos = sampling.complete_prompts(core, chosen.repeat(samples), seed=seed, tokens=True, progress=progress)
    seconds = time.perf_counter() - start  # what the data cost to produce (the algorithm benchmark reports it)
    rows = []
    for i, info in enumerate(infos):
        rows.append({
            "episode": i, "prompt_index": i // samples, "prompt": info["prompt"], "prompt_ids": info["prompt_ids"],
            "completion": info["completion"], "completion_ids": info["completion_ids"],
            "logprobs": info["logprobs"], "ref_logprobs": info["ref_logprobs"], "score": info["score"],
            "kl": info["kl"], "kl_coef": info["kl_coef"], "reward": sampling.episode_return(core, info),
        })
    spec = getattr(env, "spec", None)
    settings = {f.name: getattr(core.cfg, f.name) for f in dataclasses.fields(core.cfg)}
    for key in _DATA_SETTINGS:
        if settings[key] is not None and not isinstance(settings[key], str):
            settings[key] = f"{type(settings[key]).__name__} of {len(pool if key == 'prompts' else core.test_prompts)}"
    meta = {
        "env_id": env_id or (spec.id if spec is not None else "textgym/TextGen-v0"),
        "env_kwargs": jsonable(settings),
        "policy": policy or jsonable(core.cfg.model),
        "ref_model": jsonable(core.cfg.ref_model if core.cfg.ref_model is not None else core.cfg.model),
        "vocab_size": int(core.vocab), "split": split, "n_prompts": len(chosen), "samples": samples, "seed": seed,
        "textgym": textgym.__version__, "seconds": round(seconds, 3),
    }
    write_recording(out, rows, meta)
    return load_recording(out)


def record_target(target: str, out: str | Path, *, env_id: str | None = None, ref: str | None = None,
                  n_prompts: int | None = None, samples: int = 1, split: str = "train", seed: int = 0,
                  n_envs: int = 16, progress: bool = True) -> Recording:
    """``textgym record``: ``record`` the env that plays ``target``, a run directory (its env and
    settings, its final model against its base model) or a model name or path (on ``env_id``,
    default ``textgym/Sentiment-v0``, against ``ref``, default itself); see
    ``textgym.pipeline.evaluate.target_env``."""
    out = ensure_new_directory(out)  # before a model is loaded
    env_id, kwargs, _ = target_env(target, env_id, ref)
    vec = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="vector_entry_point", **kwargs)
    try:
        return record(vec, out, n_prompts=n_prompts, samples=samples, split=split, seed=seed, env_id=env_id,
                      policy=target, progress=progress)
    finally:
        vec.close()
