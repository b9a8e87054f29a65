import copy
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from textgym import lm, models
from textgym.envs import TextGenVectorEnv

TINY = dict(model="textgym/tiny")
PROMPTS = ["The film", "I loved the music in this", "A quiet story about two brothers who", "Bad"]


def make(env_id="textgym/TextGen-v0", **kwargs):
    return gym.make(env_id, **{**TINY, "prompts": PROMPTS, **kwargs})


def run_episode(env, actions, seed=0):
    obs, _ = env.reset(seed=seed)
    rewards = []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        rewards.append(r)
        if term or trunc:
            return obs, rewards, term, trunc, info
    raise AssertionError("episode did not end")


@pytest.mark.parametrize("env_id", ["textgym/TextGen-v0", "textgym/Sentiment-v0"])
def test_check_env(env_id):
    kwargs = {"max_new_tokens": 5} if env_id.endswith("TextGen-v0") else {}
    env = gym.make(env_id, **TINY, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gym_check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped, warn=False)
    assert env.unwrapped.action_space.n == models.logits_width(env.unwrapped.model)


def test_spaces_follow_logits_width(tiny):
    model, tok = tiny
    env = gym.make("textgym/TextGen-v0", model=model, tokenizer=tok, prompts=PROMPTS, max_new_tokens=3,
                   max_prompt_tokens=7)
    assert env.action_space == gym.spaces.Discrete(model.config.vocab_size)
    assert env.observation_space["input_ids"].shape == (10,)
    assert env.observation_space["input_ids"].dtype == np.int64


def test_observation_layout_and_render():
    env = make(max_new_tokens=4, max_prompt_tokens=12, render_mode="ansi", stop_on_eos=False)
    core = env.unwrapped.core
    obs, info = env.reset(options={"prompt": "The film"})
    prompt_ids = core.tokenizer("The film")["input_ids"]
    n = len(prompt_ids)
    assert obs["input_ids"][12 - n : 12].tolist() == prompt_ids
    assert obs["attention_mask"].tolist() == [0] * (12 - n) + [1] * n + [0] * 4
    assert (obs["input_ids"][: 12 - n] == core.pad_id).all()
    token = core.tokenizer(" good")["input_ids"][0]
    obs, *_ = env.step(token)
    assert obs["input_ids"][12] == token and obs["attention_mask"][12] == 1 and obs["attention_mask"][13] == 0
    assert env.render() == f"prompt: The film\ncompletion: {core.tokenizer.decode([token])}"
    assert info["prompt"] == "The film"


def test_score_only_on_last_step_and_kl_zero_against_itself():
    env = make(reward="length", reward_kwargs={"unit": "chars"}, max_new_tokens=6, stop_on_eos=False, kl_coef=0.1)
    core = env.unwrapped.core
    word = core.tokenizer(" the")["input_ids"][0]
    _, rewards, term, trunc, info = run_episode(env, [word] * 6)
    assert rewards[:-1] == [0.0] * 5
    assert term and not trunc
    assert info["completion"] == " the" * 6
    assert info["score"] == len(" the" * 6)
    # The reference is a frozen copy of the policy: the log-ratio is zero up to float error.
    assert abs(info["kl"]) < 1e-4
    assert rewards[-1] == pytest.approx(info["score"] - 0.1 * info["kl"])
    assert set(info) >= {"score", "kl", "kl_coef", "prompt", "completion"}


def _perturbed_ref(seed=1):
    model, _ = models.load("textgym/tiny")
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model, ref


