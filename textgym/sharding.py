"""Models larger than one device: the trained LM sharded over the data-parallel ranks with PyTorch's
FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al. 2023, "PyTorch FSDP"), the ZeRO-3 layout
(Rajbhandari et al. 2020) that veRL trains with.

``shard(model)`` makes each decoder layer an FSDP unit and the model (embeddings, final norm,
output layer) the root. Every parameter becomes a ``DTensor`` of which rank k holds the k-th 1/N;
a forward gathers one unit's weights at a time and frees them after it, so a rank holds 1/N of the
weights plus one layer's, and 1/N of the gradients and of the optimizer's state. Gradients are
*summed* over the ranks by the reduce-scatter (FSDP's default averages them; each rank's loss is
already its share of the global minibatch's mean, ``agents.data_parallel``), with sum-only
collectives, which gloo also has.

**Lockstep.** Every forward of a sharded model is collective: the ranks must make the same number
of them, in the same order (what they feed in may differ). The update is written so (every rank
takes every step over the same micro-batches, ``agents.update``), but rollouts and evaluation are
not: ranks reset, finish and score their own rows, and evaluation splits prompts unevenly. So each
forward first *announces* itself to the other ranks (a pre-forward hook: one small all-gather),
and a rank about to run any other collective (every one in ``textgym.distributed`` does, and this
module's own: broadcasting, summing and clipping gradients, gathering for saving) first *drains*:
it answers announcements with stand-in forwards of one token, whose outputs nobody reads, until
every rank has arrived. A rank that would answer a forward that needs a backward (training) with a
stand-in raises instead of hanging: the update must stay in step by construction.

What it does not do yet: every rank loads the whole model before sharding it (loading on the
meta device and reading each rank's part of the checkpoint would remove that peak), and saving
gathers the whole state into each rank's CPU memory.

Without a process group nothing here is used: ``shard`` refuses, and every other function is a
no-op on an unsharded model.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from textgym import distributed

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a sharded tensor. torch's distributed tensors take about half a second to
    import, which every textgym process would pay: they are imported when a model is first sharded,
    and nothing is one before."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _whole(tensor: Any) -> torch.Tensor:
    """A sharded tensor gathered whole (collective), or ``tensor`` itself."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def is_sharded(model: Any) -> bool:
    """Whether ``model`` was sharded by FSDP (imported on the first ``shard``, as ``_is_dtensor``)."""
    module = sys.modules.get("torch.distributed.fsdp")
    return module is not None and isinstance(model, module.FSDPModule)

_IDLE, _FORWARD, _TRAINING_FORWARD = 0, 1, 2


class _Lockstep:
    """The sharded models of this process and the announce/drain protocol that keeps their forwards
    collective (see the module's docstring). One per process.

    Each round, every rank says which model it wants to run (or that it waits, idle); the first
    rank's wish that is not idle is the round's forward. The ranks that wanted it run theirs; every
    other rank runs a stand-in of that model, then asks again. So every round is one forward of the
    same model on every rank, whatever order the ranks' own forwards come in."""

    def __init__(self) -> None:
        self.models: list[nn.Module] = []
        self.stand_ins = 0  # forwards run to answer other ranks' (counted, for tests)
        self._standing_in = False

    def add(self, model: nn.Module) -> None:
        index = len(self.models)
        self.models.append(model)

        def announce(module: nn.Module, args: Any, kwargs: Any) -> None:
            if not self._standing_in:
                self.turn(index, _TRAINING_FORWARD if torch.is_grad_enabled() else _FORWARD)

        # prepend: before FSDP's own pre-forward hook, whose root all-gather is already collective
        model.register_forward_pre_hook(announce, prepend=True, with_kwargs=True)

    def turn(self, index: int, op: int) -> None:
        """Wait for the round whose forward is this rank's (``op`` on model ``index``), running the
        stand-ins of the rounds before it."""
        while True:
            chosen = self._round(index, op)  # never None: this rank is not idle
            if chosen is None or chosen == index:
                return
            self.stand_in(chosen)

    def drain(self) -> None:
        """Answer the other ranks' forwards with stand-ins until every rank is here."""
        if not self.models:
            return
        while (chosen := self._round(-1, _IDLE)) is not None:
            self.stand_in(chosen)

    def _round(self, index: int, op: int) -> int | None:
        """One round: every rank's ``(model index, op)``; returns the round's model (None: every
        rank idle)."""
        mine = torch.tensor([index, op], dtype=torch.long, device=distributed.collective_device())
        out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(out, mine)
        wanted = [(int(t[0]), int(t[1])) for t in out]
        active = [w for w in wanted if w[1] != _IDLE]
        if not active:
            return None
        if any(o == _TRAINING_FORWARD for _, o in active) and any(w != active[0] for w in wanted):
            # A stand-in has no backward to match the training forward's: the update must stay in step.
            raise RuntimeError(f"sharded forwards out of lockstep: rank {distributed.rank()} sees the ranks' "
                               f"(model, op) {wanted} (op 2: a forward that trains, 0: waiting for another "
                               "collective); every rank must take every forward of an update step")
        return active[0][0]

    @torch.no_grad()
    def stand_in(self, index: int) -> None:
        model = self.models[index]
        device = next(iter(model.parameters())).device
        self._standing_in = True
        try:
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
        finally:
            self._standing_in = False
        self.stand_ins += 1


