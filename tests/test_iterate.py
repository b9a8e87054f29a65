"""textgym iterate: rounds of sample -> label -> reward model -> RL -> ratings on textgym/tiny, resumed
after kills between and within rounds, labels neither redone nor duplicated."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from textgym.pipeline import iterate as iterate_mod
from textgym.pipeline.config import ConfigError, load_config
from textgym.pipeline.iterate import IterateConfig, Loop, iterate
from textgym.pipeline.label import ITEMS
from textgym.preference_data import load_preferences

KEYWORD = {"name": "keyword", "kwargs": {"keywords": ["the"]}}
TINY = {
    "model": "textgym/tiny", "rounds": 2, "items": 6, "k": 3, "judge": KEYWORD, "temperature": 0.5, "gold": KEYWORD,
    "rm": {"backbone": "textgym/tiny", "epochs": 1, "learning_rate": 1e-3},
    "train": {"model": {"lora": None},
              "env": {"id": "textgym/TextGen-v0", "n_envs": 4,
                      "kwargs": {"max_new_tokens": 6, "max_prompt_tokens": 24}},
              "agent": {"algo": "reinforce++", "hyperparameters": {"learning_rate": 3e-2}},
              "training": {"iterations": 2, "eval_n": 4, "eval_samples": 1, "samples": 2}},
    "rating_prompts": 8, "bootstrap": 20,
}


def tiny(out, **changes) -> IterateConfig:
    return load_config(IterateConfig, None, [], base={**TINY, "output_dir": str(out), **changes})


def labels(out, round_: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"round_{round_}" / "preferences.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("iterate") / "loop"
    return out, iterate(tiny(out), progress=False)


def test_two_rounds_on_tiny(uninterrupted):
    out, ratings = uninterrupted
    assert [e["policy"] for e in ratings["rounds"]] == ["start", "round 0", "round 1"]
    assert json.loads((out / "state.json").read_text())["done"] == [f"{r}:{s}" for r in (0, 1)
                                                                      for s in iterate_mod.STEPS]
    seconds = json.loads((out / "state.json").read_text())["seconds"]  # where the loop's time went
    assert all(set(seconds[str(r)]) == set(iterate_mod.STEPS) for r in (0, 1))
    for name in ("ratings.json", "ratings.md", "ratings.png", "elo.json"):
        assert (out / "ratings" / name).stat().st_size > 0
    for r in (0, 1):
        got = labels(out, r)  # one ranking per item, by the simulated labeller
        assert [x["item"] for x in got] == list(range(6)) and {x["labeller"] for x in got} == {"simulated-keyword"}
        assert all(x["answer"] == "rank" and sorted(x["ranks"]) == [0, 1, 2] for x in got)
    # Each round's prompts are a fresh draw; round 1 samples round 0's trained policy.
    items = [[json.loads(line) for line in (out / f"round_{r}" / ITEMS).read_text().splitlines()] for r in (0, 1)]
    assert [i["prompt"] for i in items[0]] != [i["prompt"] for i in items[1]]
    # The reward model sees every label so far, each once.
    rm_data = [json.loads(line) for line in (out / "round_1" / "rm_data.jsonl").read_text().splitlines()]
    assert rm_data == labels(out, 0) + labels(out, 1)
    report = json.loads((out / "round_1" / "rm_report.json").read_text())
    comparisons = sum(len(g.comparisons) for g in load_preferences(out / "round_1" / "rm_data.jsonl"))
    assert report["labels"] == 12 and report["train_comparisons"] == comparisons and report["eval_comparisons"] == 0
    assert 0 <= report["previous_rm_accuracy_on_new_labels"] <= 1
    # Round 1 continues from round 0's policy with the KL to the start model.
    cfg = (out / "round_1" / "rl" / "config.yaml").read_text()
    assert "round_0/rl/final_model" in cfg and "ref_model: textgym/tiny" in cfg
    assert "ref_model" not in (out / "round_0" / "rl" / "config.yaml").read_text()  # round 0: its own base
    assert ratings["rounds"][2]["labels"] == 12 and "kl" in ratings["rounds"][1]


def _killed_at(monkeypatch, method: str, when) -> None:
    original = getattr(Loop, method)

    def step(self, round_):
        if when(self, round_):
            raise KeyboardInterrupt  # what Ctrl-C or a kill leaves: the step half done, not recorded
        return original(self, round_)

    monkeypatch.setattr(Loop, method, step)


def test_resume_after_kills_between_and_within_rounds(tmp_path, monkeypatch, uninterrupted):
    full, full_ratings = uninterrupted
    out = tmp_path / "loop"
    _killed_at(monkeypatch, "step_sample", lambda self, r: r == 1)  # between rounds
    with pytest.raises(KeyboardInterrupt):
        iterate(tiny(out), progress=False)
    assert json.loads((out / "state.json").read_text())["done"][-1] == "0:rate"
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="already holds a loop: pass --resume"):
        iterate(tiny(out), progress=False)
    with pytest.raises(ConfigError, match="cannot change k"):
        iterate(tiny(out, k=2), resume=True, progress=False)

    # Within round 1's labelling: killed after three answers are written.
    answer = iterate_mod.LabelStore.answer
    calls = {"n": 0}

    def dying_answer(self, *args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return answer(self, *args, **kwargs)

    monkeypatch.setattr(iterate_mod.LabelStore, "answer", dying_answer)
    with pytest.raises(KeyboardInterrupt):
        iterate(tiny(out), resume=True, progress=False)
    assert len(labels(out, 1)) == 3
    monkeypatch.undo()
    resumed = iterate(tiny(out), resume=True, progress=False)
    for r in (0, 1):  # the same labels as the uninterrupted loop's, none twice
        assert [{k: v for k, v in x.items() if k != "time"} for x in labels(out, r)] == \
            [{k: v for k, v in x.items() if k != "time"} for x in labels(full, r)]
    assert [e["gold"] for e in resumed["rounds"]] == [e["gold"] for e in full_ratings["rounds"]]
    assert [e["bradley_terry"] for e in resumed["rounds"]] == [e["bradley_terry"] for e in full_ratings["rounds"]]
    # More rounds may be asked of a finished loop.
    assert len(iterate(tiny(out, rounds=3), resume=True, progress=False)["rounds"]) == 4


def test_people_label_a_round_on_the_page(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "loop"
    loop = Loop(tiny(out, labeller="people", port=port, people_labels=2))
    try:
        (out / "round_0").mkdir()
        (out / "round_0" / ITEMS).write_text("".join(
            json.dumps({"item": i, "prompt": f"p{i}", "completions": ["a", "b", "c"]}) + "\n" for i in range(3)))
        waiting = threading.Thread(target=loop.step_label, args=(0,), daemon=True)
        waiting.start()
        for body in ({"labeller": "ann", "item": 0, "answer": "best", "best": 2},
                     {"labeller": "bob", "item": 1, "answer": "tie"}):
            for _ in range(300):
                try:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/answer", json.dumps(body).encode(),
                                                     {"Content-Type": "application/json"})
                    urllib.request.urlopen(request, timeout=10).read()
                    break
                except urllib.error.HTTPError:
                    raise
                except urllib.error.URLError:
                    time.sleep(0.1)  # the page is still starting
        waiting.join(timeout=60)
        assert not waiting.is_alive()  # two answers were awaited
        assert [x["answer"] for x in labels(out, 0)] == ["best", "tie"]
        with pytest.raises(urllib.error.URLError):  # and the page is down again
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/next", timeout=5)
    finally:
        loop.lock.release()


def test_config_refusals(tmp_path):
    with pytest.raises(ConfigError, match=r"train.reward is set by the loop"):
        tiny(tmp_path, train={"reward": {"name": "vader"}})
    with pytest.raises(ConfigError, match=r"rm.data is set by the loop"):
        tiny(tmp_path, rm={"data": "x.jsonl"})
    with pytest.raises(ConfigError, match="labeller"):
        tiny(tmp_path, labeller="crowd")
    with pytest.raises(ConfigError, match="epochz"):
        tiny(tmp_path, rm={"epochz": 2})
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        iterate(tiny(tmp_path / "new"), resume=True)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no loop"):
        iterate(tiny(tmp_path / "used"))
