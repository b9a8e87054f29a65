"""Data parallelism on ``torch.distributed``: the few collective operations textgym needs.

``torchrun --nproc-per-node N -m textgym train CONFIG`` starts N processes (ranks); each joins the
process group (``init_from_env``: gloo on CPU, NCCL on GPU), plays its share of the env's rows and
sums gradients with the others before every optimizer step (``DistributedDataParallel``, in
``agents.update``). The agents and the pipeline call
the functions below; every one of them is a no-op that returns the local answer when no process
group is initialised, so a single process computes exactly what it computed without this module.

Collectives must be called by every rank, in the same order: the callers here are the agents'
rollouts and updates and ``textgym train``'s iteration, which every rank runs in lockstep. With
the model sharded (``textgym.sharding``, ``fsdp=True``) every forward is a collective too, which
the ranks do not run in step: each collective here first meets the other ranks' pending forwards
(``before_collectives``).
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

T = TypeVar("T")

# Called before every collective below: the sharded models' drain (``textgym.sharding``), which
# answers other ranks' pending forwards so that the collective meets every rank.
_BEFORE_COLLECTIVES: list[Callable[[], None]] = []


def before_collectives(fn: Callable[[], None]) -> None:
    """Run ``fn()`` before each collective of this module (on every rank, as they are)."""
    _BEFORE_COLLECTIVES.append(fn)


def _meet() -> None:
    for fn in _BEFORE_COLLECTIVES:
        fn()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the rank that alone writes files (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        _meet()
        dist.barrier()


def init_from_env(backend: str | None = None, timeout: datetime.timedelta | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); returns True when this process is
    one of several ranks. With ``WORLD_SIZE`` unset or 1 (a plain run, or ``--nproc-per-node 1``)
    nothing is joined. On a GPU machine each rank takes the GPU ``LOCAL_RANK`` (so ``"cuda"``
    means that one) and the backend is NCCL; on CPU it is gloo. ``timeout``: how long a
    collective waits for the other ranks (torch's default, 30 minutes for gloo) before it fails."""
    if is_initialized():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return True


def shutdown() -> None:
    """Leave the process group (at the end of a run; a no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()


def collective_device() -> torch.device:
    """Where collective tensors live: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- shares of the global batch ---------------------------------------------------------------------


