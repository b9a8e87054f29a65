"""textgym against TRL on the same task: seconds per TRL step and per textgym iteration, and their ratio.

Each pair runs the same training step, on the same model and the same sentiment task (the shipped
train prompts, VADER compound score of the completion as the reward, sampling from the full
distribution), first in TRL, then in textgym, one after the other in this invocation, each
``--steps`` times after one warm-up step; the medians are reported.

- ``ppo``: TRL's classic ``PPOTrainer`` (trl 0.11.x, the last release that has it; it needs
  transformers 4.x, hence its own virtual environment) against textgym's PPO on
  ``textgym/Sentiment-v0``. Full fine-tuning; 16 prompts x 32 new tokens per step (no stop at EOS);
  4 PPO epochs over the batch in one minibatch (TRL ``batch_size=16, mini_batch_size=16``;
  textgym ``batch_size=16*32`` transitions: both take 4 optimizer steps per step); learning rate
  1.41e-5; KL coefficient 0.05 in the reward, not adaptive; value loss weight 0.1 on both sides.
  A TRL step is ``PPOTrainer.generate`` + the reward + ``PPOTrainer.step``; a textgym iteration is
  ``learn(n_steps * n_envs)`` from fresh episodes (what ``textgym train`` repeats).
- ``grpo``: TRL 1.x ``GRPOTrainer`` against textgym's GRPO. Full fine-tuning; 16 completions per
  step, 4 prompts x 4 (``num_generations=4``; textgym ``group_size=4``), up to 20 new tokens (both
  stop at EOS); one optimizer step per generation batch (one pass, one minibatch); KL coefficient
  0.05 in the loss (``beta``); learning rate 1e-5; the sequence-mean loss of the paper (TRL
  ``loss_type="grpo"``, textgym's default). A TRL step is one ``Trainer`` step (generation, reward,
  reference forward, update), timed between the ``on_step_end`` callbacks.

Both sides run float32 on the same device, the CPU unless CUDA is available (TRL: ``use_cpu``, no
bf16, no gradient checkpointing), with the same torch thread count. textgym left-pads every prompt
into the env's ``max_prompt_tokens`` (40) positions; TRL pads each batch to its longest prompt (at
most 16 SmolLM2 tokens here): a difference of the libraries that the figures include.

TRL runs in its own virtual environment, as a subprocess of this script (``--peer``, which imports
neither textgym nor anything outside the peer's environment and prints its times as JSON); a pair
whose interpreter is not given, or has no usable trl, is skipped with the reason. Set up (the torch
of textgym's venv; trl 0.11.4 imports ``rich`` without declaring it):

    python3 -m venv /work/trl-classic
    /work/trl-classic/bin/pip install torch==2.13.0 'trl==0.11.4' 'transformers==4.46.*' vaderSentiment rich
    python3 -m venv /work/trl-new
    /work/trl-new/bin/pip install torch==2.13.0 transformers==5.25.0 trl vaderSentiment

    python benchmarks/peer_trl.py --trl-classic-python /work/trl-classic/bin/python \\
        --trl-python /work/trl-new/bin/python                        # SmolLM2-135M-Instruct, both pairs
    python benchmarks/peer_trl.py --pair grpo --trl-python /work/trl-new/bin/python --model textgym/tiny --steps 1

Prints a Markdown table (pair, peer s/step, textgym s/iteration, ratio textgym / peer: below 1,
textgym is faster) and the machine's yardstick (the model's ``generate`` of 16 x 32 tokens), and
writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = "PEER_RESULT"  # the line the peer prints its JSON on
MAX_PROMPT_TOKENS = 40  # textgym/Sentiment-v0's: longer prompts are cut from the left (none of the shipped ones is)
SEED = 0

# The settings of each pair, shared by its two sides.
PAIRS = {
    "ppo": dict(n_prompts=16, new_tokens=32, epochs=4, learning_rate=1.41e-5, kl_coef=0.05),
    "grpo": dict(n_prompts=4, group_size=4, new_tokens=20, learning_rate=1e-5, kl_coef=0.05),
}
PEERS = {"ppo": "trl-classic PPOTrainer", "grpo": "trl GRPOTrainer"}
TASKS = {
    "ppo": "PPO: 16 prompts x 32 tokens, 4 epochs",
    "grpo": "GRPO: 4 prompts x 4 completions x 20 tokens, 1 step",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", choices=["ppo", "grpo", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median kept)")
    p.add_argument("--model", default="textgym/smollm2-135m",
                   help="textgym/smollm2-135m (default), textgym/tiny, or a local model directory")
    p.add_argument("--trl-classic-python", default=None, help="python of a venv with trl 0.11.x (the ppo pair)")
    p.add_argument("--trl-python", default=None, help="python of a venv with trl 1.x (the grpo pair)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads on both sides (default: torch's)")
    p.add_argument("--out", default="runs/peer_trl.md", help="where the Markdown table is written too")
    # internal: be the peer, inside its venv
    p.add_argument("--peer", choices=list(PAIRS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


# --- the peer's side: runs in TRL's venv (torch, transformers, trl, vaderSentiment; no textgym) ---------------


def _peer_tokenizer(path: str):
    """The model directory's tokenizer, left-padding with a pad token (as textgym's ``models.prepare``).
    transformers 4.x cannot name the ``TokenizersBackend`` class that 5.x writes: its tokenizer.json
    then loads as a plain fast tokenizer, the same tokenization."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except ValueError:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _peer_causal_lm(path: str):
    """The model in float32. transformers 4.x reads a 5.x config's ``rope_parameters`` as an unknown
    key and would fall back to its default rope theta: carry it over."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    rope = getattr(config, "rope_parameters", None)
    if int(transformers.__version__.split(".")[0]) < 5 and isinstance(rope, dict) and "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
    kwargs = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)


def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    return lambda texts: [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def peer_ppo(args, prompts: list[str]) -> list[float]:
    """Seconds of ``args.steps`` TRL classic PPO steps (generate, reward, ``step``) after one warm-up."""
    import torch
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    s = PAIRS["ppo"]
    n, T = s["n_prompts"], s["new_tokens"]
    tokenizer = _peer_tokenizer(args.model)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(_peer_causal_lm(args.model))
    config = PPOConfig(learning_rate=s["learning_rate"], batch_size=n, mini_batch_size=n, ppo_epochs=s["epochs"],
                       init_kl_coef=s["kl_coef"], adap_kl_ctrl=False, kl_penalty="kl", seed=SEED, log_with=None,
                       exp_name="peer_trl")
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)  # the reference: a frozen copy
    generation = dict(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=T, min_new_tokens=T,
                      pad_token_id=tokenizer.pad_token_id)
    reward = _vader()

    def step(i: int) -> float:
        batch = [prompts[(i * n + j) % len(prompts)] for j in range(n)]
        queries = [tokenizer(p, return_tensors="pt").input_ids[0][-MAX_PROMPT_TOKENS:] for p in batch]
        start = time.perf_counter()
        responses = trainer.generate(queries, batch_size=n, return_prompt=False, **generation)
        scores = reward(tokenizer.batch_decode(responses, skip_special_tokens=True))
        trainer.step(queries, responses, [torch.tensor(x) for x in scores])
        return time.perf_counter() - start

    step(0)  # warm-up: allocates the optimizer state
    return [step(i) for i in range(1, args.steps + 1)]


def peer_grpo(args, prompts: list[str]) -> list[float]:
    """Seconds of ``args.steps`` TRL ``GRPOTrainer`` steps after one warm-up: the intervals between
    the ends of consecutive steps of one ``train()`` of ``steps + 1`` steps."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    s = PAIRS["grpo"]
    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    score = _vader()

    def vader(completions, **_):
        return score(completions)

    n = s["n_prompts"] * s["group_size"]
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, max_steps=args.steps + 1, per_device_train_batch_size=n, gradient_accumulation_steps=1,
            num_generations=s["group_size"], steps_per_generation=1, num_iterations=1,
            max_completion_length=s["new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
            beta=s["kl_coef"], learning_rate=s["learning_rate"], lr_scheduler_type="constant", loss_type="grpo",
            use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, gradient_checkpointing=False,
            disable_dropout=True, model_init_kwargs={"dtype": "float32"}, report_to="none", logging_strategy="no",
            save_strategy="no", disable_tqdm=True, seed=SEED, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=args.model, reward_funcs=vader, args=config,
                              train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[StepEnds()])
        trainer.train()
    if len(ends) != args.steps + 1:
        raise RuntimeError(f"expected {args.steps + 1} steps, the trainer took {len(ends)}")
    return [b - a for a, b in zip(ends, ends[1:])]


