"""Held-out gain against wall time on the default task: what a CPU-minute of training buys.

Runs ``textgym train`` on a config (default: ``examples/sentiment.yaml``, the default run) with an
evaluation every ``--eval-every`` iterations, and prints, at each evaluation, the training wall time
so far (the iterations' ``seconds`` less their evaluations') and the held-out score's gain over the
untrained model with its 95% interval over the evaluated completions (``textgym.pipeline.train.score_gain``),
the KL to the reference and the change of distinct-1; plus the machine's yardstick (the model's
``generate`` of 16 x 32 tokens). The table is also written to ``RUN_DIR/gain_vs_time.md``.

    python benchmarks/gain_vs_time.py                                   # the default run, ~10 min on 2 cores
    python benchmarks/gain_vs_time.py CONFIG --eval-every 2 key=value ...
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

from benchmarks.common import machine, yardstick
from textgym.pipeline.config import load_config
from textgym.pipeline.train import score_gain, train
from textgym.pipeline.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def rows(history: list[dict], before: dict) -> list[dict]:
    """One row per evaluation in ``history`` (metrics.jsonl's records): training seconds so far,
    the held-out gain and its interval, KL, distinct-1 change."""
    out, spent = [], 0.0
    for r in history:
        spent += r["seconds"] - r.get("time/evaluation", 0.0)
        if "eval/score" not in r:
            continue
        # every evaluation completes the same held-out prompts: its n is the one before training's
        after = {"score": r["eval/score"], "score_std": r.get("eval/score_std", float("nan")), "n": before["n"]}
        gain = score_gain(before, after)
        out.append({"iteration": r["iteration"], "seconds": spent, "gain": gain["score"], "ci": gain["ci"],
                    "kl": r["eval/kl"],
                    "distinct_1_change": r["eval/distinct_1"] - before["distinct_1"]})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| iteration | training time (s) | held-out gain (95% CI over completions) | KL | distinct-1 change |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {r['seconds']:.0f} | {r['gain']:+.3f} ± {r['ci']:.3f} | {r['kl']:.2f} | "
              f"{r['distinct_1_change']:+.3f} |" for r in table]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default=str(ROOT / "examples" / "sentiment.yaml"))
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--eval-every", type=int, default=4, help="iterations between held-out evaluations")
    p.add_argument("--output-dir", default=None, help="the run directory (default: a new temporary one)")
    p.add_argument("--no-yardstick", action="store_true", help="skip the generate yardstick")
    args = p.parse_args(argv)
    out_dir = args.output_dir or tempfile.mkdtemp(prefix="gain_vs_time-")
    cfg = load_config(TrainConfig, args.config, overrides=[*args.overrides, f"training.eval_every={args.eval_every}",
                                                           f"training.output_dir={out_dir}"])
    result = train(cfg, progress=False)
    history = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    table = markdown(rows(history, result["before"]))
    speed = "not measured" if args.no_yardstick else f"{yardstick(cfg.model.name):.0f} tok/s"
    text = (f"{table}\nmachine: {machine()}; yardstick: {cfg.model.name} generate of 16 x 32 tokens at {speed}; "
            f"run: {out_dir}\n")
    (Path(out_dir) / "gain_vs_time.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
