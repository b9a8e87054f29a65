"""Where the time goes: the phase timer's arithmetic, the engine's reference and reward phases, and
``textgym train``'s per-iteration ``time/`` figures, TensorBoard scalars and ``time.md``."""

from __future__ import annotations

import json
import math
import time

import gymnasium as gym
import numpy as np
import pytest
from test_pipeline import TINY_RUN

from textgym import timing
from textgym.envs import core_of
from textgym.envs.core import TextGenCore
from textgym.pipeline.cli import main
from textgym.pipeline.evaluate import generate
from textgym.prompts import PromptSet
from textgym.timing import PHASES, PhaseTimer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake)
    return fake


def test_phases_take_their_own_time_and_nested_phases_are_taken_out(clock):
    timer = PhaseTimer()
    clock.now = 1.0
    with timer.phase("generation"):
        clock.now = 3.0  # 2 s of generation
        with timer.phase("reward"):
            clock.now = 3.5
            with timer.phase("reward"):  # the same phase nested in itself counts once
                clock.now = 4.0
            assert timer.running == ("generation", "reward")
            clock.now = 4.5  # reward: 1.5 s in all
        with timer.phase(None):  # no phase of its own: stays with generation
            clock.now = 5.0
        with timer.phase("reference"):
            clock.now = 7.0  # 2 s
        clock.now = 7.25  # generation: 2 + 0.5 + 0.25
    clock.now = 100.0  # outside every phase: nobody's time
    assert timer.totals() == {"generation": 2.75, "reward": 1.5, "reference": 2.0}
    assert sum(timer.totals().values()) == 7.25 - 1.0  # the phases add up to the wall time
    assert timer.running == ()


def test_take_reads_and_restarts_and_a_failing_phase_still_counts(clock):
    timer = PhaseTimer()
    with timer.phase("update"):
        clock.now = 2.0
        assert timer.totals() == {}  # the running phase is credited when it changes
        assert timer.take() == {"update": 2.0}  # ... or when taken: up to now
        clock.now = 3.0
    assert timer.take() == {"update": 1.0}
    assert timer.take() == {}
    with pytest.raises(RuntimeError):
        with timer.phase("reward"):
            clock.now = 4.5
            raise RuntimeError("the reward failed")
    assert timer.take() == {"reward": 1.5} and timer.running == ()


def test_iteration_figures_and_tokens_per_second_definition():
    figures = timing.iteration_figures({"generation": 3.0, "reference": 0.5, "reward": 0.5, "update": 2.0,
                                        "odd": 0.25}, tokens=80)
    assert set(figures) == {*PHASES, "tokens_per_second"}
    assert figures["evaluation"] == 0.0 and figures["other"] == 0.25  # an unknown phase is "other"
    assert figures["tokens_per_second"] == 80 / (3.0 + 0.5 + 0.5)
    assert timing.tokens_per_second(10, {}) == 0.0
    history = [{f"time/{k}": v for k, v in timing.iteration_figures(s, n).items()}
               for s, n in (({"generation": 1.0, "update": 1.0}, 10), ({"generation": 3.0, "reward": 1.0}, 30))]
    totals = timing.run_totals(history)
    assert totals["generation"] == 4.0 and totals["update"] == 1.0
    assert totals["tokens_per_second"] == pytest.approx(40 / 5.0)
    table = timing.markdown(totals, "title")
    assert table.startswith("title\n\n| phase | seconds | share |")
    assert "| generation | 4.00 | 66.7% |" in table and "| total | 6.00 | 100.0% |" in table


def _engine(**kwargs) -> TextGenCore:
    env = gym.make("textgym/TextGen-v0", model="textgym/tiny", max_new_tokens=5, max_prompt_tokens=16,
                   stop_on_eos=False, **kwargs)
    return core_of(env)


def _play(core: TextGenCore) -> None:
    """One batch of episodes to their end, with greedy tokens."""
    rows = list(range(core.n))
    core.reset_rows(rows, [np.random.default_rng(r) for r in rows])
    while core.live.any():
        actions = core.acting_logits().argmax(-1).cpu().numpy()
        core.step(actions, core.live.copy())


@pytest.mark.parametrize("kl_mode", ["final", "per_token"])
def test_the_engine_times_its_reference_and_reward(kl_mode):
    core = _engine(kl_mode=kl_mode)
    core.timer.take()
    with core.timer.phase("generation"):
        _play(core)
    spent = core.timer.take()
    assert set(spent) == {"generation", "reference", "reward"}
    assert all(v > 0 for v in spent.values()), spent


def test_an_evaluation_does_not_change_the_training_engines_timer(monkeypatch):
    core = _engine()
    with core.timer.phase("generation"):
        _play(core)
    before = core.timer.totals()
    copies = []
    original = TextGenCore.evaluation_copy

    def spy(self, n=None):
        copies.append(original(self, n))
        return copies[-1]

    monkeypatch.setattr(TextGenCore, "evaluation_copy", spy)
    with core.timer.phase("generation"):  # even while the training engine is inside one of its phases
        generate(core, PromptSet(["The film", "A story about"]), seed=0)
        during, running = core.timer.totals(), core.timer.running
    assert during == before and running == ("generation",)
    (copy,) = copies
    assert copy.timer is not core.timer and {"reference", "reward"} <= set(copy.timer.totals())


def test_train_records_prints_and_writes_where_the_time_goes(tmp_path, capsys):
    assert main(["train", *TINY_RUN, f"training.output_dir={tmp_path}", "training.iterations=2"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    keys = [f"time/{name}" for name in (*PHASES, "tokens_per_second")]
    timesteps = 0
    for r in lines:
        assert set(keys) <= set(r)
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in keys), r
        assert all(r[f"time/{name}"] > 0 for name in ("generation", "reference", "reward", "update", "other")), r
        phases = sum(r[f"time/{name}"] for name in PHASES)
        assert phases == pytest.approx(r["seconds"], abs=0.02)  # seconds is rounded to the millisecond
        assert phases <= r["seconds"] + 0.001  # the phases lie inside the iteration
        tokens = r["timesteps"] - timesteps  # the rollout's tokens: one per timestep
        timesteps = r["timesteps"]
        assert tokens == 4 * 6  # env.n_envs x n_steps
        rollout = r["time/generation"] + r["time/reference"] + r["time/reward"]
        assert r["time/tokens_per_second"] == pytest.approx(tokens / rollout, rel=1e-12)
    # training.eval_every=2: the first iteration evaluates nothing, the second does
    assert lines[0]["time/evaluation"] == 0.0 and lines[1]["time/evaluation"] > 0.0

    table = (tmp_path / "time.md").read_text()
    totals = timing.run_totals(lines)
    for name in PHASES:
        assert f"| {name} | {totals[name]:.2f} |" in table, name
    assert "| total |" in table and f"{totals['tokens_per_second']:.1f}" in table
    out = capsys.readouterr().out
    assert "where the time went" in out and f"wrote {tmp_path / 'time.md'}" in out
    assert all(name in out for name in PHASES)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent))
    acc.Reload()
    assert set(keys) <= set(acc.Tags()["scalars"])
    for key in keys:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [r["timesteps"] for r in lines], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in lines], rel=1e-5), key
