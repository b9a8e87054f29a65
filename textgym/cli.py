"""The ``textgym`` command line."""

from __future__ import annotations

import argparse
import json
import sys

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm


def run_episodes(env, agent: str, episodes: int, seed: int = 0, progress: bool = True) -> list[dict]:
    """Play ``episodes`` episodes; ``agent`` is "random", "greedy" (argmax of the env's own LM) or
    "sample" (sampling from the full LM distribution). Returns the final-step infos."""
    env.action_space.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    results = []
    obs, _ = env.reset(seed=seed)
    for _ in tqdm(range(episodes), desc=f"{agent} agent", disable=not progress, unit="episode"):
        done = False
        while not done:
            if agent == "random":
                action = env.action_space.sample()
            else:
                logits = env.unwrapped.next_token_logits().cpu()
                if agent == "greedy":
                    action = int(logits.argmax())
                else:
                    action = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
            obs, reward, done, truncated, info = env.step(action)
            done = done or truncated
        results.append({**info, "reward": reward})
        obs, _ = env.reset()
    return results


def cmd_demo(args) -> int:
    import textgym  # noqa: F401  (registers the envs)

    kwargs = {"model": args.model} if args.model else {}
    env = gym.make(args.env, **kwargs, split="test") if args.env.endswith("Sentiment-v0") else gym.make(args.env, **kwargs)
    results = run_episodes(env, args.agent, args.episodes, seed=args.seed)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.env}: {args.agent} agent, {len(results)} episodes")
    for col in ("prompt", "completion", "score", "kl", "reward"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(r["prompt"], r["completion"], f"{r['score']:.3f}", f"{r['kl']:.3f}", f"{r['reward']:.3f}")
    console = Console()
    console.print(table)
    console.print(f"mean score {np.mean([r['score'] for r in results]):.3f}  mean KL {np.mean([r['kl'] for r in results]):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def cmd_list(args) -> int:
    import textgym
    from textgym import models, rewards

    print("environments:", ", ".join(textgym.ENV_IDS))
    print("rewards:     ", ", ".join(rewards.names()))
    print("models:      ", ", ".join(models.BUILTIN), "(or any Hugging Face directory or hub id)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgym", description="Text generation as a Gymnasium environment, for RLHF.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="play a few episodes with a random, greedy or sampling agent")
    demo.add_argument("--env", default="textgym/Sentiment-v0")
    demo.add_argument("--model", default=None, help="model name or path (default: the env's)")
    demo.add_argument("--agent", choices=["random", "greedy", "sample"], default="sample")
    demo.add_argument("--episodes", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", default=None, help="also write the episodes to this JSON file")
    demo.set_defaults(func=cmd_demo)
    lst = sub.add_parser("list", help="registered environments, rewards and models")
    lst.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
