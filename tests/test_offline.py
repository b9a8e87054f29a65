"""The offline algorithms (ILQL, DPO): their losses against hand-computed values, that they learn on
textgym/tiny, that the policy that acts is the one evaluated and saved, and textgym train's run
(resume included) with them."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from textgym.agents.dpo.dpo import TokenGroup, dpo_loss, preference_accuracy
from textgym.agents.evaluate import evaluate
from textgym.agents.ilql.ilql import ilql_losses

from textgym import agents, lm
from textgym.envs import core_of
from textgym.ilql import ILQLHeads, top_k_mask
from textgym.pipeline.config import ConfigError, load_config
from textgym.pipeline.evaluate import evaluate_target
from textgym.pipeline.record import record
from textgym.pipeline.train import Run, TrainConfig, train
from textgym.recordings import RecordingError

TOY = dict(model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]}, max_new_tokens=8,
           max_prompt_tokens=16, kl_coef=0.01,
           prompts=["The film", "I saw a movie and", "My friend said that", "Today"])
# Many distinct prompts, so DPO's held-out prompts are prompts it never trained on.
MANY = [f"{a} {b}" for a in ("The film", "My friend", "Today I", "A story", "Yesterday we", "This book")
        for b in ("was", "said that", "and", "is about", "felt like", "made me")]


def make(algo, data, env_kwargs=None, **hp):
    data = str(data) if isinstance(data, Path) else data
    return agents.make(algo, "textgym/TextGen-v0", n_envs=8, env_kwargs={**TOY, **(env_kwargs or {})}, data=data,
                       **{"seed": 0, "learning_rate": 3e-3, **hp})


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """256 episodes of the untrained tiny model under the keyword reward, 64 per prompt."""
    env = gym.make_vec("textgym/TextGen-v0", num_envs=8, vectorization_mode="vector_entry_point", **TOY)
    rec = record(env, tmp_path_factory.mktemp("rec") / "rec", samples=64, seed=1, progress=False)
    env.close()
    return rec


# --- ILQL -----------------------------------------------------------------------------------------


def test_ilql_terms_equal_hand_computed_values():
    # One episode of 2 actions (a third column of padding), a vocabulary of 3 tokens.
    q1 = torch.tensor([[[0.1, 0.3, -0.2], [0.4, 0.0, 1.0], [5.0, 5.0, 5.0]]])
    q2 = torch.tensor([[[0.3, 0.1, 0.0], [0.2, 0.1, 1.4], [5.0, 5.0, 5.0]]])
    target = torch.tensor([[[0.0, 0.2, -0.1], [0.9, 0.0, 0.7], [5.0, 5.0, 5.0]]])
    v = torch.tensor([[0.2, 0.5, 9.0]])
    log_probs = torch.tensor([[-1.2, -0.7, -5.0]])
    actions = torch.tensor([[0, 2, 1]])
    rewards = torch.tensor([[0.0, 1.5, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    terms = ilql_losses([q1, q2], target, v, log_probs, actions, rewards, mask, gamma=0.9, tau=0.7, awac_beta=0.5)
    # Q targets: r_0 + 0.9 V(s_1) = 0.45; r_1 + 0 (the episode ends) = 1.5
    loss_q = ((0.1 - 0.45) ** 2 + (1.0 - 1.5) ** 2) / 2 + ((0.3 - 0.45) ** 2 + (1.4 - 1.5) ** 2) / 2
    # Qhat - V = 0.0 - 0.2 = -0.2 (weight 1 - tau), 0.7 - 0.5 = 0.2 (weight tau)
    loss_v = (0.3 * 0.04 + 0.7 * 0.04) / 2

    def ce(row, a):
        return math.log(sum(math.exp(x) for x in row)) - row[a]

    loss_cql = ((ce([0.1, 0.3, -0.2], 0) + ce([0.4, 0.0, 1.0], 2)) / 2
                + (ce([0.3, 0.1, 0.0], 0) + ce([0.2, 0.1, 1.4], 2)) / 2)
    loss_awac = (1.2 * math.exp(0.5 * -0.2) + 0.7 * math.exp(0.5 * 0.2)) / 2
    for name, expected in (("loss_q", loss_q), ("loss_v", loss_v), ("loss_cql", loss_cql), ("loss_awac", loss_awac)):
        assert terms[name].item() == pytest.approx(expected, rel=1e-6), name


def test_ilql_heads_polyak_and_top_k():
    heads = ILQLHeads(4, 5)
    before = [p.clone() for p in heads.target_q_heads.parameters()]
    with torch.no_grad():
        for p in heads.q_heads.parameters():
            p.add_(1.0)
    heads.sync_targets(0.25)
    for b, t, q in zip(before, heads.target_q_heads.parameters(), heads.q_heads.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * q)
    assert not any(p.requires_grad for p in heads.target_q_heads.parameters())
    assert top_k_mask(torch.tensor([[0.1, 0.5, 0.3, 0.2]]), 2).tolist() == [[False, True, True, False]]
    assert top_k_mask(torch.tensor([[0.1, 0.5]]), None).all()


def test_ilql_raises_the_keyword_reward_above_the_recording_policy(recording):
    recorded = float(np.mean(recording.episodes["score"]))
    model = make("ilql", recording.path, batch_size=32, gradient_steps=16, beta=8.0)
    model.learn(12 * model.iteration_timesteps)
    after = evaluate(model, 128)
    assert after["score"] > recorded + 0.15, (recorded, after["score"])
    # The env acts with ILQL's distribution: what evaluation played is log pi + beta (Q - V), top-k.
    core = model.core
    ep = after["episodes"][0]
    assert ep["length"] >= 1 and np.isfinite(after["kl"])
    eval_core = core.evaluation_copy(1)
    eval_core.reset_rows([0], [None], {"prompt_index": 0})
    logits = eval_core.acting_logits()
    assert int((logits > torch.finfo(logits.dtype).min).sum()) == 20  # top_k
    expected = core.acting.ilql.logits(eval_core.policy.logits, eval_core.policy.states, core.output_embedding())
    torch.testing.assert_close(logits, expected)


def test_a_saved_ilql_model_acts_as_the_trained_one(recording, tmp_path):
    model = make("ilql", recording.path, batch_size=8, gradient_steps=4, beta=2.0, top_k=5)
    model.learn(model.iteration_timesteps)
    model.core.save_policy(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "textgym_acting.json").read_text())["ilql"]["beta"] == 2.0
    env = gym.make_vec("textgym/TextGen-v0", num_envs=2, vectorization_mode="vector_entry_point",
                       **{**TOY, "model": str(tmp_path / "saved")})
    loaded = core_of(env)
    loaded.reset_rows([0, 1], [None, None], {"prompt_index": 1})
    torch.testing.assert_close(loaded.acting_logits(), _acting(model.core, 1), atol=1e-5, rtol=0)
    # an online algorithm does not sample from ILQL's distribution: refused, not silently wrong
    with pytest.raises(ValueError, match="acts with ILQL's decoding"):
        agents.make("ppo", env)
    env.close()


def _acting(core, prompt_index):
    copy = core.evaluation_copy(2)
    copy.reset_rows([0, 1], [None, None], {"prompt_index": prompt_index})
    return copy.acting_logits()


# --- DPO ------------------------------------------------------------------------------------------


def test_dpo_loss_equals_the_formula():
    w, lose, ref_w, ref_l = (torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -1.0]), torch.tensor([-3.5, -2.0]),
                             torch.tensor([-3.8, -1.5]))
    h = [(-3.0 + 3.5) - (-4.0 + 3.8), (-2.0 + 2.0) - (-1.0 + 1.5)]  # 0.7, -0.5
    losses, margins = dpo_loss(w, lose, ref_w, ref_l, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.1 * x)) for x in h], rel=1e-6)
    assert margins.tolist() == pytest.approx([0.1 * x for x in h], rel=1e-6)
    losses, _ = dpo_loss(w, lose, ref_w, ref_l, beta=0.1, loss_type="ipo")
    assert losses.tolist() == pytest.approx([(x - 5.0) ** 2 for x in h], rel=1e-6)
    assert preference_accuracy(torch.tensor([0.3, -0.1, 0.0, 2.0])) == pytest.approx(0.625)  # a tie counts 1/2
    with pytest.raises(ValueError, match="unknown DPO loss_type 'hinge'; valid: sigmoid, ipo"):
        dpo_loss(w, lose, ref_w, ref_l, beta=0.1, loss_type="hinge")


def test_dpo_agent_loss_is_the_formula_on_teacher_forced_log_probs():
    prefs = [{"prompt": "The film", "chosen": " was the best", "rejected": " was bad"},
             {"prompt": "Today", "completions": [" the sun", " rain", " the the"], "ranks": [1, 2, 0]}]
    model = make("dpo", prefs, batch_size=2, gradient_steps=3, eval_fraction=0.0)
    model.learn(model.iteration_timesteps)  # the policy moves off the reference
    core = model.core
    groups = model._groups
    assert [len(g.comparisons) for g in groups] == [1, 3]  # a ranking of 3 gives its 3 pairs

    def logp(model_, group, c):
        prompt = torch.tensor([group.prompt_ids])
        ids = torch.tensor([group.completions[c]])
        with torch.no_grad():
            logps = lm.completion_logprobs(model_, prompt, torch.ones_like(prompt), ids, torch.ones_like(ids))
        return float(logps.sum())

    expected = []
    for g in groups:
        for w, lose in g.comparisons:
            h = (logp(core.model, g, w) - logp(core.ref_model, g, w)) - (logp(core.model, g, lose)
                                                                         - logp(core.ref_model, g, lose))
            expected.append(math.log1p(math.exp(-0.1 * h)))
    with torch.no_grad():
        losses, _ = model._margins(groups)
    assert losses.tolist() == pytest.approx(expected, abs=1e-5)
    text = groups[0].completions[0]
    assert text[-1] in core.eos_ids  # a text completion that ends early ends on EOS, as the env's do


def test_dpo_raises_held_out_preference_accuracy(tmp_path):
    env_kwargs = {"prompts": MANY}
    env = gym.make_vec("textgym/TextGen-v0", num_envs=8, vectorization_mode="vector_entry_point",
                       **{**TOY, **env_kwargs})
    rec = record(env, tmp_path / "rec", samples=8, seed=3, progress=False)
    env.close()
    model = make("dpo", rec.path, env_kwargs, batch_size=4, gradient_steps=8, eval_fraction=0.25)
    held_out_prompts = {core_of_prompt(g) for g in model._held_out}
    assert held_out_prompts and not held_out_prompts & {core_of_prompt(g) for g in model._groups}
    before = model.held_out_figures()
    assert before["preference_accuracy"] == 0.5 and before["reward_margin"] == 0.0  # policy == reference
    model.learn(6 * model.iteration_timesteps)
    after = model.held_out_figures()
    assert after["preference_accuracy"] > 0.6 and after["reward_margin"] > 0, after


def test_dpo_with_lora_takes_the_adapters_off_model_as_its_frozen_reference(recording):
    model = make("dpo", recording.path, lora={"r": 4}, batch_size=2, gradient_steps=2, eval_fraction=0.25)
    core = model.core
    assert core.peft_model is not None and type(core.ref_model).__name__ == "AdapterDisabledRef"
    assert model.held_out_figures()["preference_accuracy"] == 0.5  # adapters start at zero: policy == reference
    model.learn(2 * model.iteration_timesteps)
    assert model.held_out_figures()["reward_margin"] != 0.0
    trained = [name for name, p in core.model.named_parameters() if p.requires_grad]
    assert trained and all("lora" in name for name in trained)
    group = model._held_out[0]  # the reference's log-probs, computed once, are still the adapters-off model's
    torch.testing.assert_close(model._ref[id(group)], model._sequence_log_probs([group], core.ref_model).cpu())


def core_of_prompt(group: TokenGroup) -> tuple:
    return tuple(group.prompt_ids)


# --- textgym train --------------------------------------------------------------------------------


def offline_run(tmp_path, algo, data, *extra):
    return load_config(TrainConfig, overrides=[
        "model.name=textgym/tiny", "model.lora=null", "env.id=textgym/TextGen-v0", "env.n_envs=4",
        "env.kwargs.max_new_tokens=8", "env.kwargs.max_prompt_tokens=16", "reward.name=keyword",
        "reward.kwargs.keywords=[the]", f"env.kwargs.prompts={json.dumps(TOY['prompts'])}", f"agent.algo={algo}",
        f"agent.hyperparameters.data={data}", "agent.hyperparameters.batch_size=4",
        "agent.hyperparameters.gradient_steps=2", "agent.hyperparameters.learning_rate=3e-3",
        "training.eval_n=4", "training.eval_every=1", f"training.output_dir={tmp_path}", *extra])


@pytest.mark.parametrize("algo", ["ilql", "dpo"])
def test_train_runs_an_offline_algorithm_and_resumes_it(algo, recording, tmp_path, monkeypatch):
    full = tmp_path / "full"
    result = train(offline_run(full, algo, recording.path, "training.iterations=3"), progress=False)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3] and "score" not in rows[0]  # no rollout to describe
    assert rows[-1]["timesteps"] == 3 * 8 and rows[0]["train/n_updates"] == 2 and "eval/score" in rows[0]
    key = "train/loss_q" if algo == "ilql" else "heldout/preference_accuracy"
    assert key in rows[0]
    assert (full / "time.md").exists() and (full / "score.png").exists() and result["iterations"] == 3
    assert ((full / "final_model" / "textgym_acting.json").exists()) == (algo == "ilql")
    # textgym eval of the run plays its final evaluation again, with the saved acting distribution
    # (ILQL's heads and beta): the figures are the run's.
    report = evaluate_target(str(full))
    assert report["metrics"]["score"] == pytest.approx(result["after"]["score"])
    assert report["metrics"]["kl"] == pytest.approx(result["after"]["kl"], abs=1e-4)

    killed = tmp_path / "killed"
    original = Run.iterate

    def dies_in_iteration_2(self, it):
        if it == 1:
            self.agent.learn(self.agent.iteration_timesteps, reset_num_timesteps=False)  # must not count
            raise KeyboardInterrupt("killed")
        return original(self, it)

    monkeypatch.setattr(Run, "iterate", dies_in_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        train(offline_run(killed, algo, recording.path, "training.iterations=3"), progress=False)
    monkeypatch.setattr(Run, "iterate", original)
    train(offline_run(killed, algo, recording.path, "training.iterations=3"), resume=True, progress=False)

    def records(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds" and not k.startswith("time/")} for r in rows]

    assert records(killed) == records(full)
    assert json.loads((killed / "summary.json").read_text()) == json.loads((full / "summary.json").read_text())


# --- bad input ------------------------------------------------------------------------------------


def test_offline_bad_input_is_refused_by_name(recording, tmp_path):
    with pytest.raises(ConfigError, match=r"ilql learns from a dataset: set agent.ilql.data .*a recording directory"):
        load_config(TrainConfig, overrides=["agent.algo=ilql", "agent.ilql.data=null"])
    with pytest.raises(RecordingError, match="is not a textgym recording"):
        make("ilql", tmp_path)
    with pytest.raises(ValueError, match=r"tau must be a number in \(0, 1\), got 1.0"):
        make("ilql", recording.path, tau=1.0)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -1"):
        make("ilql", recording.path, beta=-1)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1 or None"):
        make("ilql", recording.path, top_k=0)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'hinge'"):
        make("dpo", recording.path, loss_type="hinge")
    other = tmp_path / "other_vocab"
    shutil.copytree(recording.path, other)
    meta = json.loads((other / "recording.json").read_text())
    (other / "recording.json").write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] + 100}))
    with pytest.raises(ValueError, match="vocabulary of .* not this env's model's"):
        make("ilql", other)
    one = tmp_path / "one"
    env = gym.make_vec("textgym/TextGen-v0", num_envs=2, vectorization_mode="vector_entry_point", **TOY)
    record(env, one, samples=1, seed=0, progress=False)
    env.close()
    with pytest.raises(ValueError, match="no prompt with two completions of different scores"):
        make("dpo", one)
