"""One optimizer step of a written-out update: micro-batches, loss scaling, gradient checkpointing.

Every textgym update (PPO, A2C and NLPO's in ``ppo/``, ``a2c/``; GRPO's, RLOO's and REINFORCE++'s
in ``critic_free.py``) hands ``GradientStep.accumulate`` a function giving the loss of some rows
of its minibatch, then calls ``step`` (or ``discard``, when PPO's early stop rejects the
minibatch). What happens in between is here:

- **Micro-batches** (``micro_batch_size=k``): the minibatch's forward and backward run on ``k``
  episodes at a time, and the gradients accumulate. A micro-batch's loss is its share of the
  minibatch's loss: each mean over the minibatch is the sum over the micro-batch's rows divided by
  the *minibatch's* count, and advantages are normalised over the whole minibatch before it is
  split, so the accumulated gradient is the minibatch's (up to float rounding) while the
  activations held at once are those of ``k`` episodes. The logged figures are summed the same way.
- **Loss scaling** for float16 (Micikevicius et al. 2018, "Mixed Precision Training"): the loss is
  multiplied by a dynamic scale before backward so small gradients do not flush to zero in
  float16; gradients are unscaled before clipping, and a step whose gradients overflowed is skipped
  and the scale lowered (``torch.amp.GradScaler``). bfloat16 has float32's exponent range and needs
  none; with float32 the scaler is off and every call passes through.
- **Data parallelism** (``textgym.distributed``): each rank's minibatch is its part of the global
  minibatch, and its loss the part's share (``agents.data_parallel``), exactly as a micro-batch's
  is: so the ranks' logged figures are summed like the micro-batches' (every rank then sees the
  minibatch's figures, its early-stopping KL included), and their gradients are summed before the
  step (before unscaling: an overflow on one rank skips the step on all). The summing is
  PyTorch's ``DistributedDataParallel``: every loss is computed inside its forward (``_Losses``),
  the micro-batches but the last under ``no_sync`` (one all-reduce per step, overlapped with the
  last backward), with a communication hook that sums where DDP would average (each rank's loss
  already is its share of the global mean). A stand-in part (``agents.data_parallel``) still
  reaches every parameter (its loss is multiplied by 0); a pretraining term (PPO-ptx) does not
  reach the value head, so with one DDP looks for unused parameters (``find_unused_parameters``).
- **Gradient checkpointing** (``gradient_checkpointing=True``; Chen et al. 2016, "Training Deep
  Nets with Sublinear Memory Cost"): during the update only, the trained Hugging Face models keep
  each layer's input and recompute the layer in backward. It is turned off when the update ends:
  the KV-cached rollouts need ``use_cache``, which checkpointed layers refuse in training mode.
  Dropout is off in every textgym model (``textgym.models.disable_dropout``), so the recomputation
  is exact. PyTorch's non-reentrant checkpoint is used: it needs no input that requires grad, so
  LoRA's frozen embeddings are fine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from textgym import distributed, sharding

from .data_parallel import Share

# The loss of some rows of a minibatch, and named figures (tensors or floats) to log.
LossFn = Callable[[slice], tuple[torch.Tensor, dict[str, Any]]]
# A loss of the step's own (PPO-ptx's pretraining term) and its figures, after the micro-batches.
ExtraLossFn = Callable[[], tuple[torch.Tensor, dict[str, Any]]]


def check_micro_batch_size(value: Any) -> int | None:
    """``micro_batch_size``: None (the whole minibatch in one forward) or an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"micro_batch_size must be None (the whole minibatch in one forward) or an integer >= 1 "
                         f"(episodes per forward), got {value!r}")
    return int(value)


