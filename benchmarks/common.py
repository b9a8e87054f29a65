"""Shared set-up of the throughput benchmarks: one model, one batch of prompts, one agent."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import torch

from textgym import agents, distributed, models
from textgym.precision import default_device, resolve_dtype
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


def ranks_parser(description: str) -> argparse.ArgumentParser:
    """``parser`` for a measurement over several processes (ranks): one thread per process,
    ``--nproc`` and the internal ``--worker``."""
    p = parser(description)
    p.set_defaults(threads=1)
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) of a data-parallel run (default 2)")
    p.add_argument("--worker", action="store_true", help="internal: be one process of a measurement")
    return p


def ranks_yardstick(args, dtype: str = "float32") -> float:
    """The yardstick (in one process) of a measurement over ``--nproc`` ranks, whose global batch
    must split evenly over them (else the run stops, naming both)."""
    if args.n_envs % args.nproc:
        sys.exit(f"--n-envs={args.n_envs} must be a multiple of --nproc={args.nproc}")
    return yardstick(args.model, n_envs=args.n_envs, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                     repeats=args.repeats, threads=args.threads, dtype=dtype)


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


def iteration(agent, it: int) -> float:
    """Seconds of one ``textgym train`` iteration (fresh episodes seeded by ``it``, one rollout, one
    update), every rank done."""
    distributed.barrier()
    start = time.perf_counter()
    agent.set_random_seed(it)
    agent.start_fresh_episodes()
    agent.learn(agent.n_steps * agent.n_envs, reset_num_timesteps=False)
    distributed.barrier()
    return time.perf_counter() - start


@torch.no_grad()
def yardstick(model_name: str, *, n_envs: int = 16, new_tokens: int = 32, prompt_tokens: int = 32, repeats: int = 3,
              threads: int | None = None, dtype: str = "float32") -> float:
    """The machine's yardstick: tokens/s of the model's own ``generate`` (sampling from the full
    distribution, ``n_envs`` x ``new_tokens`` tokens, the best of ``repeats``) in this process."""
    if threads:
        torch.set_num_threads(threads)
    device = default_device()
    model, tokenizer = models.load(model_name, device=device, dtype=resolve_dtype(dtype))
    prompts = sentiment_prompts("train").prompts[:n_envs]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=prompt_tokens).to(device)

    def generate() -> float:
        start = time.perf_counter()
        model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    generate()
    return n_envs * new_tokens / min(generate() for _ in range(repeats))


def machine() -> str:
    """The accelerators, else the CPU cores, in words."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
