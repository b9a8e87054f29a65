"""A quantized frozen base under LoRA (``quantize="int8"``, torchao's, and ``quantize="nf4"``,
bitsandbytes', ``textgym.quantization``): the same quantized model acts, scores the update and,
adapters off, is the reference; what is saved computes what was trained; bad values are refused by
name. Each test runs for both kinds."""

import importlib.util

import numpy as np
import pytest
import torch
from test_pipeline import tiny_config
from test_rollout_correctness import TOY, first_minibatch_figures, one_minibatch_rollout

from textgym import agents, lm, models, quantization
from textgym.envs.config import TextGenConfig
from textgym.pipeline.evaluate import evaluate_target, target_env
from textgym.pipeline.train import train

# optional dependencies ('textgym[quantize]'); the test extras install them
KINDS = [pytest.param(kind, marks=pytest.mark.skipif(importlib.util.find_spec(module) is None,
                                                     reason=f"{module} is not installed"))
         for kind, module in (("int8", "torchao"), ("nf4", "bitsandbytes"))]
QUANTIZED = {**TOY, "quantize": "int8", "stop_on_eos": False}


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def _agent(kind, algo="ppo", **hp):
    return agents.make(algo, "textgym/TextGen-v0", n_envs=4, env_kwargs={**QUANTIZED, "quantize": kind}, seed=0,
                       lora=True, learning_rate=3e-3, **hp)


def _lora_layer(model):
    return model.core.peft_model.base_model.model.model.layers[0].self_attn.q_proj


def test_the_base_is_quantized_and_only_the_adapters_train(kind):
    model = _agent(kind)
    layer = _lora_layer(model)
    weight = layer.base_layer.weight
    stored = weight.qdata if kind == "int8" else weight.data  # (nf4: two 4-bit codes per byte)
    assert quantization.is_quantized(weight) and stored.dtype == {"int8": torch.int8, "nf4": torch.uint8}[kind]
    assert stored.numel() == {"int8": 1, "nf4": 0.5}[kind] * layer.in_features * layer.out_features
    trainable = {name for name, p in model.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("value_head") for name in trainable), trainable
    assert not any(quantization.is_quantized(p) for p in model.policy.parameters() if p.requires_grad)
    assert not quantization.is_quantized(model.core.model.get_output_embeddings().weight)  # tied to the input


@pytest.mark.parametrize("algo", ["ppo", "reinforce++"])
def test_rollout_log_probs_are_the_updates_before_any_step(kind, algo):
    """The acting distribution is the trained one: the quantized model's log-probs of the sampled
    tokens, KV-cached while acting, equal the update's teacher-forced ones (ratio 1, nothing
    clipped: the update at learning rate 0), and the adapter-free reference is the policy before
    training (KL 0)."""
    model = _agent(kind, algo)
    before = {n: p.detach().clone() for n, p in model.policy.named_parameters() if p.requires_grad}
    buffer = one_minibatch_rollout(model, algo)
    # The reference is the untrained policy: KL 0 up to the rounding of the int8 kernel on the
    # reference's teacher-forced shapes against the acting forward's one-token steps.
    kls = [s["kl"] for s in model._episode_stats]
    assert len(kls) == 4 and max(abs(k) for k in kls) < 1e-5, kls
    _, parts = first_minibatch_figures(model, buffer, algo)
    assert float(parts["train/approx_kl"]) < 1e-6 and float(parts["train/clip_fraction"]) == 0.0
    for name, p in model.policy.named_parameters():  # nothing moved (as at learning rate 0)
        if p.requires_grad:
            assert torch.equal(p, before[name]), name