def peer_main(args) -> None:
    """Be the peer: print ``RESULT {json}`` (the step seconds and versions), or ``RESULT {"skip": why}``
    when this interpreter's trl cannot run the pair."""
    import importlib.util

    def done(result: dict) -> None:
        print(f"{RESULT} {json.dumps(result)}", flush=True)

    if importlib.util.find_spec("trl") is None:
        return done({"skip": f"trl is not installed for {sys.executable}"})
    import torch
    import transformers
    import trl
    version = tuple(int(x) for x in trl.__version__.split(".")[:2] if x.isdigit())
    if args.peer == "ppo" and version >= (0, 12):
        return done({"skip": f"trl {trl.__version__} at {sys.executable} has no classic PPOTrainer (removed in 0.12)"})
    if args.peer == "grpo" and version < (0, 14):
        return done({"skip": f"trl {trl.__version__} at {sys.executable} has no GRPOTrainer (added in 0.14)"})
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    prompts = Path(args.prompts_file).read_text().splitlines()
    seconds = (peer_ppo if args.peer == "ppo" else peer_grpo)(args, prompts)
    done({"seconds": seconds, "trl": trl.__version__, "transformers": transformers.__version__,
          "torch": torch.__version__, "threads": torch.get_num_threads()})


# --- textgym's side and the comparison: run in textgym's venv -----------------------------------------------