def micro_batches(n_rows: int, size: int | None, groups: torch.Tensor | None = None) -> list[slice]:
    """Row slices of a minibatch's micro-batches: all ``n_rows`` rows at once when ``size`` is None,
    else ``size`` groups per micro-batch. ``groups``: each row's group (an episode segment:
    nondecreasing from 0, as ``policy.group_rows`` numbers them); None: every row its own."""
    if size is None or n_rows == 0:
        return [slice(0, n_rows)]
    chunk = (torch.arange(n_rows) if groups is None else groups.detach().cpu()) // size
    cuts = (torch.nonzero(chunk[1:] != chunk[:-1]).flatten() + 1).tolist()
    bounds = [0, *cuts, n_rows]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def take_rows(data: Any, rows: slice) -> Any:
    """``data`` (a tensor, a dict or NamedTuple of them, or None) restricted to ``rows``; a
    minibatch's ``Share`` stays the minibatch's."""
    if data is None or isinstance(data, Share):
        return data
    if isinstance(data, torch.Tensor):
        return data[rows]
    if isinstance(data, dict):
        return {key: take_rows(value, rows) for key, value in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(take_rows(value, rows) for value in data))
    raise TypeError(f"cannot take rows of a {type(data).__name__}")


def upcast_trainable(model: nn.Module) -> None:
    """Make ``model``'s trainable floating-point parameters float32 master weights (in place; the
    forwards still run in the env's precision under autocast): a bfloat16 weight cannot take an
    update below about 1/256 of itself, and a float16 gradient cannot be unscaled."""
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def supports_checkpointing(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_gradient_checkpointing", False))


def set_checkpointing(model: Any, on: bool) -> None:
    """Turn a Hugging Face model's gradient (activation) checkpointing on or off, non-reentrant;
    turning it off also removes the input-gradient hooks that turning it on may add."""
    kwargs = {"use_reentrant": False}
    if on:
        # Hooks that enabling adds are removed when disabling; any that were there already stay.
        model._textgym_had_input_hooks = _has_input_grad_hooks(model)
        # (transformers 5.23 renamed gradient_checkpointing_enable/_disable: the old names warn)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return
    model.activation_checkpointing_disable()
    if _has_input_grad_hooks(model) and not getattr(model, "_textgym_had_input_hooks", False):
        model.disable_input_require_grads()


def _has_input_grad_hooks(model: Any) -> bool:
    return bool(getattr(model, "_require_grads_hooks", None)) or getattr(model, "_require_grads_hook", None) is not None


class _Losses(nn.Module):
    """The trained policy as ``DistributedDataParallel`` sees it: its forward is whatever loss
    function it is handed. DDP prepares its gradient reduction in its forward, so a loss must be
    computed inside one to be synchronised; the policy's own forward acts, it does not compute
    losses."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, loss_fn: Callable[..., Any], *args: Any) -> Any:
        return loss_fn(*args)


def _sum_hook(process_group, bucket):
    """DDP communication hook: the sum of the ranks' gradients (DDP's own averages them). Left
    unannotated: DDP checks the annotation of ``bucket`` against ``dist.GradBucket`` at run time,
    and this module's annotations are strings."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    assert work is not None  # async_op=True returns the work
    return work.get_future().then(lambda fut: fut.value()[0])


