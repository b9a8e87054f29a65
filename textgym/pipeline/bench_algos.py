"""``textgym bench algos``: several RL algorithms on one task, with the same budget and seeds.

Every algorithm trains the same model on the same env for the same number of iterations of
``n_envs`` fresh episodes (``train.training.iterations``; the table reports the episodes each one
actually generated), once per seed. Each run is a ``textgym train`` run of its own, in a child
process (its run directory under ``output_dir/LABEL/seedN``), so that its wall time and peak
memory are its own. The report: a Markdown table (held-out score with a Student-t confidence
interval over seeds, its gain over the untrained model, KL to the reference, perplexity under the
reference, distinct-1/2, episodes, the data each learnt from and its cost, wall time, peak memory)
and a plot of held-out score against KL through training, one line per algorithm and seed.

Offline algorithms (ILQL, DPO) sit beside the online ones: they learn from data played before the
run (a recording, ``agent.<algo>.data``), whose cost is the seconds its recording took (read from
its ``recording.json``). ``seconds`` compares the algorithms at equal wall time: every run stops after
the first iteration that ends past its budget (``training.max_seconds``), an offline run's budget
less its data's cost, so an offline algorithm pays for its data out of the same time. (A recording
shared by several algorithms is charged to each in full: each could have had it alone.)
"""

from __future__ import annotations

import codecs
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from textgym import agents, metrics
from textgym.pipeline.config import ConfigError, defaults, from_dict, merge, option, save_config
from textgym.pipeline.plots import pyplot, save
from textgym.pipeline.train_config import TrainConfig
from textgym.recordings import META_FILE