def local_rows(total: int, what: str = "n_envs") -> tuple[int, int]:
    """``(first row, number of rows)`` of this rank's share of ``total`` rows: rank k holds rows
    ``k * total / N`` to ``(k + 1) * total / N - 1`` of the global batch. ``total`` must split
    evenly (``what`` names it in the error)."""
    n = world_size()
    if total % n:
        raise ValueError(f"{what}={total} cannot be split evenly over the {n} ranks (WORLD_SIZE={n}): use a "
                         f"multiple of {n}")
    return rank() * (total // n), total // n


def split_evenly(total: int) -> tuple[int, int]:
    """``(start, stop)`` of this rank's block of ``total`` items split as evenly as can be (the
    first ``total % N`` ranks take one more): for work that need not divide, like evaluation."""
    n, k = world_size(), rank()
    size, extra = divmod(total, n)
    start = k * size + min(k, extra)
    return start, start + size + (k < extra)


# --- reductions -----------------------------------------------------------------------------------


def all_reduce_sum(values: Any) -> np.ndarray:
    """The elementwise sum over ranks of ``values`` (a float, or an array of the same shape on
    every rank), as float64."""
    array = np.asarray(values, dtype=np.float64)
    if not is_initialized():
        return array
    _meet()
    tensor = torch.as_tensor(array, device=collective_device()).clone()
    dist.all_reduce(tensor)
    return tensor.cpu().numpy().reshape(array.shape)


def all_reduce_mean(values: Any) -> np.ndarray:
    """The elementwise mean over ranks of ``values`` (a float or same-shaped arrays)."""
    return all_reduce_sum(values) / world_size()


def sum_over_ranks(figures: dict[str, float]) -> dict[str, float]:
    """For each key (the same keys on every rank), the sum of the ranks' figures, in one collective."""
    if not is_initialized():
        return figures
    keys = sorted(figures)
    sums = all_reduce_sum([float(figures[k]) for k in keys])
    return {k: float(v) for k, v in zip(keys, sums)}


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank."""
    return bool(all_reduce_sum(float(bool(flag))) > 0)


def mean_over_ranks(values: Mapping[str, Sequence[float]]) -> dict[str, tuple[float | None, int]]:
    """For each key (the same keys on every rank): ``(mean, count)`` of the values of every rank
    together (mean None where no rank has any), in one collective. Without a process group:
    ``np.mean`` of the local values."""
    if not is_initialized():
        return {k: (float(np.mean(v)) if len(v) else None, len(v)) for k, v in values.items()}
    keys = sorted(values)
    sums = all_reduce_sum([[float(np.sum(values[k])), len(values[k])] for k in keys]).reshape(len(keys), 2)
    return {k: (float(s / n) if n else None, int(n)) for k, (s, n) in zip(keys, sums)}


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and (population) standard deviation of the values of every rank together."""
    values = np.asarray(values, dtype=np.float64)
    if not is_initialized():
        return values.mean(), values.std()
    n, total = all_reduce_sum([values.size, values.sum()])
    mean = total / n
    return mean, float(np.sqrt(all_reduce_sum(np.square(values - mean).sum()) / n))


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not is_initialized():
        return [obj]
    _meet()
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_int(value: int) -> list[int]:
    """Every rank's ``value``, in rank order (a tensor collective: cheap enough for every step)."""
    if not is_initialized():
        return [int(value)]
    _meet()
    mine = torch.tensor([int(value)], dtype=torch.long, device=collective_device())
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [int(t.item()) for t in out]


def concat_over_ranks(items: list[T]) -> list[T]:
    """The lists of every rank joined in rank order."""
    if not is_initialized():
        return items
    return [item for part in all_gather_object(items) for item in part]


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized():
        return obj
    _meet()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run by rank 0 alone, its result handed to every rank; if it raises,
    every rank raises that error, so no rank waits for a rank that has stopped. For work on
    shared state that one rank does for all, such as claiming a run directory."""
    if not is_initialized():
        return fn(*args, **kwargs)
    if is_main():
        try:
            value = fn(*args, **kwargs)
        except BaseException as err:
            broadcast_object(pickle.dumps((False, _portable(err))))
            raise
        broadcast_object(pickle.dumps((True, value)))
        return value
    ok, value = pickle.loads(broadcast_object(b""))
    if not ok:
        raise value
    return value


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a RuntimeError with its text (other ranks raise it)."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err} (on rank 0)")


# --- sampling -----------------------------------------------------------------------------------------


# SplitMix64 (Steele, Lea & Flood 2014, "Fast splittable pseudorandom number generators"; the
# constants of Java's SplittableRandom) as signed int64: the i-th output of the stream seeded with
# key is mix(key + i * GAMMA), computable for any i without the ones before it.
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX = ((30, 0xBF58476D1CE4E5B9 - 2**64), (27, 0x94D049BB133111EB - 2**64), (31, None))


def splitmix64(key: int, counters: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 outputs (int64 bit patterns) of the stream ``key`` at positions ``counters``
    (int64), in place of ``counters``. Torch's integer multiply wraps modulo 2**64; its right shift
    of a signed integer copies the sign bit, which the mask clears."""
    z = counters.mul_(_GAMMA).add_(key)
    shifted = torch.empty_like(z)
    for shift, multiplier in _MIX:
        torch.bitwise_right_shift(z, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(shifted)
        if multiplier is not None:
            z.mul_(multiplier)
    return z


def row_noise(key: int, first_row: int, n_rows: int, width: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Exponential(1) noise ``[n_rows, width]`` for the rows ``first_row`` to ``first_row + n_rows - 1``
    of a batch: row r's numbers are positions ``r * width`` to ``(r + 1) * width - 1`` of the
    SplitMix64 stream ``key``, so they depend on the key and the row only, not on which rows are
    drawn with it. ``-log(u)`` of ``u`` uniform in (0, 1) from the top 53 bits in float64, else the
    top 24 in float32 (the result's dtype)."""
    real = torch.float64 if dtype == torch.float64 else torch.float32
    bits = 53 if real == torch.float64 else 24
    counters = torch.arange(first_row * width, (first_row + n_rows) * width, dtype=torch.int64, device=device)
    z = splitmix64(key, counters).view(n_rows, width)
    top = torch.bitwise_right_shift(z, 64 - bits).bitwise_and_((1 << bits) - 1)  # the top bits, unsigned
    uniform = top.to(real).add_(0.5).mul_(2.0**-bits)
    return uniform.log_().neg_()


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None,
                       counts: list[int] | None = None) -> torch.Tensor:
    """One token per row of ``probs`` ``[n, V]``, drawn as the rows of the global batch: the rows
    of every rank stacked in rank order (``counts``: each rank's number of rows, gathered when not
    given; a single process holds the whole batch). Every rank must call this together, with or
    without rows of its own, and the same number of times (the agents' rollouts step in lockstep).

    Each call draws one key from ``generator`` (torch's default CPU generator when None: the
    agents seed it alike on every rank), and the row r of the global batch takes the token
    ``argmax(probs[r] / E[r])`` with ``E[r]`` exponential noise from the counter-based stream of that
    key and r (``row_noise``): the exponential race, an exact draw from ``probs[r]`` (torch's own
    ``multinomial`` of one sample is the same race with noise from a sequential generator). So row
    r gets the same token whichever rank holds it and however many ranks there are, and a rank
    draws ``V`` numbers per row of its own only."""
    key = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator))
    offset = 0
    if is_initialized():
        counts = all_gather_int(probs.shape[0]) if counts is None else counts
        offset = sum(counts[: rank()])
    return sample_rows_of(probs, offset, key)


def sample_rows_of(probs: torch.Tensor, offset: int, key: int) -> torch.Tensor:
    """Tokens of the rows ``offset`` to ``offset + n - 1`` of a global batch, whose probabilities
    ``probs`` ``[n, V]`` are, for the call's ``key`` (see ``sample_categorical``)."""
    noise = row_noise(key, offset, probs.shape[0], probs.shape[1], dtype=probs.dtype, device=probs.device)
    return (probs.to(noise.dtype) / noise).argmax(-1)
