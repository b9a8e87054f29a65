"""``textgym iterate CONFIG``: iterated online RLHF (Bai et al. 2022, "Training a Helpful and Harmless
Assistant with RLHF", section 4.5), round after round:

1. **sample**: ``items`` prompts, drawn afresh each round from the training split, each with ``k``
   completions of the *current* policy (the start model in round 0, then the last round's);
2. **label**: have them ranked: by people on the labelling page (``textgym label``'s, served until
   ``people_labels`` answers are in) or by a simulated labeller (``labeller: simulated``): a judge
   reward's scores with Bradley-Terry noise of ``temperature`` (``preference_data.simulated_ranks``),
   so that labels disagree on close calls as people's do;
3. **rm**: retrain the reward model from its backbone on every label so far, each once;
4. **rl**: continue RL from the current policy against that reward model, the KL measured to the
   *start* model (every round's ``env.kwargs.ref_model``), so that the rounds together stay near it;
5. **rate**: rate every round's policy against the others under the ``gold`` judge on held-out
   prompts: Bradley-Terry ratings with bootstrap intervals and the mean gold score per round
   (``ratings/``: ``ratings.json``, ``ratings.md``, ``ratings.png``).

Each round is a subdirectory ``round_<r>/`` (``items.jsonl``, ``preferences.jsonl``,
``rm_data.jsonl``, ``rm/``, ``rl/``, a ``textgym train`` run). ``state.json`` lists the finished
steps and the seconds each took; ``--resume`` continues a killed loop after the last of them:
labels already given are kept (the page and the simulated labeller resume where the round's
``preferences.jsonl`` ends, the simulated one drawing each item's noise from its own seed, so a
resumed loop labels exactly as an uninterrupted one), and an interrupted RL run resumes from its
checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from textgym.assets import atomic_dir
from textgym.pipeline.bench import bench_elo
from textgym.pipeline.config import ConfigError, defaults, from_dict, load_config, merge, option, save_config, to_dict
from textgym.pipeline.label import PREFERENCES, LabelServer, LabelStore, prepare_items
from textgym.pipeline.plots import pyplot, save
from textgym.pipeline.preferences import write_jsonl
from textgym.pipeline.rm import MINILM, RMConfig, load_preferences, pairwise_accuracy, train_reward_model
from textgym.pipeline.runlock import RunLock
from textgym.pipeline.train import iteration_seed, train
from textgym.pipeline.train_config import TrainConfig
from textgym.preference_data import simulated_ranks
from textgym.rewards import RewardModelReward

STEPS = ("sample", "label", "rm", "rl", "rate")
LABELLERS = ("simulated", "people")
# What --resume may change in a loop's saved config: the rest would make it another loop.
RESUMABLE = ("rounds",)


@dataclass
class IterateConfig:
    """``textgym iterate``'s config (module docstring)."""

    model: str = option("textgym/smollm2-135m", "the start policy, and every round's reference for the KL",
                        nonempty=True, what="a model name or path")
    rounds: int = option(3, "rounds of sample -> label -> reward model -> RL -> rating", min=1)
    items: int = option(64, "prompts drawn from the training split each round, each with k completions to rank", min=1)
    k: int = option(4, "completions per prompt (a ranking of k gives C(k, 2) comparisons)", min=2)
    labeller: str = option("simulated", "who ranks: simulated (the judge below, with noise) or people (the labelling "
                           "page, served until people_labels answers are in)", choices=LABELLERS,
                           what="a labeller")
    judge: str | dict = option("vader", "the simulated labeller's judge: a reward name or {name:, kwargs:}")
    temperature: float = option(0.1, "the simulated labeller's noise: it puts a above b with probability "
                                "sigmoid((judge(a) - judge(b)) / temperature); 0: always the higher score", min=0)
    people_labels: int | None = option(None, "with labeller people: answers (by anyone, skips and ties included) "
                                       "awaited each round; null: one per item", min=1)
    host: str = option("127.0.0.1", "with labeller people: the page's address (anything but loopback gets a token)",
                       nonempty=True, what="an address")
    port: int = option(8765, "with labeller people: the page's port", min=0, max=65535)
    gold: str | dict = option("vader", "the gold judge of the ratings and of every RL run's evaluations")
    rm: dict = option({"backbone": MINILM, "epochs": 2, "learning_rate": 5e-5},
                      "textgym rm settings of every round's reward model (data, output_dir and eval_fraction are set "
                      "by the loop: it trains on every label so far)")
    normalize: bool = option(True, "scale each round's reward model to unit standard deviation over the round's "
                             "completions (the env's score_scale), so one KL coefficient weighs every round's alike")
    train: dict = option({"training": {"iterations": 8}},
                         "a textgym train config (sections env, agent, training, model.lora ...) for every round's RL; "
                         "model.name, reward and the output directory are set by the loop")
    rating_prompts: int = option(64, "held-out prompts every policy completes for the ratings", min=1)
    bootstrap: int = option(200, "bootstrap resamples of the rating intervals", min=1)
    seed: int = option(0, "seed of the prompts' draws, the sampling, the labeller's noise and the runs")
    output_dir: str = option("runs/iterate", "the loop's directory (one subdirectory per round)", nonempty=True,
                             what="a directory path")

    def resolve(self) -> None:
        for key in ("model", "reward"):
            if key in self.train and (key == "reward" or "name" in self.train[key]):
                raise ConfigError(f"train.{key}{'.name' if key == 'model' else ''} is set by the loop (the start "
                                  f"policy is model:, the reward each round's reward model)")
        for key in ("data", "eval_data", "output_dir", "eval_fraction"):
            if key in self.rm:
                raise ConfigError(f"rm.{key} is set by the loop (every label so far, in the round's directory)")
        load_config(RMConfig, None, [], base={**self.rm, "data": "x"})  # the rm keys are textgym rm's
        self.train_config(0, Path(self.output_dir), Path(self.output_dir) / "rm", 1.0)  # a valid train section

    def train_config(self, round_: int, out: Path, rm_dir: Path, score_scale: float) -> TrainConfig:
        """Round ``round_``'s RL run: from the last round's final model, against this round's reward
        model, with the start model as reference."""
        policy = self.model if round_ == 0 else str(out / f"round_{round_ - 1}" / "rl" / "final_model")
        env_kwargs: dict[str, Any] = {"ref_model": self.model} if round_ > 0 else {}
        if score_scale != 1.0:
            env_kwargs["score_scale"] = float(self.train.get("env", {}).get("kwargs", {}).get("score_scale", 1.0)) \
                * score_scale
        data = merge(self.train, {
            "model": {"name": policy},
            "env": {"kwargs": env_kwargs},
            "reward": {"name": "reward_model", "kwargs": {"model": str(rm_dir)}, "gold": self.gold},
            "training": {"seed": iteration_seed(self.seed, round_), "output_dir": str(out / f"round_{round_}" / "rl")},
        })
        return from_dict(TrainConfig, merge(defaults(TrainConfig), data), "train.")


