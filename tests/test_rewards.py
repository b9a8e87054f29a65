"""Tests for textgym.rewards (fast, offline: models are tiny and built locally)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from textgym import rewards
from textgym.rewards import Reward, UnknownOptionError, as_reward, make, names, register

BUILTINS = [
    "bleu",
    "chrf",
    "classifier",
    "keyword",
    "length",
    "regex",
    "reward_model",
    "rouge",
    "vader",
    "weighted",
]


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are dropped afterwards."""
    monkeypatch.setattr(rewards.registry, "_REGISTRY", dict(rewards.registry._REGISTRY))


# ---------------------------------------------------------------------------
# Registry and as_reward
# ---------------------------------------------------------------------------


def test_builtins_registered_and_sorted() -> None:
    assert names() == sorted(names())
    assert set(BUILTINS) <= set(names())


def test_register_function_binds_kwargs() -> None:
    def bonus(prompts, completions, amount=1.0, **metadata):
        return [amount * len(p) for p in prompts]

    register("bonus", bonus)
    assert "bonus" in names()
    assert make("bonus")(["ab", "c"], ["x", "y"]) == [2.0, 1.0]
    reward = make("bonus", amount=0.5)
    assert reward.name == "bonus"
    assert reward(["ab", "c"], ["x", "y"]) == [1.0, 0.5]

    def strict(prompts, completions, amount=1.0):
        return [amount] * len(completions)

    register("strict", strict)
    assert make("strict", amount=2)(["a"], ["b"]) == [2.0]
    with pytest.raises(TypeError, match="reward 'strict'.*nonsense"):
        make("strict", nonsense=3)


class Constant(Reward):
    name = "constant"

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def __call__(self, prompts, completions, **metadata):
        return [self.value] * len(completions)


def test_register_class() -> None:
    register("constant", Constant)
    assert make("constant", value=2)(["a"], ["b"]) == [2.0]
    with pytest.raises(TypeError, match="constant"):
        make("constant", colour="red")


# The registry contract: a registered class is built with the options, anything else
# registered is a reward function and the options are bound to it; nothing is guessed.


def test_contract_class_is_built_with_the_options() -> None:
    register("constant", Constant)
    reward = make("constant", value=2.5)
    assert isinstance(reward.reward, Constant) and reward.value == 2.5
    assert reward(["a", "b"], ["c", "d"]) == [2.5, 2.5]
    assert make("constant").value == 0.0

    class Doubler:  # any class, not only a Reward subclass
        def __init__(self, factor: float = 2.0) -> None:
            self.factor = factor

        def __call__(self, prompts, completions, **metadata):
            return [self.factor * len(c) for c in completions]

    register("doubler", Doubler)
    assert make("doubler", factor=3)(["p"], ["ab"]) == [6.0]
    assert as_reward(Doubler, factor=0.5)(["p"], ["ab"]) == [1.0]
    assert as_reward(Doubler).name == "Doubler"


def test_contract_function_is_bound_with_the_options() -> None:
    calls = []

    def scaled(prompts, completions, scale=1.0, **metadata):
        calls.append((scale, metadata))
        return [scale * len(c) for c in completions]

    register("scaled", scaled)
    reward = make("scaled", scale=2)
    assert isinstance(reward.reward, functools.partial)
    assert reward.reward.func is scaled and reward.reward.keywords == {"scale": 2}
    assert reward(["p"], ["abc"], topic=["x"]) == [6.0]
    assert calls == [(2, {"topic": ["x"]})]
    assert make("scaled").reward is scaled  # no options: the function itself


def test_contract_unknown_option_of_a_class_is_named() -> None:
    register("constant", Constant)
    with pytest.raises(UnknownOptionError, match=r"reward 'constant' \(Constant\) has no option 'colour'; "
                                                  r"valid options: value$") as info:
        make("constant", colour="red")
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)
    with pytest.raises(ValueError, match=r"reward 'length' \(LengthReward\) has no option 'units', 'size'; "
                                         r"valid options: unit, target, scale$"):
        make("length", units="chars", size=3)
    with pytest.raises(ValueError, match=r"reward 'constant' \(Constant\) has no option 'colour'"):
        as_reward(Constant, colour="red")
    with pytest.raises(UnknownOptionError, match=r"reward 'weighted': reward 'length' \(LengthReward\) "
                                                  r"has no option 'units'"):
        make("weighted", components=[{"name": "length", "kwargs": {"units": "chars"}}])
    # a missing or bad option is not an unknown one: the class's own error, naming the reward
    with pytest.raises(TypeError, match="reward 'regex'.*pattern") as info:
        make("regex")
    assert not isinstance(info.value, UnknownOptionError)
    # a class taking **options passes them all on: the error comes from where they go
    with pytest.raises(TypeError, match="reward 'bleu'.*colour") as info:
        make("bleu", colour="red")
    assert not isinstance(info.value, UnknownOptionError)


