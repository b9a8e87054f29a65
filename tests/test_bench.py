import json

import pytest

from textgym import rewards
from textgym.pipeline.bench import BenchRewardsConfig, bench_elo, bench_rewards, judge_matches
from textgym.pipeline.cli import main
from textgym.pipeline.config import ConfigError, load_config

TRAIN = {
    "model": {"name": "textgym/tiny", "lora": None},
    "env": {"id": "textgym/TextGen-v0", "n_envs": 4, "kwargs": {"max_new_tokens": 6, "max_prompt_tokens": 16}},
    "agent": {"algo": "ppo", "hyperparameters": {"n_steps": 6, "batch_size": 24, "learning_rate": 3e-3}},
    "training": {"iterations": 2, "eval_n": 8, "eval_every": 1},
}


def broken(prompts, completions):
    raise RuntimeError("scorer crashed")


def test_bench_rewards_end_to_end(tmp_path):
    rewards.register("test_broken", broken, overwrite=True)
    cfg = load_config(BenchRewardsConfig, base={
        "rewards": [{"name": "keyword", "kwargs": {"keywords": ["the"]}}, "length", "test_broken"],
        "gold": {"name": "keyword", "kwargs": {"keywords": ["the"]}}, "seeds": [0], "train": TRAIN,
        "agreement_n": 8, "output_dir": str(tmp_path)})
    results = bench_rewards(cfg, progress=False)
    ok = results["rewards"]["keyword"]
    assert {"proxy", "gold", "kl", "perplexity_ref", "distinct_1", "distinct_2", "seconds"} <= set(ok)
    assert ok["proxy"] == pytest.approx(ok["gold"])  # the proxy is the gold reward here
    assert [p["iteration"] for p in ok["runs"][0]["curve"]] == [0, 1, 2]
    assert "length" in results["rewards"] and "error" not in results["rewards"]["length"]
    assert "scorer crashed" in results["rewards"]["test_broken"]["error"]
    agreement = results["speed_agreement"]
    assert agreement["spearman"]["keyword"]["gold"] == pytest.approx(1.0)
    assert agreement["n"] == 8 and set(agreement["completions_per_second"]) == {"keyword", "length", "gold"}
    assert "test_broken" in agreement["errors"]
    table = (tmp_path / "results.md").read_text()
    assert "| keyword |" in table
    assert "test_broken | failed: RewardError: reward 'test_broken' raised RuntimeError: scorer crashed" in table
    assert (tmp_path / "overoptimization.png").read_bytes()[:4] == b"\x89PNG"
    # Gao et al.'s fit over the curve's three points (iterations 0, 1, 2), reported in the table
    fit = ok["fit"]
    assert fit["n"] == 3 and fit["alpha"] is not None
    assert fit["gold_0"] == pytest.approx(ok["runs"][0]["curve"][0]["gold"])
    assert "Over-optimisation: Gao et al." in table and "| keyword | " in table.split("Over-optimisation")[1]
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0]


def test_bench_config_validation():
    with pytest.raises(ConfigError, match="unknown config key 'train.traning'"):
        load_config(BenchRewardsConfig, base={"train": {"traning": {}}})
    with pytest.raises(ConfigError, match="train.reward is set by the benchmark"):
        load_config(BenchRewardsConfig, base={"train": {"reward": {"name": "vader"}}})
    with pytest.raises(ConfigError, match="labels must be unique"):
        load_config(BenchRewardsConfig, base={"rewards": ["length", "length"]})


def test_judge_matches_by_hand():
    matches = judge_matches(["a", "b", "c"], {"a": [1.0, 0.0], "b": [0.5, 0.0], "c": [2.0, -1.0]})
    assert matches == [("a", "b", 1.0), ("a", "b", 0.5), ("a", "c", 0.0), ("a", "c", 1.0),
                       ("b", "c", 0.0), ("b", "c", 1.0)]


def test_bench_elo_ranks_a_trained_policy(tmp_path, capsys):
    from textgym.pipeline.config import load_config as load
    from textgym.pipeline.train import TrainConfig, train

    run = tmp_path / "run"
    cfg = load(TrainConfig, base={**TRAIN, "reward": {"name": "length", "kwargs": {"unit": "chars"}},
                                  "training": {**TRAIN["training"], "iterations": 3, "output_dir": str(run)}})
    train(cfg, progress=False)
    assert main(["bench", "elo", "textgym/tiny", str(run), "--judge", "length", "--env", "textgym/TextGen-v0",
                 "--n", "16", "--n-envs", "4", "--bootstrap", "50", "--output-dir", str(tmp_path / "elo")]) == 0
    result = json.loads((tmp_path / "elo" / "elo.json").read_text())
    for r in result["ratings"].values():
        assert r["low"] <= r["high"]
    assert set(result["ratings"]) == {"textgym/tiny", str(run)}
    assert (tmp_path / "elo" / "elo.png").exists() and "| policy | Elo |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at least two policies"):
        bench_elo(["textgym/tiny"])
