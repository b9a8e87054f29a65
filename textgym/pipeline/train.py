"""``textgym train``: RL fine-tuning of a causal LM on a textgym env, from one YAML config.

A run directory holds the resolved ``config.yaml``, TensorBoard logs (``tb/``), ``metrics.jsonl``
(one line per iteration), ``checkpoint/`` (written atomically after every iteration; ``--resume``
continues from it), ``samples_before.jsonl`` / ``samples_after.jsonl`` (held-out completions),
``final_model/`` (``save_pretrained``), PNG plots of score, KL and KL coefficient, and ``time.md``: where
the run's time went (``textgym.timing``), phase by phase over its iterations.

Every iteration's record (``metrics.jsonl``, and TensorBoard) holds the seconds of its phases:
``time/generation`` (the rollout, less the two phases nested in it), ``time/reference`` (the
reference model), ``time/reward``, ``time/update``, ``time/evaluation`` and ``time/other`` (the
rest: seeding, fresh episodes, the records), which add up to the iteration's ``seconds``; and
``time/tokens_per_second``, the rollout's generated tokens (its timesteps) per second of
generation + reference + reward. Timings differ from run to run, so a resumed run repeats every
figure of the uninterrupted one except ``seconds`` and the ``time/`` figures.

Every iteration (one rollout and one update) starts from fresh episodes with its own seed,
``iteration_seed(training.seed, iteration)``, so a resumed run repeats exactly what the
uninterrupted run would do, and every episode's prompt is an independent draw: no iteration (of
this run, or of a run with another seed) replays another's draws.

Data-parallel (``torchrun --nproc-per-node N -m textgym train CONFIG``, or ``train`` called inside
an initialised process group, see ``textgym.distributed``): every rank runs each iteration on its
share of ``env.n_envs`` rows (the agents sum gradients and reduce the rollout's figures over the
ranks, so the figures are the global batch's), each evaluates a block of the held-out prompts, and
rank 0 alone claims, locks and writes the run directory: one run, whatever the number of ranks.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.logger import Logger, configure
from tqdm.auto import tqdm

from textgym import agents, distributed, metrics, timing
from textgym.assets import atomic_dir
from textgym.pipeline.config import ConfigError, check_no_code_options, load_config, save_config, to_dict
from textgym.pipeline.evaluate import generate, held_out_prompts, make_rewards, summarise
from textgym.pipeline.plots import pyplot, save
from textgym.pipeline.runlock import RunLock, holder
from textgym.pipeline.train_config import TrainConfig
from textgym.prompts import PromptSet

# --- the run ---------------------------------------------------------------------------------------


# What ``--resume`` may change in a run's saved config: the rest would make the resumed run another run.
RESUMABLE_KEYS = ("training.iterations", "training.output_dir")


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def resume_config(saved: TrainConfig, requested: TrainConfig, done: int) -> TrainConfig:
    """The config a resumed run continues with: the saved one, with the changes ``--resume`` allows
    (``RESUMABLE_KEYS``) taken from ``requested``; any other change is refused by name."""
    old, new = _leaves(to_dict(saved)), _leaves(to_dict(requested))
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>")
                     and k not in RESUMABLE_KEYS)
    if changed:
        shown = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed[:5])
        raise ConfigError(
            f"--resume continues the run with its saved config.yaml, so it cannot change {', '.join(changed)} "
            f"({shown}); only {', '.join(RESUMABLE_KEYS)} may be given. Start a new run (another "
            "training.output_dir) to change them"
        )
    cfg = copy.deepcopy(saved)
    cfg.training.output_dir = requested.training.output_dir  # the directory may have moved
    if requested.training.iterations < done:
        raise ConfigError(f"training.iterations={requested.training.iterations} is fewer than the {done} "
                          "iterations the run has already done")
    cfg.training.iterations = requested.training.iterations
    return cfg


def iteration_seed(seed: int, iteration: int) -> int:
    """The seed of iteration ``iteration`` of a run seeded ``seed``: 32 bits of
    ``numpy.random.SeedSequence([seed, iteration])``, so that (seed, iteration) pairs give unrelated
    seeds (``seed + iteration`` would give iteration 1 of seed 0 the seed of iteration 0 of seed 1,
    and the agent's env seeds row r with the stream of (seed, r): see ``agents.vec_env``)."""
    return int(np.random.SeedSequence([int(seed), int(iteration)]).generate_state(1)[0])


class Run:
    """One training run in ``cfg.training.output_dir``, which it locks for its whole life (a second
    run or resume there is refused, see ``textgym.pipeline.runlock``). ``resume=True`` continues the run saved
    there; ``cfg`` may then differ from the saved config only in ``RESUMABLE_KEYS``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True):
        check_no_code_options(to_dict(cfg))
        self.dir = Path(cfg.training.output_dir)
        self.checkpoint = self.dir / "checkpoint"
        self.main = distributed.is_main()  # data-parallel, only rank 0 touches the run directory
        self.lock: RunLock | None = None
        # Rank 0 checks and claims the directory; the other ranks get its answer, or its error.
        cfg, self.state, existed = distributed.on_main(self._claim, cfg, resume)
        try:
            self._setup(cfg, resume, progress)
            if not resume and self.main:
                save_config(cfg, self.dir / "config.yaml")
        except BaseException:
            if self.lock is not None:
                if not existed:  # a run refused before it started leaves nothing behind
                    shutil.rmtree(self.dir, ignore_errors=True)
                self.lock.release()
            raise

    def _claim(self, cfg: TrainConfig, resume: bool) -> tuple[TrainConfig, dict, bool]:
        """Check the run directory, lock it and read the state of the run to resume there:
        ``(the config to run, the state, whether the directory existed)``."""
        if resume:
            if not (self.checkpoint / "state.json").exists():
                raise FileNotFoundError(f"nothing to resume in {str(self.dir)!r}: no checkpoint/state.json")
            # checked before the lock is taken: a refused resume touches nothing
            state = json.loads((self.checkpoint / "state.json").read_text())
            cfg = resume_config(load_config(TrainConfig, self.dir / "config.yaml"), cfg, state["iteration"])
        elif (self.checkpoint / "state.json").exists() and holder(self.dir) is None:
            # (a run still going there is refused by the lock below, naming its process)
            raise FileExistsError(
                f"{str(self.dir)!r} already holds a run: pass --resume, or another training.output_dir"
            )
        existed = self.dir.exists()
        lock = RunLock(self.dir).acquire()  # before anything is written (or removed) in the directory
        try:
            if resume:
                state = json.loads((self.checkpoint / "state.json").read_text())  # final, now that we hold it
                for stale in [*self.dir.glob(".checkpoint-*"), *self.dir.glob(".final_model-*"),
                              *self.dir.glob(".metrics.jsonl-*")]:
                    if stale.is_dir():  # half-written by a killed process: nobody else holds the lock
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)
            else:
                if (self.checkpoint / "state.json").exists():  # finished while we waited for the lock
                    raise FileExistsError(f"{str(self.dir)!r} already holds a run: pass --resume, or another "
                                          "training.output_dir")
                state = {"iteration": 0, "history": [], "before": None}
        except BaseException:
            if not existed:  # a run refused before it started leaves nothing behind
                shutil.rmtree(self.dir, ignore_errors=True)
            lock.release()
            raise
        self.lock = lock
        return cfg, state, existed

    def _setup(self, cfg: TrainConfig, resume: bool, progress: bool) -> None:
        self.cfg, self.progress = cfg, progress
        # The loader checked every one against the algorithm (textgym.pipeline.train_config).
        hp = {**cfg.agent.hyperparameters, "seed": cfg.training.seed}
        if cfg.model.lora is not None:
            hp["lora"] = cfg.model.lora
        env_kwargs = cfg.env_kwargs()
        if resume:
            self.agent = agents.load(self.checkpoint / "agent.zip", env=cfg.env.id, n_envs=cfg.env.n_envs,
                                     env_kwargs=env_kwargs)  # restores the KL controller's state too
        else:
            self.agent = agents.make(cfg.agent.algo, cfg.env.id, n_envs=cfg.env.n_envs, env_kwargs=env_kwargs, **hp)

        # The TensorBoard logs are rank 0's; the other ranks' logger only collects the figures.
        self.agent.set_logger(configure(str(self.dir / "tb"), ["tensorboard"]) if self.main else Logger(None, []))
        self.core = self.agent.env.core
        # The engine's timer: the agent's rollout and the engine's reference and reward are timed on
        # it, and the iteration's other phases here (textgym.timing). Data-parallel, every rank times
        # its own work; rank 0's figures are the ones written (the ranks wait for one another at
        # every collective, so its iteration takes as long as theirs).
        self.timer = self.core.timer
        # (iteration, summary, episodes) of the latest evaluation: the final one reuses the last
        # iteration's, which evaluated the same weights with the same seed.
        self._last_evaluation: tuple[int, dict, list[dict]] | None = None
        self.eval_prompts = self._eval_prompts()

        self.eval_rewards = make_rewards(cfg.reward.eval_specs())

    def close(self) -> None:
        """Release the run directory (``run`` does it when it ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    def _eval_prompts(self):
        t = self.cfg.training
        return held_out_prompts(self.core, t.eval_prompts, t.eval_n).repeat(t.eval_samples)

    def evaluate(self) -> tuple[dict, list[dict]]:
        """The held-out evaluation. Data-parallel, each rank completes its block of the prompts
        (its sampling seeded by the seed and its rank) and every rank summarises all the episodes."""
        prompts, seed = self.eval_prompts, self.cfg.training.seed
        if not distributed.is_initialized():
            episodes = generate(self.core, prompts, seed=seed)
        else:
            start, stop = distributed.split_evenly(len(prompts))
            mine: list[dict] = []
            if stop > start:
                block = PromptSet(prompts.prompts[start:stop], {k: v[start:stop] for k, v in prompts.metadata.items()})
                mine = generate(self.core, block, seed=seed + distributed.rank())
            episodes = distributed.concat_over_ranks(mine)
        return summarise(episodes, self.eval_rewards, prompts), episodes

    def _reward_hacking(self, history: list[dict]) -> bool:
        """Warn when, over the last three evaluations (the one before training included), the proxy
        rose at every step while the gold score fell at every step."""
        points = [(0, self.state["before"])] + [(r["iteration"], {"score": r["eval/score"],
                                                                  "reward/gold": r["eval/reward/gold"]})
                                                for r in history if "eval/reward/gold" in r]
        proxy, gold = [p["score"] for _, p in points], [p["reward/gold"] for _, p in points]
        if not metrics.proxy_up_gold_down(proxy, gold):
            return False
        its = ", ".join(str(it) for it, _ in points[-3:])
        warnings.warn(f"reward hacking? over the evaluations at iterations {its} the proxy rose "
                      f"({' -> '.join(f'{v:.3f}' for v in proxy[-3:])}) while the gold reward fell "
                      f"({' -> '.join(f'{v:.3f}' for v in gold[-3:])}); see gold.png", stacklevel=2)
        return True

    def _write_samples(self, name: str, episodes: list[dict]) -> None:
        keep = ("prompt", "completion", "score", "kl", "length")
        with open(self.dir / name, "w") as f:
            for e in episodes[: self.cfg.training.samples]:
                f.write(json.dumps({k: e[k] for k in keep}) + "\n")

    def iterate(self, it: int) -> dict:
        """One rollout and one update, from fresh episodes seeded by the iteration, and the
        held-out evaluation when one is due; ``seconds`` is the wall time of all three, and the
        ``time/`` figures split it by phase (see the module's docstring)."""
        agent, timer = self.agent, self.timer
        timer.take()  # only the iteration's own work counts in its figures
        timesteps = agent.num_timesteps
        start = time.perf_counter()
        with timer.phase("other"):  # whatever no other phase covers
            agent.set_random_seed(iteration_seed(self.cfg.training.seed, it))
            agent.start_fresh_episodes()
            # learn() is one rollout (collect_rollouts: the generation phase, with the reference
            # and reward phases nested in it) and one update: what remains of it is the update,
            # with SB3's few lines of bookkeeping around it.
            with timer.phase("update"):
                agent.learn(agent.iteration_timesteps, reset_num_timesteps=False)
            stats = agent.rollout_stats  # over the episodes of every rank
            record: dict[str, Any] = {"iteration": it + 1, "timesteps": int(agent.num_timesteps),
                                      "episodes": stats["episodes"]}
            for key in ("score", "kl", "length", "reward"):
                if key in stats:  # an offline algorithm plays no rollout: none of them
                    record[key] = stats[key]
            record["kl_coef"] = float(self.core.kl.value)
            for key, value in agent.logger.name_to_value.items():
                if key.startswith(("train/", "heldout/")):
                    record[key] = float(value)
            every = self.cfg.training.eval_every
            if (every and (it + 1) % every == 0) or it + 1 == self.cfg.training.iterations:
                with timer.phase("evaluation"):  # on an evaluation copy, which times its work apart
                    summary, episodes = self.evaluate()
                self._last_evaluation = (it + 1, summary, episodes)
                record.update({f"eval/{k}": v for k, v in summary.items() if k != "n"})
                if "reward/gold" in summary and self._reward_hacking([*self.state["history"], record]):
                    record["eval/reward_hacking"] = 1.0
        record["seconds"] = round(time.perf_counter() - start, 3)
        # The tokens are the global batch's (timesteps), the seconds this rank's (rank 0's are written).
        figures = timing.iteration_figures(timer.take(), tokens=int(agent.num_timesteps - timesteps))
        for name, value in figures.items():
            record[f"time/{name}"] = value
            agent.logger.record(f"time/{name}", value)  # TensorBoard, beside the update's train/ figures
        agent.logger.dump(agent.num_timesteps)
        return record

    def save_checkpoint(self) -> None:
        """Every rank calls this (a sharded agent's weights are gathered from all); rank 0 writes."""
        if not self.main:
            self.agent.save(None)
            return
        with atomic_dir(self.checkpoint) as tmp:
            self.agent.save(tmp / "agent.zip")
            (tmp / "state.json").write_text(json.dumps(self.state))
        # metrics.jsonl mirrors the checkpoint's history, so a kill between the two writes loses nothing.
        fd, tmp_metrics = tempfile.mkstemp(prefix=".metrics.jsonl-", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.state["history"]))
            os.replace(tmp_metrics, self.dir / "metrics.jsonl")
        except BaseException:
            Path(tmp_metrics).unlink(missing_ok=True)
            raise

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        t = self.cfg.training
        if self.state["before"] is None:
            summary, episodes = self.evaluate()
            self.state["before"] = summary
            if self.main:
                self._write_samples("samples_before.jsonl", episodes)
            self.save_checkpoint()
        bar = tqdm(range(self.state["iteration"], t.iterations), initial=self.state["iteration"], total=t.iterations,
                   desc="textgym train", unit="iter", disable=not (self.progress and self.main))
        for it in bar:
            record = self.iterate(it)
            self.state["history"].append(record)
            self.state["iteration"] = it + 1
            self.save_checkpoint()
            if "score" in record:
                bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.2f}")
            if t.max_seconds is not None and distributed.broadcast_object(
                    sum(r["seconds"] for r in self.state["history"]) >= t.max_seconds):
                break  # the budget is spent (rank 0's clock decides for all; a resume counts the earlier iterations)
        if self._last_evaluation is not None and self._last_evaluation[0] == self.state["iteration"]:
            _, summary, episodes = self._last_evaluation  # the last iteration's: same weights, same seed
        else:  # a run resumed after its last iteration, or one of no iterations
            summary, episodes = self.evaluate()
        result = {"before": self.state["before"], "after": summary, "iterations": self.state["iteration"],
                  "gain": score_gain(self.state["before"], summary)}
        self.save_final_model()
        if self.main:
            self._write_samples("samples_after.jsonl", episodes)
            plot_history(self.state["history"], self.dir, self.state["before"])
            (self.dir / "summary.json").write_text(json.dumps(result, indent=1))
        # Where the time went, phase by phase over the iterations (resumed ones included); timings
        # differ from run to run, so they stay out of summary.json.
        spent = timing.run_totals(self.state["history"])
        if self.main:
            title = f"where the time went: seconds over the {self.state['iteration']} iterations ({TIME_NOTE})"
            (self.dir / "time.md").write_text(timing.markdown(spent, title))
        return {**result, "time": spent}

    def save_final_model(self) -> None:
        """The acting policy that the evaluations played (NLPO's with its mask), LoRA merged. Every
        rank calls this (a sharded policy is gathered from all); rank 0 writes."""
        if not self.main:
            self.core.save_policy(None)
            return
        with atomic_dir(self.dir / "final_model") as tmp:
            self.core.save_policy(tmp)