_LOCKSTEP = _Lockstep()
distributed.before_collectives(_LOCKSTEP.drain)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules of the classes transformers says must not be split
    over devices (``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot shard {type(model).__name__}: it names no decoder layer class "
                         "(transformers' _no_split_modules), which FSDP's units are made of")
    return layers


def shard(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place over the process group's ranks (each decoder layer one FSDP unit,
    the model the root) and keep its forwards in lockstep; returns it. Every rank must call this
    with the same model (rank 0's weights are broadcast first, so a seed's differences between
    ranks, such as LoRA's initialisation, cannot split them)."""
    if not distributed.is_initialized():
        raise ValueError("sharding (fsdp=True) needs a process group: launch with torchrun --nproc-per-node N")
    if is_sharded(model):
        return model
    # imported on use: a slow import (see _is_dtensor), needed only once a model is sharded
    from torch.distributed.fsdp import FSDPModule, fully_shard

    broadcast_from_main(model)
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
            module.set_gradient_divide_factor(1.0)  # the sum of the ranks' gradients, not their mean
    # FSDP keeps the root's weights (embeddings, output layer) gathered after a forward, for the
    # backward that follows; after a forward that no backward follows (rollouts, evaluation) they
    # would stay whole on every rank until the next update: shard them again.
    model.register_forward_hook(lambda module, args, output: None if torch.is_grad_enabled() else module.reshard())
    _LOCKSTEP.add(model)
    return model


def has_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is sharded."""
    return any(_is_dtensor(p) for p in module.parameters())


def broadcast_from_main(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (in place), but for sharded ones (rank 0's
    would not be the others' part)."""
    _LOCKSTEP.drain()
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if not _is_dtensor(tensor):
                dist.broadcast(tensor.data, src=0)


def sum_replicated_gradients(params: list[torch.Tensor]) -> None:
    """Sum over the ranks the gradients of the parameters that are not sharded (a value head, a
    separate critic: each rank holds all of them), in one all-reduce; the sharded ones were summed
    by their reduce-scatter."""
    grads = [p.grad for p in params if p.grad is not None and not _is_dtensor(p)]
    if not grads or not distributed.is_initialized():
        return
    _LOCKSTEP.drain()
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded and whole gradients together (torch's
    refuses the mix): the norm of all of them, the sharded part's summed over the ranks."""
    _LOCKSTEP.drain()
    groups = [[p for p in params if p.grad is not None and _is_dtensor(p.grad) is sharded]
              for sharded in (True, False)]
    norms = []
    for group in filter(None, groups):
        norm = torch.nn.utils.get_total_norm([p.grad for p in group if p.grad is not None])
        norms.append(_whole(norm))
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in filter(None, groups):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def gathered(state: Any) -> Any:
    """``state`` (a state dict, an optimizer's, nested dicts and lists of tensors) with every
    sharded tensor gathered whole onto the CPU, one at a time (collective: every rank calls it with
    the same structure, as they hold the same model). Other values are kept as they are."""
    _LOCKSTEP.drain()
    return _gathered(state)


def _gathered(state: Any) -> Any:
    if _is_dtensor(state):
        return _whole(state).cpu()
    if isinstance(state, dict):
        return {key: _gathered(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_gathered(value) for value in state)
    return state


def shard_like(whole: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's part of the whole tensor ``whole`` (which every rank holds), laid out as
    ``like`` is (no communication)."""
    # imported on use: a slow import (see _is_dtensor); ``like`` is sharded, so it is imported already
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def sharded_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole state dict of ``module`` (``gathered``) made loadable into it: each tensor of a
    sharded parameter or buffer replaced by this rank's part."""
    current = module.state_dict()
    return {key: shard_like(value, current[key]) if _is_dtensor(current.get(key)) else value
            for key, value in state.items()}


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A whole optimizer state dict (``gathered``) made loadable into ``optimizer`` over sharded
    parameters: each per-parameter tensor of a parameter's shape replaced by this rank's part."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params))
    out = {}
    for key, values in state["state"].items():
        param: Any = by_id.get(key)
        out[key] = {name: shard_like(value, param) if _is_dtensor(param) and isinstance(value, torch.Tensor)
                    and tuple(value.shape) == tuple(param.shape) else value for name, value in values.items()}
    return {**state, "state": out}


def whole_model(model: nn.Module, state: dict[str, torch.Tensor], adapt: Any = None) -> nn.Module:
    """An unsharded model of ``model``'s class and config holding the whole ``state`` (``gathered``):
    built without weights (on the meta device), ``adapt`` applied to it (e.g. injecting the same
    LoRA adapters), then the state's tensors taken as its weights."""
    # imported on use: a slow import (see _is_dtensor); ``model`` is sharded, so it is imported already
    from torch.distributed.fsdp import FSDPModule

    # the class before sharding (FSDP's is a subclass of it and of FSDPModule); Any: a transformers model
    cls: Any = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = cls(model.config)
    wrapper = adapt(copy) if adapt is not None else None
    copy.load_state_dict(state, strict=True, assign=True)
    for name, buffer in model.named_buffers():  # buffers left out of state dicts (RoPE's), never sharded
        owner, _, leaf = name.rpartition(".")
        held = copy.get_submodule(owner)._buffers
        if leaf in held and held[leaf] is not None and held[leaf].is_meta:
            held[leaf] = buffer.detach().to("cpu", copy=True)
    copy.tie_weights()
    copy.generation_config = model.generation_config
    return copy if wrapper is None else wrapper


def stand_in_forwards() -> int:
    """How many stand-in forwards this process ran to keep sharded forwards in lockstep."""
    return _LOCKSTEP.stand_ins
