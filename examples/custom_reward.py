"""Register a reward function in Python and train against it.

    python examples/custom_reward.py [--model textgym/smollm2-135m] [--steps 2048]
"""

import argparse

import textgym
from textgym import agents


def politeness(prompts: list[str], completions: list[str], **metadata) -> list[float]:
    """+1 for each polite word, -1 for shouting (a batched reward: one float per completion)."""
    polite = ("please", "thank", "thanks", "kind")
    return [sum(c.lower().count(w) for w in polite) - c.count("!") for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="textgym/tiny")
    parser.add_argument("--steps", type=int, default=2048)
    args = parser.parse_args()

    textgym.rewards.register("politeness", politeness, overwrite=True)
    env_kwargs = dict(model=args.model, reward="politeness", max_new_tokens=12, max_prompt_tokens=24,
                      prompts=["Write a note to your neighbour:", "Reply to the customer:", "Ask for help:"])
    model = agents.make("ppo", "textgym/TextGen-v0", n_envs=8, env_kwargs=env_kwargs, seed=0, n_steps=24,
                        batch_size=96, learning_rate=3e-3 if args.model == "textgym/tiny" else 1e-4)
    before = agents.evaluate(model, 32)
    model.learn(args.steps, progress_bar=True)
    after = agents.evaluate(model, 32)
    print(f"politeness: {before['score']:.2f} -> {after['score']:.2f}")
    for episode in after["episodes"][:3]:
        print(repr(episode["prompt"]), "->", repr(episode["completion"]))


if __name__ == "__main__":
    main()