def test_training_moves_the_adapters_and_the_saved_model_computes_what_was_trained(tmp_path, kind):
    model = _agent(kind, n_steps=6, batch_size=24, n_epochs=2)
    model.learn(24)
    layer = _lora_layer(model)
    assert float(layer.lora_B["default"].weight.detach().abs().max()) > 0  # the adapters learned something
    core = model.core
    core.models.save_policy(tmp_path / "final")
    saved, _ = models.load(tmp_path / "final")
    assert not quantization.has_quantized(saved)  # a plain float model: base dequantized plus the adapters
    ids = torch.as_tensor(np.array(core.tokenizer(["The film was", "Once upon a time"], padding=True)["input_ids"]))
    mask = (ids != core.pad_id).long()
    prompt, completion = ids[:, :2], ids[:, 2:]
    ours = lm.completion_logprobs(core.model, prompt, mask[:, :2], completion, mask[:, 2:], dtype=core.dtype)
    theirs = lm.completion_logprobs(saved, prompt, mask[:, :2], completion, mask[:, 2:], dtype=torch.float32)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_an_agent_zip_holds_the_adapters_not_the_frozen_base(tmp_path, kind):
    model = _agent(kind, n_steps=6, batch_size=24, n_epochs=1)
    model.learn(24)
    model.save(tmp_path / "agent.zip")
    import zipfile

    with zipfile.ZipFile(tmp_path / "agent.zip") as archive:
        policy = torch.load(archive.open("policy.pth"), weights_only=True)
    assert policy and not any(quantization.is_quantized(v) for v in policy.values())
    assert not any("base_layer.weight" in k for k in policy)  # (nor nf4's absmax, quant_map... of it)
    env_kwargs = {**QUANTIZED, "quantize": kind}
    loaded = agents.load(tmp_path / "agent.zip", agents.as_vec_env("textgym/TextGen-v0", 4, env_kwargs))
    for (name, a), (_, b) in zip(model.policy.named_parameters(), loaded.policy.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    # Onto an env whose base is float, the file lacks that base's weights: refused, naming them.
    with pytest.raises(ValueError, match=r"(?s)agent.zip.*do not fit this env's model.*Missing key.*base_layer.weight"):
        agents.load(tmp_path / "agent.zip",
                    agents.as_vec_env("textgym/TextGen-v0", 4, {**env_kwargs, "quantize": None}))


def test_a_run_over_a_quantized_base_is_evaluated_as_it_was_trained(tmp_path, kind):
    """textgym train with env.kwargs.quantize=KIND (and its default LoRA), then textgym eval of the
    run: the float final model against the quantized base reproduces the run's own final figures."""
    result = train(tiny_config(tmp_path, "model.lora={r: 4}", f"env.kwargs.quantize={kind}", "training.iterations=1",
                               "training.eval_n=4"), progress=False)
    assert not quantization.has_quantized(models.load(tmp_path / "final_model")[0])
    _, kwargs, _ = target_env(str(tmp_path))
    assert "quantize" not in kwargs and quantization.has_quantized(kwargs["ref_model"])
    report = evaluate_target(str(tmp_path))
    assert report["metrics"]["n"] == result["after"]["n"]
    assert report["metrics"]["score"] == pytest.approx(result["after"]["score"])
    assert report["metrics"]["kl"] == pytest.approx(result["after"]["kl"], abs=1e-3)


def test_bad_values_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown quantize 'int4'; valid: None .*'int8', 'nf4'"):
        TextGenConfig.from_kwargs(**{**TOY, "quantize": "int4"})
    with pytest.raises(ValueError, match=r"quantize='int8'.*needs LoRA adapters"):
        agents.make("ppo", "textgym/TextGen-v0", n_envs=2, env_kwargs=QUANTIZED, seed=0)
    model, tokenizer = models.load("textgym/tiny")
    with pytest.raises(ValueError, match=r"quantize='nf4' loads the model with bitsandbytes from its name or path"):
        agents.make("ppo", "textgym/TextGen-v0", n_envs=2, seed=0, lora=True,
                    env_kwargs={**QUANTIZED, "quantize": "nf4", "model": model, "tokenizer": tokenizer})