@dataclass
class BenchAlgosConfig:
    """``textgym bench algos``'s config.

    ``train`` is a ``textgym train`` config (sections model, env, reward, agent, training) shared by
    every run; each entry of ``algos`` (a name, or ``{name, label, hyperparameters, env, train}``)
    picks the algorithm. ``train.agent.hyperparameters`` are shared: each applies to the algorithms that take it
    (A2C has no ``n_epochs``); ``train.agent.<algo>`` sections and an entry's ``hyperparameters``
    apply to that algorithm only, and an entry's ``env`` (env keyword arguments, e.g. ``kl_coef``)
    and ``train`` (a part of a train config, e.g. ``{env: {n_envs: 16}, training: {iterations: 40}}``,
    merged over the shared one) to that entry's runs only: so one config can also sweep an
    algorithm's settings, sizes included.
    """

    algos: list[str | dict] = option(["ppo", "grpo"], "the algorithms: names or {name:, label:, hyperparameters:, "
                                     "env:, train:} (env: env keyword arguments of that entry's runs; train: a part "
                                     "of a train config merged over the shared one for them)",
                                     nonempty=True, what="a list of at least one algorithm")
    seeds: list[int] = option([0], "training seeds, one run per algorithm and seed", nonempty=True,
                              what="a list of at least one integer")
    train: dict = option({}, "a textgym train config (sections model, env, reward, agent, training) shared by every "
                         "run")
    output_dir: str = option("runs/bench_algos", "where the results go", nonempty=True, what="a directory path")
    seconds: float | None = option(None, "each run's budget of wall time (training.max_seconds; an offline "
                                   "algorithm's less the seconds its recording took): equal wall time; null: "
                                   "train.training.iterations alone bound every run", gt=0)

    def resolve(self) -> None:
        """Each entry names an algorithm, labels are unique, and every run's train config is valid."""
        for spec in self.specs():
            self.train_config(spec, self.seeds[0], Path(self.output_dir))

    def specs(self) -> list[dict]:
        """The ``algos`` entries as ``{name, label, hyperparameters}``."""
        out = []
        for spec in self.algos:
            if isinstance(spec, str):
                spec = {"name": spec}
            if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "label", "hyperparameters",
                                                                                "env", "train"}:
                raise ConfigError(f"each entry of algos must be a name or {{name:, label:, hyperparameters:, env:, "
                                  f"train:}}, got {spec!r}")
            env, train = spec.get("env") or {}, spec.get("train") or {}
            if not isinstance(env, dict):
                raise ConfigError(f"algos: {spec.get('label', spec['name'])!r}: env must be a mapping of env keyword "
                                  f"arguments, got {spec['env']!r}")
            if not isinstance(train, dict) or "algo" in (train.get("agent") or {}):
                raise ConfigError(f"algos: {spec.get('label', spec['name'])!r}: train must be a mapping of train "
                                  f"config sections without agent.algo (the entry's name), got {spec['train']!r}")
            if spec["name"] not in agents.names():
                raise ConfigError(f"algos: {spec['name']!r} is not an algorithm; valid: {', '.join(agents.names())}")
            out.append({"name": spec["name"], "label": str(spec.get("label", spec["name"])),
                        "hyperparameters": dict(spec.get("hyperparameters") or {}), "env": dict(env),
                        "train": dict(train)})
        labels = [s["label"] for s in out]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"algorithm labels must be unique (give each a label:), got {labels}")
        return out

    def train_config(self, spec: dict, seed: int, out_dir: Path) -> TrainConfig:
        train = merge(self.train, spec.get("train") or {})
        agent = dict(train.get("agent") or {})
        if "algo" in agent:
            raise ConfigError("train.agent.algo is set by the benchmark: list the algorithms under algos:")
        accepted = agents.accepted_hyperparameters(spec["name"])
        shared = {k: v for k, v in (agent.pop("hyperparameters", None) or {}).items() if k in accepted}
        data = merge(train, {"agent": {"algo": spec["name"]}, "env": {"kwargs": spec.get("env", {})},
                                  "training": {"seed": seed, "output_dir": str(out_dir)}})
        # replaced, not merged: the shared hyperparameters this algorithm does not take are left out
        data["agent"]["hyperparameters"] = {**shared, **spec["hyperparameters"]}
        cfg = from_dict(TrainConfig, merge(defaults(TrainConfig), data), "train.")
        if self.seconds is not None:
            cost = data_cost(cfg)["seconds"]
            budget = self.seconds - (0.0 if math.isnan(cost) else cost)  # (a cost unknown is not charged)
            if budget <= 0:
                raise ConfigError(f"algos: {spec['label']!r}: its data took {cost:.0f} s to record, more than the "
                                  f"budget seconds={self.seconds:g}")
            cfg.training.max_seconds = budget
        return cfg


def data_cost(cfg: TrainConfig) -> dict:
    """What a run learns from and what that cost: ``{"data", "seconds", "episodes"}``: an online
    run's own rollouts (their time is in its wall time: 0 s more); an offline run's recording, the
    seconds its playing took and its episodes (a preference file made elsewhere: unknown cost, NaN)."""
    if not getattr(agents.get_class(cfg.agent.algo), "offline", False):
        return {"data": "own rollouts", "seconds": 0.0, "episodes": None}
    source = cfg.agent.hyperparameters.get("data")
    meta_file = Path(str(source)) / META_FILE
    if isinstance(source, str) and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        return {"data": f"recording {Path(source).name}", "seconds": float(meta.get("seconds", float("nan"))),
                "episodes": meta.get("n_episodes")}
    return {"data": f"preferences {source}", "seconds": float("nan"), "episodes": None}