def test_contract_no_guessing_from_signatures() -> None:
    # The parameter names do not matter: any function is a reward function.
    def by_position(texts, outputs, scale=1.0):
        return [scale * len(o) for o in outputs]

    register("by_position", by_position)
    assert make("by_position", scale=2)(["p"], ["ab"]) == [4.0]

    # A function that returns a reward is not called as a factory: it is a reward
    # function, refused by make() when it cannot take (prompts, completions) ...
    def constant_factory(value=1.0):
        return Constant(value)

    register("constant_factory", constant_factory)
    for options in ({}, {"value": 3}):
        with pytest.raises(TypeError, match=r"reward 'constant_factory': constant_factory cannot be called "
                                            r"as fn\(prompts, completions"):
            make("constant_factory", **options)
    # ... and failing by name when it can, but returns no list of scores
    register("all_defaults", lambda a=1.0, b=2.0: Constant(a + b))
    with pytest.raises(ValueError, match="reward 'all_defaults' returned a Constant, expected a list of 1 floats"):
        make("all_defaults")(["p"], ["c"])
    # and there is no switch to make a function a factory
    with pytest.raises(TypeError, match="factory"):
        register("explicit", lambda a=1.0, b=2.0: Constant(a + b), factory=True)


def test_register_duplicate_overwrite_and_not_callable() -> None:
    register("dup", lambda p, c: [0.0] * len(c))
    with pytest.raises(ValueError, match="dup.*already registered"):
        register("dup", lambda p, c: [1.0] * len(c))
    register("dup", lambda p, c: [1.0] * len(c), overwrite=True)
    assert make("dup")(["a"], ["b"]) == [1.0]
    with pytest.raises(ValueError, match="already registered"):
        register("vader", lambda p, c: [0.0] * len(c))
    with pytest.raises(TypeError, match="not callable"):
        register("number", 3)


def test_make_unknown_name_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown reward 'nope'") as info:
        make("nope")
    for name in BUILTINS:
        assert name in str(info.value)


def test_as_reward() -> None:
    def my_fn(prompts, completions, **metadata):
        return [float(len(c)) for c in completions]

    wrapped = as_reward(my_fn)
    assert wrapped.name == "my_fn"
    assert wrapped(["p", "q"], ["abc", ""]) == [3.0, 0.0]

    class Fixed(Reward):
        name = "fixed"

        def __call__(self, prompts, completions, **metadata):
            return [0.25] * len(completions)

    fixed = as_reward(Fixed())
    assert fixed.name == "fixed" and fixed(["p"], ["c"]) == [0.25]
    assert as_reward(fixed) is fixed
    assert as_reward(Fixed)(["p"], ["c"]) == [0.25]

    length = as_reward("length", unit="chars")
    assert length.name == "length" and length(["p"], ["four"]) == [4.0]
    assert length.unit == "chars"  # attributes of the wrapped reward are reachable

    with pytest.raises(TypeError, match="cannot be called as fn\\(prompts, completions\\)"):
        as_reward(lambda completions: [1.0])
    for bad in (42, None, ["length"]):
        with pytest.raises(TypeError):
            as_reward(bad)


# ---------------------------------------------------------------------------
# Output validation
# ---------------------------------------------------------------------------


