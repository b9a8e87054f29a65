"""textgym label: the labelling page (driven by a real headless Chromium), its preference file,
resuming after a kill, the token off loopback, and the labels' format and agreement."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from textgym.pipeline import label
from textgym.preference_data import agreement, label_record, load_preferences, simulated_ranks

# Items as `textgym label --policy ...` writes them (hand-written completions: no model needed here).
REVIEWS = [
    ("I went in expecting very little, and", [
        "came out grinning. The cast clearly had fun, and so did I.",
        "left before the end. Two hours of nothing happening.",
        "it was about what I expected: loud, long and forgettable."]),
    ("The first half hour of this film", ["drags badly", "is the best thing in it",
                                          "sets up a twist you will see coming"]),
    ("My kids loved", ["every minute of it", "the popcorn more than the film", "the songs but not the story"]),
    ("The director's last film was", ["a masterpiece; this one is close", "better", "a mess, and so is this"]),
    ("Honestly, the soundtrack", ["is the only reason to watch", "is wonderful", "never stops, and never helps"]),
]
ITEMS = [{"item": i, "prompt": prompt, "completions": completions} for i, (prompt, completions) in enumerate(REVIEWS)]


@pytest.fixture()
def label_dir(tmp_path) -> Path:
    d = tmp_path / "labels"
    d.mkdir()
    (d / label.ITEMS).write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``textgym label DIR`` in its own process, as a person would start it."""

    def __init__(self, directory: Path, *args: str):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "textgym", "label", str(directory), "--port",
                                      str(self.port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"textgym label exited: {''.join(self.lines)}")
            self.lines.append(line)
            if "open http" in line:
                self.url = line.split("open ", 1)[1].split(" ", 1)[0]
                break
        else:
            raise AssertionError("textgym label did not start")
        base = f"http://127.0.0.1:{self.port}"
        while True:  # printed just before uvicorn binds
            try:
                urllib.request.urlopen(base + "/nothing", timeout=5)
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc.stdout.close()


def get(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        body = err.read()
        return err.code, json.loads(body) if body.startswith(b"{") else {}


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture()
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The machine's network is closed: no background connections, no sandbox as root.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1100,430"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, text: str, element: str = "progress-text", timeout: float = 30) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.ID, element).text)


def lines(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / label.PREFERENCES).read_text().splitlines()]