def bench_algos(cfg: BenchAlgosConfig) -> dict:
    """Run the benchmark; writes ``results.json``, ``results.md`` and ``score_vs_kl.png`` into
    ``cfg.output_dir`` and returns the results. A run that fails is reported, not fatal."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"seeds": cfg.seeds, "algos": {}}
    specs = cfg.specs()
    for n, spec in enumerate(specs):
        runs: list[dict] = []
        for seed in cfg.seeds:
            run_dir = out / spec["label"] / f"seed{seed}"
            print(f"textgym bench algos: {spec['label']}, seed {seed} ({n * len(cfg.seeds) + len(runs) + 1}/"
                  f"{len(specs) * len(cfg.seeds)}) -> {run_dir}", file=sys.stderr, flush=True)
            train_cfg = cfg.train_config(spec, seed, run_dir)
            runs.append({"seed": seed, **train_in_child(train_cfg, out / "configs")})
        results["algos"][spec["label"]] = {"spec": spec, "runs": runs, "data": data_cost(train_cfg), **aggregate(runs)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown_report(results))
    plot_score_vs_kl(results, out / "score_vs_kl.png")
    return results


def train_in_child(train_cfg: TrainConfig, config_dir: Path) -> dict:
    """``textgym train`` in a child process: its summary, held-out curve, wall time and peak
    resident memory (the child's own, from ``os.wait4``), or the error it ended with."""
    run_dir = Path(train_cfg.training.output_dir)
    config_dir.mkdir(parents=True, exist_ok=True)
    config_file = config_dir / f"{run_dir.parent.name}-{run_dir.name}.yaml"
    save_config(train_cfg, config_file)
    start = time.time()
    child = subprocess.Popen([sys.executable, "-m", "textgym", "train", str(config_file)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    assert child.stderr is not None  # stderr=PIPE
    tail, decoder = "", codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(child.stderr.fileno(), 4096):  # the child's progress bars pass through; its end is kept
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        tail = (tail + text)[-4000:]
    child.stderr.close()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - start
    peak_mb = usage.ru_maxrss / 1024  # Linux reports kilobytes
    if child.returncode != 0 or not (run_dir / "summary.json").exists():
        lines = [line for line in tail.replace("\r", "\n").splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {child.returncode}", "seconds": seconds,
                "peak_mb": peak_mb}
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [{"iteration": 0, "score": summary["before"]["score"], "kl": summary["before"]["kl"]}]
    curve += [{"iteration": r["iteration"], "score": r["eval/score"], "kl": r["eval/kl"]}
              for r in history if "eval/score" in r]
    if curve[-1]["iteration"] != summary["iterations"]:
        curve.append({"iteration": summary["iterations"], "score": summary["after"]["score"],
                      "kl": summary["after"]["kl"]})
    return {"before": summary["before"], "after": summary["after"], "gain": summary.get("gain"), "curve": curve,
            "seconds": seconds,
            "peak_mb": peak_mb, "episodes": int(sum(r.get("episodes", 0) for r in history))}


def aggregate(runs: list[dict]) -> dict:
    """Means over the seeds that finished, with a confidence interval for the held-out score."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return {"error": "; ".join(sorted({r["error"] for r in runs}))}
    score, score_ci = metrics.mean_ci([r["after"]["score"] for r in done])
    gain, gain_ci = metrics.mean_ci([r["after"]["score"] - r["before"]["score"] for r in done])
    if len(done) == 1 and done[0].get("gain"):  # one seed: the interval over the evaluated completions
        gain_ci = float(done[0]["gain"]["ci"])

    def mean(key: str) -> float:
        return float(np.mean([r["after"][key] for r in done]))

    return {"score": score, "score_ci": score_ci, "gain": gain, "gain_ci": gain_ci,
            "gains": [r["after"]["score"] - r["before"]["score"] for r in done], "kl": mean("kl"),
            "perplexity_ref": mean("perplexity_ref"), "distinct_1": mean("distinct_1"),
            "distinct_2": mean("distinct_2"),
            "distinct_1_change": float(np.mean([r["after"]["distinct_1"] - r["before"]["distinct_1"] for r in done])),
            "untrained_distinct_1": float(np.mean([r["before"]["distinct_1"] for r in done])),
            "untrained_score": float(np.mean([r["before"]["score"] for r in done])),
            "episodes": float(np.mean([r["episodes"] for r in done])),
            "seconds": float(np.mean([r["seconds"] for r in done])),
            "peak_mb": float(np.max([r["peak_mb"] for r in done])), "seeds_done": len(done),
            "failed": [f"seed {r['seed']}: {r['error']}" for r in runs if "error" in r]}


def comparisons(results: dict) -> list[dict]:
    """Every algorithm's held-out gain against the best one's, over seeds
    (``metrics.compare_to_best``): the difference, its Welch-t 95% interval and whether it is beyond
    that noise. With one seed there is no interval over seeds: no verdict."""
    return metrics.compare_to_best({label: r["gains"] for label, r in results["algos"].items() if "error" not in r})


def markdown_report(results: dict) -> str:
    seeds = results["seeds"]
    ci = "95% CI over seeds" if len(seeds) > 1 else "one seed: no interval"
    gain_ci = "95% CI over seeds" if len(seeds) > 1 else "95% CI over the held-out completions"
    rows = [f"| algorithm | held-out score ({ci}) | gain over untrained ({gain_ci}) | KL | perplexity (ref) "
            "| distinct-1 (change) | distinct-2 | episodes | data (cost) | wall time (s) | with data (s) "
            "| peak memory (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    untrained = []
    for label, r in results["algos"].items():
        if "error" in r:
            rows.append(f"| {label} | failed: {r['error']} | | | | | | | | | | |")
            continue
        cost = r.get("data", {"data": "own rollouts", "seconds": 0.0, "episodes": None})
        data = cost["data"] + (f", {cost['episodes']} episodes" if cost.get("episodes") else "")
        data += f" ({cost['seconds']:.0f} s)" if cost["seconds"] > 0 else (" (unknown)" if cost["seconds"] != 0
                                                                            else "")
        untrained.append((r["untrained_score"], r["untrained_distinct_1"]))
        rows.append(f"| {label} | {metrics.plus_minus(r['score'], r['score_ci'])} | "
                    f"{metrics.plus_minus(r['gain'], r['gain_ci'])} | {r['kl']:.2f} | "
                    f"{r['perplexity_ref']:.1f} | {r['distinct_1']:.3f} ({r['distinct_1_change']:+.3f}) | "
                    f"{r['distinct_2']:.3f} | {r['episodes']:.0f} | {data} "
                    f"| {r['seconds']:.0f} | {r['seconds'] + cost['seconds']:.0f} | {r['peak_mb']:.0f} |")
        for failure in r["failed"]:
            rows.append(f"| {label} | failed, {failure} | | | | | | | | | | |")
    if untrained:  # each algorithm's acting distribution before training (NLPO's is masked, so it differs)
        scores, distinct = sorted({round(u[0], 3) for u in untrained}), sorted({round(u[1], 3) for u in untrained})
        rows.append(f"\nUntrained (each algorithm's acting distribution before training): held-out score "
                    f"{' / '.join(f'{v:.3f}' for v in scores)}, distinct-1 {' / '.join(f'{v:.3f}' for v in distinct)} "
                    f"(seeds {', '.join(map(str, seeds))}).")
    pairs = comparisons(results)
    if pairs:
        rows += [f"\nGain of {pairs[0]['best']} (the largest) minus each other's (95% Welch interval over seeds):\n",
                 "| against | difference of gains | verdict |", "|---|---|---|"]
        rows += [f"| {c['other']} | {metrics.plus_minus(c['difference'], c['ci'])} | {c['verdict']} |" for c in pairs]
    return "\n".join(rows) + "\n"


def plot_score_vs_kl(results: dict, path: Path) -> None:
    """Held-out score against KL to the reference through training, one line per algorithm and
    seed (the last point of each line is the final evaluation)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n, (label, r) in enumerate(results["algos"].items()):
        for k, run in enumerate(x for x in r["runs"] if "error" not in x):
            kl, score = [p["kl"] for p in run["curve"]], [p["score"] for p in run["curve"]]
            ax.plot(kl, score, marker="o", markersize=3, color=f"C{n % 10}", alpha=0.8,
                    label=label if k == 0 else None)
            ax.plot(kl[-1:], score[-1:], marker="*", markersize=11, color=f"C{n % 10}")
    ax.set_xlabel("KL to the reference (nats, held-out)")
    ax.set_ylabel("held-out score")
    ax.set_title("Score against KL through training (star: final)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, path)