def textgym_agent(pair: str, model: str):
    """The textgym agent of ``pair``, on the same task and settings as the peer."""
    from textgym import agents

    s = PAIRS[pair]
    if pair == "ppo":
        n, T = s["n_prompts"], s["new_tokens"]
        env_kwargs = dict(model=model, max_new_tokens=T, stop_on_eos=False, kl_coef=s["kl_coef"])
        return agents.make("ppo", "textgym/Sentiment-v0", n_envs=n, env_kwargs=env_kwargs, seed=SEED, n_steps=T,
                           batch_size=n * T, n_epochs=s["epochs"], learning_rate=s["learning_rate"], target_kl=None)
    env_kwargs = dict(model=model, group_size=s["group_size"], max_new_tokens=s["new_tokens"], kl_coef=s["kl_coef"])
    return agents.make("grpo", "textgym/Sentiment-v0", n_envs=s["n_prompts"] * s["group_size"], env_kwargs=env_kwargs,
                       seed=SEED, learning_rate=s["learning_rate"], n_epochs=1, batch_size=None)


def textgym_seconds(pair: str, model: str, steps: int) -> list[float]:
    """Seconds of ``steps`` textgym training iterations after one warm-up."""
    from benchmarks.common import iteration

    agent = textgym_agent(pair, model)
    iteration(agent, 0)  # warm-up: allocates the optimizer state
    seconds = [iteration(agent, it) for it in range(1, steps + 1)]
    del agent
    return seconds


