"""Agent rollout throughput against raw ``model.generate``, same model, batch, lengths and sampling.

Both sample every token from the full distribution (top_k=0, top_p=1) for ``--new-tokens`` tokens
in a batch of ``--n-envs`` prompts. The agent's rollout also computes values, the reference
log-probs (a teacher-forced forward of the reference model over every sequence) and the reward,
and fills SB3's rollout buffer. Prints tokens/s and two ratios measured in one run:

- agent / ``model.generate`` (target >= 0.8);
- agent / (``model.generate`` + the same reference forward and reward), the work a TRL-style
  rollout does, so like is compared with like.

    python benchmarks/rollout_throughput.py                          # textgym/tiny
    python benchmarks/rollout_throughput.py --model textgym/smollm2-135m
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
    args = parser(__doc__.splitlines()[0]).parse_args()
    model, tokenizer, prompts, agent = setup(args)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=args.prompt_tokens)

    @torch.no_grad()
    def generate() -> float:
        start = time.perf_counter()
        model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    core = agent.env.core

    @torch.no_grad()
    def generate_and_score() -> float:
        start = time.perf_counter()
        out = model.generate(**batch, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, pad_token_id=tokenizer.pad_token_id)
        P = batch["input_ids"].shape[1]
        completion = out[:, P:]
        lm.completion_logprobs(core.ref_model, batch["input_ids"], batch["attention_mask"], completion,
                               torch.ones_like(completion))
        core.reward_fn(prompts, tokenizer.batch_decode(completion, skip_special_tokens=True))
        return time.perf_counter() - start

    generate(), generate_and_score(), collect_rollout(agent)  # warm-up
    times = [(generate(), generate_and_score(), collect_rollout(agent)) for _ in range(args.repeats)]
    t_gen, t_gen_score, t_agent = (min(t[i] for t in times) for i in range(3))
    tokens = args.n_envs * args.new_tokens
    print(f"model {args.model}, batch {args.n_envs} x {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(f"model.generate                     : {tokens / t_gen:8.1f} tokens/s")
    print(f"model.generate + reference + reward: {tokens / t_gen_score:8.1f} tokens/s")
    print(f"agent rollout (all of that + SB3)  : {tokens / t_agent:8.1f} tokens/s")
    print(f"ratio agent / generate                      = {t_gen / t_agent:.2f}  (target >= 0.8)")
    print(f"ratio agent / (generate + reference + reward) = {t_gen_score / t_agent:.2f}")


if __name__ == "__main__":
    main()
