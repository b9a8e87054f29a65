"""Data-parallel scaling: the time of one training iteration in 1 process and in N processes, same global batch.

An iteration is what ``textgym train`` repeats: fresh episodes, one rollout of ``--n-envs`` rows
(one episode of ``--new-tokens`` tokens each) and one PPO update (4 epochs, minibatches of 64
transitions). The N-process run (``torchrun``, ``textgym.distributed``: gloo on CPU, NCCL on GPUs)
gives each process ``n_envs / N`` rows and sums their gradients every step (each loss being its
share of the global minibatch's), so it computes the same update; the ratio N processes / 1
process is 1/N for perfect scaling. On a CPU whose cores the single process could use as threads,
it mostly shows the cost of the communication; on a machine with a GPU per process it shows the
scaling. Also prints the machine and a yardstick (the model's ``generate`` speed in one process),
as the README's figures state theirs.

    python benchmarks/ddp_scaling.py                                  # textgym/tiny, 2 processes
    python benchmarks/ddp_scaling.py --model textgym/smollm2-135m --nproc 2
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

from benchmarks.common import iteration, machine, ranks_parser, ranks_yardstick
from textgym import agents, distributed
from textgym.precision import DTYPES
from textgym.prompts import sentiment_prompts

RESULT = "ITERATION_SECONDS"  # the line a worker's rank 0 prints its result on


def make_agent(args):
    """PPO on ``--n-envs`` rows of the sentiment prompts (this rank's share of them, data-parallel)."""
    prompts = sentiment_prompts("train").prompts[: args.n_envs]
    env_kwargs = dict(model=args.model, prompts=prompts, reward="length", stop_on_eos=False, dtype=args.dtype,
                      max_new_tokens=args.new_tokens, max_prompt_tokens=args.prompt_tokens)  # on this rank's device
    return agents.make("ppo", "textgym/TextGen-v0", n_envs=args.n_envs, env_kwargs=env_kwargs, seed=0,
                       n_steps=args.new_tokens, learning_rate=1e-5)


def worker(args) -> None:
    """One process of a measurement (alone, or one rank under torchrun): the best of ``--repeats``."""
    torch.set_num_threads(args.threads)
    distributed.init_from_env()
    agent = make_agent(args)
    iteration(agent, 0)  # warm-up: allocates the optimizer state
    best = min(iteration(agent, it) for it in range(1, args.repeats + 1))
    if distributed.is_main():
        print(f"{RESULT} {best!r}", flush=True)
    distributed.shutdown()


def measure(args, nproc: int) -> float:
    """Best iteration seconds with ``nproc`` processes (1: a plain process; more: torchrun)."""
    script = [str(Path(__file__).resolve()), "--worker", "--model", args.model, "--n-envs", str(args.n_envs),
              "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
              "--repeats", str(args.repeats), "--threads", str(args.threads), "--dtype", args.dtype]
    # torchrun (torch.distributed.run) on one machine, its rendezvous on a free port (--standalone)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, *launcher, *script], capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode or not lines:
        sys.exit(f"the {nproc}-process measurement failed:\n{out.stderr[-3000:]}")
    return float(lines[-1].split()[1])


def main() -> None:
    p = ranks_parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the models' precision (the env's dtype)")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    speed = ranks_yardstick(args, dtype=args.dtype)
    t1, tn = measure(args, 1), measure(args, args.nproc)
    print(f"model {args.model} ({args.dtype}), global batch {args.n_envs} sequences of {args.prompt_tokens} + "
          f"{args.new_tokens} tokens, PPO, {args.threads} thread(s) per process")
    print(f"machine: {machine()}; yardstick: {args.model} generate of {args.n_envs} x {args.new_tokens} tokens at "
          f"{speed:.0f} tok/s")
    for label, seconds in (("1 process", t1), (f"{args.nproc} processes", tn)):
        print(f"one iteration, {label:<13}: {seconds * 1000:10.3f} ms")
    print(f"ratio {args.nproc} processes / 1 process = {tn / t1:.2f}  (perfect scaling: {1 / args.nproc:.2f})")


if __name__ == "__main__":
    main()