def data_parallel(policy: nn.Module, find_unused: bool = False) -> DistributedDataParallel | None:
    """``policy`` wrapped for summed data-parallel gradients (None without a process group). DDP
    broadcasts rank 0's parameters and buffers to every rank when it wraps, so all ranks start from
    the same weights whatever their seeds. ``find_unused``: some loss of a step does not reach
    every trainable parameter (DDP then walks each loss's graph to find those it skips)."""
    if not distributed.is_initialized():
        return None
    ddp = DistributedDataParallel(_Losses(policy), find_unused_parameters=find_unused,
                                  forward_sync_buffers=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


class GradientStep:
    """Gradient accumulation over micro-batches, loss scaling and checkpointing for one policy.

    :param policy: the ``LMActorCriticPolicy`` (its ``optimizer`` and trained models).
    :param micro_batch_size: episodes per forward (None: the whole minibatch at once).
    :param gradient_checkpointing: checkpoint the trained LMs (``policy.lm``, a separate critic)
        during updates.
    :param loss_scaling: scale the loss dynamically (float16).
    :param extra_loss: steps add an extra loss (``accumulate``'s ``extra``) that may not reach every
        trainable parameter.
    """

    def __init__(self, policy, *, micro_batch_size: int | None = None, gradient_checkpointing: bool = False,
                 loss_scaling: bool = False, extra_loss: bool = False):
        self.policy = policy
        self.micro_batch_size = check_micro_batch_size(micro_batch_size)
        self.scaler = torch.amp.GradScaler(policy.lm_device.type, enabled=loss_scaling)
        # Sharded (``textgym.sharding``), FSDP sums the gradients of the sharded weights itself.
        self.sharded = sharding.has_sharded(policy)
        self.ddp = None if self.sharded else data_parallel(policy, find_unused=extra_loss)
        self.checkpointed: list[nn.Module] = []
        if gradient_checkpointing:
            self.checkpointed = [m for m in (policy.lm, policy.critic) if m is not None]
            for model in self.checkpointed:
                if not supports_checkpointing(model):
                    raise ValueError(f"gradient_checkpointing=True needs Hugging Face models that support it; "
                                     f"{type(model).__name__} does not")

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The span of an update: the trained models are checkpointed within it (when asked)."""
        for model in self.checkpointed:
            set_checkpointing(model, True)
        try:
            yield
        finally:
            for model in self.checkpointed:
                set_checkpointing(model, False)

    def accumulate(self, loss_fn: LossFn, n_rows: int, groups: torch.Tensor | None = None,
                   extra: ExtraLossFn | None = None) -> dict[str, float]:
        """Zero the gradients, then for each micro-batch (``micro_batches``) of the minibatch's
        ``n_rows`` rows: ``loss, parts = loss_fn(rows)`` and backward. ``loss_fn`` returns the
        micro-batch's share of the minibatch loss (its sums over the minibatch's counts) and named
        figures shared alike; ``extra``: one more loss term of the step (its own batch, after the
        micro-batches). Returns each figure summed over the micro-batches (and, data-parallel,
        over the ranks): the minibatch's. Data-parallel, the gradients are summed over the ranks in
        the last backward."""
        self.policy.optimizer.zero_grad()
        slices = micro_batches(n_rows, self.micro_batch_size, groups)
        counted = len(slices)
        if self.sharded:  # every forward and backward is collective: every rank takes as many
            slices += [slice(0, 1)] * (max(distributed.all_gather_int(len(slices))) - len(slices))
        calls: list[tuple[Callable[..., Any], tuple[Any, ...], bool]] = [
            (loss_fn, (rows,), i < counted) for i, rows in enumerate(slices)]
        if extra is not None:
            calls.append((extra, (), True))
        totals: dict[str, float] = {}
        for i, (fn, args, counts) in enumerate(calls):
            synced = i == len(calls) - 1
            with contextlib.nullcontext() if self.ddp is None or synced else self.ddp.no_sync():
                loss, parts = fn(*args) if self.ddp is None else self.ddp(fn, *args)
                self.backward(loss if counts else loss * 0.0)  # (a stand-in micro-batch counts nothing)
            for name, value in parts.items() if counts else ():
                totals[name] = totals.get(name, 0.0) + float(value)
        return distributed.sum_over_ranks(totals)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled with loss scaling), accumulating into the gradients."""
        self.scaler.scale(loss).backward()

    def step(self, max_grad_norm: float | None) -> None:
        """Clip the norm of the accumulated (unscaled; data-parallel, already summed over the
        ranks) gradients to ``max_grad_norm`` and step the optimizer (skipped by the scaler if a
        float16 gradient overflowed)."""
        optimizer = self.policy.optimizer
        if self.sharded:  # the weights that are not sharded (a value head) are summed here
            sharding.sum_replicated_gradients(list(self.policy.parameters()))
        self.scaler.unscale_(optimizer)
        if max_grad_norm is not None:
            clip = sharding.clip_grad_norm_ if self.sharded else torch.nn.utils.clip_grad_norm_
            clip(list(self.policy.parameters()), max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()

    def discard(self) -> None:
        """Drop the accumulated gradients without a step (PPO's early stop)."""
        self.policy.optimizer.zero_grad()
