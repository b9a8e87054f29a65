import json
import subprocess
import sys
from pathlib import Path

import pytest

from textgym.pipeline.config import load_config
from textgym.pipeline.rm import RMConfig
from textgym.pipeline.train import TrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["sentiment.yaml", "ppo_with_reward_model.yaml"])
def test_train_configs_are_valid(name):
    cfg = load_config(TrainConfig, EXAMPLES / name)
    assert cfg.env.id == "textgym/Sentiment-v0"


def test_default_config_is_the_example():
    assert load_config(TrainConfig, EXAMPLES / "sentiment.yaml") == load_config(TrainConfig)


def test_bench_config_is_valid():
    from textgym.pipeline.bench import MIN_FIT_EVALUATIONS, BenchRewardsConfig

    cfg = load_config(BenchRewardsConfig, EXAMPLES / "bench_rewards.yaml")
    assert [s["label"] for s in cfg.specs()] == ["reward_model", "length", "vader"]
    assert cfg.gold == "vader"
    assert len(set(cfg.seeds)) >= 3  # intervals over seeds
    # every curve long enough for the Gao fit: the untrained evaluation, one every eval_every, the last
    training = cfg.train_config(cfg.specs()[0], cfg.seeds[0], Path("unused")).training
    evaluations = 1 + len({*range(training.eval_every, training.iterations + 1, training.eval_every),
                           training.iterations})
    assert evaluations >= MIN_FIT_EVALUATIONS


def test_bench_algos_config_is_valid():
    from textgym import agents
    from textgym.pipeline.bench_algos import BenchAlgosConfig

    cfg = load_config(BenchAlgosConfig, EXAMPLES / "bench_algos.yaml")
    assert sorted(s["name"] for s in cfg.specs()) == agents.names()  # every algorithm, the same budget
    assert cfg.seconds is not None  # at equal wall time, offline algorithms paying for their data


def test_rm_config_is_valid():
    assert load_config(RMConfig, EXAMPLES / "rm_from_preferences.yaml").backbone == "minilm"


@pytest.mark.parametrize("script, expect", [("custom_reward.py", "politeness:"),
                                            ("compare_algorithms.py", "reinforce++")])
def test_python_examples_run_on_the_tiny_model(script, expect):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), "--steps", "256"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert expect in out.stdout


def test_make_preferences_script(tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLES / "make_preferences.py"), "--model", "textgym/tiny", "--k", "3",
                          "--out", str(tmp_path / "p.jsonl"), "--pairs"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "p.jsonl").read_text().count("\n") >= 1


def test_train_classifier_script(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "p", "completions": [f"good {i}", f"bad {i}"], "scores": [0.5, -0.5]})
                            + "\n" for i in range(10)))
    out = subprocess.run([sys.executable, str(EXAMPLES / "train_classifier.py"), "--data", str(data), "--out",
                          str(tmp_path / "clf"), "--backbone", "textgym/tiny", "--epochs", "1"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval_accuracy" in json.loads(out.stdout.strip().splitlines()[-1])
    assert (tmp_path / "clf" / "config.json").is_file()
