import json
from pathlib import Path

import pytest
import torch

from textgym import models
from textgym.lm import position_ids
from textgym.pipeline import sft
from textgym.pipeline.config import ConfigError, load_config
from textgym.pipeline.sft import SFTConfig, build_batch, completion_loss, encode_prompt, train_sft

FACTS = {"grass": "green", "sky": "blue", "snow": "white", "coal": "black", "blood": "red",
         "sun": "yellow", "orange": "orange", "violet": "purple"}
ROWS = [{"prompt": f"colour of {k}:", "completion": f" {v}"} for k, v in FACTS.items()] * 5  # 40 pairs


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return models.load(models.TINY)[1]


def write_pairs(path, rows=ROWS):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def tiny_cfg(tmp_path, **kwargs) -> SFTConfig:
    data = write_pairs(tmp_path / "pairs.jsonl")
    settings = dict(model=models.TINY, data=data, eval_data=data, epochs=10, batch_size=8, learning_rate=3e-3,
                    output_dir=str(tmp_path / "out"))
    return SFTConfig(**{**settings, **kwargs})


@pytest.mark.parametrize("chat_template", [False, True])
def test_build_batch_labels_only_on_completion_and_eos(tokenizer, chat_template):
    tok = tokenizer
    prompts = ["colour of grass:", "a much longer prompt about the colour of the sky:"]
    completions = [" green and lush", " blue"]
    batch = build_batch(tok, prompts, completions, max_length=64, chat_template=chat_template)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    for i, (p, c) in enumerate(zip(prompts, completions)):
        p_ids = encode_prompt(tok, p, chat_template)
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p_ids) + len(c_ids)
        assert ids[i, :n].tolist() == p_ids + c_ids
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right padding
        assert labels[i].tolist() == [-100] * len(p_ids) + c_ids + [-100] * (ids.shape[1] - n)
        assert tok.decode(labels[i][labels[i] != -100]) == c + tok.eos_token
        if chat_template:
            assert tok.decode(p_ids).endswith("<|im_start|>assistant\n")
            assert f"<|im_start|>user\n{p}<|im_end|>" in tok.decode(p_ids)
    assert (ids[mask == 0] == tok.pad_token_id).all()


def test_build_batch_truncates_prompt_from_the_left(tokenizer):
    tok = tokenizer
    prompt, completion = "one two three four five six seven eight nine ten", " green"
    c_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = build_batch(tok, [prompt], [completion], max_length=len(c_ids) + 3)
    assert batch["input_ids"][0].tolist() == tok(prompt)["input_ids"][-3:] + c_ids
    # A completion that alone does not fit keeps one prompt token and is cut on the right.
    batch = build_batch(tok, [prompt], [completion], max_length=2)
    assert batch["input_ids"][0].tolist() == tok(prompt)["input_ids"][-1:] + c_ids[:1]
    assert batch["labels"][0].tolist() == [-100, c_ids[0]]


def test_padding_and_position_ids_do_not_change_the_loss(tiny, tokenizer):
    model, tok = tiny
    prompts, completions = ["colour of grass:", "the sky over the sea is quite often:"], [" green grass", " blue"]
    seen = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        batch = build_batch(tok, prompts, completions, 64)
        total, count = completion_loss(model, batch)
        alone = [completion_loss(model, build_batch(tok, [p], [c], 64)) for p, c in zip(prompts, completions)]
    assert torch.equal(seen[0]["position_ids"], position_ids(batch["attention_mask"]))
    assert count == sum(n for _, n in alone)
    assert total.item() == pytest.approx(sum(t.item() for t, _ in alone), rel=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir):
    tmp_path = tmp_path_factory.mktemp("sft")
    cfg = tiny_cfg(tmp_path)
    model, tok = models.load(models.TINY)
    prompts, completions = [r["prompt"] for r in ROWS], [r["completion"] for r in ROWS]
    before = sft.evaluate(model, tok, prompts, completions)
    return cfg, before, train_sft(cfg)


def test_training_learns_the_mapping(trained):
    cfg, before, metrics = trained
    assert len(metrics["train_loss"]) == len(metrics["eval_loss"]) == cfg.epochs
    assert metrics["steps"] == cfg.epochs * 5
    assert metrics["train_loss"][-1] < metrics["train_loss"][0] / 10
    assert metrics["eval_loss"][-1] < before / 20
    model, tok = models.load(cfg.output_dir)  # the saved directory is a textgym model
    for thing, colour in FACTS.items():
        ids = tok(f"colour of {thing}:", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        assert tok.decode(out[0, ids["input_ids"].shape[1]:]) == f" {colour}{tok.eos_token}"


def test_output_dir_holds_metrics_and_config(trained):
    cfg, _, metrics = trained
    out = Path(cfg.output_dir)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert load_config(SFTConfig, out / "sft_config.yaml") == cfg
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_training_is_deterministic(tmp_path):
    a = train_sft(tiny_cfg(tmp_path, epochs=1, eval_data=None, output_dir=str(tmp_path / "a")))
    b = train_sft(tiny_cfg(tmp_path, epochs=1, eval_data=None, output_dir=str(tmp_path / "b")))
    assert a["train_loss"] == b["train_loss"] and a["eval_loss"] is None


def test_failed_run_leaves_no_output_dir(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, epochs=2)
    calls = []

    def failing_loss(model, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-training")
        return completion_loss(model, batch)

    monkeypatch.setattr(sft, "completion_loss", failing_loss)
    with pytest.raises(RuntimeError, match="mid-training"):
        train_sft(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]

    # A failure while saving leaves neither the output dir nor a temporary one.
    monkeypatch.setattr(sft, "completion_loss", completion_loss)
    monkeypatch.setattr(sft, "save_config", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        train_sft(tiny_cfg(tmp_path, epochs=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_missing_completion_column(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(ValueError, match="'completion'.*answer"):
        sft.load_pairs(data)
    assert sft.load_pairs(data, completion_column="answer") == (["a"], ["b"])


def test_config_validation():
    cfg = load_config(SFTConfig, overrides=["data=pairs.jsonl", "epochs=3", "learning_rate=0.0001", "eval_data=null"])
    assert (cfg.data, cfg.epochs, cfg.learning_rate, cfg.eval_data, cfg.model) == (
        "pairs.jsonl", 3, 1e-4, None, models.SMOLLM2)
    with pytest.raises(ValueError, match="data"):
        load_config(SFTConfig, overrides=["epochs=3"])
    for override, key in [("epochs=0", "epochs"), ("batch_size=-1", "batch_size"), ("max_length=1", "max_length"),
                          ("learning_rate=0", "learning_rate"), ("weight_decay=-0.1", "weight_decay")]:
        with pytest.raises(ValueError, match=key):
            load_config(SFTConfig, overrides=["data=pairs.jsonl", override])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(SFTConfig, overrides=["data=pairs.jsonl", "batch_size=eight"])
    with pytest.raises(ConfigError, match="'lr'"):
        load_config(SFTConfig, overrides=["data=pairs.jsonl", "lr=0.1"])
