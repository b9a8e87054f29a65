"""Worker of tests/test_distributed.py: one iteration (rollout and update) of several algorithms on
textgym/tiny, as ``textgym train`` runs it, recording what the equivalence test compares.

    torchrun --nproc-per-node 2 tests/distributed_worker.py OUT [LABEL...]   # 2 ranks x n_envs / 2 rows
    python tests/distributed_worker.py OUT                          # 1 process x n_envs rows

Each rank writes ``OUT/LABEL-rankK.pt``: the policy's parameters after the update, the tokens of
its rollout, the rollout's figures and the KL coefficient after it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from textgym import agents, distributed

N_ENVS = 4
# The reward counts the letter "e", which scores differ by in almost any batch: with all scores
# equal, REINFORCE++'s normalised returns would be float noise of the KL term, not comparable.
ENV_KWARGS = {"model": "textgym/tiny", "prompts": [f"Prompt number {i} says" for i in range(11)], "reward": "keyword",
              "reward_kwargs": {"keywords": ["e"], "whole_word": False}, "max_new_tokens": 6, "max_prompt_tokens": 12,
              "stop_on_eos": True, "kl_target": 1.0, "kl_horizon": 50}
# label: (algorithm, env kwargs, hyperparameters). Several small minibatches per epoch and several
# epochs, so that some ranks' parts of some minibatches are empty (stand-ins) and early stopping is
# decided on the global KL. Micro-batches (one episode per forward) must not change the update either.
# PPO-ptx's pretraining term is a forward of its own in every step, which skips the value head.
PPO = {"n_steps": 5, "batch_size": 6, "n_epochs": 2, "learning_rate": 3e-3}
PTX = {"ptx_coef": 0.5, "ptx_data": ["The cat sat on the mat.", "A dog ran in the park.", "It rained all day."],
       "ptx_batch_size": 2}
ALGORITHMS = {
    "ppo": ("ppo", {}, PPO),
    "ppo micro-batched": ("ppo", {}, {**PPO, "micro_batch_size": 1}),
    "ppo-ptx": ("ppo", {}, {**PPO, **PTX}),
    "ppo-ptx micro-batched": ("ppo", {}, {**PPO, **PTX, "micro_batch_size": 1}),
    "ppo lora": ("ppo", {}, {**PPO, "lora": {"r": 4}, "learning_rate": 3e-2}),
    "grpo": ("grpo", {"group_size": 2}, {"batch_size": 8, "n_epochs": 2, "learning_rate": 3e-3}),
    "reinforce++": ("reinforce++", {}, {"episodes_per_row": 2, "batch_size": 8, "n_epochs": 2, "learning_rate": 3e-3}),
}
# The same with the trained LM (and the reference of its own, without LoRA) sharded by FSDP2.
SHARDED = ("ppo", "ppo-ptx micro-batched", "ppo lora", "grpo")
ALGORITHMS |= {f"{label} fsdp": (algo, env, {**hyper, "fsdp": True})
               for label, (algo, env, hyper) in ALGORITHMS.items() if label in SHARDED}


def single_process_label(label: str) -> str:
    """The label whose single-process run a multi-rank run of ``label`` must reproduce: micro-batches
    and sharding leave the update unchanged."""
    return label.removesuffix(" fsdp").removesuffix(" micro-batched")


def full(state: dict) -> dict[str, torch.Tensor]:
    """A state dict's tensors whole (a sharded one's gathered: collective) and detached."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


def one_iteration(label: str, seed: int = 0):
    algo, env_extra, hyperparameters = ALGORITHMS[label]
    drawn = [0]  # the sampling noise this process draws (numbers), counted at its one source
    real_noise = distributed.row_noise

    def counted(*args, **kwargs):
        noise = real_noise(*args, **kwargs)
        drawn[0] += noise.numel()
        return noise

    distributed.row_noise = counted
    try:
        return _run(label, algo, env_extra, hyperparameters, seed) | {"noise": drawn[0]}
    finally:
        distributed.row_noise = real_noise


def _run(label, algo, env_extra, hyperparameters, seed):
    agent = agents.make(algo, "textgym/TextGen-v0", n_envs=N_ENVS, env_kwargs={**ENV_KWARGS, **env_extra}, seed=seed,
                        **hyperparameters)
    initial = full(agent.policy.state_dict())
    agent.set_random_seed(seed)  # as textgym train's iteration
    agent.start_fresh_episodes()
    agent.learn(agent.n_steps * agent.n_envs)
    buffer = agent.rollout_buffer
    tokens = buffer.completion_ids if hasattr(buffer, "completion_ids") else buffer.actions
    return {
        "initial": initial,
        "params": full(agent.policy.state_dict()),
        "tokens": torch.as_tensor(tokens).clone(),
        "stats": dict(agent.rollout_stats),
        "kl_coef": float(agent.core.kl_controller.value),
        "timesteps": int(agent.num_timesteps),
        "logs": {k: float(v) for k, v in agent.logger.name_to_value.items() if k.startswith("train/")},
    }


def main(out: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env()
    for label in sys.argv[2:] or ALGORITHMS:
        torch.save(one_iteration(label), Path(out) / f"{label}-rank{distributed.rank()}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
