"""Recorded episodes (textgym.recordings, textgym record): what is written is what was played, it
reads back the same, and a malformed recording is refused naming its file and field."""

from __future__ import annotations

import json

import gymnasium as gym
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from textgym import lm, models
from textgym.envs import core_of
from textgym.pipeline.cli import main
from textgym.pipeline.record import record
from textgym.recordings import EPISODES_FILE, META_FILE, RecordingError, load_recording, write_recording


@pytest.fixture(scope="module")
def env():
    vec = gym.make_vec("textgym/TextGen-v0", num_envs=4, vectorization_mode="vector_entry_point",
                       model=models.TINY, reward="length", max_new_tokens=6, max_prompt_tokens=48, kl_coef=0.1)
    yield vec
    vec.close()


@pytest.fixture(scope="module")
def recorded(env, tmp_path_factory):
    return record(env, tmp_path_factory.mktemp("rec") / "rec", n_prompts=3, samples=2, seed=5, progress=False)


def test_a_recording_holds_what_the_env_played(env, recorded):
    core = core_of(env)
    eps = recorded.episodes
    assert len(recorded) == 6 and recorded.meta["env_id"] == "textgym/TextGen-v0"
    assert eps["prompt_index"] == [0, 0, 1, 1, 2, 2]  # samples of a prompt are adjacent
    assert eps["prompt"][::2] == core.prompts.prompts[:3]
    meta = recorded.meta
    assert meta["vocab_size"] == core.vocab and meta["samples"] == 2 and meta["split"] == "train"
    assert meta["env_kwargs"]["max_new_tokens"] == 6 and meta["env_kwargs"]["reward"] == "length"
    for row in eps:
        n = len(row["completion_ids"])
        assert 1 <= n <= 6 and len(row["logprobs"]) == len(row["ref_logprobs"]) == n
        assert row["kl"] == pytest.approx(sum(row["logprobs"]) - sum(row["ref_logprobs"]), abs=1e-4)
        assert row["reward"] == pytest.approx(row["score"] - row["kl_coef"] * row["kl"])
        assert row["score"] == len(row["completion"].split())  # the length reward scored this completion
        # The log-probs are the acting distribution's: the policy's teacher-forced forward on the
        # recorded tokens gives them back (float32 tiny model; before any training, ref == policy).
        prompt = torch.tensor([row["prompt_ids"]])
        completion = torch.tensor([row["completion_ids"]])
        expected = lm.completion_logprobs(core.model, prompt, torch.ones_like(prompt), completion,
                                          torch.ones_like(completion))[0]
        assert torch.allclose(torch.tensor(row["logprobs"]), expected, atol=1e-4)
        assert torch.allclose(torch.tensor(row["ref_logprobs"]), expected, atol=1e-4)


def test_recording_is_seeded_and_leaves_the_env_alone(env, recorded, tmp_path):
    core = core_of(env)
    env.reset(seed=0)
    ids_before, live_before = core.input_ids.copy(), core.live.copy()
    again = record(env, tmp_path / "again", n_prompts=3, samples=2, seed=5, progress=False)
    assert again.episodes["completion_ids"] == recorded.episodes["completion_ids"]
    assert again.episodes["logprobs"] == recorded.episodes["logprobs"]
    assert (core.input_ids == ids_before).all() and (core.live == live_before).all()
    other = record(env, tmp_path / "other", n_prompts=3, samples=2, seed=6, progress=False)
    assert other.episodes["completion_ids"] != recorded.episodes["completion_ids"]


def test_one_recording_per_directory_and_nothing_half_written(env, recorded, tmp_path):
    with pytest.raises(FileExistsError, match="one recording per directory"):
        record(env, recorded.path, n_prompts=1, progress=False)
    with pytest.raises(FileExistsError, match="one recording per directory"):  # refused before anything is played
        record(object(), recorded.path)
    rows = recorded.episodes.to_list()
    rows[1]["logprobs"] = rows[1]["logprobs"][:-1]
    with pytest.raises(RecordingError, match=r"episode 1 \(row 1\), field 'logprobs'"):
        write_recording(tmp_path / "bad", rows, recorded.meta)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad-*"))
    with pytest.raises(ValueError, match="unknown split 'dev'; valid: train, test"):
        record(env, tmp_path / "x", split="dev")
    with pytest.raises(ValueError, match="samples must be an integer >= 1, got 0"):
        record(env, tmp_path / "x", samples=0)