def test_page_by_click_and_key_then_kill_and_resume(label_dir, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server = Server(label_dir)
    try:
        assert server.url.startswith("http://127.0.0.1:") and "token=" not in server.url  # loopback: no token
        browser.get(server.url)
        wait_for(browser, "0 of 5 answered")
        assert browser.find_element(By.ID, "prompt").text == ITEMS[0]["prompt"]
        browser.find_element(By.ID, "completion-1").click()  # item 0: the best, by mouse
        wait_for(browser, "1 of 5 answered")
        keys = ActionChains(browser)
        for key in ("r", "3", "1"):  # item 1: rank all by keyboard, 3rd best, then 1st; the 2nd is left last
            keys.send_keys(key)
        keys.send_keys(Keys.ENTER).perform()
        wait_for(browser, "2 of 5 answered")
        ActionChains(browser).send_keys("t").perform()  # item 2: a tie
        wait_for(browser, "3 of 5 answered")
        browser.find_element(By.ID, "completion-2").click()  # still ranking: a first place, by mouse
        assert browser.find_element(By.ID, "completion-2").text.startswith("3\n#1")
        # (README's picture of the page: TEXTGYM_SCREENSHOT=docs/label_page.png pytest tests/test_label.py)
        shot = Path(os.environ.get("TEXTGYM_SCREENSHOT", label_dir / "page.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        ActionChains(browser).send_keys("r").perform()  # back to picking the best: the ranking is dropped
        browser.find_element(By.ID, "completion-0").click()
        wait_for(browser, "4 of 5 answered")

        got = lines(label_dir)
        assert [(r["item"], r["answer"], r["labeller"]) for r in got] == [
            (0, "best", "labeller"), (1, "rank", "labeller"), (2, "tie", "labeller"), (3, "best", "labeller")]
        assert got[0]["scores"] == [0, 1, 0] and got[1]["ranks"] == [1, 2, 0] and got[3]["scores"] == [1, 0, 0]
        assert got[0]["completions"] == ITEMS[0]["completions"] and got[0]["prompt"] == ITEMS[0]["prompt"]
        groups = load_preferences(label_dir / label.PREFERENCES)  # what textgym rm and DPO read
        assert [len(g.comparisons) for g in groups] == [2, 3, 2]  # the tie holds none
        assert sorted(groups[1].comparisons) == sorted([(2, 0), (2, 1), (0, 1)])

        server.kill()  # while the page is open, mid-labelling
        server = Server(label_dir)  # restarted: the file is valid and labelling goes on where it ended
        browser.get(server.url)
        wait_for(browser, "4 of 5 answered")
        assert browser.find_element(By.ID, "prompt").text == ITEMS[4]["prompt"]
        ActionChains(browser).send_keys("s").perform()
        wait_for(browser, "All items are labelled", element="done")
        assert [r["item"] for r in lines(label_dir)] == [0, 1, 2, 3, 4] and lines(label_dir)[4]["answer"] == "skip"

        browser.get(server.url.replace("labeller=labeller", "labeller=ann"))  # a second labeller, same items
        wait_for(browser, "0 of 5 answered")
        browser.find_element(By.ID, "completion-1").click()
        wait_for(browser, "1 of 5 answered")
    finally:
        server.stop()
    report = label.LabelStore(label_dir).report()
    assert report["by_labeller"] == {"labeller": 5, "ann": 1}
    assert report["agreement"]["pairs"]["ann / labeller"] == {"agreement": 1.0, "comparisons": 2, "items": 1}


def test_token_required_off_loopback_and_only_own_routes(label_dir):
    server = Server(label_dir, "--host", "0.0.0.0")
    try:
        assert "token=" in server.url and any("not loopback" in line for line in server.lines)
        token = server.url.split("token=", 1)[1]
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/api/next")[0] == 403
        assert get(base + "/")[0] == 403
        assert get(base + "/api/next?token=wrong")[0] == 403
        assert get(base + "/api/next", {"X-Textgym-Token": "x" + token})[0] == 403
        status, data = get(base + f"/api/next?token={token}")
        assert status == 200 and data["item"] == 0
        assert get(base + "/api/next", {"X-Textgym-Token": token})[0] == 200
        answer = json.dumps({"labeller": "bo", "item": 0, "answer": "best", "best": 0}).encode()
        assert get(base + "/api/answer", data=answer)[0] == 403  # no token: nothing written
        assert not (label_dir / label.PREFERENCES).exists()
        auth = {"X-Textgym-Token": token, "Content-Type": "application/json"}
        assert get(base + "/api/answer", auth, answer)[0] == 200
        # Nothing a request sends is a path or code: unknown routes, bad names and bad answers are refused.
        assert get(base + "/../../etc/passwd", auth)[0] == 404
        assert get(base + "/api/answer", auth)[0] == 405  # GET on a POST route
        for bad, why in ((b'{"labeller": "../x", "item": 1, "answer": "tie"}', "labeller"),
                         (b'{"labeller": "bo", "item": 99, "answer": "tie"}', "item"),
                         (b'{"labeller": "bo", "item": 1, "answer": "worst"}', "answer"),
                         (b'{"labeller": "bo", "item": 1, "answer": "rank", "ranks": [0, 0, 1]}', "ranks"),
                         (b'{"labeller": "bo", "item": 0, "answer": "tie"}', "already answered"),
                         (b'{"labeller": "bo", "item": 1, "answer": "tie", "path": "/etc"}', "unknown fields"),
                         (b"not json", "Expecting value")):
            status, data = get(base + "/api/answer", auth, bad)
            assert status == 400 and why in data["error"], (bad, data)
        assert len(lines(label_dir)) == 1
    finally:
        server.stop()


def test_store_cuts_a_torn_last_line_and_refuses_a_bad_one(label_dir):
    store = label.LabelStore(label_dir)
    store.answer("ann", 0, "best", best=2)
    store.answer("ann", 1, "rank", ranks=[2, 0, 1])
    path = label_dir / label.PREFERENCES
    whole = path.read_bytes()
    with open(path, "ab") as f:  # a kill in the middle of a write
        f.write(b'{"item": 2, "labeller": "ann", "answ')
    with pytest.warns(UserWarning, match="torn last line"):
        store = label.LabelStore(label_dir)
    assert path.read_bytes() == whole and store.next_item("ann") == 2
    with pytest.raises(ValueError, match="already answered"):
        store.answer("ann", 1, "tie")
    path.write_bytes(whole.replace(b'"ranks": [2, 0, 1]', b'"ranks": [2, 2, 1]'))
    with pytest.raises(ValueError, match=r"preferences.jsonl', line 2: ranks \[2, 2, 1\] contain ties"):
        label.LabelStore(label_dir)
    path.write_bytes(whole.replace(b'"completions": ["came out', b'"completions": ["an edited'))
    with pytest.raises(ValueError, match="line 1: prompt and completions differ from item 0"):
        label.LabelStore(label_dir)
    path.write_bytes(whole + whole.splitlines(keepends=True)[1])
    with pytest.raises(ValueError, match="line 3: labeller 'ann' answered item 1 twice"):
        label.LabelStore(label_dir)


def test_a_malformed_preference_line_is_refused_by_file_and_line(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    for bad, why in (("{not json", "not valid JSON"), (json.dumps({"prompt": "p", "chosen": "a"}), "lacks rejected"),
                     (json.dumps({**good, "answer": "maybe"}), "answer must be one of")):
        path = tmp_path / "prefs.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"prefs.jsonl', line 3.*{why}"):
            load_preferences(path)


def test_label_records_and_agreement():
    items = ["a", "b", "c"]
    best = label_record(0, "p", items, "best", labeller="x", best=1)
    rank = label_record(0, "p", items, "rank", labeller="y", ranks=[1, 0, 2])
    tie = label_record(0, "p", items, "tie", labeller="z")
    assert best["scores"] == [0, 1, 0] and rank["ranks"] == [1, 0, 2] and "scores" not in tie
    for kwargs, why in (({"answer": "best", "best": 3}, "best must be"), ({"answer": "rank", "ranks": [0, 1]}, "ranks"),
                        ({"answer": "tie", "best": 0}, "neither"), ({"answer": "meh"}, "answer must be")):
        with pytest.raises(ValueError, match=why):
            label_record(0, "p", items, labeller="x", **kwargs)
    result = agreement([best, rank, tie, label_record(1, "q", items, "skip", labeller="x")])
    # x and y decide (1 > 0) and (1 > 2) alike; z's tie agrees with none of them.
    assert result["pairs"]["x / y"] == {"agreement": 1.0, "comparisons": 2, "items": 1}
    assert result["pairs"]["x / z"]["agreement"] == 0.0 and result["pairs"]["y / z"]["comparisons"] == 3
    assert result["agreement"] == pytest.approx(2 / 7) and result["shared_items"] == 1


def test_simulated_labeller_follows_bradley_terry():
    rng = np.random.default_rng(0)
    for temperature, (a, b) in ((0.5, (0.3, 0.0)), (0.1, (0.05, 0.0)), (1.0, (-1.0, 1.0))):
        wins = np.mean([simulated_ranks([a, b], temperature, rng)[0] == 0 for _ in range(4000)])
        assert wins == pytest.approx(1 / (1 + np.exp(-(a - b) / temperature)), abs=0.03)
    # Among three, each pair is still ordered as Bradley-Terry says (a Plackett-Luce draw).
    pairs = np.mean([(lambda r: r[2] < r[1])(simulated_ranks([1.0, -0.5, 0.2], 0.5, rng)) for _ in range(4000)])
    assert pairs == pytest.approx(1 / (1 + np.exp(-0.7 / 0.5)), abs=0.03)
    assert simulated_ranks([0.2, 0.9, -0.5], 0, rng) == [1, 0, 2]
    # temperature 0: by score, equal scores in random order (both orders drawn), never above a better one
    drawn = {tuple(simulated_ranks([0.5, 0.5, 0.0, 0.5 + 1e-13], 0, rng)) for _ in range(50)}
    assert {r[3] for r in drawn} == {0} and {r[2] for r in drawn} == {3} and len(drawn) == 2
    with pytest.raises(ValueError, match="temperature"):
        simulated_ranks([0.0, 1.0], -1, rng)


def test_items_are_sampled_from_the_policy_once(tmp_path, tiny_dir):
    items = label.prepare_items(tmp_path / "lab", str(tiny_dir), n=3, k=2, seed=1, progress=False,
                                env_kwargs={"max_new_tokens": 4})
    assert [i["item"] for i in items] == [0, 1, 2] and all(len(i["completions"]) == 2 for i in items)
    assert len({i["prompt"] for i in items}) == 3
    again = label.prepare_items(tmp_path / "lab2", str(tiny_dir), n=3, k=2, seed=1, progress=False,
                                env_kwargs={"max_new_tokens": 4})
    assert again == items  # the same seed gives the same items
    # Reopened: read back, not sampled again (no policy needed).
    assert label.prepare_items(tmp_path / "lab", None) == items
    with pytest.raises(FileNotFoundError, match="no items.jsonl yet"):
        label.prepare_items(tmp_path / "empty", None)
