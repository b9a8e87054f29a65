"""Sharding the trained model (FSDP2, ``fsdp=True``) against replicating it (DDP): what a rank holds and what it costs.

The same N-process run twice on the same global batch (``torchrun``, gloo on CPU, NCCL on GPUs):
one PPO iteration (fresh episodes, a rollout of ``--n-envs`` rows of ``--new-tokens`` tokens, the
update) with the LM replicated on every rank (DDP) and with it sharded (``textgym.sharding``: the
policy LM and the frozen reference, each rank holding 1/N of the weights, gradients and Adam
state, every forward gathering one layer at a time). Prints per rank (the largest over the ranks)
the bytes of model weights and optimizer state it holds after the iteration, its resident memory
then (the C allocator's free memory handed back first), its peak resident memory, and the
iteration's time, then the ratios sharded / replicated. On CPU the peak counts what the allocator
kept of freed buffers (every forward gathers and frees each layer) and the whole model each rank
loads before sharding it. Also prints the machine
and a yardstick (the model's ``generate`` speed in one process), as the README's figures state theirs.

    python benchmarks/fsdp_sharding.py                                  # textgym/tiny, 2 processes
    python benchmarks/fsdp_sharding.py --model textgym/smollm2-135m --nproc 2
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

from benchmarks.common import iteration, machine, ranks_parser, ranks_yardstick
from textgym import agents, distributed
from textgym.prompts import sentiment_prompts

MiB = 2**20
COLUMNS = ("weights MiB", "optimizer MiB", "resident MiB", "peak memory MiB", "iteration s")


def held_bytes(tensors) -> int:
    """Bytes of the tensors' data on this rank (a sharded tensor's local part)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if isinstance(t, torch.Tensor))


def resident() -> int:
    """Bytes of this process's resident memory now, after handing the C allocator's free memory back
    to the system (glibc's ``malloc_trim``; on CPU, freed tensors' memory otherwise stays resident
    and the figure would be the allocator's history, not what the process holds)."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc is not None and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    """One rank: the best of ``--repeats`` iterations, then what it holds."""
    torch.set_num_threads(args.threads)
    distributed.init_from_env()
    prompts = sentiment_prompts("train").prompts[: args.n_envs]
    env_kwargs = dict(model=args.model, prompts=prompts, reward="length", stop_on_eos=False,
                      max_new_tokens=args.new_tokens, max_prompt_tokens=args.prompt_tokens)
    agent = agents.make("ppo", "textgym/TextGen-v0", n_envs=args.n_envs, env_kwargs=env_kwargs, seed=0,
                        n_steps=args.new_tokens, learning_rate=1e-5, fsdp=args.fsdp)
    iteration(agent, 0)  # warm-up: allocates the optimizer state
    best = min(iteration(agent, it) for it in range(1, args.repeats + 1))
    core = agent.core
    models = {id(m): m for m in (core.model, core.ref_model, agent.policy)}.values()
    weights = held_bytes({id(p): p for m in models for p in m.parameters()}.values())
    optimizer = held_bytes(v for state in agent.policy.optimizer.state.values() for v in state.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    figures = [weights / MiB, optimizer / MiB, resident() / MiB, peak / MiB, best]
    Path(args.out, f"rank{distributed.rank()}.json").write_text(json.dumps(figures))
    distributed.shutdown()


def measure(args, fsdp: bool) -> list[float]:
    """The largest figures over the ranks of an ``--nproc``-process run."""
    script = [str(Path(__file__).resolve()), "--worker", "--model", args.model, "--n-envs", str(args.n_envs),
              "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
              "--repeats", str(args.repeats), "--threads", str(args.threads), *(["--fsdp"] if fsdp else [])]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as out_dir:  # each rank writes its figures there
        out = subprocess.run([sys.executable, *launcher, *script, "--out", out_dir], capture_output=True, text=True,
                             env=env)
        files = sorted(Path(out_dir).glob("rank*.json"))
        if out.returncode or len(files) != args.nproc:
            sys.exit(f"the {'sharded' if fsdp else 'replicated'} measurement failed:\n{out.stderr[-3000:]}")
        ranks = [json.loads(f.read_text()) for f in files]
    return [max(column) for column in zip(*ranks)]


def main() -> None:
    p = ranks_parser(__doc__.splitlines()[0])
    p.add_argument("--fsdp", action="store_true", help="internal: the worker shards the model")
    p.add_argument("--out", help="internal: where the worker writes its figures")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    speed = ranks_yardstick(args)
    rows = {"replicated (DDP)": measure(args, False), "sharded (FSDP2)": measure(args, True)}
    print(f"model {args.model}, {args.nproc} ranks, global batch {args.n_envs} sequences of {args.prompt_tokens} + "
          f"{args.new_tokens} tokens, PPO (Adam, the whole LM trained), {args.threads} thread(s) per rank")
    print(f"machine: {machine()}; yardstick: {args.model} generate of {args.n_envs} x {args.new_tokens} tokens at "
          f"{speed:.0f} tok/s")
    print("\nper rank (the largest over the ranks):\n")
    print("| model | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name, figures in rows.items():
        print(f"| {name} | " + " | ".join(f"{x:.4g}" for x in figures) + " |")
    print()
    replicated, sharded = rows.values()
    for column, a, b in zip(COLUMNS, replicated, sharded):
        print(f"ratio {column.removesuffix(' MiB').removesuffix(' s')} sharded / replicated = {b / a:.2f}")


if __name__ == "__main__":
    main()
