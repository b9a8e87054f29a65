"""Reward-model training (textgym.pipeline.rm) and synthetic preference data (textgym.pipeline.preferences)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from textgym import rewards
from textgym.pipeline.config import ConfigError, load_config
from textgym.pipeline.preferences import synthesize, to_pairs, write_jsonl
from textgym.pipeline.rm import (
    RMConfig,
    load_preferences,
    pairwise_loss,
    ranking_loss,
    split_groups,
    train_reward_model,
)


def _nll(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


# --- losses -------------------------------------------------------------------------------------


def test_pairwise_loss_by_hand() -> None:
    loss = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx((_nll(1.0) + _nll(-0.5)) / 2)
    assert pairwise_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))


def test_ranking_loss_k2_is_pairwise() -> None:
    r = torch.tensor([0.3, 1.0])
    assert ranking_loss(r, [1, 0]).item() == pytest.approx(_nll(0.7))  # completion 1 is best
    assert ranking_loss(r, [1, 0]).item() == pytest.approx(pairwise_loss(r[1:], r[:1]).item())


def test_ranking_loss_k3_worked_example() -> None:
    # Rewards (a, b, c) = (1, 0, 2) ranked b < a < c (ranks a=1, b=0, c=2):
    # pairs (b>a), (b>c), (a>c): differences -1, -2, -1 -> (nll(-1) + nll(-2) + nll(-1)) / 3.
    r = torch.tensor([1.0, 0.0, 2.0])
    expected = (_nll(-1.0) + _nll(-2.0) + _nll(-1.0)) / 3
    assert expected == pytest.approx(1.5845, abs=1e-4)  # (2 * 1.3133 + 2.1269) / 3
    assert ranking_loss(r, [1, 0, 2]).item() == pytest.approx(expected)
    assert ranking_loss(r, torch.tensor([1, 0, 2])).item() == pytest.approx(expected)
    # The order matters: ranking c < a < b agrees with the rewards and costs less.
    agreeing = ranking_loss(r, [1, 2, 0]).item()
    assert agreeing == pytest.approx((_nll(1.0) + _nll(2.0) + _nll(1.0)) / 3)
    assert agreeing < expected
    # Gradients push winners up and losers down.
    r.requires_grad_(True)
    ranking_loss(r, [1, 0, 2]).backward()
    assert r.grad[1] < 0 < r.grad[2]
    with pytest.raises(ValueError, match="ties"):
        ranking_loss(torch.zeros(3), [0, 0, 1])
    with pytest.raises(ValueError, match="one rank per reward"):
        ranking_loss(torch.zeros(3), [0, 1])


# --- data ---------------------------------------------------------------------------------------


def test_load_both_formats_and_group_by_prompt(tmp_path: Path) -> None:
    records = [
        {"prompt": "p1", "chosen": "good", "rejected": "bad"},
        {"prompt": "p2", "completions": ["x", "y", "z"], "ranks": [2, 0, 1]},
        {"prompt": "p1", "chosen": "good", "rejected": "worse"},
        {"prompt": "p3", "completions": ["u", "v", "w"], "scores": [0.5, 0.5, -1.0]},
    ]
    path = write_jsonl(records, tmp_path / "sub" / "prefs.jsonl")
    groups = load_preferences(path)
    assert [g.prompt for g in groups] == ["p1", "p2", "p3"]
    p1, p2, p3 = groups
    assert p1.completions == ["good", "bad", "worse"] and p1.comparisons == [(0, 1), (0, 2)]
    assert p2.completions == ["x", "y", "z"] and sorted(p2.comparisons) == [(1, 0), (1, 2), (2, 0)]
    assert sorted(p3.comparisons) == [(0, 2), (1, 2)]  # equal scores are not compared

    # The same rankings from parquet (list columns) and pairs from csv.
    ranked = pd.DataFrame([records[1], {"prompt": "p4", "completions": ["a", "b"], "ranks": [0, 1]}])
    ranked.to_parquet(tmp_path / "r.parquet")
    groups = load_preferences(tmp_path / "r.parquet")
    assert sorted(groups[0].comparisons) == sorted(p2.comparisons) and groups[1].comparisons == [(0, 1)]
    pd.DataFrame([records[0], records[2]]).to_csv(tmp_path / "p.csv", index=False)
    assert load_preferences(tmp_path / "p.csv")[0].comparisons == p1.comparisons

    train, held = split_groups(load_preferences(path), 0.34, seed=0)
    assert len(held) == 1 and len(train) == 2 and {g.prompt for g in train + held} == {"p1", "p2", "p3"}


@pytest.mark.parametrize(
    "record, match",
    [
        ({"prompt": "p", "chosen": "a"}, r"bad.jsonl', line 2 \(pair\) lacks rejected.*\['chosen', 'prompt'\]"),
        ({"chosen": "a", "rejected": "b"}, r"bad.jsonl', line 2 \(pair\) lacks prompt"),
        ({"prompt": "p", "completions": ["a", "b"]}, r"bad.jsonl', line 2 \(ranking\) lacks ranks or scores"),
        ({"prompt": "p", "text": "a"}, r"bad.jsonl', line 2 is neither a pair.*\['prompt', 'text'\]"),
        ({"prompt": "p", "completions": ["a", "b", "c"], "ranks": [0, 1, 1]},
         r"bad.jsonl', line 2: ranks \[0, 1, 1\] contain ties"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [0]},
         r"bad.jsonl', line 2: ranks must be a list with one entry per"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1, 1]}, r"bad.jsonl', line 2: all scores are equal"),
        ({"prompt": "p", "completions": ["a", "b"], "scores": [1, 0], "ranks": [1, 0]},
         r"bad.jsonl', line 2: ranks .* disagree"),
    ],
)
def test_bad_records(tmp_path: Path, record: dict, match: str) -> None:
    # A JSON Lines file's bad record is named by file and line (the page's files are read so too).
    path = write_jsonl([{"prompt": "ok", "chosen": "a", "rejected": "b"}, record], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=match):
        load_preferences(path)


def test_missing_file_and_bad_spec(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="invalid dataset spec"):
        load_preferences({"name": "x"})


# --- config -------------------------------------------------------------------------------------


def test_config_validation(tmp_path: Path) -> None:
    cfg = load_config(RMConfig, overrides=["data=prefs.jsonl", "epochs=3", "learning_rate=0.0001"])
    assert (cfg.data, cfg.epochs, cfg.learning_rate, cfg.backbone) == ("prefs.jsonl", 3, 1e-4, "minilm")
    with pytest.raises(ConfigError, match="unknown config key 'lr'.*learning_rate"):
        load_config(RMConfig, overrides=["data=x.jsonl", "lr=0.1"])
    with pytest.raises(ConfigError, match="'epochs' must be an integer, got 'two'"):
        load_config(RMConfig, overrides=["data=x.jsonl", "epochs=two"])
    with pytest.raises(ConfigError, match="'learning_rate' must be a number"):
        load_config(RMConfig, overrides=["data=x.jsonl", "learning_rate=[1]"])
    with pytest.raises(ValueError, match="RMConfig.eval_fraction must be a number in \\[0, 1\\), got 1.5"):
        load_config(RMConfig, overrides=["data=x.jsonl", "eval_fraction=1.5"])
    with pytest.raises(ValueError, match="RMConfig.prompts_per_batch must be an integer >= 1, got 0"):
        load_config(RMConfig, overrides=["data=x.jsonl", "prompts_per_batch=0"])
    with pytest.raises(ValueError, match="RMConfig.data must be"):
        load_config(RMConfig)
    spec = load_config(RMConfig, overrides=["data={dataset: some/prefs, split: test}"])
    assert spec.data == {"dataset": "some/prefs", "split": "test"}


# --- training -----------------------------------------------------------------------------------

HAPPY = ["great", "wonderful", "lovely", "superb", "delightful", "excellent", "charming", "brilliant"]
SAD = ["awful", "dreadful", "boring", "terrible", "dull", "painful", "miserable", "tedious"]
NEUTRAL = ["the", "film", "plot", "cast", "was", "and", "ending", "music", "really", "quite"]


def _separable_pairs(n: int, seed: int) -> list[dict]:
    """Chosen completions hold two happy words, rejected ones two sad words, among neutral ones."""
    rng = random.Random(seed)

    def text(words: list[str]) -> str:
        return " " + " ".join([*rng.sample(NEUTRAL, 3), *rng.sample(words, 2), rng.choice(NEUTRAL)])

    return [{"prompt": f"review {seed}-{i}:", "chosen": text(HAPPY), "rejected": text(SAD)} for i in range(n)]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with a word-level tokenizer trained on the test vocabulary."""
    path = tmp_path_factory.mktemp("bert_backbone")
    bpe = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(HAPPY + SAD + NEUTRAL + ["review", ":", "-"] + [str(i) for i in range(200)])]
    bpe.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", pad_token="[PAD]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)  # an encoder without a head, like MiniLM
    tokenizer.save_pretrained(path)
    return path


