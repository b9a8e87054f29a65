import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["rollout_throughput.py", "update_throughput.py"])
def test_benchmark_prints_its_ratio(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--n-envs", "2", "--new-tokens", "4", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ratios = re.findall(r"ratio .*= (\d+\.\d+)", out.stdout)
    assert ratios and all(float(r) > 0 for r in ratios)
