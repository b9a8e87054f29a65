"""Reward-function benchmarks: ``textgym bench rewards`` and ``textgym bench elo``.

``bench rewards`` trains the same policy against each proxy reward (same env, algorithm, budget and
seeds) and reports the proxy score, the score under a designated gold reward, the KL to the
reference, perplexity under the reference, distinct-1/2 and wall time; it measures every reward's
speed and the rewards' agreement (Spearman) on one shared set of completions of the untrained
policy, on which it also scales each proxy to unit standard deviation (``normalize``), so that one KL
coefficient weighs a reward model's logits, a word count and a sentiment score alike, and plots the gold
score against sqrt(KL) through training: where the curve bends down, optimising the proxy stops
helping the gold reward (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

``bench elo`` rates policies by pairwise comparisons of their completions of the same prompts under
a judge reward, with bootstrap confidence intervals.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from textgym import metrics
from textgym.envs import core_of
from textgym.pipeline.config import ConfigError, defaults, from_dict, merge, option
from textgym.pipeline.evaluate import generate, held_out_prompts, make_rewards
from textgym.pipeline.plots import pyplot, save
from textgym.pipeline.train import Run
from textgym.pipeline.train_config import TrainConfig


@dataclass
class BenchRewardsConfig:
    """``textgym bench rewards``'s config.

    ``train`` is a ``textgym train`` config (sections model, env, agent, training) shared by every
    run; its reward section is replaced by each entry of ``rewards`` (``{name, kwargs, label}``).
    """

    rewards: list[str | dict] = option([{"name": "vader"}, {"name": "length"}],
                                       "the proxy rewards trained against: names or {name:, kwargs:, label:}",
                                       nonempty=True, what="a list of at least one reward")
    gold: str | dict = option("vader", "the reward every run is judged by: a name or {name:, kwargs:}")
    seeds: list[int] = option([0], "training seeds, one run per reward and seed", nonempty=True,
                              what="a list of at least one integer")
    train: dict = option({}, "a textgym train config (sections model, env, agent, training) shared by every run")
    agreement_n: int = option(64, "completions of training prompts by the untrained policy, scored by every reward for "
                              "the speed, agreement and normalisation measurements", min=1)
    normalize: bool = option(True, "scale each proxy's score to unit standard deviation over those completions "
                             "(the env's score_scale times 1 / std), so one KL coefficient weighs every proxy alike; "
                             "false: raw scores (a proxy's scale then sets how far the KL lets it move the policy)")
    output_dir: str = option("runs/bench_rewards", "where the results go", nonempty=True, what="a directory path")

    def resolve(self) -> None:
        """Each reward entry names a reward, labels are unique, and ``train`` makes a valid train config."""
        for spec in self.rewards:
            if isinstance(spec, dict) and "name" not in spec:
                raise ConfigError(f"each entry of rewards must be a name or {{name:, kwargs:, label:}}, got {spec!r}")
        self.train_config(self.specs()[0], self.seeds[0], Path(self.output_dir))  # checks the train section

    def specs(self) -> list[dict]:
        out = []
        for spec in self.rewards:
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            spec.setdefault("kwargs", {})
            spec.setdefault("label", spec["name"])
            out.append(spec)
        labels = [s["label"] for s in out]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"reward labels must be unique (give each a label:), got {labels}")
        return out

    def train_config(self, spec: dict, seed: int, out_dir: Path, score_scale: float = 1.0):
        """The train config of ``spec``'s run of ``seed``; ``score_scale`` multiplies the env's."""
        if "reward" in self.train:
            raise ConfigError("train.reward is set by the benchmark: list the rewards under rewards:")
        data = merge(self.train, {
            "reward": {"name": spec["name"], "kwargs": spec["kwargs"], "gold": self.gold_spec()},
            "training": {"seed": seed, "output_dir": str(out_dir)},
        })
        if score_scale != 1.0:
            base = float(self.train.get("env", {}).get("kwargs", {}).get("score_scale", 1.0))
            data = merge(data, {"env": {"kwargs": {"score_scale": base * score_scale}}})
        return from_dict(TrainConfig, merge(defaults(TrainConfig), data), "train.")

    def gold_spec(self) -> dict:
        return dict(self.gold) if isinstance(self.gold, dict) else {"name": self.gold}


def bench_rewards(cfg: BenchRewardsConfig, progress: bool = True) -> dict:
    """Run the benchmark; writes ``results.json``, ``results.md`` and ``overoptimization.png`` into
    ``cfg.output_dir`` and returns the results. A reward that fails is reported, not fatal."""

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"rewards": {}, "gold": cfg.gold, "seeds": cfg.seeds, "normalize": cfg.normalize}
    # First, on the untrained policy's completions: every reward's speed, their agreement, and each
    # proxy's spread, whose inverse scales it when normalising.
    results["speed_agreement"] = shared = speed_and_agreement(cfg)
    for spec in cfg.specs():
        label = spec["label"]
        runs = []
        try:
            scale = unit_spread_scale(shared, label) if cfg.normalize else 1.0
            for seed in cfg.seeds:
                start = time.time()
                run = Run(cfg.train_config(spec, seed, out / label / f"seed{seed}", scale), progress=progress)
                summary = run.run()
                curve = [(0, summary["before"])] + [
                    (r["iteration"], {k[5:]: v for k, v in r.items() if k.startswith("eval/")})
                    for r in run.state["history"] if "eval/score" in r
                ]
                runs.append({"seed": seed, "before": summary["before"], "after": summary["after"],
                             "seconds": time.time() - start,
                             "curve": [{"iteration": it, "kl": m["kl"], "gold": m["reward/gold"], "proxy": m["score"]}
                                       for it, m in curve]})
            results["rewards"][label] = {"spec": spec, "score_scale": scale, "runs": runs, **_aggregate(runs),
                                         "fit": _gao_fit(runs)}
        except Exception as err:  # one broken reward must not stop the benchmark
            results["rewards"][label] = {"spec": spec, "runs": runs,
                                         "error": f"{type(err).__name__}: {err}",
                                         "traceback": traceback.format_exc(limit=3)}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown_report(results))
    plot_overoptimization(results, out / "overoptimization.png")
    return results


# A fit of Gao et al.'s two-parameter form is reported only on curves of at least this many held-out
# evaluations each (the untrained one included): on three points it fits any curve exactly.
MIN_FIT_EVALUATIONS = 6


def _aggregate(runs: list[dict]) -> dict:
    """Means over seeds; the gold score and its gain over the untrained policy's with Student-t 95%
    intervals over seeds (NaN with one seed)."""
    def mean(key):
        return float(np.mean([r["after"][key] for r in runs]))

    gains = [r["after"]["reward/gold"] - r["before"]["reward/gold"] for r in runs]
    gold, gold_ci = metrics.mean_ci([r["after"]["reward/gold"] for r in runs])
    gold_gain, gold_gain_ci = metrics.mean_ci(gains)
    return {"proxy": mean("score"), "gold": gold, "gold_ci": gold_ci, "gold_gain": gold_gain,
            "gold_gain_ci": gold_gain_ci, "gold_gains": gains, "kl": mean("kl"),
            "perplexity_ref": mean("perplexity_ref"), "distinct_1": mean("distinct_1"),
            "distinct_2": mean("distinct_2"), "seconds": float(np.mean([r["seconds"] for r in runs]))}


def _gao_fit(runs: list[dict]) -> dict:
    """Gao et al.'s RL form fitted to the gold-score curve of every seed together
    (``metrics.gao_rl_fit``), when every curve has ``MIN_FIT_EVALUATIONS`` evaluations; otherwise
    only ``n`` and ``evaluations`` (the shortest curve's), with the fit's values None."""
    points = [p for run in runs for p in run["curve"]]
    evaluations = min(len(run["curve"]) for run in runs)
    if evaluations < MIN_FIT_EVALUATIONS:
        return {**metrics.gao_rl_fit([], []), "n": len(points), "evaluations": evaluations}
    return {**metrics.gao_rl_fit([p["kl"] for p in points], [p["gold"] for p in points]), "evaluations": evaluations,
            "kl_max": max(p["kl"] for p in points)}


def unit_spread_scale(shared: dict, label: str) -> float:
    """``1 / std`` of reward ``label``'s scores over the shared completions (``speed_and_agreement``):
    the factor that gives it unit spread on the untrained policy, as RLHF systems normalise a reward
    model's output before the KL penalty is weighed against it."""
    if label in shared["errors"]:
        raise RuntimeError(f"reward {label!r} could not score the untrained policy's completions: "
                           f"{shared['errors'][label]}")
    std = shared["std"][label]
    if not std > 0:
        raise ValueError(f"reward {label!r} gives every completion of the untrained policy the same score "
                         f"({shared['mean'][label]!r}): nothing to normalise, and nothing to learn from")
    return 1.0 / std


def speed_and_agreement(cfg: BenchRewardsConfig) -> dict:
    """Score one shared set of completions, the untrained policy's of the first ``agreement_n``
    training prompts, with every reward and the gold: completions per second, each reward's mean
    and standard deviation, and the Spearman correlation of every pair. (Training prompts: the
    held-out ones stay unseen by anything that shapes training, the normalisation included.)"""

    train_cfg = cfg.train_config(cfg.specs()[0], cfg.seeds[0], Path(cfg.output_dir) / "_agreement")
    kwargs = {**train_cfg.env_kwargs(), "reward": "length", "reward_kwargs": {}}
    vec = gym.make_vec(train_cfg.env.id, num_envs=train_cfg.env.n_envs, vectorization_mode="vector_entry_point",
                       **kwargs)
    core = core_of(vec)
    prompts = core.prompts.head(cfg.agreement_n)
    episodes = generate(core, prompts, seed=cfg.seeds[0])
    texts = ([e["prompt"] for e in episodes], [e["completion"] for e in episodes])
    meta = prompts.metadata_for(list(range(len(episodes))))
    specs = [*cfg.specs(), {**cfg.gold_spec(), "label": "gold"}]
    scores, speed, errors = {}, {}, {}
    for spec in specs:
        try:
            reward = make_rewards([spec])[spec["label"]]
            start = time.perf_counter()
            scores[spec["label"]] = reward(*texts, **meta)
            speed[spec["label"]] = len(episodes) / max(time.perf_counter() - start, 1e-9)
        except Exception as err:
            errors[spec["label"]] = f"{type(err).__name__}: {err}"
    labels = list(scores)
    spearman = {a: {b: metrics.spearman(scores[a], scores[b]) for b in labels} for a in labels}
    return {"n": len(episodes), "completions_per_second": speed, "spearman": spearman, "errors": errors,
            "mean": {a: float(np.mean(scores[a])) for a in labels},
            "std": {a: float(np.std(scores[a], ddof=1)) if len(scores[a]) > 1 else 0.0 for a in labels}}


def markdown_report(results: dict) -> str:
    seeds = results.get("seeds", [])
    ci = f"95% CI over {len(seeds)} seeds" if len(seeds) > 1 else "one seed: no interval"
    rows = [f"| reward | proxy score | score scale | gold score ({ci}) | gold gain over untrained ({ci}) | KL "
            "| perplexity (ref) | distinct-1 | distinct-2 | wall time (s) | scored / s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    speed = results["speed_agreement"]["completions_per_second"]
    for label, r in results["rewards"].items():
        if "error" in r:
            rows.append(f"| {label} | failed: {r['error']} | | | | | | | | | |")
            continue
        verdict = metrics.noise_verdict(r["gold_gain"], r["gold_gain_ci"], null="not distinguishable from no change")
        rows.append(f"| {label} | {r['proxy']:.3f} | {r.get('score_scale', 1.0):.3g} | "
                    f"{metrics.plus_minus(r['gold'], r['gold_ci'])} | "
                    f"{metrics.plus_minus(r['gold_gain'], r['gold_gain_ci'])} ({verdict}) | "
                    f"{r['kl']:.2f} | {r['perplexity_ref']:.1f} | "
                    f"{r['distinct_1']:.3f} | {r['distinct_2']:.3f} | {r['seconds']:.0f} | "
                    f"{speed.get(label, float('nan')):.0f} |")
    pairs = metrics.compare_to_best({label: r["gold_gains"] for label, r in results["rewards"].items()
                                     if "error" not in r})
    if pairs:
        rows += ["", f"Gold gain of {pairs[0]['best']} (the largest) minus each other proxy's (95% Welch interval "
                 "over seeds):", "", "| against | difference of gold gains | verdict |", "|---|---|---|"]
        rows += [f"| {c['other']} | {metrics.plus_minus(c['difference'], c['ci'])} | {c['verdict']} |" for c in pairs]
    spearman = results["speed_agreement"]["spearman"]
    labels = list(spearman)
    rows += ["", "Spearman agreement on the same completions:", "",
             "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for a in labels:
        rows.append(f"| {a} | " + " | ".join(f"{spearman[a][b]:.2f}" for b in labels) + " |")
    for label, error in results["speed_agreement"]["errors"].items():
        rows.append(f"\n{label} could not be scored: {error}")
    rows += ["", "Over-optimisation: Gao et al. 2022's RL form gold(d) = gold_0 + d (alpha - beta log d), "
             "d = sqrt(KL), fitted to each proxy's held-out gold curve (all seeds):", "",
             "| proxy | alpha | beta | R^2 | KL at the gold peak | gold at the peak | points |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results["rewards"].items():
        fit = r.get("fit")
        if fit and fit.get("evaluations", MIN_FIT_EVALUATIONS) < MIN_FIT_EVALUATIONS:
            rows.append(f"| {label} | not fitted: {fit['evaluations']} evaluations per curve, fewer than "
                        f"{MIN_FIT_EVALUATIONS} | | | | | {fit['n']} |")
            continue
        if not fit or fit["alpha"] is None:
            rows.append(f"| {label} | too few points | | | | | {fit['n'] if fit else 0} |")
            continue
        if fit["kl_peak"] is None:
            peak = ("no peak (still rising)", "")
        elif fit["kl_peak"] > fit.get("kl_max", float("inf")):  # an extrapolation, not a measurement
            peak = (f"beyond the measured KL (at most {fit['kl_max']:.2f})", "")
        else:
            peak = (f"{fit['kl_peak']:.2f}", f"{fit['gold_peak']:.3f}")
        rows.append(f"| {label} | {fit['alpha']:.3f} | {fit['beta']:.3f} | {fit['r2']:.2f} | {peak[0]} | {peak[1]} | "
                    f"{fit['n']} |")
    return "\n".join(rows) + "\n"


def plot_overoptimization(results: dict, path: Path) -> None:
    """Gold score against sqrt(KL) through training, one line per proxy reward and seed, with each
    proxy's fitted Gao et al. curve dashed."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n, (label, r) in enumerate(results["rewards"].items()):
        color = f"C{n % 10}"
        for run in r.get("runs", []):
            kl = np.sqrt(np.maximum([p["kl"] for p in run["curve"]], 0.0))
            ax.plot(kl, [p["gold"] for p in run["curve"]], marker="o", color=color,
                    label=f"{label} (seed {run['seed']})")
        fit = r.get("fit")
        if fit and fit["alpha"] is not None:
            top = max(p["kl"] for run in r["runs"] for p in run["curve"])
            grid = np.linspace(0.0, max(top, 1e-6), 100)
            ax.plot(np.sqrt(grid), metrics.gao_rl_curve(fit, grid), linestyle="--", color=color, alpha=0.7)
    ax.set_xlabel("sqrt(KL to the reference)")
    ax.set_ylabel("gold score (held-out)")
    ax.set_title("Optimising each proxy: gold score against KL")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, path)


# --- Elo --------------------------------------------------------------------------------------------


def bench_elo(targets: list[str], *, judge: Any = "vader", env_id: str = "textgym/Sentiment-v0", n: int = 32,
              seed: int = 0, n_envs: int = 16, n_bootstrap: int = 200, output_dir: str = "runs/bench_elo",
              env_kwargs: dict | None = None) -> dict:
    """Rate policies (run directories or models) from pairwise comparisons of their completions of
    the same ``n`` held-out prompts under ``judge``: a higher judge score wins the comparison, equal
    scores draw. Ratings: Bradley-Terry maximum likelihood (``metrics.bradley_terry``: all games at
    once, independent of their order) and online Elo (order-dependent, kept for comparison), each with
    a bootstrap interval. Writes ``elo.json``, ``elo.md`` and ``elo.png`` (Bradley-Terry)."""

    if len(targets) < 2:
        raise ValueError(f"bench elo needs at least two policies, got {targets!r}")
    judge_spec = judge if isinstance(judge, dict) else {"name": judge}
    judge_fn = make_rewards([{**judge_spec, "label": "judge"}])["judge"]
    names, completions, prompts = [], {}, None
    for target in targets:
        model_path = Path(target) / "final_model" if (Path(target) / "final_model").exists() else target
        name = str(target).rstrip("/")
        # By path, so a saved acting distribution (NLPO's mask) is loaded with the model.
        vec = gym.make_vec(env_id, num_envs=n_envs, vectorization_mode="vector_entry_point", model=str(model_path),
                           **(env_kwargs or {}))
        core = core_of(vec)
        prompts = prompts or held_out_prompts(core, None, n)
        episodes = generate(core, prompts, seed=seed)
        completions[name] = [e["completion"] for e in episodes]
        names.append(name)
    assert prompts is not None  # targets holds at least two
    meta = prompts.metadata_for(list(range(len(prompts))))
    scores = {name: judge_fn(prompts.prompts, completions[name], **meta) for name in names}
    matches = judge_matches(names, scores)
    ratings = metrics.elo_bootstrap(names, matches, n_bootstrap=n_bootstrap, seed=seed)
    bt = metrics.bradley_terry_bootstrap(names, matches, n_bootstrap=n_bootstrap, seed=seed)
    result = {"judge": judge_spec, "n_prompts": len(prompts), "ratings": ratings, "bradley_terry": bt,
              "mean_judge_score": {k: float(np.mean(v)) for k, v in scores.items()},
              # half-width of each mean's 95% t-interval over the prompts
              "judge_score_ci": {k: metrics.mean_ci(v)[1] for k, v in scores.items()}}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "elo.json").write_text(json.dumps(result, indent=1))
    (out / "elo.md").write_text(elo_markdown(result))
    plot_elo(bt, out / "elo.png", "Bradley-Terry rating (95% bootstrap interval)")
    return result


def judge_matches(names: list[str], scores: dict[str, list[float]]) -> list[tuple[str, str, float]]:
    """One match per prompt and pair of policies: 1 if the first's completion scores higher, 0.5 tie."""
    matches = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for sa, sb in zip(scores[a], scores[b]):
                matches.append((a, b, 1.0 if sa > sb else 0.0 if sa < sb else 0.5))
    return matches


def elo_markdown(result: dict) -> str:
    """The ratings as a Markdown table, best first by Bradley-Terry (by Elo in a result saved before
    textgym computed Bradley-Terry)."""
    bt = result.get("bradley_terry")
    rows = ["| policy | Bradley-Terry | 95% CI | Elo (online) | 95% CI | mean judge score |",
            "|---|---|---|---|---|---|"]
    ordered = sorted(result["ratings"], key=lambda name: -(bt or result["ratings"])[name]["rating"])
    for name in ordered:
        r = result["ratings"][name]
        b = bt[name] if bt else None
        rows.append((f"| {name} | {b['rating']:.0f} | [{b['low']:.0f}, {b['high']:.0f}] " if b else f"| {name} | | ")
                    + f"| {r['rating']:.0f} | [{r['low']:.0f}, {r['high']:.0f}] | "
                    f"{result['mean_judge_score'][name]:.3f} |")
    return "\n".join(rows) + "\n"


def plot_elo(ratings: dict, path: Path, label: str = "Elo rating (95% bootstrap interval)") -> None:
    plt = pyplot()

    ordered = sorted(ratings.items(), key=lambda kv: kv[1]["rating"])
    names = [k for k, _ in ordered]
    values = np.array([v["rating"] for _, v in ordered])
    err = np.array([[v["rating"] - v["low"], v["high"] - v["rating"]] for _, v in ordered]).T
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(names)))
    ax.errorbar(values, range(len(names)), xerr=np.maximum(err, 0), fmt="o", capsize=4)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
    save(fig, path)

