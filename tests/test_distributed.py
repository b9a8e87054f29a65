"""Data parallelism (``textgym.distributed``): 2 gloo processes on textgym/tiny against one process.

The multi-process tests launch ``torchrun`` (one thread per process) with a timeout, so a hang
fails the test instead of blocking it. The single-process references run in this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_worker import ALGORITHMS, N_ENVS, one_iteration, single_process_label
from scipy import stats
from test_pipeline import TINY_RUN, tiny_config
from textgym.agents import data_parallel, update

from textgym import agents, distributed, models
from textgym.pipeline.train import train

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _delta(result: dict) -> dict[str, torch.Tensor]:
    return {k: result["params"][k] - result["initial"][k] for k in result["params"]}


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


# --- two ranks against one process ------------------------------------------------------------------


def test_two_ranks_take_the_single_process_update(tmp_path):
    """One iteration (rollout and update) of PPO (also micro-batched, also with PPO-ptx's
    pretraining term, also with LoRA) and two critic-free algorithms, several minibatches and
    epochs each, with DDP and (some) with the LM sharded by FSDP2: 2 ranks x n_envs / 2 rows
    sample the same tokens as 1 process x n_envs rows, end with identical parameters on both ranks,
    and those are the single process's within float tolerance (dividing each rank's loss by its
    own part's count instead of the minibatch's moves them by 60-130% of the update)."""
    out = torchrun(str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    singles = {label: one_iteration(label) for label in ALGORITHMS if single_process_label(label) == label}
    for label, (algo, _, _) in ALGORITHMS.items():
        # micro-batches leave the update unchanged (tests/test_precision.py), and so does sharding
        single = singles[single_process_label(label)]
        ranks = [torch.load(tmp_path / f"{label}-rank{k}.pt") for k in (0, 1)]
        for name, value in ranks[0]["params"].items():
            assert torch.equal(value, ranks[1]["params"][name]), (label, name)
        # Row r of the global batch drew the same tokens on whichever rank held it.
        if algo == "ppo":  # transitions, flattened env-major: rank 0's rows, then rank 1's
            tokens = torch.cat([r["tokens"] for r in ranks])
        else:  # whole episodes, a round of every row at a time
            half = N_ENVS // 2
            rounds = single["tokens"].shape[0] // N_ENVS
            tokens = torch.cat([r["tokens"][j * half:(j + 1) * half] for j in range(rounds) for r in ranks])
        assert torch.equal(tokens, single["tokens"]), label
        # Each rank drew the sampling noise of its own rows only: together, the single process's.
        assert ranks[0]["noise"] + ranks[1]["noise"] == single["noise"] > 0, label
        if algo == "ppo":  # every rank steps its n_envs / 2 rows at every step
            assert ranks[0]["noise"] == ranks[1]["noise"], label
        for r in ranks:
            assert r["stats"] == pytest.approx(single["stats"], rel=1e-5, abs=1e-5), label
            assert r["kl_coef"] == pytest.approx(single["kl_coef"], rel=1e-6) and r["timesteps"] == single["timesteps"]
            # The logged figures are the global minibatches', the early-stopping KL included (PPO's
            # update stops after its first epoch here: n_updates 1 of 2).
            assert r["logs"] == pytest.approx(single["logs"], rel=1e-4, abs=1e-6), label
        step, error = _delta(single), _delta(ranks[0])
        assert _norm(step.values()) > 0.1, label
        assert _norm(error[k] - step[k] for k in step) < 1e-3 * _norm(step.values()), label


def test_sharded_forwards_stay_collective(tmp_path):
    """FSDP2 over 2 ranks (``textgym.sharding``): each rank holds half the weights, also after
    forwards (none stays gathered, the root's included); ranks that run
    different numbers of forwards, of two sharded models in different orders, still meet at the
    next collective (the rank with fewer runs stand-ins: 3 forwards against 1 is 2 stand-ins); a
    gathered forward computes the unsharded one; a forward that trains on one rank alone is
    refused on both, naming the lockstep, instead of hanging."""
    out = torchrun(str(ROOT / "tests" / "sharding_worker.py"), str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"sharding-rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["held"] for r in ranks] == [ranks[0]["whole"] // 2] * 2
    assert [r["held_after_forwards"] for r in ranks] == [ranks[0]["whole"] // 2] * 2  # none left gathered
    assert [r["sum"] for r in ranks] == [2.0, 2.0]
    assert [r["stand_ins"] for r in ranks] == [0, 2]
    assert [r["gathered_logits_error"] for r in ranks] == [0.0, 0.0]
    assert all("out of lockstep" in r["refused"] for r in ranks)


@pytest.mark.parametrize("extra", [[], ["agent.hyperparameters.fsdp=true"],
                                   ["agent.hyperparameters.fsdp=true", "model.lora={r: 4}"]],
                         ids=["ddp", "fsdp", "fsdp-lora"])
def test_train_cli_on_two_ranks_writes_one_run_that_resumes(tmp_path, extra):
    """``torchrun -m textgym train``: rank 0 alone writes the run directory (the same files as a
    single process's run, nothing in the working directory), the global figures are the single
    process's, and ``--resume`` continues the run; with DDP, and with the LM sharded by FSDP2 (its
    checkpoints and final model gathered from both ranks, the optimizer state scattered back on
    resume; with LoRA, merged into the final model)."""
    run, cwd = tmp_path / "run", tmp_path / "cwd"
    args = ["-m", "textgym", "train", *TINY_RUN, f"training.output_dir={run}", *extra]
    out = torchrun(*args, "training.iterations=2", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # no rank wrote anywhere else
    assert out.stdout.count("held-out evaluation") == 1  # rank 0 prints the summary
    two = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = torchrun(*args, "training.iterations=3", "--resume", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]

    single = tmp_path / "single"
    train(tiny_config(single, "training.iterations=3", *(e for e in extra if "fsdp" not in e)), progress=False)

    def files(directory: Path) -> list[str]:
        return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.parent.name != "tb")

    assert files(run) == files(single)
    assert len(list((run / "tb").iterdir())) == 2  # one TensorBoard file per launch, rank 0's
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert resumed[:2] == two and len(resumed) == 3
    for got, want in zip(resumed, reference):
        # Held-out evaluation is split over the ranks (each samples its block of prompts): its
        # figures differ; the iteration's figures are the global batch's (abs: the first KL is
        # float noise around 0, the policy being the reference).
        assert {k for k in got if not k.startswith("eval/")} == {k for k in want if not k.startswith("eval/")}
        assert {k for k in got if k.startswith("eval/")} == {k for k in want if k.startswith("eval/")}
        for key, value in want.items():
            if key != "seconds" and not key.startswith(("eval/", "time/")):  # timings differ from run to run
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (got["iteration"], key)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 3 and summary["after"]["n"] == 16  # every held-out prompt, twice (eval_samples)
    final, _ = models.load(run / "final_model")
    want, _ = models.load(single / "final_model")
    start, _ = models.load("textgym/tiny")
    with torch.no_grad():
        moved = max(float((w - s).abs().max()) for w, s in zip(want.parameters(), start.parameters()))
        error = max(float((f - w).abs().max()) for f, w in zip(final.parameters(), want.parameters()))
    assert error < 1e-3 * moved, (error, moved)
    if extra:  # a sharded run's agent file is the unsharded agent's: it opens in one process
        cfg = tiny_config(tmp_path / "unused", *(e for e in extra if "fsdp" not in e))
        with pytest.raises(ValueError, match="fsdp=True .* needs a process group"):
            agents.load(run / "checkpoint" / "agent.zip", env=cfg.env.id, n_envs=4, env_kwargs=cfg.env_kwargs())
        agent = agents.load(run / "checkpoint" / "agent.zip", env=cfg.env.id, n_envs=4, env_kwargs=cfg.env_kwargs(),
                            fsdp=False)
        saved = agent.core.models.plain_copy(agent.core.model)
        with torch.no_grad():
            assert max(float((s - f).abs().max()) for s, f in zip(saved.parameters(), final.parameters())) < 1e-6


FAILING = """
import sys

import torch.distributed as dist

import textgym
from textgym.pipeline.cli import main


def fails_on_rank_1(prompts, completions, **metadata):
    if dist.get_rank() == 1 and any(p.startswith("Train") for p in prompts):
        raise RuntimeError("the reward service is unreachable from rank 1")
    return [float(len(c)) for c in completions]


textgym.rewards.register("fails_on_rank_1", fails_on_rank_1)
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_fails_ends_the_run_with_its_error(tmp_path):
    """Rank 1's reward raises in its first rollout while rank 0 goes on: the run ends (no hang: the
    launch has a timeout) with a non-zero status and rank 1's error in the output."""
    script = tmp_path / "fails.py"
    script.write_text(FAILING)
    overrides = [o for o in TINY_RUN if not o.startswith("reward.")]
    out = torchrun(str(script), "train", *overrides, "reward.name=fails_on_rank_1", "reward.eval=[]",
                   "env.kwargs.prompts=[Train a, Train b]", "env.kwargs.test_prompts=[Held out a, Held out b]",
                   "training.eval_n=2", "training.iterations=2", f"training.output_dir={tmp_path / 'run'}",
                   cwd=tmp_path / "cwd", timeout=180)
    assert out.returncode != 0
    assert "the reward service is unreachable from rank 1" in out.stdout + out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        not (tmp_path / "run" / "metrics.jsonl").read_text()  # no iteration was recorded


def test_rank_0s_refusal_reaches_every_rank(tmp_path):
    """What rank 0 alone checks (here: a --resume with nothing to resume) ends every rank with its
    error, each naming its rank, before anything is written."""
    run = tmp_path / "run"
    out = torchrun("-m", "textgym", "train", *TINY_RUN, f"training.output_dir={run}", "--resume",
                   cwd=tmp_path / "cwd", timeout=120)
    assert out.returncode != 0
    for k in (0, 1):
        assert f"textgym train (rank {k} of 2): error: FileNotFoundError: nothing to resume in" in out.stderr, \
            out.stderr[-3000:]
    assert not run.exists()


# --- pieces, in one process ---------------------------------------------------------------------------


def test_the_noise_is_splitmix64_by_row_and_key():
    """The counter-based stream is SplitMix64 exactly (as Python integers compute it, modulo 2**64),
    and a row's noise depends only on the key and the row, not on which rows are drawn with it."""
    def reference(key, i):
        mask = 2**64 - 1
        z = (key + i * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for key in (0, 1, -(2**63), 2**63 - 1, 123456789123456789):
        got = distributed.splitmix64(key, torch.arange(0, 300, dtype=torch.int64))
        assert [int(v) % 2**64 for v in got] == [reference(key % 2**64, i) for i in range(300)]
    whole = distributed.row_noise(7, 0, 6, 50)
    for first, n in ((0, 3), (3, 3), (2, 1), (5, 1)):
        assert torch.equal(distributed.row_noise(7, first, n, 50), whole[first:first + n])
    assert not torch.equal(distributed.row_noise(8, 0, 6, 50), whole)
    assert whole.min() > 0 and torch.isfinite(whole).all()


def test_sampled_tokens_follow_the_distribution():
    """The exponential race with this noise is an exact categorical draw: the frequencies of 40,000
    draws match the probabilities (chi-square), a token of probability 0 never comes, and for each
    precision the noise is Exponential(1) (Kolmogorov-Smirnov)."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03, 0.0])
    torch.manual_seed(0)
    tokens = distributed.sample_categorical(probs.repeat(40_000, 1))
    counts = torch.bincount(tokens, minlength=6).numpy()
    assert counts[5] == 0
    assert stats.chisquare(counts[:5], 40_000 * probs[:5].numpy()).pvalue > 1e-3
    for dtype in (torch.float32, torch.float64):
        noise = distributed.row_noise(3, 10, 20, 1000, dtype=dtype)
        assert noise.dtype == dtype
        assert stats.kstest(noise.flatten().numpy(), "expon").pvalue > 1e-3


def test_a_ranks_rows_are_drawn_alone_and_alike(monkeypatch):
    """Row r of the global batch takes the same token whichever rows are drawn with it, and drawing
    a rank's rows draws numbers for those rows only: ``V`` per row whatever the batch's size (the
    2-rank run counts them too, in test_two_ranks_take_the_single_process_update)."""
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(6, 50) * 3, -1)
    torch.manual_seed(0)
    expected = distributed.sample_categorical(probs)  # one process holding the 6 rows
    torch.manual_seed(0)
    key = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))  # the key that call drew
    for offset, n in ((0, 3), (3, 3), (2, 1), (5, 0)):
        rows = slice(offset, offset + n)
        assert torch.equal(distributed.sample_rows_of(probs[rows], offset, key), expected[rows])
    drawn = []
    real_noise = distributed.row_noise
    monkeypatch.setattr(distributed, "row_noise", lambda *a, **k: (drawn.append(a[2] * a[3]), real_noise(*a, **k))[1])
    for rows in (1, 4, 64):
        distributed.sample_rows_of(torch.full((1, 50), 0.02), rows - 1, key)  # the last row of a batch of `rows`
    assert drawn == [50, 50, 50]


def test_without_a_process_group_everything_is_local():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.local_rows(6) == (0, 6) and distributed.split_evenly(5) == (0, 5)
    assert distributed.all_reduce_sum([1.5, 2.0]).tolist() == [1.5, 2.0]
    assert distributed.sum_over_ranks({"a": 0.5}) == {"a": 0.5}
    assert distributed.mean_over_ranks({"a": [1.0, 2.0], "b": []}) == {"a": (1.5, 2), "b": (None, 0)}
    assert distributed.on_main(lambda x: x + 1, 1) == 2 and distributed.concat_over_ranks([3]) == [3]
    assert update.data_parallel(torch.nn.Linear(2, 1)) is None  # no DDP wrapper: the gradients stay local
    share = data_parallel.whole(3, 9)
    values = torch.tensor([1.0, 2.0, 4.0])
    assert share.totals() is None and not share.stand_in
    assert torch.equal(share.mean()(values), values.sum() / 3)
    assert torch.equal(share.normalize(values), (values - values.mean()) / (values.std() + 1e-8))
    stand_in = data_parallel.Share({"items": 0, "tokens": 0}, {"items": 3, "tokens": 9})
    assert stand_in.stand_in and stand_in.mean()(values).item() == 0.0


def test_minibatch_plan_of_a_single_process_is_the_buffers_own():
    """The plan of minibatches is the shuffle and cut the buffers always made (the same numpy draws)."""
    lengths = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    np.random.seed(0)
    plan = list(data_parallel.minibatches(data_parallel.rank_lengths(lengths), 6))
    np.random.seed(0)
    chunks, chunk, size = [], [], 0
    for k in np.random.permutation(len(lengths)):
        chunk.append(k)
        size += lengths[k]
        if size >= 6:
            chunks.append(chunk)
            chunk, size = [], 0
    chunks += [chunk] if chunk else []
    assert [list(idx) for idx, _ in plan] == chunks
    assert [s.local["items"] for _, s in plan] == [len(c) for c in chunks]
    assert [s.total["tokens"] for _, s in plan] == [int(lengths[c].sum()) for c in chunks]
    # Two ranks' buffers laid out as one process stores them: rank-major, or round by round.
    assert data_parallel.global_order([2, 3]) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert data_parallel.global_order([4, 2], rounds=2) == [(0, 0), (0, 1), (1, 0), (0, 2), (0, 3), (1, 1)]


def test_the_rows_must_split_over_the_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"n_envs=4 cannot be split evenly over the 3 ranks \(WORLD_SIZE=3\)"):
        agents.make("ppo", "textgym/TextGen-v0", n_envs=4)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match=r"n_envs=4 over 2 ranks gives 2 rows per rank, not a multiple of "
                                         r"group_size=4: .* a multiple of 8"):
        agents.make("grpo", "textgym/TextGen-v0", n_envs=4)


@pytest.fixture
def one_rank_group():
    """A process group of this process alone (gloo, world size 1), for what needs one to exist."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


TINY_ENV = {"model": "textgym/tiny", "max_new_tokens": 4, "max_prompt_tokens": 12}


@pytest.mark.parametrize("algo, env_kwargs, hyperparameters, named", [
    ("nlpo", {}, {}, "algorithm 'nlpo'"),
    ("ppo", {"quantize": "int8"}, {"lora": True}, "quantize='int8'"),
    ("ppo", {}, {"policy_kwargs": {"critic": "copy"}}, "critic='copy'"),
    ("ppo", {"dtype": "float16"}, {}, "dtype float16"),
])
def test_sharding_refuses_what_it_cannot_shard(one_rank_group, algo, env_kwargs, hyperparameters, named):
    if "quantize" in env_kwargs:
        pytest.importorskip("torchao")
    with pytest.raises(ValueError, match=rf"fsdp=True cannot shard with {named}.*use fsdp=False"):
        agents.make(algo, "textgym/TextGen-v0", n_envs=2, env_kwargs={**TINY_ENV, **env_kwargs}, fsdp=True,
                    **hyperparameters)


def test_sharding_needs_a_process_group_and_a_flag():
    with pytest.raises(ValueError, match=r"fsdp=True shards .* needs a process group: launch with torchrun"):
        agents.make("ppo", "textgym/TextGen-v0", n_envs=2, env_kwargs=TINY_ENV, fsdp=True)
    with pytest.raises(ValueError, match=r"fsdp must be True or False, got 'yes'"):
        agents.make("ppo", "textgym/TextGen-v0", n_envs=2, env_kwargs=TINY_ENV, fsdp="yes")