def test_validation_names_the_reward() -> None:
    register("nan_reward", lambda p, c: [0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="reward 'nan_reward' returned NaN at index 1"):
        make("nan_reward")(["a"] * 3, ["b"] * 3)

    def my_fn(prompts, completions):
        return [0.0, 1.0, 2.0]

    with pytest.raises(ValueError, match="reward 'my_fn' returned 3 values for 4 completions"):
        as_reward(my_fn)(["a"] * 4, ["b"] * 4)
    register("inf_fn", lambda p, c: [-math.inf])
    with pytest.raises(ValueError, match="reward 'inf_fn' returned -inf at index 0"):
        make("inf_fn")(["a"], ["b"])
    register("inf_fn", lambda p, c: np.array([1.0, np.inf]), overwrite=True)
    with pytest.raises(ValueError, match="reward 'inf_fn' returned inf at index 1"):
        make("inf_fn")(["a", "b"], ["c", "d"])
    with pytest.raises(ValueError, match="non-numeric value 'x'"):
        as_reward(lambda p, c: ["x"])(["a"], ["b"])
    with pytest.raises(ValueError, match="returned a float"):
        as_reward(lambda p, c: 1.0)(["a"], ["b"])
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        make("length")(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="metadata 'references' has 1 entries for 2 completions"):
        make("bleu")(["a", "b"], ["c", "d"], references=["c"])


def test_validation_converts_to_plain_floats() -> None:
    out = as_reward(lambda p, c: np.array([1, 2], dtype=np.int64))(["a", "b"], ["c", "d"])
    assert out == [1.0, 2.0] and all(type(v) is float for v in out)
    out = as_reward(lambda p, c: torch.tensor([0.5, 1.5]))(["a", "b"], ["c", "d"])
    assert out == [0.5, 1.5] and type(out) is list
    assert make("length")([], []) == []


# ---------------------------------------------------------------------------
# Sentiment, surface features
# ---------------------------------------------------------------------------


def test_vader() -> None:
    reward = make("vader")
    pos, neg, neutral = reward(
        ["", "", ""],
        ["I love this, it is wonderful!", "This is terrible and I hate it.", "The box is on the table."],
    )
    assert pos == pytest.approx(0.8478, abs=1e-4)
    assert neg == pytest.approx(-0.7783, abs=1e-4)
    assert neutral == 0.0
    # only the completion is scored unless include_prompt=True
    assert reward(["I hate this."], [" The box is on the table."]) == [0.0]
    assert make("vader", include_prompt=True)(["I hate this."], [" The box is on the table."])[0] < -0.5


def test_length() -> None:
    completions = ["one two  three", "", "four"]
    assert make("length")([""] * 3, completions) == [3.0, 0.0, 1.0]
    assert make("length", unit="chars")([""] * 3, completions) == [14.0, 0.0, 4.0]
    assert make("length", target=2)([""] * 3, completions) == [-1.0, -2.0, -1.0]
    assert make("length", target=2, scale=0.5)([""] * 3, completions) == [-0.5, -1.0, -0.5]
    assert make("length", scale=2.0)([""], ["a b"]) == [4.0]
    with pytest.raises(ValueError, match="reward 'length'.*'tokens'.*'words', 'chars'"):
        make("length", unit="tokens")
    with pytest.raises(ValueError, match="scale"):
        make("length", scale=float("nan"))


def test_keyword() -> None:
    text = "The cat sat. Cats like the CATalog; cat!"
    assert make("keyword", keywords=["cat"])([""], [text]) == [2.0]
    assert make("keyword", keywords=["cat"], whole_word=False)([""], [text]) == [4.0]
    assert make("keyword", keywords=["cat"], case_sensitive=True, whole_word=False)([""], [text]) == [2.0]
    assert make("keyword", keywords=["cat", "the"])([""], [text]) == [4.0]
    assert make("keyword", keywords=["dog"], mode="any")([""] * 2, [text, "a dog"]) == [0.0, 1.0]
    assert make("keyword", keywords=["new", "new york"])([""], ["new york is new"]) == [2.0]
    assert make("keyword", keywords=["c++"])([""], ["I like C++ and c++."]) == [2.0]
    with pytest.raises(ValueError, match="reward 'keyword'.*keywords"):
        make("keyword", keywords=[])
    with pytest.raises(ValueError, match="'sum'.*'count', 'any'"):
        make("keyword", keywords=["x"], mode="sum")


def test_regex() -> None:
    assert make("regex", pattern=r"\d+")([""] * 2, ["a1 b22 c333", "none"]) == [3.0, 0.0]
    assert make("regex", pattern=r"\d+", mode="any")([""] * 2, ["a1 b22 c333", "none"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"reward 'regex'.*invalid regular expression '\(unclosed'"):
        make("regex", pattern="(unclosed")
    with pytest.raises(ValueError, match="'all'"):
        make("regex", pattern="a", mode="all")


# ---------------------------------------------------------------------------
# Reference-based metrics
# ---------------------------------------------------------------------------


def test_bleu() -> None:
    bleu = make("bleu")
    text = "the quick brown fox jumps over the lazy dog"
    assert bleu([""], [text], references=[text]) == [pytest.approx(1.0)]
    assert bleu([""], [text], references=[["nothing in common", text]]) == [pytest.approx(1.0)]
    assert bleu([""], [text], references=[["zzz yyy xxx"]]) == [0.0]
    partial = bleu([""], ["the cat sat on the mat"], references=["the cat sat on a mat"])[0]
    assert partial == pytest.approx(0.537285, abs=1e-5)
    with pytest.raises(ValueError, match="reward 'bleu' needs metadata `references`"):
        bleu([""], [text])


def test_chrf() -> None:
    chrf = make("chrf")
    assert chrf([""], ["the cat"], references=[["the cat"]]) == [pytest.approx(1.0)]
    assert chrf([""], ["the cat sat on the mat"], references=["the cat sat on a mat"]) == [
        pytest.approx(0.720848, abs=1e-5)
    ]
    assert chrf([""], ["abc"], references=["xyz"]) == [0.0]
    with pytest.raises(ValueError, match="reward 'chrf' needs metadata `references`"):
        chrf([""], ["abc"])


def test_rouge() -> None:
    # rougeL: LCS("a b c d", "a c d") = 3 -> P = 3/4, R = 3/3, F = 6/7
    assert make("rouge")([""], ["a b c d"], references=["a c d"]) == [pytest.approx(6 / 7)]
    # rouge2: bigrams {a b, b c} vs {a b, b d}: P = R = 1/2
    assert make("rouge", rouge_type="rouge2")([""], ["a b c"], references=["a b d"]) == [pytest.approx(0.5)]
    # several references: the best one counts
    assert make("rouge", rouge_type="rouge1")(
        [""], ["the cat ran"], references=[["a dog", "the cat sat"]]
    ) == [pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="'rouge3'.*'rouge1', 'rouge2', 'rougeL', 'rougeLsum'"):
        make("rouge", rouge_type="rouge3")
    with pytest.raises(ValueError, match="reward 'rouge' needs metadata `references`"):
        make("rouge")([""], ["a"])


# ---------------------------------------------------------------------------
# Weighted sums
# ---------------------------------------------------------------------------


def test_weighted() -> None:
    prompts = ["", ""]
    completions = ["I love it", "the cat sat on the mat"]
    refs = ["I love it", "the cat sat on a mat"]
    vader = make("vader")(prompts, completions)
    chars = make("length", unit="chars")(prompts, completions)
    bleu = make("bleu")(prompts, completions, references=refs)

    by_dict = make("weighted", components={"vader": 2.0, "bleu": -1.0})
    assert by_dict(prompts, completions, references=refs) == pytest.approx(
        [2 * v - b for v, b in zip(vader, bleu)]
    )

    by_specs = make(
        "weighted",
        components=[
            {"name": "length", "weight": 0.1, "kwargs": {"unit": "chars"}},
            {"name": "vader"},
        ],
    )
    assert by_specs(prompts, completions) == pytest.approx([0.1 * c + v for c, v in zip(chars, vader)])

    def one(prompts, completions, **metadata):
        return [1.0] * len(completions)

    by_tuples = make("weighted", components=[(one, 3.0), (make("vader"), 0.5), ("bleu", 1.0)])
    assert by_tuples(prompts, completions, references=refs) == pytest.approx(
        [3.0 + 0.5 * v + b for v, b in zip(vader, bleu)]
    )

    with pytest.raises(ValueError, match="reward 'weighted'.*unknown reward 'nope'"):
        make("weighted", components={"nope": 1.0})
    with pytest.raises(ValueError, match="empty"):
        make("weighted", components=[])
    with pytest.raises(ValueError, match="weight"):
        make("weighted", components={"vader": float("inf")})
    # component errors name the component
    register("broken", lambda p, c: [float("nan")] * len(c))
    with pytest.raises(ValueError, match="reward 'broken' returned NaN"):
        make("weighted", components={"broken": 1.0})(["a"], ["b"])


# ---------------------------------------------------------------------------
# Hugging Face classifiers and reward models (tiny local models)
# ---------------------------------------------------------------------------

SENTENCES = [
    "the movie was great",
    "the movie was terrible",
    "i love this film",
    "i hate this film",
    "what a wonderful day",
    "what an awful day",
]


def _word_tokenizer(**special_tokens: str) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "</s>"]
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", **special_tokens)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-label BERT sentiment classifier (random weights) with a word-level tokenizer."""
    path = tmp_path_factory.mktemp("bert")
    tokenizer = _word_tokenizer(pad_token="[PAD]")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _llama_dir(path: Path, num_labels: int) -> Path:
    """A Llama sequence classifier whose tokenizer has no pad token (only EOS)."""
    tokenizer = _word_tokenizer(eos_token="</s>")
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_rm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama_dir(tmp_path_factory.mktemp("llama_rm"), num_labels=1)


def _logits_one_by_one(model_dir: Path, texts: list[str], cls) -> torch.Tensor:
    """Unbatched, unpadded forward passes: the reference the rewards must match."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = cls.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])


PROMPTS = ["tell me:", "review:", "q:"]
COMPLETIONS = ["the movie was great", "i hate this film", "what a day"]  # different lengths -> padding


def test_classifier_matches_manual_forward(bert_dir: Path) -> None:
    logits = _logits_one_by_one(bert_dir, COMPLETIONS, BertForSequenceClassification)
    probs = torch.softmax(logits, dim=-1)

    by_name = make("classifier", model=str(bert_dir), label="POSITIVE")
    assert by_name(PROMPTS, COMPLETIONS) == pytest.approx(probs[:, 1].tolist(), abs=1e-5)
    by_index = make("classifier", model=bert_dir, label=0, batch_size=2)
    assert by_index(PROMPTS, COMPLETIONS) == pytest.approx(probs[:, 0].tolist(), abs=1e-5)
    raw = make("classifier", model=bert_dir, label="NEGATIVE", output="logit")
    assert raw(PROMPTS, COMPLETIONS) == pytest.approx(logits[:, 0].tolist(), abs=1e-5)

    with_prompt = make("classifier", model=bert_dir, label=1, include_prompt=True)
    joined = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    joined_probs = torch.softmax(_logits_one_by_one(bert_dir, joined, BertForSequenceClassification), -1)
    assert with_prompt(PROMPTS, COMPLETIONS) == pytest.approx(joined_probs[:, 1].tolist(), abs=1e-5)


def test_classifier_with_loaded_model(bert_dir: Path) -> None:
    model = BertForSequenceClassification.from_pretrained(bert_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(bert_dir)
    reward = make("classifier", model=model, tokenizer=tokenizer, label="POSITIVE")
    expected = make("classifier", model=bert_dir, label="POSITIVE")(PROMPTS, COMPLETIONS)
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="reward 'classifier'.*tokenizer"):
        make("classifier", model=model, label=1)


def test_classifier_bad_arguments(bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="reward 'classifier'.*'happy'.*0='NEGATIVE', 1='POSITIVE'"):
        make("classifier", model=bert_dir, label="happy")
    with pytest.raises(ValueError, match="unknown label 5"):
        make("classifier", model=bert_dir, label=5)
    with pytest.raises(ValueError, match="2 labels.*label"):
        make("classifier", model=bert_dir)
    with pytest.raises(ValueError, match="'score'.*'prob', 'logit'"):
        make("classifier", model=bert_dir, label=1, output="score")
    with pytest.raises(TypeError, match="reward 'classifier'"):
        make("classifier", model=bert_dir, label=1, colour="red")


def test_reward_model_llama_backbone(llama_rm_dir: Path) -> None:
    joined = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    logits = _logits_one_by_one(llama_rm_dir, joined, LlamaForSequenceClassification)[:, 0]

    reward = make("reward_model", model=llama_rm_dir, batch_size=2)
    # no pad token in the tokenizer: EOS is used, and the model is told about it
    assert reward.tokenizer.pad_token == "</s>"
    assert reward.model.config.pad_token_id == reward.tokenizer.pad_token_id
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(logits.tolist(), abs=1e-5)

    # the same model as a classifier: completion only, sigmoid for the single output
    completion_logits = _logits_one_by_one(llama_rm_dir, COMPLETIONS, LlamaForSequenceClassification)[:, 0]
    prob = make("classifier", model=llama_rm_dir)
    assert prob(PROMPTS, COMPLETIONS) == pytest.approx(torch.sigmoid(completion_logits).tolist(), abs=1e-5)


def test_reward_model_rejects_multi_label(bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="reward 'reward_model'.*num_labels == 2"):
        make("reward_model", model=bert_dir)
