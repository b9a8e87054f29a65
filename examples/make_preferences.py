"""Write synthetic preference data: K sampled completions per prompt, ranked by a gold reward.

    python examples/make_preferences.py --model textgym/smollm2-135m --k 4 --out data/prefs.jsonl [--pairs]

Then train a reward model on it: ``textgym rm data=data/prefs.jsonl``.
"""

from __future__ import annotations

import argparse

from textgym.pipeline.preferences import synthesize, to_pairs, write_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="textgym/smollm2-135m", help="policy that samples the completions")
    parser.add_argument("--prompts", default=None,
                        help="prompt file or dataset (default: the shipped movie-review openings)")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--gold", default="vader", help="registered reward that ranks the completions")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="data/prefs.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--pairs", action="store_true", help="write best-vs-worst pairs instead of rankings")
    parser.add_argument("--all-pairs", action="store_true", help="write every ordered pair instead of rankings")
    args = parser.parse_args(argv)

    prompts = args.prompts
    if args.limit is not None:
        from textgym.prompts import load_prompts, sentiment_prompts

        prompts = (load_prompts(prompts) if prompts else sentiment_prompts("train")).head(args.limit)
    records = synthesize(args.model, prompts=prompts, k=args.k, gold=args.gold,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size)
    kind = "rankings"
    if args.pairs or args.all_pairs:
        records, kind = to_pairs(records, all_pairs=args.all_pairs), "pairs"
    path = write_jsonl(records, args.out)
    print(f"wrote {len(records)} {kind} to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
