import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["rollout_throughput.py", "update_throughput.py", "ddp_scaling.py"])
def test_benchmark_prints_its_ratio(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--n-envs", "2", "--new-tokens", "4", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = [float(r) for r in re.findall(r"ratio [^=]*= (\d+\.\d+)", out.stdout)]  # not the "(target >= x)"
    assert ratios
    # Each ratio is the quotient of the figures printed above it (same run, same machine).
    if script == "rollout_throughput.py":
        gen, gen_score, agent = (float(x) for x in re.findall(r": +(\d+\.\d+) tokens/s", out.stdout))
        expected = [agent / gen, agent / gen_score]
    elif script == "ddp_scaling.py":  # 1 process, then 2 processes on the same global batch
        one, two = (float(x) for x in re.findall(r": +(\d+\.\d+) ms", out.stdout))
        expected = [two / one]
        assert re.search(r"machine: .+; yardstick: .+ at \d+ tok/s", out.stdout), out.stdout
    else:
        floor, ppo = (float(x) for x in re.findall(r": +(\d+\.\d+) ms", out.stdout))
        expected = [ppo / floor]
    assert ratios == pytest.approx(expected, rel=0.02, abs=0.011)


def test_fsdp_sharding_prints_its_table_and_ratios():
    """benchmarks/fsdp_sharding.py (2 gloo ranks): a row per layout, and ratios that are the
    quotients of the rows' figures (same run); a sharded rank holds half the weights and half the
    optimizer state of a replicated one (the value head, whole on every rank, is a few bytes)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fsdp_sharding.py"), "--n-envs", "2", "--new-tokens", "4",
         "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"machine: .+; yardstick: .+ at \d+ tok/s", out.stdout), out.stdout
    rows = {m[0]: [float(x) for x in m[1:]] for m in re.findall(
        r"^\| (replicated \(DDP\)|sharded \(FSDP2\)) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
        out.stdout, re.M)}
    replicated, sharded = rows["replicated (DDP)"], rows["sharded (FSDP2)"]
    ratios = [float(r) for r in re.findall(r"ratio [^=]*= (\d+\.\d+)", out.stdout)]
    assert ratios == pytest.approx([b / a for a, b in zip(replicated, sharded)], rel=0.05, abs=0.011)
    assert ratios[0] == pytest.approx(0.5, abs=0.02) and ratios[1] == pytest.approx(0.5, abs=0.02)


def test_quantized_base_prints_its_table_and_ratios():
    """benchmarks/quantized_base.py: a row per base, and ratios that are the quotients of the row's
    figures (same run); each quantized base's weights take less room than float32's."""
    pytest.importorskip("torchao")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quantized_base.py"), "--n-envs", "2", "--new-tokens", "4",
         "--repeats", "1", "--rounds", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {m[0]: [float(x) for x in m[1:]] for m in
            re.findall(r"^\| (float32|int8|nf4) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out.stdout,
                       re.M)}
    kinds = ["int8", *(["nf4"] if importlib.util.find_spec("bitsandbytes") else [])]
    assert set(rows) == {"float32", *kinds}, out.stdout
    f_tok, _, f_w, f_mem = rows["float32"]
    for kind in kinds:
        ratios = [float(x) for x in re.search(rf"ratios {kind} / float32: rollout speed ([\d.]+), update time "
                                              r"([\d.]+), weights ([\d.]+), peak memory ([\d.]+)", out.stdout).groups()]
        q_tok, _, q_w, q_mem = rows[kind]
        assert ratios[0] == pytest.approx(q_tok / f_tok, abs=0.011)
        assert ratios[3] == pytest.approx(q_mem / f_mem, abs=0.011)
        assert q_w < f_w and ratios[2] < 1
    assert re.search(r"yardstick: .+ at \d+ tok/s", out.stdout), out.stdout


def test_peer_trl_skips_the_pairs_it_has_no_peer_for(tmp_path):
    """benchmarks/peer_trl.py needs TRL in venvs of its own: without their interpreters each pair is
    skipped with its reason (and nothing is measured), and the table is written to --out."""
    script = str(ROOT / "benchmarks" / "peer_trl.py")
    assert "--trl-classic-python" in subprocess.run([sys.executable, script, "--help"], capture_output=True,
                                                    text=True, timeout=60, cwd=ROOT).stdout
    out = subprocess.run([sys.executable, script, "--out", str(tmp_path / "peer.md")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipped: no --trl-classic-python given" in out.stdout
    assert "skipped: no --trl-python given" in out.stdout
    assert "yardstick: not measured" in out.stdout
    assert (tmp_path / "peer.md").read_text() == out.stdout


def test_peer_trl_skips_a_peer_interpreter_without_trl(tmp_path):
    """An interpreter without trl (here this one) runs the peer's side, which answers why it skips."""
    if importlib.util.find_spec("trl") is not None:
        pytest.skip("trl is installed here")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peer_trl.py"), "--pair", "grpo", "--model", "textgym/tiny",
         "--trl-python", sys.executable, "--threads", "1", "--out", str(tmp_path / "peer.md")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"skipped: trl is not installed for {sys.executable}" in out.stdout
    assert re.search(r"machine: .+; yardstick: textgym/tiny generate of 16 x 32 tokens at \d+ tok/s", out.stdout)


def test_gain_vs_time_reports_each_evaluation(tmp_path):
    """benchmarks/gain_vs_time.py on the tiny model: a row per evaluation, its gain and interval those
    of metrics.difference_ci on the run's own figures, the training time growing."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gain_vs_time.py"), str(ROOT / "examples" / "sentiment.yaml"),
         "model.name=textgym/tiny", "model.lora=null", "env.id=textgym/TextGen-v0", "env.n_envs=4",
         "env.kwargs.max_new_tokens=4", "training.iterations=2", "training.eval_n=4", "training.eval_samples=2",
         "--eval-every", "1", "--no-yardstick", "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.findall(r"^\| (\d+) \| (\d+) \| ([+-]\d\.\d{3}) ± (\d\.\d{3}) \| (-?\d+\.\d\d) \| ([+-]\d\.\d{3}) \|$",
                       out.stdout, re.M)
    assert [int(r[0]) for r in found] == [1, 2] and int(found[0][1]) <= int(found[1][1])
    summary = __import__("json").loads((tmp_path / "run" / "summary.json").read_text())
    assert float(found[-1][2]) == pytest.approx(summary["gain"]["score"], abs=1e-3)
    assert float(found[-1][3]) == pytest.approx(summary["gain"]["ci"], abs=1e-3)
    assert (tmp_path / "run" / "gain_vs_time.md").read_text() == out.stdout