def _corrupt(recorded, tmp_path, change_table=None, change_meta=None):
    """A copy of ``recorded`` with its table or metadata changed."""
    out = tmp_path / "corrupt"
    out.mkdir()
    table = pq.read_table(recorded.path / EPISODES_FILE)
    pq.write_table(change_table(table) if change_table else table, out / EPISODES_FILE)
    meta = json.loads((recorded.path / META_FILE).read_text())
    (out / META_FILE).write_text(json.dumps(change_meta(meta) if change_meta else meta))
    return out


def _set(table, name, row, value):
    values = table.column(name).to_pylist()
    values[row] = value
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name),
                            pa.array(values, table.schema.field(name).type))


@pytest.mark.parametrize("change_table, change_meta, message", [
    (lambda t: t.drop_columns(["ref_logprobs"]), None, r"episodes.parquet: field 'ref_logprobs' is missing"),
    (lambda t: _set(t, "logprobs", 2, [-1.0]), None,
     r"episodes.parquet: episode 2 \(row 2\), field 'logprobs': 1 values for \d completion_ids"),
    (lambda t: _set(t, "completion_ids", 3, [10**6, *t.column("completion_ids")[3].as_py()[1:]]), None,
     r"episodes.parquet: episode 3 \(row 3\), field 'completion_ids': token id 1000000 outside \[0, \d+\)"),
    (lambda t: _set(t, "ref_logprobs", 0, [0.5] * len(t.column("ref_logprobs")[0].as_py())), None,
     r"episodes.parquet: episode 0 \(row 0\), field 'ref_logprobs': 0.5 is not a log-probability"),
    (lambda t: _set(t, "score", 4, float("nan")), None, r"episode 4 \(row 4\), field 'score': nan is not a finite"),
    (lambda t: _set(t, "prompt", 1, None), None, r"episode 1 \(row 1\), field 'prompt': missing value"),
    (lambda t: _set(t, "episode", 5, 0), None, r"episodes.parquet: row 5, field 'episode': 0 appears twice"),
    (lambda t: t.set_column(t.schema.get_field_index("score"), "score", pa.array(["high"] * t.num_rows)), None,
     r"episodes.parquet: field 'score' has type string, expected double"),
    (None, lambda m: {**m, "version": 99}, r"recording.json: field 'version' is 99; this textgym reads version 1"),
    (None, lambda m: {k: v for k, v in m.items() if k != "vocab_size"},
     r"recording.json: field 'vocab_size' is missing"),
    (None, lambda m: {**m, "n_episodes": 7}, r"recording.json: field 'n_episodes' is 7 but episodes.parquet holds 6"),
])
def test_a_malformed_recording_is_refused_naming_file_and_field(recorded, tmp_path, change_table, change_meta,
                                                                 message):
    with pytest.raises(RecordingError, match=message):
        load_recording(_corrupt(recorded, tmp_path, change_table, change_meta))


def test_not_a_recording(tmp_path):
    with pytest.raises(RecordingError, match="is not a textgym recording: recording.json is missing"):
        load_recording(tmp_path)
    (tmp_path / META_FILE).write_text("{")
    (tmp_path / EPISODES_FILE).write_bytes(b"PAR1 not really")
    with pytest.raises(RecordingError, match="recording.json: not JSON"):
        load_recording(tmp_path)


def test_record_command(tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["record", models.TINY, "--env", "textgym/TextGen-v0", "--out", str(out), "--prompts", "2",
                 "--samples", "3", "--split", "test"]) == 0
    assert "recorded 6 episodes (2 prompts x 3)" in capsys.readouterr().out
    rec = load_recording(out)
    assert rec.meta["policy"] == models.TINY and rec.meta["split"] == "test" and len(rec) == 6
    assert main(["record", models.TINY, "--env", "textgym/TextGen-v0", "--out", str(out), "--prompts", "1"]) != 0
    assert "one recording per directory" in capsys.readouterr().err
