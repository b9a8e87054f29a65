"""Columns of padding alone are never computed: prompts are left-padded to ``max_prompt_tokens``,
which a batch seldom needs in full, and every forward (KV-cached prompt encoding, teacher-forced
reference and update forwards) drops the leading columns that are padding in every row. The
results are those of the padded forwards (positions come from the mask)."""

import numpy as np
import torch

from textgym import agents, lm, models

PROMPTS = ["The film", "I saw a movie and", "My friend said that", "Today", "Last night", "Once upon a time", "We"]


def _padded(tokenizer, texts, width):
    """Left-padded ids and mask of ``texts``, ``width`` columns."""
    ids = np.full((len(texts), width), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    for i, text in enumerate(texts):
        tokens = tokenizer(text)["input_ids"][-width:]
        ids[i, width - len(tokens):], mask[i, width - len(tokens):] = tokens, 1
    return torch.as_tensor(ids), torch.as_tensor(mask)


def test_drop_padding_columns():
    ids = torch.tensor([[0, 0, 0, 5, 6], [0, 0, 7, 8, 9]])
    mask = (ids != 0).long()
    out_ids, out_mask, cut = lm.drop_padding_columns(ids, mask)
    assert cut == 2 and out_ids.tolist() == [[0, 5, 6], [7, 8, 9]] and out_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert lm.drop_padding_columns(ids[:, 2:], mask[:, 2:])[2] == 0  # nothing to drop
    assert lm.drop_padding_columns(ids, torch.zeros_like(mask))[2] == 0  # all padding: left as it is


def test_teacher_forced_log_probs_ignore_the_padding_width():
    model, tokenizer = models.load(models.TINY)
    completions = torch.as_tensor(np.random.default_rng(0).integers(3, 100, size=(3, 5)))
    cmask = torch.ones_like(completions)
    longest = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS[:3])
    narrow = lm.completion_logprobs(model, *_padded(tokenizer, PROMPTS[:3], longest), completions, cmask)
    wide = lm.completion_logprobs(model, *_padded(tokenizer, PROMPTS[:3], 40), completions, cmask)
    torch.testing.assert_close(wide, narrow, atol=1e-5, rtol=1e-5)


def test_no_forward_sees_a_column_of_padding_alone():
    """A PPO iteration with prompts padded to 64 columns: every forward of the model (prompt encoding,
    decoding, the update's teacher-forced passes) is at most as wide as the longest prompt plus the
    completion, and the first column is real in some row."""
    agent = agents.make("ppo", "textgym/TextGen-v0", n_envs=4, seed=0, learning_rate=3e-3, n_steps=6,
                        batch_size=24, env_kwargs=dict(model="textgym/tiny", reward="length", prompts=PROMPTS,
                                                       max_new_tokens=6, max_prompt_tokens=64, stop_on_eos=False))
    core = agent.core
    longest = max(len(core.tokenizer(p)["input_ids"]) for p in PROMPTS)
    seen = []

    def record(module, args, kwargs):
        mask = kwargs["attention_mask"]
        seen.append((mask.shape[1], bool(mask[:, 0].any()), kwargs.get("cache") is not None))

    handle = core.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        agent.learn(agent.n_steps * agent.n_envs)
    finally:
        handle.remove()
    assert seen and all(width <= longest + 6 + 1 for width, _, _ in seen), (longest, seen)
    assert all(first_real for _, first_real, cached in seen if not cached)  # cached steps carry the old columns


def test_a_wider_prompt_widens_the_cache():
    """A row restarted with a prompt wider than every live row's columns: the cache grows on the
    left (masked), and every row's logits are still those of a fresh forward."""
    model, tokenizer = models.load(models.TINY)
    dec = lm.IncrementalLM(model, 2)
    ids, mask = _padded(tokenizer, ["We", "Today"], 12)
    dec.start([0, 1], ids, mask)
    dec.advance(torch.tensor([5, 6]), torch.tensor([True, True]))
    long_ids, long_mask = _padded(tokenizer, ["I saw a movie and my friend said that once upon a time"], 12)
    dec.start([1], long_ids, long_mask)
    with torch.no_grad():
        for row, (row_ids, row_mask) in enumerate([(torch.cat([ids[0], torch.tensor([5])]),
                                                    torch.cat([mask[0], torch.tensor([1])])),
                                                   (long_ids[0], long_mask[0])]):
            keep = row_mask.bool()
            seq = row_ids[keep].unsqueeze(0)
            full = model(input_ids=seq, position_ids=torch.arange(seq.shape[1]).unsqueeze(0)).logits[0, -1]
            torch.testing.assert_close(dec.logits[row], full, atol=1e-4, rtol=1e-4)
