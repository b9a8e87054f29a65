"""The ``textgym`` command line.

``textgym train`` also runs data-parallel under ``torchrun`` (``torchrun --nproc-per-node N -m
textgym train CONFIG``): each process joins the process group that torchrun describes
(``textgym.distributed.init_from_env``) and the run splits its batch over them. A rank that fails
prints its error and exits; torchrun then stops the other ranks and exits non-zero."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
from rich.console import Console
from rich.table import Table

import textgym
from textgym import agents, distributed, metrics, models, rewards, sampling, timing
from textgym.pipeline import hyperparameters, label
from textgym.pipeline.bench import BenchRewardsConfig, bench_elo, bench_rewards
from textgym.pipeline.bench_algos import BenchAlgosConfig, bench_algos
from textgym.pipeline.config import describe, load_config
from textgym.pipeline.evaluate import evaluate_target
from textgym.pipeline.iterate import IterateConfig, iterate
from textgym.pipeline.record import record_target
from textgym.pipeline.rm import RMConfig, train_reward_model
from textgym.pipeline.runlock import RunLockedError
from textgym.pipeline.sft import SFTConfig, train_sft
from textgym.pipeline.train import TIME_NOTE, train
from textgym.pipeline.train_config import TrainConfig, config_from_cli


def run_episodes(env, agent: str, episodes: int, seed: int = 0, progress: bool = True) -> list[dict]:
    """Play ``episodes`` episodes on the env's held-out prompts (textgym's one sampling path,
    ``textgym.sampling``); ``agent`` is "random" (uniform token ids), "greedy" (argmax of the env's
    acting distribution) or "sample" (sampling from it). Returns the final-step infos, each with
    the episode's ``reward`` (its return)."""
    core = env.unwrapped.core
    infos = sampling.episodes_per_row(core, episodes, seed=seed, prompts=core.test_prompts, mode=agent,
                                      progress=progress)
    return [{**info, "reward": sampling.episode_return(core, info)} for info in infos]