def _check_trained(out: Path, metrics: dict) -> None:
    assert metrics["eval_accuracy"] >= 0.8, metrics
    assert metrics["eval_accuracy"] > metrics["eval_accuracy_before"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    reward = rewards.make("reward_model", model=out)
    # It scores with the max_length it was trained with (remembered in its config), not 512.
    assert reward.max_length == json.loads((out / "config.json").read_text())["textgym_max_length"]
    assert reward.max_length < 512
    assert rewards.make("reward_model", model=out, max_length=20).max_length == 20
    new = _separable_pairs(3, seed=99)
    chosen = reward([r["prompt"] for r in new], [r["chosen"] for r in new])
    rejected = reward([r["prompt"] for r in new], [r["rejected"] for r in new])
    assert all(c > r for c, r in zip(chosen, rejected)), (chosen, rejected)


def test_train_encoder_backbone(tmp_path: Path, bert_dir: Path) -> None:
    data = write_jsonl(_separable_pairs(100, seed=0), tmp_path / "prefs.jsonl")
    out = tmp_path / "rm"
    cfg = RMConfig(backbone=str(bert_dir), data=str(data), eval_fraction=0.2, epochs=3, prompts_per_batch=8,
                   learning_rate=3e-3, max_length=32, output_dir=str(out))
    metrics = train_reward_model(cfg, progress=False)
    assert (metrics["train_prompts"], metrics["eval_prompts"], metrics["eval_comparisons"]) == (80, 20, 20)
    assert len(metrics["train_loss"]) == 3 and metrics["train_loss"][-1] < metrics["train_loss"][0]
    _check_trained(out, metrics)


def test_training_is_deterministic(tmp_path: Path, bert_dir: Path) -> None:
    data = write_jsonl(_separable_pairs(12, seed=5), tmp_path / "prefs.jsonl")
    runs = [
        train_reward_model(RMConfig(backbone=str(bert_dir), data=str(data), eval_fraction=0.25, epochs=2,
                                    prompts_per_batch=4, learning_rate=3e-3, seed=7, output_dir=str(tmp_path / d)),
                           progress=False)
        for d in ("a", "b")
    ]
    assert runs[0]["train_loss"] == runs[1]["train_loss"]
    assert runs[0]["eval_accuracy"] == runs[1]["eval_accuracy"]


def test_train_causal_backbone_with_rankings(tmp_path: Path) -> None:
    # K = 3 rankings (happy > neutral > sad) as training data, held-out pairs as eval_data.
    rng = random.Random(1)
    rankings = [
        {"prompt": r["prompt"], "completions": [r["rejected"], " " + " ".join(rng.sample(NEUTRAL, 5)), r["chosen"]],
         "ranks": [2, 1, 0]}
        for r in _separable_pairs(60, seed=1)
    ]
    data = write_jsonl(rankings, tmp_path / "rankings.jsonl")
    pd.DataFrame(_separable_pairs(20, seed=2)).to_parquet(tmp_path / "eval.parquet")
    out = tmp_path / "rm"
    cfg = RMConfig(backbone="textgym/tiny", data=str(data), eval_data=str(tmp_path / "eval.parquet"), epochs=2,
                   learning_rate=3e-3, max_length=48, output_dir=str(out))
    metrics = train_reward_model(cfg, progress=False)
    assert (metrics["train_prompts"], metrics["train_comparisons"], metrics["eval_comparisons"]) == (60, 180, 20)
    _check_trained(out, metrics)


@pytest.mark.slow
def test_train_minilm_backbone(tmp_path: Path) -> None:
    data = write_jsonl(_separable_pairs(40, seed=3), tmp_path / "prefs.jsonl")
    cfg = RMConfig(data=str(data), eval_fraction=0.25, epochs=1, learning_rate=1e-4, max_length=32,
                   output_dir=str(tmp_path / "rm"))
    metrics = train_reward_model(cfg, progress=False)
    assert metrics["eval_accuracy"] >= 0.8, metrics
    assert rewards.make("reward_model", model=tmp_path / "rm").model.config.model_type == "bert"


# --- synthetic preferences ----------------------------------------------------------------------

PROMPTS = ["The film was", "I watched this movie", "The acting", "Overall, the story"]


def test_synthesize_and_pairs() -> None:
    gold = rewards.make("length", unit="chars")
    records = synthesize("textgym/tiny", prompts=PROMPTS, k=3, gold=gold, max_new_tokens=12, seed=0, batch_size=3)
    assert [r["prompt"] for r in records] == PROMPTS
    for r in records:
        assert len(r["completions"]) == len(r["scores"]) == 3 and sorted(r["ranks"]) == [0, 1, 2]
        assert r["scores"] == [float(len(c)) for c in r["completions"]]
        for i in range(3):
            for j in range(3):
                if r["scores"][i] > r["scores"][j]:
                    assert r["ranks"][i] < r["ranks"][j]
    again = synthesize("textgym/tiny", prompts=PROMPTS, k=3, gold=gold, max_new_tokens=12, seed=0, batch_size=3)
    assert again == records
    other = synthesize("textgym/tiny", prompts=PROMPTS, k=3, gold=gold, max_new_tokens=12, seed=1, batch_size=3)
    assert other != records
    # Completely tied prompts are dropped.
    assert synthesize("textgym/tiny", prompts=PROMPTS[:2], k=2, gold=lambda p, c: [0.0] * len(c),
                      max_new_tokens=4) == []

    pairs = to_pairs(records)
    assert len(pairs) == len(records)
    for pair, r in zip(pairs, records):
        assert pair["prompt"] == r["prompt"]
        assert pair["chosen"] == r["completions"][r["ranks"].index(0)]
        assert pair["rejected"] == r["completions"][r["ranks"].index(2)]
    every = to_pairs(records, all_pairs=True)
    s = [r["scores"] for r in records]
    assert len(every) == sum(x[i] != x[j] for x in s for i in range(3) for j in range(i + 1, 3)) > len(pairs)
    assert all(len(p["chosen"]) > len(p["rejected"]) for p in every)
    # Rankings written by write_jsonl load back as training data.
    assert len(load_preferences(records)) == len(records)


def test_train_classifier_feeds_the_classifier_reward(tmp_path):
    from textgym import rewards
    from textgym.pipeline.classifier import train_classifier

    happy = ["a lovely happy film", "great and wonderful", "I loved it, so good", "a joyful delight"]
    sad = ["an awful sad film", "boring and bad", "I hated it, so dull", "a miserable mess"]
    texts = [t + f" {i}" for i in range(8) for t in happy + sad]
    labels = [int(j < 4) for _ in range(8) for j in range(8)]
    metrics = train_classifier(texts, labels, label_names=("other", "positive"), backbone="textgym/tiny",
                               output_dir=tmp_path / "clf", epochs=4, learning_rate=1e-3, progress=False)
    assert metrics["eval_accuracy"] >= 0.8
    reward = rewards.make("classifier", model=str(tmp_path / "clf"), label="positive")
    assert reward.max_length == 128  # train_classifier's max_length, remembered
    good, bad = reward(["", ""], ["a lovely happy film", "an awful sad film"])
    assert good > bad
    with pytest.raises(ValueError, match="as many labels as texts"):
        train_classifier(["a"], [0, 1], output_dir=tmp_path / "x")
