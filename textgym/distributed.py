"""Data parallelism on ``torch.distributed``: the few collective operations textgym needs.

``torchrun --nproc-per-node N -m textgym train CONFIG`` starts N processes (ranks); each joins the
process group (``init_from_env``: gloo on CPU, NCCL on GPU), plays its share of the env's rows and
sums gradients with the others before every optimizer step (``DistributedDataParallel``, in
``agents.update``). The agents and the pipeline call
the functions below; every one of them is a no-op that returns the local answer when no process
group is initialised, so a single process computes exactly what it computed without this module.

Collectives must be called by every rank, in the same order: the callers here are the agents'
rollouts and updates and ``textgym train``'s iteration, which every rank runs in lockstep.
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


def _device() -> torch.device:
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
    tensor = torch.as_tensor(array, device=_device()).clone()
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
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_int(value: int) -> list[int]:
    """Every rank's ``value``, in rank order (a tensor collective: cheap enough for every step)."""
    if not is_initialized():
        return [int(value)]
    mine = torch.tensor([int(value)], dtype=torch.long, device=_device())
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


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None,
                       counts: list[int] | None = None) -> torch.Tensor:
    """One token per row of ``probs`` ``[n, V]``, drawn as the rows of the global batch: the rows
    of every rank stacked in rank order (``counts``: each rank's number of rows, gathered when not
    given), sampled as ``torch.multinomial(global_probs, 1)`` samples them in one process.

    ``torch.multinomial`` draws one sample per row as ``argmax(probs / E)`` with ``E`` an
    exponential noise tensor of the batch's shape (PyTorch's ``multinomial`` for one sample). Here
    every rank draws the noise of the whole global batch from its generator (in the same state on
    every rank: the agents seed them alike) and takes its own rows' part, so row r gets the same
    token whichever rank holds it, and N processes sample what one process would. Every rank must
    call this together, with or without rows of its own. The price: each rank draws the noise of
    the global batch, ``total x V`` numbers per token, N times its own share (cheap next to the
    forward that produced ``probs``)."""
    if not is_initialized():
        return torch.multinomial(probs, 1, True, generator=generator).squeeze(1)
    counts = all_gather_int(probs.shape[0]) if counts is None else counts
    return sample_rows_of(probs, sum(counts[: rank()]), sum(counts), generator)


def sample_rows_of(probs: torch.Tensor, offset: int, total: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.multinomial(global_probs, 1)`` of a batch of ``total`` rows, for the rows ``offset``
    to ``offset + n - 1`` only, whose probabilities ``probs`` ``[n, V]`` are: the exponential noise
    of the whole batch is drawn, and these rows' part used (see ``sample_categorical``)."""
    noise = torch.empty((total, probs.shape[1]), dtype=probs.dtype, device=probs.device).exponential_(
        generator=generator)
    return (probs / noise[offset : offset + probs.shape[0]]).argmax(-1)
