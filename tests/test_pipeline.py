import dataclasses
import json
import math
import re
import typing
from pathlib import Path

import pytest
import torch

from textgym import agents, models
from textgym.metrics import difference_ci
from textgym.pipeline import hyperparameters
from textgym.pipeline.bench import BenchRewardsConfig
from textgym.pipeline.cli import main
from textgym.pipeline.config import ConfigError, load_config, save_config
from textgym.pipeline.evaluate import evaluate_target
from textgym.pipeline.record import record_target
from textgym.pipeline.rm import RMConfig
from textgym.pipeline.sft import SFTConfig
from textgym.pipeline.train import Run, TrainConfig, train
from textgym.pipeline.train_config import PRESETS, config_from_cli

TINY_RUN = [
    "model.name=textgym/tiny", "model.lora=null", "env.id=textgym/TextGen-v0", "env.n_envs=4",
    "env.kwargs.max_new_tokens=6", "env.kwargs.max_prompt_tokens=16", "reward.name=keyword",
    "reward.kwargs.keywords=[the]", "reward.eval=[length]", "agent.algo=ppo", "agent.hyperparameters.n_steps=6",
    "agent.hyperparameters.batch_size=24", "agent.hyperparameters.learning_rate=3e-3",
    "training.eval_n=8", "training.eval_every=2", "training.samples=4",
]


