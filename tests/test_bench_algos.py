"""``textgym bench algos`` end to end on the tiny model: two algorithms, one seed."""

import json

import pytest

from textgym.pipeline.bench_algos import BenchAlgosConfig, aggregate, comparisons, markdown_report
from textgym.pipeline.cli import main
from textgym.pipeline.config import ConfigError, load_config

TRAIN = {
    "model": {"name": "textgym/tiny", "lora": None},
    "env": {"id": "textgym/TextGen-v0", "n_envs": 4,
            "kwargs": {"max_new_tokens": 6, "max_prompt_tokens": 16}},
    "reward": {"name": "keyword", "kwargs": {"keywords": ["the"]}},
    "agent": {"hyperparameters": {"n_steps": 6, "batch_size": 24, "learning_rate": 3e-3}},
    "training": {"iterations": 2, "eval_n": 8, "eval_every": 1},
}


def test_bench_algos_end_to_end(tmp_path, capsys):
    config = tmp_path / "bench.json"  # YAML is a superset of JSON
    config.write_text(json.dumps({"algos": ["ppo", {"name": "grpo", "label": "grpo-g2",
                                                    "hyperparameters": {"n_epochs": 2}, "env": {"kl_coef": 0.2}}],
                                  "seeds": [0], "train": TRAIN, "output_dir": str(tmp_path / "out")}))
    assert main(["bench", "algos", str(config), "train.env.kwargs.group_size=2"]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert list(results["algos"]) == ["ppo", "grpo-g2"]
    for label, r in results["algos"].items():
        assert "error" not in r, r
        run = r["runs"][0]
        # the same budget: 2 iterations of 4 rows; the curve holds the untrained and each evaluation
        assert [p["iteration"] for p in run["curve"]] == [0, 1, 2]
        assert run["episodes"] >= 8 and run["peak_mb"] > 50 and run["seconds"] > 0
        assert r["gain"] == pytest.approx(run["after"]["score"] - run["before"]["score"])
        assert (out / label / "seed0" / "summary.json").exists()
    grpo_config = (out / "configs" / "grpo-g2-seed0.yaml").read_text()
    assert "algo: grpo" in grpo_config and "n_epochs: 2" in grpo_config
    assert "kl_coef: 0.2" in grpo_config and "kl_coef: 0.1" in (out / "configs" / "ppo-seed0.yaml").read_text()
    table = (out / "results.md").read_text()
    assert "| ppo |" in table and "| grpo-g2 |" in table and "one seed: no interval" in table
    # One seed: the gain's interval is the run's own, over its held-out completions.
    assert "gain over untrained (95% CI over the held-out completions)" in table
    run = results["algos"]["ppo"]["runs"][0]
    assert results["algos"]["ppo"]["gain_ci"] == pytest.approx(run["gain"]["ci"])
    assert (out / "score_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert "| grpo-g2 |" in capsys.readouterr().out


def test_bench_algos_reports_a_failed_run(tmp_path):
    cfg = load_config(BenchAlgosConfig, base={"algos": ["a2c"], "seeds": [0], "output_dir": str(tmp_path),
                                              "train": {**TRAIN, "model": {"name": str(tmp_path / "no-model"),
                                                                          "lora": None}}})
    from textgym.pipeline.bench_algos import bench_algos

    results = bench_algos(cfg)
    assert "no-model" in results["algos"]["a2c"]["error"]
    assert "| a2c | failed:" in (tmp_path / "results.md").read_text()


def test_bench_algos_config_errors():
    with pytest.raises(ConfigError, match="'dqn' is not an algorithm; valid: a2c, dpo, grpo"):
        load_config(BenchAlgosConfig, base={"algos": ["dqn"], "train": TRAIN})
    with pytest.raises(ConfigError, match="env must be a mapping of env keyword arguments, got 3"):
        load_config(BenchAlgosConfig, base={"algos": [{"name": "ppo", "env": 3}], "train": TRAIN})
    with pytest.raises(ConfigError, match="labels must be unique"):
        load_config(BenchAlgosConfig, base={"algos": ["ppo", "ppo"], "train": TRAIN})
    with pytest.raises(ConfigError, match="set by the benchmark"):
        load_config(BenchAlgosConfig, base={"algos": ["ppo"], "train": {**TRAIN, "agent": {"algo": "a2c"}}})
    with pytest.raises(ConfigError, match=r"seeds must be a list of at least one integer, got \[\]"):
        load_config(BenchAlgosConfig, base={"seeds": [], "train": TRAIN})


def test_an_entry_may_change_the_run_sizes(tmp_path):
    cfg = load_config(BenchAlgosConfig, base={
        "algos": ["ppo", {"name": "grpo", "label": "grpo 8 rows", "train": {"env": {"n_envs": 8},
                                                                           "training": {"iterations": 5}}}],
        "train": TRAIN})
    ppo, grpo = (cfg.train_config(spec, 0, tmp_path) for spec in cfg.specs())
    assert (ppo.env.n_envs, ppo.training.iterations) == (4, 2)  # the shared sizes
    assert (grpo.env.n_envs, grpo.training.iterations) == (8, 5)
    assert grpo.env.kwargs["max_new_tokens"] == 6  # merged over the shared train config, not replacing it
    with pytest.raises(ConfigError, match="train must be a mapping of train config sections without agent.algo"):
        load_config(BenchAlgosConfig, base={"algos": [{"name": "ppo", "train": {"agent": {"algo": "a2c"}}}],
                                            "train": TRAIN})


def test_confidence_interval_over_seeds_in_the_table():
    runs = [{"seed": s, "before": {"score": 0.0, "distinct_1": 0.5},
             "after": {"score": v, "kl": 1.0, "perplexity_ref": 5.0, "distinct_1": 0.4, "distinct_2": 0.6},
             "episodes": 8, "seconds": 1.0, "peak_mb": 100.0} for s, v in ((0, 1.0), (1, 2.0), (2, 3.0))]
    r = aggregate(runs)
    assert r["score"] == 2.0 and r["score_ci"] == pytest.approx(4.3027 / 3 ** 0.5, rel=1e-4)
    table = markdown_report({"seeds": [0, 1, 2], "algos": {"ppo": {"spec": {}, "runs": runs, **r}}})
    assert "| ppo | 2.000 ± 2.484 |" in table and "95% CI over seeds" in table


def test_comparisons_say_whether_a_difference_is_beyond_the_noise():
    def algo(gains):
        runs = [{"seed": s, "before": {"score": 0.0, "distinct_1": 0.5},
                 "after": {"score": g, "kl": 1.0, "perplexity_ref": 5.0, "distinct_1": 0.4, "distinct_2": 0.6},
                 "episodes": 8, "seconds": 1.0, "peak_mb": 100.0} for s, g in enumerate(gains)]
        return {"spec": {}, "runs": runs, **aggregate(runs)}

    results = {"seeds": [0, 1, 2], "algos": {"a": algo([0.50, 0.52, 0.48]), "b": algo([0.10, 0.12, 0.08]),
                                             "c": algo([0.1, 0.8, 0.5])}}
    pairs = {c["other"]: c for c in comparisons(results)}
    assert set(pairs) == {"b", "c"} and pairs["b"]["best"] == "a"  # a has the largest mean gain
    assert pairs["b"]["difference"] == pytest.approx(0.4) and pairs["b"]["verdict"] == "beyond the noise"
    assert pairs["c"]["verdict"] == "not distinguishable"  # c's seeds spread over a's
    table = markdown_report(results)
    assert "| b | 0.400 ± " in table and "| c | " in table and "not distinguishable" in table
    one_seed = {"seeds": [0], "algos": {"a": algo([0.5]), "b": algo([0.1])}}
    assert comparisons(one_seed)[0]["verdict"] == "one seed: no interval"


def test_bench_algos_takes_offline_algorithms_at_equal_wall_time(tmp_path):
    """ILQL beside PPO: its data (a recording) and that data's cost in the table, and a budget of
    wall time that charges an offline run for its recording."""
    import gymnasium as gym

    from textgym.pipeline.bench_algos import bench_algos
    from textgym.pipeline.record import record

    env = gym.make_vec("textgym/TextGen-v0", num_envs=4, vectorization_mode="vector_entry_point",
                       model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]},
                       max_new_tokens=6, max_prompt_tokens=16)
    rec = record(env, tmp_path / "rec", n_prompts=8, samples=2, seed=0, progress=False)
    env.close()
    assert rec.meta["seconds"] > 0  # a recording keeps what it cost to play
    meta = json.loads((rec.path / "recording.json").read_text())
    (rec.path / "recording.json").write_text(json.dumps({**meta, "seconds": 0.0004}))
    train = {**TRAIN, "training": {**TRAIN["training"], "iterations": 3},
             "agent": {"hyperparameters": TRAIN["agent"]["hyperparameters"],
                       "ilql": {"data": str(rec.path), "batch_size": 4, "gradient_steps": 2}}}
    base = {"algos": ["ppo", "ilql"], "seeds": [0], "train": train, "output_dir": str(tmp_path / "out")}
    cfg = load_config(BenchAlgosConfig, base={**base, "seconds": 0.001})
    ppo, ilql = (cfg.train_config(spec, 0, tmp_path / "x") for spec in cfg.specs())
    assert ppo.training.max_seconds == 0.001 and ilql.training.max_seconds == pytest.approx(0.0006)
    results = bench_algos(cfg)
    for label in ("ppo", "ilql"):  # each stopped after the first iteration past its budget
        r = results["algos"][label]
        assert "error" not in r, r
        assert [p["iteration"] for p in r["runs"][0]["curve"]] == [0, 1], label
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| own rollouts |" in table and "| recording rec, 16 episodes (0 s) |" in table
    with pytest.raises(ConfigError, match="its data took 0 s to record, more than the budget seconds=0.0001"):
        load_config(BenchAlgosConfig, base={**base, "seconds": 0.0001})