def score_gain(before: dict, after: dict, confidence: float = 0.95) -> dict:
    """The held-out score's change over the run, ``after - before``, with the half-width of its
    ``confidence`` Welch-t interval over the evaluated completions (``metrics.difference_ci``; NaN
    where a summary has no ``score_std``, as one saved before textgym recorded it)."""
    diff, half = metrics.difference_ci((after["score"], after.get("score_std", float("nan")), after["n"]),
                                       (before["score"], before.get("score_std", float("nan")), before["n"]),
                                       confidence)
    return {"score": diff, "ci": half, "confidence": confidence, "n": int(after["n"])}


def plot_history(history: list[dict], out_dir: Path, before: dict | None = None) -> list[Path]:
    """PNG plots of score, KL and KL coefficient per iteration, with the held-out evaluations
    (``before``: the one before training, drawn at iteration 0)."""
    plt = pyplot()

    paths = []
    for key, title in (("score", "mean score"), ("kl", "mean KL to the reference"), ("kl_coef", "KL coefficient")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        rollouts = [(r["iteration"], r[key]) for r in history if key in r]  # none for an offline algorithm
        if rollouts:
            ax.plot(*zip(*rollouts), marker="o", label="training rollouts")
        evals = [(0, before[key])] if before and key in before else []
        evals += [(r["iteration"], r[f"eval/{key}"]) for r in history if f"eval/{key}" in r]
        if evals:
            ax.plot(*zip(*evals), marker="s", label="held-out prompts")
            ax.legend()
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        path = Path(out_dir) / f"{key}.png"
        save(fig, path)
        paths.append(path)
    evals = [(0, before)] if before and "reward/gold" in before else []
    evals += [(r["iteration"], {"score": r["eval/score"], "reward/gold": r["eval/reward/gold"]})
              for r in history if "eval/reward/gold" in r]
    if evals:  # reward.gold: the proxy and the gold score at each evaluation, on their own scales
        fig, ax = plt.subplots(figsize=(6, 3.5))
        its_eval = [it for it, _ in evals]
        ax.plot(its_eval, [m["score"] for _, m in evals], marker="s", color="C0", label="proxy (trained on)")
        ax.set_ylabel("proxy score", color="C0")
        gold_ax = ax.twinx()
        gold_ax.plot(its_eval, [m["reward/gold"] for _, m in evals], marker="o", color="C3", label="gold")
        gold_ax.set_ylabel("gold score", color="C3")
        ax.set_xlabel("iteration")
        ax.set_title("held-out proxy and gold scores")
        ax.grid(alpha=0.3)
        path = Path(out_dir) / "gold.png"
        save(fig, path)
        paths.append(path)
    return paths


# What a run's time breakdown (time.md, and what textgym train prints) covers.
TIME_NOTE = "the evaluations before and after training, loading and saving not counted"


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or with ``resume``, continue) the training run ``cfg`` describes. Returns its summary
    (``summary.json``: the evaluations before and after, the iterations) and ``time``: seconds per
    phase over its iterations (``textgym.timing.run_totals``, the figures of ``time.md``)."""
    return Run(cfg, resume=resume, progress=progress).run()

