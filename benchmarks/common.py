"""Shared set-up of the throughput benchmarks: one model, one batch of prompts, one agent."""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from textgym import agents, models
from textgym.prompts import sentiment_prompts


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=models.TINY, help="textgym/tiny (default) or textgym/smollm2-135m, or a path")
    p.add_argument("--n-envs", type=int, default=16, help="batch size: episodes generated together")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def setup(args, **agent_kwargs):
    """(model, tokenizer, prompts, agent): the agent's env shares the model object."""
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = models.load(args.model)
    prompts = sentiment_prompts("train").prompts[: args.n_envs]
    env_kwargs = dict(model=model, tokenizer=tokenizer, prompts=prompts, reward="length", stop_on_eos=False,
                      max_new_tokens=args.new_tokens, max_prompt_tokens=args.prompt_tokens)
    agent = agents.make("ppo", "textgym/TextGen-v0", n_envs=args.n_envs, env_kwargs=env_kwargs, seed=0,
                        n_steps=args.new_tokens, **agent_kwargs)
    return model, tokenizer, prompts, agent


def collect_rollout(agent) -> float:
    """Seconds to collect one rollout (one episode per env, from fresh resets)."""
    agent._setup_learn(agent.n_steps * agent.n_envs, callback=None)
    callback = agent._init_callback(None)
    start = time.perf_counter()
    agent.collect_rollouts(agent.env, callback, agent.rollout_buffer, agent.n_steps)
    return time.perf_counter() - start