def tiny_config(tmp_path, *extra):
    return load_config(TrainConfig, overrides=[*TINY_RUN, f"training.output_dir={tmp_path}", *extra])


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'training.iteratons'; valid keys of training: iterations"):
        load_config(TrainConfig, overrides=["training.iteratons=3"])
    with pytest.raises(ConfigError, match=r"'training.iterations' must be an integer, got 'many'"):
        load_config(TrainConfig, overrides=["training.iterations=many"])
    with pytest.raises(ConfigError,
                       match=r"agent.algo 'dqn' is not an algorithm; valid: a2c, dpo, grpo, ilql, nlpo, ppo, "
                             r"reinforce\+\+, rloo, trpo"):
        load_config(TrainConfig, overrides=["agent.algo=dqn"])
    with pytest.raises(ConfigError, match=r"env.kwargs.model is set by the model section"):
        load_config(TrainConfig, overrides=["env.kwargs.model=x"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimiser'"):
        load_config(TrainConfig, overrides=["optimiser.lr=1"])
    cfg = load_config(TrainConfig, overrides=["agent.algo=ppo", "agent.hyperparameters.n_steps=8"])
    assert cfg.agent.hyperparameters["n_steps"] == 8 and "learning_rate" in cfg.agent.hyperparameters


def test_yaml_config_and_cli_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("agent:\n  algo: a2c\ntraining:\n  iterations: 7\n")
    cfg = load_config(TrainConfig, path, ["training.iterations=9"])
    assert cfg.agent.algo == "a2c" and cfg.training.iterations == 9 and cfg.env.id == "textgym/Sentiment-v0"


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sentiment.yaml"


@pytest.mark.parametrize("algo", agents.names())
def test_algo_switch_applies_that_algorithms_section(algo):
    """One file holds every algorithm's settings; --algo picks whose apply, agent.hyperparameters goes on top."""
    cfg = config_from_cli(str(EXAMPLE), ["agent.hyperparameters.learning_rate=1e-4"], algo=algo)
    assert cfg.agent.algo == algo
    assert cfg.agent.hyperparameters == {**PRESETS[algo], "learning_rate": 1e-4}
    assert set(cfg.agent.hyperparameters) <= set(hyperparameters.of(algo))


def test_hyperparameters_go_on_top_of_the_section_and_the_run_config_round_trips(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("agent:\n  algo: ppo\n  ppo: {batch_size: 40, n_epochs: 2}\n  hyperparameters: {batch_size: 24}\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.agent.hyperparameters == {**PRESETS["ppo"], "batch_size": 24, "n_epochs": 2}
    save_config(cfg, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert "\n  ppo:\n" in saved and "\n  reinforce++:\n" in saved and "algorithms" not in saved
    assert load_config(TrainConfig, tmp_path / "config.yaml") == cfg


COMMANDS = [(["train"], TrainConfig), (["sft"], SFTConfig), (["rm"], RMConfig),
            (["bench", "rewards"], BenchRewardsConfig)]


def _declared(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _declared(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.metadata.get("label", f.name), f.metadata["help"]


@pytest.mark.parametrize("command, cls", COMMANDS, ids=[" ".join(c) for c, _ in COMMANDS])
def test_help_lists_every_config_key_with_type_default_and_help(command, cls, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for key, help_ in _declared(cls):
        assert re.search(rf"^  {re.escape(key)} \(", out, re.M), key
        assert " ".join(help_.split()) in flat, key
    if cls is TrainConfig:
        assert "training.iterations (int; default 22; >= 1): RL iterations" in flat  # the sweep's default run: 22
        assert "agent.ppo default {learning_rate: 0.001, n_steps: 20, batch_size: 80" in flat  # issue 11's presets
        for algo in agents.names():
            for name in hyperparameters.of(algo):
                assert re.search(rf"^  {name}$", out, re.M), (algo, name)
        assert "nlpo (float; default 0.9): the masking policy's top-p" in flat
    if cls is SFTConfig:
        assert "learning_rate (float; default 5.0e-05; > 0): AdamW's learning rate" in flat


def test_eval_samples_complete_every_held_out_prompt_several_times(tmp_path):
    result = train(tiny_config(tmp_path, "training.iterations=1", "training.eval_n=3", "training.eval_samples=2",
                               "training.samples=6"),
                   progress=False)
    assert result["before"]["n"] == result["after"]["n"] == 6 and result["gain"]["n"] == 6
    samples = [json.loads(line) for line in (tmp_path / "samples_before.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples[:6:2]] == [s["prompt"] for s in samples[1:6:2]]  # each prompt twice
    # textgym eval of the run plays the same evaluation: its figures are the run's.
    report = evaluate_target(str(tmp_path))
    assert report["metrics"]["n"] == 6 and report["metrics"]["score"] == pytest.approx(result["after"]["score"])
    # textgym record of the run at its evaluation's prompts and seed records the episodes it evaluated,
    # with the run's env settings and its base model as the reference.
    rec = record_target(str(tmp_path), tmp_path / "rec", n_prompts=3, samples=2, split="test", progress=False)
    after = [json.loads(line) for line in (tmp_path / "samples_after.jsonl").read_text().splitlines()]
    assert rec.episodes["completion"] == [s["completion"] for s in after]
    assert rec.meta["env_id"] == "textgym/TextGen-v0" and rec.meta["env_kwargs"]["reward"] == "keyword"
    assert rec.meta["policy"] == str(tmp_path) and rec.meta["ref_model"] == models.TINY


def test_train_writes_the_run_directory(tmp_path):
    result = train(tiny_config(tmp_path, "training.iterations=4"), progress=False)
    assert result["iterations"] == 4
    for name in ("config.yaml", "metrics.jsonl", "samples_before.jsonl", "samples_after.jsonl", "summary.json",
                 "score.png", "kl.png", "kl_coef.png"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "score.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4]
    assert {"score", "kl", "kl_coef", "train/value_loss", "train/entropy"} <= set(lines[0])
    assert "eval/score" in lines[1] and "eval/score" not in lines[0]
    assert len((tmp_path / "samples_after.jsonl").read_text().splitlines()) == 4
    # The held-out gain, with its interval from the two evaluations' spreads (metrics.difference_ci).
    summary = json.loads((tmp_path / "summary.json").read_text())
    before, after, gain = summary["before"], summary["after"], summary["gain"]
    assert gain["score"] == pytest.approx(after["score"] - before["score"]) and gain["n"] == after["n"]
    expected = difference_ci((after["score"], after["score_std"], after["n"]),
                             (before["score"], before["score_std"], before["n"]))[1]
    assert math.isfinite(gain["ci"]) and gain["ci"] == pytest.approx(expected) and gain["confidence"] == 0.95
    # The final evaluation is the last iteration's, not played again (same weights, same seed).
    assert lines[-1]["eval/score"] == after["score"] and lines[-1]["eval/kl"] == after["kl"]
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
    model, _ = models.load(tmp_path / "final_model")
    assert result["after"]["score"] > result["before"]["score"]  # the keyword task is learnt quickly
    assert {"perplexity_ref", "distinct_1", "distinct_2", "length", "reward/length"} <= set(result["after"])
    with pytest.raises(FileExistsError, match="--resume"):
        Run(tiny_config(tmp_path))


def test_evaluating_every_iteration_changes_no_training_figure(tmp_path):
    def training_records(out, every):
        train(tiny_config(out, "training.iterations=3", f"training.eval_every={every}",
                          "env.kwargs.kl_target=1.0", "env.kwargs.kl_horizon=50"), progress=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds" and not k.startswith(("eval/", "time/"))}
                for r in rows], rows

    never, _ = training_records(tmp_path / "never", 0)
    always, rows = training_records(tmp_path / "always", 1)
    assert all("eval/score" in r for r in rows)
    assert always == never
    assert len({r["kl_coef"] for r in never}) == 3  # the adaptive coefficient moved every iteration


@pytest.mark.parametrize("lora", ["model.lora=null", "model.lora={r: 4}"])
def test_killed_run_resumes_with_the_same_iterations(tmp_path, monkeypatch, lora):
    full = tmp_path / "full"
    train(tiny_config(full, "training.iterations=4", lora), progress=False)

    killed = tmp_path / "killed"
    original = Run.iterate

    def dies_in_iteration_3(self, it):
        if it == 2:
            self.agent.start_fresh_episodes()
            self.agent.learn(8, reset_num_timesteps=False)  # half-done work that must not count
            raise KeyboardInterrupt("killed")
        return original(self, it)

    monkeypatch.setattr(Run, "iterate", dies_in_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(killed, "training.iterations=4", lora), progress=False)
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(Run, "iterate", original)
    train(tiny_config(killed, "training.iterations=4", lora), resume=True, progress=False)

    def records(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds" and not k.startswith("time/")} for r in rows]

    assert records(killed) == records(full)
    a, _ = models.load(full / "final_model")
    b, _ = models.load(killed / "final_model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_cli_sft_rm_train_eval_end_to_end(tmp_path, capsys):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Say something about film {i}:",
                                         "completion": " the film was good"})
                             + "\n" for i in range(16)))
    prefs = tmp_path / "prefs.jsonl"
    good, bad = ["good", "great", "lovely", "happy"], ["bad", "awful", "sad", "boring"]
    prefs.write_text("".join(json.dumps({"prompt": f"Review {i}:", "chosen": f" a {good[i % 4]} film",
                                         "rejected": f" a {bad[i % 4]} film"}) + "\n" for i in range(24)))
    assert main(["sft", f"model={models.TINY}", f"data={demos}", f"output_dir={tmp_path / 'sft'}", "epochs=2"]) == 0
    assert main(["rm", "backbone=textgym/tiny", f"data={prefs}", f"output_dir={tmp_path / 'rm'}", "epochs=2"]) == 0
    run = tmp_path / "run"
    # A2C takes no batch_size: since issue 10 giving it one is an error, no longer a warning.
    args = [o for o in TINY_RUN if not o.startswith(("model.name", "reward.", "agent.hyperparameters.batch_size"))]
    assert main(["train", f"model.name={tmp_path / 'sft'}", "reward.name=reward_model",
                 f"reward.kwargs.model={tmp_path / 'rm'}", *args, "training.iterations=2",
                 f"training.output_dir={run}", "--algo", "a2c"]) == 0
    saved = load_config(TrainConfig, run / "config.yaml")
    assert saved.agent.hyperparameters == {"learning_rate": 3e-3, "n_steps": 6}  # A2C's section, then the overrides
    assert main(["eval", str(run), "--n", "4"]) == 0
    report = json.loads((run / "eval.json").read_text())
    # 4 held-out prompts, each completed training.eval_samples times (2 by default), as the run's evaluations
    assert saved.training.eval_samples == 2 and report["metrics"]["n"] == 8 and len(report["episodes"]) == 8
    assert {"score", "kl", "perplexity_ref", "distinct_1", "distinct_2", "length"} <= set(report["metrics"])
    out = capsys.readouterr().out
    assert "perplexity_ref" in out and "held-out evaluation" in out
    assert re.search(r"held-out score gain: [+-]\d\.\d{3} \+- \d\.\d{3} \(95% interval over \d+ completions: "
                     r"(beyond the noise|not distinguishable from no change)\)", out)
    assert main(["list"]) == 0
    assert "textgym/Sentiment-v0" in capsys.readouterr().out


@pytest.mark.slow
def test_default_config_runs_on_smollm2(tmp_path):
    cfg = load_config(TrainConfig, overrides=[f"training.output_dir={tmp_path}", "training.iterations=2",
                                              "env.n_envs=4", "training.eval_n=4", "training.eval_every=0"])
    result = train(cfg, progress=False)
    assert result["iterations"] == 2
    samples = [json.loads(line) for line in (tmp_path / "samples_after.jsonl").read_text().splitlines()]
    from textgym import rewards

    vader = rewards.make("vader")
    assert [s["score"] for s in samples] == pytest.approx(vader([s["prompt"] for s in samples],
                                                                [s["completion"] for s in samples]))
    assert (tmp_path / "final_model" / "config.json").exists()


def test_sigkilled_cli_run_resumes_to_the_same_result(tmp_path):
    """A real kill -9 at a random point: the resumed run ends with the uninterrupted run's iterations."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def cli(out, *extra):
        return [sys.executable, "-m", "textgym", "train", *TINY_RUN, "training.iterations=6",
                "training.eval_every=0", f"training.output_dir={out}", *extra]

    full = tmp_path / "full"
    subprocess.run(cli(full), check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 6, "the kill should land mid-run"
    subprocess.run(cli(killed, "--resume"), check=True, capture_output=True, timeout=300)

    def records(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds" and not k.startswith("time/")} for r in rows]

    assert records(killed) == records(full)
    assert not list(tmp_path.rglob(".checkpoint-*"))  # no half-written checkpoint left behind


@pytest.mark.parametrize("agent", ["sample", "greedy", "random"])
def test_demo_plays_the_envs_held_out_prompts(tmp_path, capsys, agent):
    out = tmp_path / "demo.json"
    args = ["demo", "--env", "textgym/TextGen-v0", "--model", "textgym/tiny", "--agent", agent, "--episodes", "5",
            "--seed", "3", "--json", str(out)]
    assert main(args) == 0
    episodes = json.loads(out.read_text())
    assert len(episodes) == 5
    from textgym.prompts import sentiment_prompts

    held_out = set(sentiment_prompts("test").prompts)  # TextGen's default held-out split
    assert all(e["prompt"] in held_out for e in episodes)
    for e in episodes:
        assert e["reward"] == pytest.approx(e["score"] - e["kl_coef"] * e["kl"])
    assert "mean score" in capsys.readouterr().out
    assert main(args[:-2] + ["--json", str(tmp_path / "again.json")]) == 0  # seeded: the same episodes
    assert json.loads((tmp_path / "again.json").read_text()) == episodes


def test_envs_own_their_held_out_split():
    import gymnasium as gym

    from textgym.prompts import sentiment_prompts

    env = gym.make("textgym/Sentiment-v0", model="textgym/tiny", split="train")
    assert env.unwrapped.core.test_prompts.prompts == sentiment_prompts("test").prompts
    env = gym.make("textgym/TextGen-v0", prompts=["a", "b"])
    assert env.unwrapped.core.test_prompts.prompts == ["a", "b"]  # no split given: its own prompts
    env = gym.make("textgym/TextGen-v0", prompts=["a", "b"], test_prompts=["c"])
    assert env.unwrapped.core.test_prompts.prompts == ["c"]


def test_gold_reward_is_reported_plotted_and_reward_hacking_warned(tmp_path, monkeypatch):
    """reward.gold: every evaluation reports it beside the proxy; when the proxy rises over three
    evaluations while the gold falls, the run warns and flags it, and gold.png shows both."""
    from textgym import rewards
    from textgym.pipeline import train as train_module

    keyword = rewards.make("keyword", keywords=["the"])
    rewards.register("test_minus_the", lambda prompts, completions: [-s for s in keyword(prompts, completions)],
                     overwrite=True)
    real = train_module.summarise
    scripted = iter([(0.1, 0.5), (0.2, 0.45), (0.3, 0.4), (0.4, 0.35), (0.5, 0.3)])  # before, 3 evals, final

    def summarise(*args, **kwargs):
        out = real(*args, **kwargs)
        assert out["reward/gold"] == pytest.approx(-out["score"])  # the real gold, on the same completions
        out["score"], out["reward/gold"] = next(scripted)
        return out

    monkeypatch.setattr(train_module, "summarise", summarise)
    cfg = tiny_config(tmp_path, "training.iterations=3", "training.eval_every=1", "reward.gold=test_minus_the")
    with pytest.warns(UserWarning, match=r"reward hacking\? over the evaluations at iterations 1, 2, 3 the proxy rose "
                                         r"\(0.200 -> 0.300 -> 0.400\) while the gold reward fell"):
        train(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("eval/reward_hacking") for r in lines] == [None, 1.0, 1.0]  # from the third evaluation on
    assert (tmp_path / "gold.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="already has a reward labelled 'gold'"):
        tiny_config(tmp_path, "reward.gold=vader", "reward.eval=[{name: length, label: gold}]")
