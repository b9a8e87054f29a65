"""End-to-end checks on the real SmolLM2-135M-Instruct (offline, from its PyPI wheel)."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from textgym import models, rewards
from textgym.pipeline.cli import run_episodes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return models.load(models.SMOLLM2)


def test_smollm2_loads_tied_and_writes_english(smollm2):
    model, tok = smollm2
    assert models.logits_width(model) == 49152
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    batch = tok(["The capital of France is", "One, two, three, four,"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in texts[0]
    assert "five" in texts[1].lower()


def test_sentiment_env_on_smollm2(smollm2):
    model, tok = smollm2
    env = gym.make("textgym/Sentiment-v0", model=model, tokenizer=tok, split="test")
    assert env.action_space.n == 49152
    results = run_episodes(env, "greedy", episodes=2, progress=False)
    vader = rewards.make("vader")
    for r in results:
        assert r["score"] == pytest.approx(vader([r["prompt"]], [r["completion"]])[0])
        assert abs(r["kl"]) < 1e-3  # the reference is a copy of the policy
        assert len(r["completion"].split()) >= 3
    vec = gym.make_vec("textgym/Sentiment-v0", num_envs=4, vectorization_mode="vector_entry_point", model=model,
                       tokenizer=tok)
    obs, _ = vec.reset(seed=0)
    ends = 0
    for _ in range(20):
        logits = vec.unwrapped.next_token_logits()
        obs, reward, term, trunc, info = vec.step(logits.argmax(-1).numpy())
        ends += int(term.sum())
        assert np.isfinite(reward).all()
    assert ends >= 4  # every episode lasts at most max_new_tokens=20 steps


def test_ppo_with_lora_on_smollm2(smollm2, tmp_path):
    from textgym import agents

    model, tok = smollm2
    agent = agents.make("ppo", "textgym/Sentiment-v0", n_envs=4, env_kwargs={"model": model, "tokenizer": tok},
                        lora={"r": 4}, n_steps=20, batch_size=40, n_epochs=1, learning_rate=1e-4, seed=0)
    agent.learn(80)
    logged = agent.logger.name_to_value
    assert np.isfinite(logged["train/value_loss"]) and logged["train/entropy"] > 0
    assert all(p.requires_grad == ("lora_" in n) for n, p in agent.policy.lm.named_parameters())
    assert any(p.abs().sum() > 0 for n, p in agent.policy.lm.named_parameters() if "lora_B" in n)  # adapters moved
    summary = agents.evaluate(agent, 4)
    vader = rewards.make("vader")
    episodes = summary["episodes"]
    assert [e["score"] for e in episodes] == pytest.approx(vader([e["prompt"] for e in episodes],
                                                                 [e["completion"] for e in episodes]))
    assert summary["kl"] == pytest.approx(np.mean([e["kl"] for e in episodes]))