class Loop:
    """One iterated-RLHF loop in ``cfg.output_dir`` (locked for its life)."""

    def __init__(self, cfg: IterateConfig, resume: bool = False, progress: bool = True):
        self.dir = Path(cfg.output_dir)
        self.state_path = self.dir / "state.json"
        self.progress = progress
        if resume:
            if not self.state_path.exists():
                raise FileNotFoundError(f"nothing to resume in {str(self.dir)!r}: no state.json")
            saved = load_config(IterateConfig, self.dir / "config.yaml")
            old, new = to_dict(saved), to_dict(cfg)
            changed = sorted(k for k in old if old[k] != new[k] and k not in RESUMABLE and k != "output_dir")
            if changed:
                raise ConfigError(f"--resume continues the loop with its saved config.yaml, so it cannot change "
                                  f"{', '.join(changed)}; only {', '.join(RESUMABLE)} may be given")
            saved.rounds, saved.output_dir = cfg.rounds, cfg.output_dir  # the directory may have moved
            cfg = saved
        elif self.state_path.exists():
            raise FileExistsError(f"{str(self.dir)!r} already holds a loop: pass --resume, or another output_dir")
        elif self.dir.exists() and any(p.name != ".lock" for p in self.dir.iterdir()):
            raise FileExistsError(f"{str(self.dir)!r} is not empty and holds no loop: give a new or empty output_dir")
        self.cfg = cfg
        self.lock = RunLock(self.dir).acquire()
        state = json.loads(self.state_path.read_text()) if resume else {}
        self.done: list[str] = state.get("done", [])
        self.seconds: dict[str, dict[str, float]] = state.get("seconds", {})  # per round and step
        if not resume:
            save_config(cfg, self.dir / "config.yaml")
            self._save_state()

    def _save_state(self) -> None:
        _write_json(self.state_path, {"done": self.done, "seconds": self.seconds})

    def round_dir(self, round_: int) -> Path:
        return self.dir / f"round_{round_}"

    def run(self) -> dict:
        try:
            for round_ in range(self.cfg.rounds):
                for step in STEPS:
                    key = f"{round_}:{step}"
                    if key in self.done:
                        continue
                    started = time.perf_counter()
                    getattr(self, f"step_{step}")(round_)
                    self.done.append(key)
                    self.seconds.setdefault(str(round_), {})[step] = round(time.perf_counter() - started, 1)
                    self._save_state()
            return json.loads((self.dir / "ratings" / "ratings.json").read_text())
        finally:
            self.lock.release()

    # --- the steps ---------------------------------------------------------------------------------

    def policy(self, round_: int) -> str:
        """The policy at the start of ``round_``: the start model, or the last round's RL run."""
        return self.cfg.model if round_ == 0 else str(self.round_dir(round_ - 1) / "rl")

    def step_sample(self, round_: int) -> None:
        env = self.cfg.train_config(round_, self.dir, self.round_dir(round_) / "rm", 1.0)
        gold = self.cfg.judge if self.cfg.labeller == "simulated" else None
        prepare_items(self.round_dir(round_), self.policy(round_), n=self.cfg.items, k=self.cfg.k,
                      seed=iteration_seed(self.cfg.seed, 1000 + round_), gold=gold, progress=self.progress,
                      env_id=env.env.id, env_kwargs=_lengths(env))

    def step_label(self, round_: int) -> None:
        store = LabelStore(self.round_dir(round_))
        if self.cfg.labeller == "simulated":
            name = self.cfg.judge if isinstance(self.cfg.judge, str) else self.cfg.judge["name"]
            labeller = f"simulated-{name}"
            answered = {r["item"] for r in store.records if r["labeller"] == labeller}  # before a kill
            for item in tqdm(store.items, desc=f"round {round_}: simulated labels", disable=not self.progress):
                if item["item"] not in answered:
                    rng = np.random.default_rng([self.cfg.seed, round_, item["item"]])  # its own noise: resumable
                    store.answer(labeller, item["item"], "rank",
                                 ranks=simulated_ranks(item["scores"], self.cfg.temperature, rng))
            return
        needed = self.cfg.people_labels or len(store.items)
        server = LabelServer(store, host=self.cfg.host, port=self.cfg.port).start()
        print(f"textgym iterate: round {round_}: waiting for {needed} answers at {server.url('labeller')} "
              f"({len(store.records)} so far)", flush=True)
        try:
            with tqdm(total=needed, initial=min(len(store.records), needed), desc=f"round {round_}: answers",
                      disable=not self.progress) as bar:
                while len(store.records) < needed:
                    time.sleep(0.2)
                    bar.update(min(len(store.records), needed) - bar.n)
        finally:
            server.stop()

    def step_rm(self, round_: int) -> None:
        """A reward model from every label so far, each once (``rm_data.jsonl``), from the backbone."""
        labels = [line for r in range(round_ + 1)
                  for line in (self.round_dir(r) / PREFERENCES).read_text().splitlines() if line.strip()]
        data = write_jsonl([json.loads(line) for line in labels], self.round_dir(round_) / "rm_data.jsonl")
        rm_cfg = load_config(RMConfig, None, [], base={
            **self.cfg.rm, "data": str(data), "eval_fraction": 0.0, "seed": iteration_seed(self.cfg.seed, round_),
            "output_dir": str(self.round_dir(round_) / "rm")})
        report: dict[str, Any] = {}
        if round_ > 0:  # the last reward model on this round's labels of the new policy: never trained on them
            try:
                fresh = load_preferences(self.round_dir(round_) / PREFERENCES)
            except ValueError:  # only ties and skips this round
                fresh = []
            report["previous_rm_accuracy_on_new_labels"] = _accuracy(self.round_dir(round_ - 1) / "rm", fresh,
                                                                     rm_cfg.max_length) if fresh else None
        report.update(train_reward_model(rm_cfg, progress=self.progress))
        report["labels"] = len(labels)
        (self.round_dir(round_) / "rm_report.json").write_text(json.dumps(report, indent=1))

    def score_scale(self, round_: int) -> float:
        """``1 / std`` of the round's reward model over the round's completions (its policy's)."""
        if not self.cfg.normalize:
            return 1.0
        store = LabelStore(self.round_dir(round_))
        reward = RewardModelReward(str(self.round_dir(round_) / "rm"))
        prompts = [i["prompt"] for i in store.items for _ in i["completions"]]
        scores = np.asarray(reward(prompts, [c for i in store.items for c in i["completions"]]), dtype=float)
        std = float(scores.std())
        if not std > 0:
            raise ValueError(f"round {round_}'s reward model gives every completion the same score ({scores[0]}): "
                             "nothing to learn from; label more items or train it longer")
        return 1.0 / std

    def step_rl(self, round_: int) -> None:
        run_dir = self.round_dir(round_) / "rl"
        if (run_dir / "final_model").exists() and (run_dir / "summary.json").exists():
            return  # finished before a kill that came before this step was recorded
        scale_path = self.round_dir(round_) / "score_scale.json"  # kept: a resumed run must keep its scale
        if not scale_path.exists():
            _write_json(scale_path, {"score_scale": self.score_scale(round_)})
        scale = json.loads(scale_path.read_text())["score_scale"]
        cfg = self.cfg.train_config(round_, self.dir, self.round_dir(round_) / "rm", scale)
        train(cfg, resume=(run_dir / "checkpoint" / "state.json").exists(), progress=self.progress)

    def step_rate(self, round_: int) -> None:
        """Bradley-Terry ratings of the start model and every round's policy so far, under the gold
        judge, on the same held-out prompts; ``ratings/`` is replaced whole."""
        targets = [self.cfg.model] + [str(self.round_dir(r) / "rl") for r in range(round_ + 1)]
        names = ["start"] + [f"round {r}" for r in range(round_ + 1)]
        env = self.cfg.train_config(0, self.dir, self.dir, 1.0)
        with atomic_dir(self.dir / "ratings") as tmp:
            result = bench_elo(targets, judge=self.cfg.gold, env_id=env.env.id, n=self.cfg.rating_prompts,
                               seed=self.cfg.seed, n_envs=env.env.n_envs, n_bootstrap=self.cfg.bootstrap,
                               output_dir=str(tmp), env_kwargs=_lengths(env))
            rename = dict(zip([t.rstrip("/") for t in targets], names))
            rounds = []
            for r, (target, name) in enumerate(zip(targets, names)):
                entry = {"round": r - 1, "policy": name, "path": target,
                         "bradley_terry": result["bradley_terry"][target.rstrip("/")],
                         "gold": result["mean_judge_score"][target.rstrip("/")],
                         "gold_ci": result["judge_score_ci"][target.rstrip("/")]}
                if r > 0:
                    summary = json.loads((Path(target) / "summary.json").read_text())
                    report = json.loads((self.round_dir(r - 1) / "rm_report.json").read_text())
                    entry.update(kl=summary["after"]["kl"], labels=report["labels"],
                                 previous_rm_accuracy=report.get("previous_rm_accuracy_on_new_labels"))
                rounds.append(entry)
            ratings = {"judge": result["judge"], "n_prompts": result["n_prompts"], "rounds": rounds,
                       "elo": {rename[k]: v for k, v in result["ratings"].items()}}
            (tmp / "ratings.json").write_text(json.dumps(ratings, indent=1))
            (tmp / "ratings.md").write_text(ratings_markdown(ratings))
            plot_rounds(ratings, tmp / "ratings.png")


