import json

import pytest

from textgym import rewards
from textgym.pipeline.bench import BenchRewardsConfig, bench_elo, bench_rewards, judge_matches
from textgym.pipeline.cli import main
from textgym.pipeline.config import ConfigError, load_config
from textgym.pipeline.train_config import TrainConfig

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
        "rewards": [{"name": "keyword", "kwargs": {"keywords": ["the"]}}, "length", "test_broken",
                    {"name": "keyword", "kwargs": {"keywords": ["zqzqzq"]}, "label": "constant"}],
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
    # Each proxy is trained at unit spread over the untrained policy's completions (normalize, the default).
    assert ok["score_scale"] == pytest.approx(1 / agreement["std"]["keyword"])
    saved = load_config(TrainConfig, tmp_path / "keyword" / "seed0" / "config.yaml")
    assert saved.env.kwargs["score_scale"] == pytest.approx(ok["score_scale"])
    assert "gives every completion of the untrained policy the same score (0.0)" in \
        results["rewards"]["constant"]["error"]
    assert agreement["spearman"]["keyword"]["gold"] == pytest.approx(1.0)
    assert agreement["n"] == 8
    assert set(agreement["completions_per_second"]) == {"keyword", "length", "gold", "constant"}
    assert "test_broken" in agreement["errors"]
    table = (tmp_path / "results.md").read_text()
    assert "| keyword |" in table
    assert ("test_broken | failed: RuntimeError: reward 'test_broken' could not score the untrained policy's "
            "completions: RewardError: reward 'test_broken' raised RuntimeError: scorer crashed") in table
    assert (tmp_path / "overoptimization.png").read_bytes()[:4] == b"\x89PNG"
    # Gao et al.'s two-parameter form is not fitted to a curve of three evaluations (it would fit any)
    fit = ok["fit"]
    assert fit["n"] == 3 and fit["evaluations"] == 3 and fit["alpha"] is None
    assert "| keyword | not fitted: 3 evaluations per curve, fewer than 6 |" in table
    # one seed: the gold gain is shown without an interval, and says so
    assert ok["gold_gain"] == pytest.approx(ok["runs"][0]["after"]["reward/gold"]
                                            - ok["runs"][0]["before"]["reward/gold"])
    assert "one seed: no interval" in table
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0]


def test_gold_gains_over_seeds_are_compared_and_fitted_on_six_evaluations():
    from textgym.pipeline.bench import _aggregate, _gao_fit, markdown_report

    def run(seed, gold_gain, kl_scale=1.0):
        curve = [{"iteration": i, "kl": kl_scale * i, "gold": 0.1 + gold_gain * (i / 5) ** 0.5, "proxy": 0.0}
                 for i in range(6)]
        after = {"score": 0.5, "reward/gold": curve[-1]["gold"], "kl": curve[-1]["kl"], "perplexity_ref": 9.0,
                 "distinct_1": 0.5, "distinct_2": 0.9}
        return {"seed": seed, "before": {"reward/gold": 0.1}, "after": after, "seconds": 1.0, "curve": curve}

    strong = [run(s, g) for s, g in enumerate([0.40, 0.45, 0.50])]
    weak = [run(s, g) for s, g in enumerate([0.00, 0.02, -0.02])]
    results = {"seeds": [0, 1, 2], "speed_agreement": {"completions_per_second": {}, "spearman": {}, "errors": {}},
               "rewards": {label: {"runs": runs, **_aggregate(runs), "fit": _gao_fit(runs)}
                           for label, runs in (("gold itself", strong), ("length", weak))}}
    r = results["rewards"]["gold itself"]
    assert r["gold_gain"] == pytest.approx(0.45) and 0 < r["gold_gain_ci"] < 0.45
    assert r["fit"]["evaluations"] == 6 and r["fit"]["alpha"] is not None and r["fit"]["n"] == 18
    table = markdown_report(results)
    assert "0.450 ± " in table and "(beyond the noise)" in table  # the gold-trained policy raised the gold
    assert "(not distinguishable from no change)" in table  # the length proxy did not
    assert "| length | 0.450 ± " in table and "| beyond the noise |" in table  # and the two differ
    # A fitted peak beyond the largest KL measured is an extrapolation: the table says so, with no figure.
    assert r["fit"]["kl_max"] == pytest.approx(5.0)
    r["fit"].update(beta=0.002, kl_peak=4.8e10, gold_peak=502.0)
    table = markdown_report(results)
    assert "| beyond the measured KL (at most 5.00) |  |" in table and "502" not in table


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
    for r in result["bradley_terry"].values():
        assert r["low"] <= r["rating"] <= r["high"]
    assert set(result["bradley_terry"]) == set(result["ratings"])
    out = capsys.readouterr().out
    assert (tmp_path / "elo" / "elo.png").exists() and "| policy | Bradley-Terry | 95% CI | Elo (online) |" in out
    with pytest.raises(ValueError, match="at least two policies"):
        bench_elo(["textgym/tiny"])
