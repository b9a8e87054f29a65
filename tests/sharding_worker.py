"""Worker of tests/test_distributed.py's sharding tests: textgym/tiny sharded over 2 gloo ranks
(``textgym.sharding``), checked piece by piece; writes ``OUT/sharding-rankK.json``.

    torchrun --nproc-per-node 2 tests/sharding_worker.py OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from textgym import distributed, models, sharding


def main(out: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env()
    me = distributed.rank()
    result: dict = {}
    policy, _ = models.load("textgym/tiny")
    reference, _ = models.load("textgym/tiny")
    whole = sum(p.numel() for p in policy.parameters())
    with torch.no_grad():
        want = policy(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False).logits
    sharding.shard(policy)
    sharding.shard(reference)
    result["held"] = sum(p.to_local().numel() for p in policy.parameters() if isinstance(p, DTensor))
    result["whole"] = whole

    # Uneven forwards, of two models in different orders on the two ranks, then a collective:
    # rank 0 runs policy, policy, reference; rank 1 runs reference only.
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        order = [policy, policy, reference] if me == 0 else [reference]
        logits = [model(input_ids=ids, use_cache=False).logits for model in order]
    result["sum"] = float(distributed.all_reduce_sum(1.0))
    result["held_after_forwards"] = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
                                        for p in policy.parameters())
    result["stand_ins"] = sharding.stand_in_forwards()
    result["gathered_logits_error"] = float((logits[0] - want).abs().max())

    # A forward that trains, taken by one rank alone, is refused rather than left to hang.
    try:
        if me == 0:
            policy(input_ids=ids, use_cache=False).logits.sum().backward()
        distributed.barrier()
        result["refused"] = None
    except RuntimeError as err:
        result["refused"] = str(err)
    Path(out, f"sharding-rank{me}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