def _lengths(train_cfg: TrainConfig) -> dict:
    """The completion and prompt lengths of a round's env: items and ratings are played with them."""
    return {k: v for k, v in train_cfg.env.kwargs.items() if k in ("max_new_tokens", "max_prompt_tokens")}


def _write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, replaced whole (a kill leaves the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _accuracy(rm_dir: Path, groups: list, max_length: int) -> float | None:
    reward = RewardModelReward(str(rm_dir))
    return pairwise_accuracy(reward.model, reward.tokenizer, groups, max_length)


def ratings_markdown(ratings: dict) -> str:
    """Per round: Bradley-Terry rating (95% bootstrap interval), mean gold score (95% t-interval over
    the prompts), KL to the start
    model, labels the round's reward model learnt from, and the last reward model's accuracy on the
    round's new labels."""
    rows = ["| policy | Bradley-Terry | 95% CI | gold score (95% CI) | KL to start | labels | last RM on new labels |",
            "|---|---|---|---|---|---|---|"]
    for e in ratings["rounds"]:
        bt = e["bradley_terry"]
        kl = f"{e['kl']:.2f}" if "kl" in e else "0"
        acc = e.get("previous_rm_accuracy")
        rows.append(f"| {e['policy']} | {bt['rating']:.0f} | [{bt['low']:.0f}, {bt['high']:.0f}] | "
                    f"{e['gold']:.3f} ± {e['gold_ci']:.3f} | {kl} | {e.get('labels', '-')} | "
                    f"{'-' if acc is None else f'{acc:.2f}'} |")
    return "\n".join(rows) + "\n"


def plot_rounds(ratings: dict, path: Path) -> None:
    """Bradley-Terry rating (with its interval) and mean gold score of each round's policy."""
    plt = pyplot()
    rounds = ratings["rounds"]
    x = [e["round"] + 1 for e in rounds]  # 0: the start model, r + 1: after round r
    bt = np.array([[e["bradley_terry"]["rating"], e["bradley_terry"]["low"], e["bradley_terry"]["high"]]
                   for e in rounds])
    fig, (ax, gold_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax.errorbar(x, bt[:, 0], yerr=np.maximum([bt[:, 0] - bt[:, 1], bt[:, 2] - bt[:, 0]], 0), fmt="o-", capsize=4)
    ax.set_title("Bradley-Terry rating under the gold judge (95% CI)", fontsize=9)
    gold_ax.errorbar(x, [e["gold"] for e in rounds], yerr=[e["gold_ci"] for e in rounds], fmt="s-", color="C3",
                     capsize=4)
    gold_ax.set_title(f"mean gold score on {ratings['n_prompts']} held-out prompts (95% CI)", fontsize=9)
    for a in (ax, gold_ax):
        a.set_xticks(x, [e["policy"] for e in rounds])
        a.grid(alpha=0.3)
    save(fig, path)


def iterate(cfg: IterateConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or with ``resume``, continue) the loop ``cfg`` describes; returns the last ratings."""
    return Loop(cfg, resume=resume, progress=progress).run()


__all__ = ["IterateConfig", "iterate", "ratings_markdown", "plot_rounds"]
