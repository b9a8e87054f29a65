"""One PPO epoch over a rollout against one teacher-forced forward+backward over the same sequences.

The floor of any policy-gradient update: one forward and one backward of the LM (and value head)
over each sampled sequence. Prints both times and the ratio PPO epoch / floor (target <= 1.5),
measured in one run. ``--batch-size`` sets PPO's minibatch in transitions (default: the whole
rollout, i.e. the same batch as the floor).

    python benchmarks/update_throughput.py                          # textgym/tiny
    python benchmarks/update_throughput.py --model textgym/smollm2-135m
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

from benchmarks.common import collect_rollout, parser, setup
from textgym import lm


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args()
    batch_size = args.batch_size or args.n_envs * args.new_tokens
    model, tokenizer, prompts, agent = setup(args, n_epochs=1, batch_size=batch_size, target_kl=None)
    policy, core = agent.policy, agent.env.core

    collect_rollout(agent)
    # The sequences of that rollout: every env ran exactly one episode of new_tokens tokens.
    final = agent.rollout_buffer.observations
    ids = torch.tensor(final["input_ids"][-1], dtype=torch.long)
    mask = torch.tensor(final["attention_mask"][-1], dtype=torch.long)
    actions = torch.as_tensor(agent.rollout_buffer.actions[-1]).long().view(-1)
    ids[:, -1], mask[:, -1] = actions, 1
    P = core.P

    T = ids.shape[1] - P

    def floor() -> float:
        start = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=lm.position_ids(mask), use_cache=False,
                    output_hidden_states=True, logits_to_keep=T + 1)
        logp = torch.log_softmax(out.logits[:, :T], -1).gather(-1, ids[:, P:, None])
        values = policy.value_head(out.hidden_states[-1][:, P - 1 : -1])
        (values.sum() - logp.sum()).backward()
        policy.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def ppo_epoch() -> float:
        snapshot = {k: v.clone() for k, v in policy.state_dict().items()}
        start = time.perf_counter()
        agent.train()
        elapsed = time.perf_counter() - start
        policy.load_state_dict(snapshot)  # every repeat updates the same weights
        return elapsed

    floor()
    ppo_epoch()  # warm-up: allocates the optimizer state
    times = [(floor(), ppo_epoch()) for _ in range(args.repeats)]  # interleaved: same machine load
    t_floor, t_ppo = min(t[0] for t in times), min(t[1] for t in times)
    print(f"model {args.model}, {args.n_envs} sequences of {P} + {args.new_tokens} tokens, "
          f"minibatch {batch_size} transitions, {torch.get_num_threads()} threads")
    print(f"forward+backward floor : {t_floor * 1000:9.3f} ms")
    print(f"one PPO epoch          : {t_ppo * 1000:9.3f} ms")
    print(f"ratio PPO epoch / floor = {t_ppo / t_floor:.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