def cmd_demo(args) -> int:

    kwargs = {"model": args.model} if args.model else {}
    env = gym.make(args.env, **kwargs)
    results = run_episodes(env, args.agent, args.episodes, seed=args.seed)

    table = Table(title=f"{args.env}: {args.agent} agent, {len(results)} episodes")
    for col in ("prompt", "completion", "score", "kl", "reward"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(r["prompt"], r["completion"], f"{r['score']:.3f}", f"{r['kl']:.3f}", f"{r['reward']:.3f}")
    console = Console()
    console.print(table)
    console.print(f"mean score {np.mean([r['score'] for r in results]):.3f}  "
                  f"mean KL {np.mean([r['kl'] for r in results]):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def cmd_list(args) -> int:
    print("environments:", ", ".join(textgym.ENV_IDS))
    print("rewards:     ", ", ".join(rewards.names()))
    print("models:      ", ", ".join(models.BUILTIN), "(or any Hugging Face directory or hub id)")

    print("agents:      ", ", ".join(agents.names()))
    return 0


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    """argparse puts a first ``key=value`` into the optional config slot: give it back."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    return config, overrides


def cmd_train(args) -> int:

    config, overrides = _config_and_overrides(args)
    # With --resume the run continues with its saved config: training.iterations may be changed, any
    # other change is refused with the reason.
    cfg = config_from_cli(config, overrides, args.algo, resume=args.resume)
    result = train(cfg, resume=args.resume)
    if distributed.is_main():
        _print_comparison(result, cfg.training.output_dir)
        _print_time(result["time"], result["iterations"], cfg.training.output_dir)
    return 0


def _print_comparison(result: dict, run_dir: str) -> None:

    table = Table(title=f"held-out evaluation, {run_dir}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key, before in result["before"].items():
        after = result["after"].get(key, float("nan"))
        table.add_row(key, f"{before:.4g}", f"{after:.4g}")
    Console().print(table)
    gain = result["gain"]
    noise = metrics.noise_verdict(gain["score"], gain["ci"], null="not distinguishable from no change")
    print(f"held-out score gain: {gain['score']:+.3f} +- {gain['ci']:.3f} ({gain['confidence']:.0%} interval over "
          f"{gain['n']} completions: {noise})")


def _print_time(spent: dict, iterations: int, run_dir: str) -> None:
    """The run's time breakdown (as in its ``time.md``): seconds and share of every phase."""
    table = Table(title="where the time went")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for name, seconds, share in timing.breakdown_rows(spent):
        table.add_row(name, f"{seconds:.2f}", f"{share:.1%}")
    Console().print(table)
    print(f"seconds over the {iterations} iterations of {run_dir} ({TIME_NOTE}); generated tokens per second "
          f"of rollout (generation + reference + reward): {spent['tokens_per_second']:.1f}")
    print(f"wrote {Path(run_dir) / 'time.md'}")


def cmd_eval(args) -> int:

    summary = evaluate_target(args.target, env_id=args.env, n=args.n, ref=args.ref, seed=args.seed,
                              n_envs=args.n_envs, out=args.json)

    table = Table(title=f"textgym eval {args.target}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary["metrics"].items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    print(f"wrote {summary['json']}")
    return 0


def cmd_record(args) -> int:

    rec = record_target(args.target, args.out, env_id=args.env, ref=args.ref, n_prompts=args.prompts,
                        samples=args.samples, split=args.split, seed=args.seed, n_envs=args.n_envs)
    scores = rec.episodes["score"]
    print(f"recorded {len(rec)} episodes ({rec.meta['n_prompts']} prompts x {rec.meta['samples']}) of "
          f"{rec.meta['env_id']} to {rec.path}: mean score {np.mean(scores):.3f}, "
          f"mean KL {np.mean(rec.episodes['kl']):.3f}")
    return 0


def cmd_sft(args) -> int:

    print(json.dumps(train_sft(load_config(SFTConfig, *_config_and_overrides(args))), indent=1))
    return 0


def cmd_rm(args) -> int:

    print(json.dumps(train_reward_model(load_config(RMConfig, *_config_and_overrides(args))), indent=1))
    return 0


def cmd_bench_rewards(args) -> int:

    cfg = load_config(BenchRewardsConfig, *_config_and_overrides(args))
    bench_rewards(cfg)
    print((Path(cfg.output_dir) / "results.md").read_text())
    print(f"plot: {Path(cfg.output_dir) / 'overoptimization.png'}")
    return 0


def cmd_bench_algos(args) -> int:
    cfg = load_config(BenchAlgosConfig, *_config_and_overrides(args))
    bench_algos(cfg)
    print((Path(cfg.output_dir) / "results.md").read_text())
    print(f"plot: {Path(cfg.output_dir) / 'score_vs_kl.png'}")
    return 0


def cmd_bench_elo(args) -> int:

    bench_elo(args.policies, judge=args.judge, env_id=args.env, n=args.n, seed=args.seed, n_envs=args.n_envs,
              n_bootstrap=args.bootstrap, output_dir=args.output_dir)
    print((Path(args.output_dir) / "elo.md").read_text())
    print(f"plot: {Path(args.output_dir) / 'elo.png'}")
    return 0


def cmd_iterate(args) -> int:
    cfg = load_config(IterateConfig, *_config_and_overrides(args))
    iterate(cfg, resume=args.resume)
    print((Path(cfg.output_dir) / "ratings" / "ratings.md").read_text(), end="")
    print(f"plot: {Path(cfg.output_dir) / 'ratings' / 'ratings.png'}")
    return 0


def cmd_label(args) -> int:
    env_kwargs = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else None
    items = label.prepare_items(args.directory, args.policy, n=args.items, k=args.k, seed=args.seed,
                                split=args.split, env_kwargs=env_kwargs)
    store = label.LabelStore(args.directory, items)
    if args.report:
        report = store.report()
        text = label.report_markdown(report)
        (Path(args.directory) / "agreement.json").write_text(json.dumps(report["agreement"], indent=1))
        print(text, end="")
        return 0
    server = label.LabelServer(store, host=args.host, port=args.port, labeller=args.labeller)
    progress = store.progress(args.labeller)
    print(f"textgym label: {len(items)} items in {args.directory} ({progress['answers']} answers so far, "
          f"{progress['done']} by {args.labeller}); answers go to {store.path}", flush=True)
    if server.token:
        print(f"textgym label: serving on {args.host}, not loopback: every request needs the access token in this "
              "address", flush=True)
    print(f"textgym label: open {server.url(args.labeller)} (another labeller: another labeller= in the address; "
          "Ctrl-C stops)", flush=True)
    server.run()
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--n -3`` or ``--n 0`` is an error, not a silent default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def config_help(cls: type, hyperparameter_help: str | None = None) -> dict:
    """``add_parser`` arguments whose ``--help`` lists every key of config ``cls`` (type, default,
    valid values, help), generated from its declaration."""
    epilog = f"config keys (in the YAML file, or key=value):\n{describe(cls)}"
    if hyperparameter_help is not None:
        epilog += ("\n\nhyperparameters (agent.<algo>.NAME applies when that algorithm runs, "
                   "agent.hyperparameters.NAME to the running one), from the algorithms' constructors:\n"
                   + hyperparameter_help)
    return {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgym",
                                     description="Text generation as a Gymnasium environment, for RLHF.")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="play a few episodes with a random, greedy or sampling agent")
    demo.add_argument("--env", default="textgym/Sentiment-v0")
    demo.add_argument("--model", default=None, help="model name or path (default: the env's)")
    demo.add_argument("--agent", choices=["random", "greedy", "sample"], default="sample")
    demo.add_argument("--episodes", type=positive_int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", default=None, help="also write the episodes to this JSON file")
    demo.set_defaults(func=cmd_demo)
    lst = sub.add_parser("list", help="registered environments, rewards, agents and models")
    lst.set_defaults(func=cmd_list)

    tr = sub.add_parser("train",
                        help="RL fine-tuning from a YAML config (default: REINFORCE++ on Sentiment-v0 with SmolLM2)",
                        **config_help(TrainConfig, hyperparameters.describe()))
    tr.add_argument("config", nargs="?", default=None,
                    help="YAML config (sections model, env, reward, agent, training)")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.iterations=5 agent.algo=a2c")
    tr.add_argument("--algo", default=None, help="shortcut for agent.algo=...")
    tr.add_argument("--resume", action="store_true", help="continue the run in training.output_dir")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a run directory or a model on held-out prompts")
    ev.add_argument("target", help="a run directory (from textgym train) or a model name/path")
    ev.add_argument("--env", default=None, help="env id (default: the run's, else textgym/Sentiment-v0)")
    ev.add_argument("--n", type=positive_int, default=None,
                    help="number of held-out prompts (default: the run's eval_n, else 50)")
    ev.add_argument("--ref", default=None,
                    help="reference model (default: the run's base model, else the model itself)")
    ev.add_argument("--n-envs", type=positive_int, default=None,
                    help="prompts generated together (default: the run's, else 16)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", default=None, help="where to write the JSON (default: RUN_DIR/eval.json or ./eval.json)")
    ev.set_defaults(func=cmd_eval)

    rc = sub.add_parser("record", help="play an env and write its episodes as an offline dataset (Parquet)")
    rc.add_argument("target", help="a run directory (from textgym train) or a model name/path")
    rc.add_argument("--out", required=True, help="a new (or empty) directory for the recording")
    rc.add_argument("--env", default=None, help="env id (default: the run's, else textgym/Sentiment-v0)")
    rc.add_argument("--ref", default=None, help="reference model (default: the run's base model, else the model)")
    rc.add_argument("--prompts", type=positive_int, default=None,
                    help="the first N prompts of the split (default: all)")
    rc.add_argument("--samples", type=positive_int, default=1, help="completions per prompt")
    rc.add_argument("--split", choices=["train", "test"], default="train",
                    help="the prompts training draws from (train) or the held-out ones (test)")
    rc.add_argument("--n-envs", type=positive_int, default=16, help="rows of the env (evaluation plays up to 64)")
    rc.add_argument("--seed", type=int, default=0)
    rc.set_defaults(func=cmd_record)

    bench = sub.add_parser("bench", help="benchmark rewards, algorithms (algos), or rate policies (elo)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    br = bench_sub.add_parser("rewards", help="train against each reward; gold score, KL, agreement, speed, plot",
                              **config_help(BenchRewardsConfig))
    br.add_argument("config", nargs="?", default=None, help="YAML config (rewards, gold, seeds, train, ...)")
    br.add_argument("overrides", nargs="*", help="key=value overrides")
    br.set_defaults(func=cmd_bench_rewards)
    ba = bench_sub.add_parser("algos", help="train with each algorithm on one task and budget; score, KL, table, plot",
                              **config_help(BenchAlgosConfig))
    ba.add_argument("config", nargs="?", default=None, help="YAML config (algos, seeds, train, output_dir)")
    ba.add_argument("overrides", nargs="*", help="key=value overrides")
    ba.set_defaults(func=cmd_bench_algos)
    be = bench_sub.add_parser("elo", help="Elo ratings of policies from pairwise comparisons under a judge reward")
    be.add_argument("policies", nargs="+", help="run directories or model names/paths")
    be.add_argument("--judge", default="vader", help="registered reward that judges each pair of completions")
    be.add_argument("--env", default="textgym/Sentiment-v0", help="env whose held-out prompts are completed")
    be.add_argument("--n", type=positive_int, default=32, help="prompts")
    be.add_argument("--n-envs", type=positive_int, default=16)
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--bootstrap", type=positive_int, default=200, help="bootstrap resamples for the intervals")
    be.add_argument("--output-dir", default="runs/bench_elo")
    be.set_defaults(func=cmd_bench_elo)

    lb = sub.add_parser("label", help="a local web page to rank a policy's completions into a preference file")
    lb.add_argument("directory", help="the labelling directory (items.jsonl, preferences.jsonl); reopen it to resume")
    lb.add_argument("--policy", default=None,
                    help="run directory or model whose completions are labelled (needed until items.jsonl exists)")
    lb.add_argument("--items", type=positive_int, default=20, help="prompts to label, drawn from --split")
    lb.add_argument("--k", type=positive_int, default=4, help="completions per prompt (>= 2)")
    lb.add_argument("--split", choices=["train", "test"], default="train", help="the prompts the items come from")
    lb.add_argument("--max-new-tokens", type=positive_int, default=None, help="completion length (default: the env's)")
    lb.add_argument("--seed", type=int, default=0, help="seed of the prompts' draw and the sampling")
    lb.add_argument("--host", default="127.0.0.1",
                    help="address to serve on; anything but loopback gets a printed access token")
    lb.add_argument("--port", type=int, default=8765)
    lb.add_argument("--labeller", default="labeller", help="the labeller of a page opened without ?labeller=")
    lb.add_argument("--report", action="store_true",
                    help="print the answers and the labellers' agreement (and write agreement.json) instead of serving")
    lb.set_defaults(func=cmd_label)

    it = sub.add_parser("iterate", help="iterated online RLHF: rounds of sample -> rank (people or a simulated "
                        "labeller) -> reward model -> RL, each round's policy rated", **config_help(IterateConfig))
    it.add_argument("config", nargs="?", default=None,
                    help="YAML config (model, rounds, items, labeller, rm, train, ...)")
    it.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rounds=2 labeller=people")
    it.add_argument("--resume", action="store_true",
                    help="continue the loop in output_dir after its last finished step")
    it.set_defaults(func=cmd_iterate)

    for name, func, what, cls in (
            ("sft", cmd_sft, "supervised fine-tuning on (prompt, completion) demonstrations", SFTConfig),
            ("rm", cmd_rm, "train a scalar reward model from preference pairs or rankings", RMConfig)):
        p = sub.add_parser(name, help=what, **config_help(cls))
        p.add_argument("config", nargs="?", default=None, help="YAML config")
        p.add_argument("overrides", nargs="*", help="key=value overrides")
        p.set_defaults(func=func)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order: ``textgym train CONFIG --algo a2c k=v`` (argparse
    alone stops collecting positionals at the first option)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the command's input (a bad value, a missing file, a locked run directory):
    printed as one line. Anything else is a bug and keeps its traceback."""
    return (ValueError, TypeError, OSError, RunLockedError)


# The commands that run data-parallel under torchrun; the others would only repeat themselves N times.
DATA_PARALLEL_COMMANDS = ("train",)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    args = parse_args([a for a in argv if a != "--debug"])
    where = ""
    try:
        ranks = os.environ.get("WORLD_SIZE", "1")
        if ranks != "1" and args.command not in DATA_PARALLEL_COMMANDS:
            raise ValueError(f"textgym {args.command} runs in one process; only {', '.join(DATA_PARALLEL_COMMANDS)} "
                             f"runs data-parallel under torchrun (WORLD_SIZE={ranks})")
        joined = args.command in DATA_PARALLEL_COMMANDS and distributed.init_from_env()
        if joined:
            where = f" (rank {distributed.rank()} of {distributed.world_size()})"
        try:
            return args.func(args)
        finally:
            if joined:
                distributed.shutdown()
    except user_errors() as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        kind = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
        print(f"textgym {args.command}{where}: error: {kind}{message} (--debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
