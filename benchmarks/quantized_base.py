"""Quantized frozen bases under LoRA against a float32 one: decoding speed, update speed and memory.

Each variant runs in a process of its own (so its peak memory is its own), float32, int8
(torchao) and nf4 (bitsandbytes) in turn, ``--rounds`` times, best time kept (a quantized variant
whose library is not installed is left out): a PPO agent with LoRA adapters (``lora=True``) over
the model loaded with ``quantize=None``, ``"int8"`` or ``"nf4"`` (``textgym.quantization``), the
reference being the adapter-free base in each. Prints, as a Markdown table: rollout tokens/s (one
KV-cached forward per token for ``--n-envs`` rows, the reference's teacher-forced forward and the
reward included), the seconds of one update (4 epochs), the bytes of the model's weights and the
process's peak resident memory; then the ratios quantized / float32 of this run and the machine's
yardstick.

    python benchmarks/quantized_base.py --model textgym/smollm2-135m
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

from benchmarks.common import collect_rollout, machine, parser, yardstick
from textgym import agents, quantization
from textgym.prompts import sentiment_prompts

VARIANTS = ("float32", "int8", "nf4")
LIBRARIES = {"int8": "torchao", "nf4": "bitsandbytes"}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters, a quantized weight counted by the tensors it stores."""
    total = 0
    for p in model.parameters():
        if quantization.is_quantized(p) and hasattr(p, "quant_state"):  # bitsandbytes: packed bytes and scales
            described = [v for v in p.quant_state.as_dict(packed=True).values() if isinstance(v, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in [p.data, *described])
        elif quantization.is_quantized(p):  # torchao: the tensors its subclass is made of
            names, _ = p.__tensor_flatten__()
            total += sum(getattr(p, n).numel() * getattr(p, n).element_size() for n in names)
        else:
            total += p.numel() * p.element_size()
    return total


def worker(args) -> None:
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    env_kwargs = dict(model=args.model, prompts=sentiment_prompts("train").prompts[: args.n_envs], reward="length",
                      stop_on_eos=False, max_new_tokens=args.new_tokens, max_prompt_tokens=args.prompt_tokens,
                      quantize=None if args.variant == "float32" else args.variant)
    agent = agents.make("ppo", "textgym/TextGen-v0", n_envs=args.n_envs, env_kwargs=env_kwargs, seed=0, lora=True,
                        n_steps=args.new_tokens, batch_size=64, n_epochs=4, learning_rate=1e-4)
    collect_rollout(agent)  # warm-up
    rollout = min(collect_rollout(agent) for _ in range(args.repeats))
    start = time.perf_counter()
    agent.train()
    update = time.perf_counter() - start
    print(json.dumps({"rollout_tok_s": args.n_envs * args.new_tokens / rollout, "update_s": update,
                      "weights_mb": weight_bytes(agent.core.model) / 2**20,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="processes per variant, run in turn")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a worker process's own
    args = p.parse_args()
    if args.variant:
        worker(args)
        return
    forwarded = ["--model", args.model, "--n-envs", str(args.n_envs), "--new-tokens", str(args.new_tokens),
                 "--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats)]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    variants = [v for v in VARIANTS if v not in LIBRARIES or importlib.util.find_spec(LIBRARIES[v]) is not None]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            out = subprocess.run([sys.executable, __file__, *forwarded, "--variant", variant], check=True,
                                 capture_output=True, text=True).stdout
            results[variant].append(json.loads(out.strip().splitlines()[-1]))
    best = {v: {"rollout_tok_s": max(r["rollout_tok_s"] for r in rs), "update_s": min(r["update_s"] for r in rs),
                "weights_mb": rs[0]["weights_mb"], "peak_rss_mb": min(r["peak_rss_mb"] for r in rs)}
            for v, rs in results.items()}
    print(f"{machine()}; model {args.model}; PPO with LoRA, batch {args.n_envs} x {args.new_tokens} new tokens; "
          f"best of {args.rounds} processes x {args.repeats} rollouts")
    print("\n| base | rollout tok/s | update s | weights MiB | peak memory MiB |\n|---|---|---|---|---|")
    for v, b in best.items():
        print(f"| {v} | {b['rollout_tok_s']:.1f} | {b['update_s']:.2f} | {b['weights_mb']:.1f} "
              f"| {b['peak_rss_mb']:.0f} |")
    f = best["float32"]
    print()
    for v in variants[1:]:
        q = best[v]
        print(f"ratios {v} / float32: rollout speed {q['rollout_tok_s'] / f['rollout_tok_s']:.2f}, update time "
              f"{q['update_s'] / f['update_s']:.2f}, weights {q['weights_mb'] / f['weights_mb']:.2f}, peak memory "
              f"{q['peak_rss_mb'] / f['peak_rss_mb']:.2f}")
    print(f"yardstick: {args.model} generate 16 x 32 tokens at {yardstick(args.model):.0f} tok/s")


if __name__ == "__main__":
    main()
