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
