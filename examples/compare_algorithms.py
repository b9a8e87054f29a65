"""The same task under every algorithm (PPO, A2C, NLPO, TRPO, GRPO, RLOO, REINFORCE++, and offline ILQL
and DPO on episodes the untrained model played): only the name changes.

    python examples/compare_algorithms.py [--model textgym/smollm2-135m] [--steps 4096]
"""

import argparse
import tempfile

import gymnasium as gym

from textgym import agents
from textgym.pipeline.record import record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="textgym/tiny")
    parser.add_argument("--steps", type=int, default=2048)
    args = parser.parse_args()
    env_kwargs = dict(model=args.model, reward="keyword", reward_kwargs={"keywords": ["good", "great", "the"]},
                      max_new_tokens=8, max_prompt_tokens=24)
    lr = 3e-3 if args.model == "textgym/tiny" else 1e-4
    results = {}
    recordings = tempfile.TemporaryDirectory()
    # The offline algorithms learn from episodes the untrained model played: 32 prompts x 4 completions
    # (DPO ranks each prompt's 4 by their reward; ILQL learns from all 128).
    env = gym.make_vec("textgym/TextGen-v0", num_envs=8, vectorization_mode="vector_entry_point", **env_kwargs)
    data = str(record(env, f"{recordings.name}/untrained", n_prompts=32, samples=4, progress=False).path)
    env.close()
    for algo in agents.names():
        # n_steps (tokens per row per rollout) belongs to the actor-critic algorithms; the critic-free
        # ones play whole rounds of episodes. batch_size: transitions (PPO, NLPO, TRPO's critic) or tokens
        # (critic-free).
        hp: dict = {"n_steps": 16} if algo in ("ppo", "a2c", "nlpo", "trpo") else {}
        if algo not in ("a2c", "ilql", "dpo"):
            hp["batch_size"] = 64
        if algo in ("ilql", "dpo"):  # an offline step count is examples trained on (episodes, or prompts for DPO)
            hp["data"] = data
        model = agents.make(algo, "textgym/TextGen-v0", n_envs=8, env_kwargs=env_kwargs, seed=0, learning_rate=lr,
                            **hp)
        before = agents.evaluate(model, 32)["score"]
        model.learn(args.steps)
        after = agents.evaluate(model, 32)
        results[algo] = (before, after["score"], after["kl"])
    recordings.cleanup()
    print(f"{'algo':12} {'before':>8} {'after':>8} {'KL':>8}")
    for algo, (before, after, kl) in results.items():
        print(f"{algo:12} {before:8.2f} {after:8.2f} {kl:8.2f}")


if __name__ == "__main__":
    main()