def run_peer(pair: str, python: str, model_dir: str, prompts_file: str, args, threads: int) -> dict:
    """The peer's JSON result, ``{"skip": why}``, or ``{"failed": why}``."""
    if not Path(python).exists():
        return {"skip": f"no interpreter at {python}"}
    command = [python, str(Path(__file__).resolve()), "--peer", pair, "--model", model_dir, "--steps", str(args.steps),
               "--threads", str(threads), "--prompts-file", prompts_file]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the peer sees its own venv only
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT + " ")]
    if out.returncode or not lines:
        return {"failed": f"{python} exited {out.returncode}:\n{(out.stderr or out.stdout)[-3000:]}"}
    return json.loads(lines[-1][len(RESULT) + 1:])


def markdown(results: dict, args, threads: int, speed: float | None) -> str:
    """The table, then the settings, versions and the machine's yardstick."""
    import torch
    import transformers

    from benchmarks.common import machine

    rows = ["| pair | peer | peer s/step | textgym s/iteration | ratio textgym / peer |", "|---|---|---:|---:|---:|"]
    peers = set()
    for pair, r in results.items():
        if "seconds" in r:
            peer, ours = statistics.median(r["seconds"]), statistics.median(r["textgym"])
            rows.append(f"| {TASKS[pair]} | trl {r['trl']} {PEERS[pair].split()[-1]} | {peer:.3f} | {ours:.3f} | "
                        f"{ours / peer:.2f} |")
            peers.add(f"trl {r['trl']} (transformers {r['transformers']}, torch {r['torch']})")
        else:
            why = f"skipped: {r['skip']}" if "skip" in r else "failed (see stderr)"
            rows.append(f"| {TASKS[pair]} | {PEERS[pair]}: {why} | - | - | - |")
    lines = ["", f"model {args.model} (float32, full fine-tuning), sentiment train prompts, VADER reward; median of "
             f"{args.steps} timed step(s) after 1 warm-up; {threads} torch thread(s) on each side",
             f"textgym: transformers {transformers.__version__}, torch {torch.__version__}"
             + (f"; peers: {', '.join(sorted(peers))}" if peers else "")]
    if speed is None:
        lines.append(f"machine: {machine()}; yardstick: not measured (no pair ran)")
    else:
        lines.append(f"machine: {machine()}; yardstick: {args.model} generate of 16 x 32 tokens at {speed:.0f} tok/s")
    return "\n".join(rows + lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.peer:
        return peer_main(args)

    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m
    import torch

    from benchmarks.common import yardstick
    from textgym import models
    from textgym.prompts import sentiment_prompts

    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    pythons = {"ppo": ("--trl-classic-python", args.trl_classic_python), "grpo": ("--trl-python", args.trl_python)}
    results: dict[str, dict] = {}
    for pair in ["ppo", "grpo"] if args.pair == "both" else [args.pair]:
        flag, python = pythons[pair]
        results[pair] = {"skip": f"no {flag} given"} if python is None else {}
    todo = [pair for pair, r in results.items() if not r]
    speed = None
    if todo:
        builtin = {models.TINY: models.tiny_path, models.SMOLLM2: models.smollm2_path}  # the peer needs a directory
        model_dir = str(builtin[args.model]() if args.model in builtin else Path(args.model).resolve())
        speed = yardstick(args.model, threads=threads)  # 16 x 32 tokens, the best of 3
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.txt"
        prompts = sentiment_prompts("train").prompts
        assert not any("\n" in p for p in prompts)
        prompts_file.write_text("\n".join(prompts) + "\n")
        for pair in todo:
            r = run_peer(pair, pythons[pair][1], model_dir, str(prompts_file), args, threads)
            if "seconds" in r:
                r["textgym"] = textgym_seconds(pair, args.model, args.steps)
            elif "failed" in r:
                print(f"{pair}: the peer failed: {r['failed']}", file=sys.stderr)
            results[pair] = r
    report = markdown(results, args, threads, speed)
    print(report, end="")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    if any("failed" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