def _hand_logratio(model, ref, obs, P, n):
    ids = torch.as_tensor(obs["input_ids"])[None]
    mask = torch.as_tensor(obs["attention_mask"])[None]
    args = (ids[:, :P], mask[:, :P], ids[:, P : P + n], mask[:, P : P + n])
    with torch.no_grad():
        return (lm.completion_logprobs(model, *args) - lm.completion_logprobs(ref, *args))[0]


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_kl_matches_hand_computed_logratios(kl_in):
    model, ref = _perturbed_ref()
    _, tok = models.load("textgym/tiny")
    env = make(model=model, tokenizer=tok, ref_model=ref, kl_in=kl_in, kl_coef=0.5, max_new_tokens=5,
               stop_on_eos=False, reward=lambda p, c: [0.0] * len(c))
    rng = np.random.default_rng(0)
    obs, rewards, *_, info = run_episode(env, rng.integers(10, 300, size=5))
    r = _hand_logratio(model, ref, obs, 64, 5).double()
    assert abs(r.sum().item()) > 0.05  # the reference really differs
    assert info["kl"] == pytest.approx(r.sum().item(), rel=1e-5, abs=1e-4)  # k1, whatever the placement
    assert info["kl_k3"] == pytest.approx((torch.exp(-r) - 1 + r).sum().item(), rel=1e-5, abs=1e-4)
    # In the reward: -kl_coef * k1; in the loss: the reward is the score alone (the agent adds k2).
    expected = -0.5 * r.sum().item() if kl_in == "reward" else 0.0
    assert rewards[-1] == pytest.approx(expected, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("kl_in, estimator", [("reward", "k2"), ("reward", "k3"), ("loss", "k1"), ("loss", "k3")])
def test_gradient_wrong_kl_placements_are_refused(kl_in, estimator):
    with pytest.raises(ValueError, match=rf"kl_estimator '{estimator}' with kl_in='{kl_in}' is refused: .*gradient"):
        make(kl_in=kl_in, kl_estimator=estimator)
    with pytest.raises(ValueError, match="unknown kl_in 'both'; valid: reward, loss"):
        make(kl_in="both")


def test_ref_model_cannot_be_the_policy():
    model, tok = models.load("textgym/tiny")
    with pytest.raises(ValueError, match="ref_model is the policy model itself"):
        make(model=model, tokenizer=tok, ref_model=model)


def test_per_token_kl_mode():
    model, ref = _perturbed_ref()
    _, tok = models.load("textgym/tiny")
    env = make(model=model, tokenizer=tok, ref_model=ref, kl_mode="per_token", kl_coef=0.5, max_new_tokens=4,
               stop_on_eos=False, reward=lambda p, c: [2.0] * len(c))
    obs, rewards, *_, info = run_episode(env, [40, 41, 42, 43])
    r = _hand_logratio(model, ref, obs, 64, 4).double().numpy()
    np.testing.assert_allclose(rewards[:-1], -0.5 * r[:-1], atol=1e-4)
    assert rewards[-1] == pytest.approx(2.0 - 0.5 * r[-1], abs=1e-4)
    assert info["kl"] == pytest.approx(r.sum(), abs=1e-4)


def test_eos_terminates_and_is_not_in_completion():
    env = make(max_new_tokens=8)
    core = env.unwrapped.core
    word = core.tokenizer(" the")["input_ids"][0]
    _, rewards, term, trunc, info = run_episode(env, [word, core.eos_ids[0]])
    assert term and not trunc and info["length"] == 2 and info["completion"] == " the"
    env = make(max_new_tokens=3, stop_on_eos=False)
    _, rewards, term, _, info = run_episode(env, [core.eos_ids[0]] * 3)
    assert term and len(rewards) == 3 and info["length"] == 3


def test_adaptive_kl_coef_in_env():
    env = make(kl_coef=0.2, kl_target=1.0, kl_horizon=10, max_new_tokens=2, stop_on_eos=False)
    *_, info = run_episode(env, [40, 41])
    # KL ~ 0 -> error clipped at -0.2: coef *= 1 - 0.2 / 10
    assert info["kl_coef"] == 0.2
    assert env.unwrapped.kl_controller.value == pytest.approx(0.2 * (1 - 0.02))


def _random_actions(rng, n, eos, vocab):
    actions = rng.integers(0, vocab, size=n)
    actions[rng.random(n) < 0.25] = eos  # varied episode lengths
    return actions


@pytest.mark.parametrize("kl_mode", ["final", "per_token"])
def test_vector_env_equals_single_envs(kl_mode):
    n, steps = 3, 16
    kwargs = dict(model="textgym/tiny", prompts=PROMPTS, max_new_tokens=5, max_prompt_tokens=10, kl_mode=kl_mode,
                  reward="length", kl_coef=0.3)
    vec = gym.make_vec("textgym/TextGen-v0", num_envs=n, vectorization_mode="vector_entry_point", **kwargs)
    assert isinstance(vec, TextGenVectorEnv)
    ref = gym.make_vec("textgym/TextGen-v0", num_envs=n, vectorization_mode="sync", **kwargs)
    assert vec.single_observation_space == ref.single_observation_space
    assert vec.single_action_space == ref.single_action_space
    # Different weights for the reference make the KL non-trivial; give both setups the same ones.
    _, perturbed = _perturbed_ref()
    vec.unwrapped.core.ref_model.load_state_dict(perturbed.state_dict())
    if kl_mode == "per_token":
        vec.unwrapped.core.ref.model.load_state_dict(perturbed.state_dict())
    for env in ref.envs:
        env.unwrapped.core.ref_model.load_state_dict(perturbed.state_dict())

    o1, _ = vec.reset(seed=7)
    o2, _ = ref.reset(seed=7)
    rng = np.random.default_rng(0)
    eos = vec.unwrapped.core.eos_ids[0]
    ends = 0
    for _ in range(steps):
        np.testing.assert_array_equal(o1["input_ids"], o2["input_ids"])
        np.testing.assert_array_equal(o1["attention_mask"], o2["attention_mask"])
        actions = _random_actions(rng, n, eos, vec.single_action_space.n)
        o1, r1, t1, u1, i1 = vec.step(actions)
        o2, r2, t2, u2, i2 = ref.step(actions)
        np.testing.assert_allclose(r1, r2, atol=1e-4)
        np.testing.assert_array_equal(t1, t2)
        assert not u1.any() and not u2.any()
        if t1.any():
            ends += int(t1.sum())
            np.testing.assert_array_equal(i1["_score"], i2["_score"])
            np.testing.assert_allclose(i1["kl"][t1], i2["kl"][t1], atol=1e-4)
            assert list(i1["completion"][t1]) == list(i2["completion"][t1])
    assert ends >= 4  # restarts happened while other rows were mid-episode


def test_vector_cache_matches_full_forward():
    """The right-aligned, trimmed KV cache gives the logits of a fresh forward over each observation."""
    vec = TextGenVectorEnv(3, model="textgym/tiny", prompts=PROMPTS, max_new_tokens=4, max_prompt_tokens=10)
    obs, _ = vec.reset(seed=1)
    rng = np.random.default_rng(1)
    eos = vec.core.eos_ids[0]
    model = vec.model
    for _ in range(12):
        live = vec.core.live.copy()
        ids, mask = torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"])
        with torch.no_grad():
            for i in np.flatnonzero(live):
                last = int(mask[i].nonzero().max())
                m = mask[i : i + 1, : last + 1]
                full = model(input_ids=ids[i : i + 1, : last + 1], attention_mask=m,
                             position_ids=lm.position_ids(m)).logits[0, -1]
                torch.testing.assert_close(vec.next_token_logits()[i], full, atol=1e-4, rtol=1e-4)
        obs, *_ = vec.step(_random_actions(rng, 3, eos, vec.single_action_space.n))
        assert vec.core.policy.mask is None or vec.core.policy.mask.shape[1] <= 14


def test_bad_input_errors():
    env = make(max_new_tokens=2)
    env.reset(seed=0)
    n = env.action_space.n
    with pytest.raises(ValueError, match=rf"out of range.*\[0, {n}\)"):
        env.step(n)
    with pytest.raises(ValueError, match=r"-1.*out of range"):
        env.step(-1)
    with pytest.raises(ValueError, match=r"integer token id.*3\.5"):
        env.step(3.5)
    env.step(40)
    env.step(41)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(40)
    with pytest.raises(ValueError, match=r"unknown keyword\(s\).*max_tokens.*valid: .*max_new_tokens"):
        gym.make("textgym/TextGen-v0", max_tokens=3)
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*vader"):
        make(reward="nope")
    with pytest.raises(ValueError, match=r"could not load model 'no/such-model'.*textgym/tiny"):
        make(model="no/such-model")
    with pytest.raises(ValueError, match="empty"):
        make(prompts=[])
    with pytest.raises(ValueError, match=r"kl_mode 'sometimes'.*final, per_token"):
        make(kl_mode="sometimes")
    with pytest.raises(ValueError, match=r"kl_estimator 'k4'.*k1, k2, k3"):
        make(kl_estimator="k4")
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 1, got 0"):
        make(max_new_tokens=0)


def test_long_prompt_is_cut_from_the_left_with_warning():
    env = make(max_prompt_tokens=4)
    text = "one two three four five six seven eight"
    with pytest.warns(UserWarning, match="cut from the left"):
        obs, _ = env.reset(options={"prompt": text})
    ids = env.unwrapped.tokenizer(text)["input_ids"]
    assert obs["input_ids"][:4].tolist() == ids[-4:]


def test_long_prompt_warns_once_per_env_and_is_encoded_as_sft_encodes_it():
    from textgym.pipeline.sft import build_batch

    env = make(max_prompt_tokens=4)
    text = "one two three four five six seven eight"
    with pytest.warns(UserWarning, match="cut from the left") as caught:
        obs, _ = env.reset(options={"prompt": text})
    cut = [w for w in caught if "cut from the left" in str(w.message)]
    assert len(cut) == 1 and cut[0].filename.endswith("core.py")  # at the env's reset
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        env.reset(options={"prompt": text + " nine"})
    assert not [w for w in later if "cut from the left" in str(w.message)]  # once per env
    tok = env.unwrapped.tokenizer
    c_ids = tok(" x", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = build_batch(tok, [text], [" x"], max_length=len(c_ids) + 4)  # room for 4 prompt tokens
    assert batch["input_ids"][0, :4].tolist() == obs["input_ids"][:4].tolist()


def test_chat_template_wraps_prompt():
    env = make(chat_template=True, max_prompt_tokens=40, render_mode="ansi")
    obs, _ = env.reset(options={"prompt": "Hi"})
    tok = env.unwrapped.tokenizer
    text = tok.decode(obs["input_ids"][obs["attention_mask"] == 1])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_prompts_from_file_and_seeded_sampling(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt number {i}" for i in range(50)))
    env = make(prompts=str(path))
    first = [env.reset(seed=3)[1]["prompt"]] + [env.reset()[1]["prompt"] for _ in range(5)]
    again = [env.reset(seed=3)[1]["prompt"]] + [env.reset()[1]["prompt"] for _ in range(5)]
    assert first == again and len(set(first)) > 1
    assert all(p.startswith("prompt number") for p in first)


def test_sentiment_env_defaults_and_splits():
    env = gym.make("textgym/Sentiment-v0", model="textgym/tiny", split="test")
    core = env.unwrapped.core
    assert len(core.prompts) == 50 and core.reward_fn.name == "vader"
    assert (core.P, core.T) == (40, 20)
    with pytest.raises(ValueError, match="split"):
        gym.make("textgym/Sentiment-v0", model="textgym/tiny", split="dev")
    vec = gym.make_vec("textgym/Sentiment-v0", num_envs=2, vectorization_mode="vector_entry_point",
                       model="textgym/tiny")
    obs, _ = vec.reset(seed=0)
    assert obs["input_ids"].shape == (2, 60)


def test_random_agent_episode_with_custom_reward():
    from textgym import rewards

    name = "test_has_e"
    rewards.register(name, lambda prompts, completions: [float("e" in c) for c in completions], overwrite=True)
    env = make(reward=name, max_new_tokens=6)
    env.action_space.seed(0)
    obs, _ = env.reset(seed=0)
    done = False
    while not done:
        obs, reward, done, truncated, info = env.step(env.action_space.sample())
    assert info["score"] == float("e" in info["completion"])


@pytest.mark.parametrize("kl_mode", ["final", "per_token"])
def test_info_reports_reference_logprob_of_the_completion(kl_mode):
    model, ref = _perturbed_ref()
    _, tok = models.load("textgym/tiny")
    env = make(model=model, tokenizer=tok, ref_model=ref, kl_mode=kl_mode, max_new_tokens=4, stop_on_eos=False)
    obs, *_, info = run_episode(env, [40, 41, 42, 43])
    ids, mask = torch.as_tensor(obs["input_ids"])[None], torch.as_tensor(obs["attention_mask"])[None]
    with torch.no_grad():
        expected = lm.completion_logprobs(ref, ids[:, :64], mask[:, :64], ids[:, 64:68], mask[:, 64:68]).sum().item()
    assert info["ref_logprob"] == pytest.approx(expected, abs=1e-4)


def test_kl_controller_moves_once_per_batch_of_num_envs_episodes():
    # Each of the 4 rows ends after 2 tokens, all on the same step: one update with their mean KL.
    model, ref = _perturbed_ref()
    _, tok = models.load("textgym/tiny")
    vec = gym.make_vec("textgym/TextGen-v0", num_envs=4, vectorization_mode="vector_entry_point", model=model,
                       tokenizer=tok, ref_model=ref, prompts=PROMPTS, max_new_tokens=2, stop_on_eos=False,
                       kl_coef=0.2, kl_target=0.05, kl_horizon=10)
    vec.reset(seed=0)
    rng = np.random.default_rng(3)
    vec.step(rng.integers(10, 300, size=4))
    _, _, term, _, infos = vec.step(rng.integers(10, 300, size=4))
    assert term.all()
    assert (infos["kl_coef"] == 0.2).all()  # every row finishing together sees one coefficient
    mean = float(np.mean(infos["kl"]))
    assert np.ptp(infos["kl"]) > 0.01  # mixed per-episode KLs
    error = min(max(mean / 0.05 - 1, -0.2), 0.2)
    assert vec.unwrapped.kl_controller.value == pytest.approx(0.2 * (1 + error * 4 / 10))


def test_evaluation_copy_leaves_the_engine_untouched():
    from textgym import sampling

    vec = gym.make_vec("textgym/TextGen-v0", num_envs=3, vectorization_mode="vector_entry_point", **TINY,
                       prompts=PROMPTS, max_new_tokens=6, kl_coef=0.1, kl_target=1.0, kl_horizon=10)
    core = vec.unwrapped.core
    vec.reset(seed=0)
    for _ in range(2):
        vec.step(vec.unwrapped.next_token_logits().argmax(-1).numpy())
    state = {k: getattr(core, k).copy() for k in ("input_ids", "attention_mask", "length", "live", "pending")}
    logits = core.policy.logits.clone()
    cache = [layer.keys.clone() for layer in core.policy.cache.layers]
    coef, batch = core.kl_controller.value, list(core.kl.batch)
    torch_rng, np_rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    episodes = sampling.episodes_per_row(core, 7, seed=1)
    assert len(episodes) == 7
    for key, value in state.items():
        np.testing.assert_array_equal(getattr(core, key), value)
    assert torch.equal(core.policy.logits, logits)
    assert all(torch.equal(a.keys, b) for a, b in zip(core.policy.cache.layers, cache))
    assert core.kl_controller.value == coef and core.kl.batch == batch
    assert torch.equal(torch.get_rng_state(), torch_rng) and np.array_equal(np.random.get_state()[1], np_rng)
    # The training episodes carry on as if nothing happened.
    vec.step(vec.unwrapped.next_token_logits().argmax(-1).numpy())


def test_episodes_per_row_spreads_episodes_like_sb3():
    from textgym import sampling

    vec = gym.make_vec("textgym/TextGen-v0", num_envs=3, vectorization_mode="vector_entry_point", **TINY,
                       prompts=PROMPTS, max_new_tokens=6)
    core = vec.unwrapped.core
    assert sampling.play(core, lambda row: None, seed=0) == []
    # 8 episodes over 3 rows: 2, 3, 3 (SB3's evaluate_policy), however fast each row finishes.
    targets = [(8 + i) // 3 for i in range(3)]
    counts = [0, 0, 0]

    def next_prompt(row):
        if counts[row] == targets[row]:
            return None
        counts[row] += 1
        return 0

    rows = [row for row, _ in sampling.play(core, next_prompt, seed=0)]
    assert sorted(rows) == [0, 0, 1, 1, 1, 2, 2, 2]
    assert len(sampling.episodes_per_row(core, 8)) == 8
    a = sampling.episodes_per_row(core, 5, seed=4)
    b = sampling.episodes_per_row(core, 5, seed=4)
    assert [e["completion"] for e in a] == [e["completion"] for e in b]  # seeded
    with pytest.raises(ValueError, match="n_episodes must be an integer >= 1, got 0"):
        sampling.episodes_per_row(core, 0)


def test_score_scale_scales_the_reward_not_the_reported_score():
    env = make(reward=lambda p, c: [2.0] * len(c), score_scale=0.25, kl_coef=0.0, max_new_tokens=2, stop_on_eos=False)
    _, rewards, *_, info = run_episode(env, [40, 41])
    assert info["score"] == 2.0 and rewards[-1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="score_scale must be a finite number > 0, got 0"):
        make(score_scale=0)


def test_lora_is_attached_through_the_engine():
    env = make(max_new_tokens=3)
    core = env.unwrapped.core
    core.attach_lora({"r": 4, "lora_alpha": 8, "lora_dropout": 0.0})
    assert core.peft_model is not None
    assert [n for n, p in core.model.named_parameters() if p.requires_grad]  # adapters only
    assert all("lora_" in n for n, p in core.model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="already attached"):
        core.attach_lora({"r": 4})
    with pytest.raises(ValueError, match="lora bias='all'.*reference would drift"):
        make().unwrapped.core.attach_lora({"r": 4, "bias": "all"})
    obs, _ = env.reset(seed=0)  # episodes run on the adapted model against the adapter-free reference
    *_, info = run_episode(env, [40, 41, 42])
    assert info["kl"] == pytest.approx(0.0, abs=1e-4)  # LoRA's B starts at zero: policy = reference
