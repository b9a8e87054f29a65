"""Train a sentiment classifier (the `classifier` reward) on completions labelled by a gold reward.

Reads the rankings written by make_preferences.py (prompt, completions, scores) and labels each
completion "positive" when its gold score is above 0.05 (VADER's convention), else "other".

    python examples/train_classifier.py --data runs/bench_data/prefs.jsonl --out runs/bench_data/classifier
"""

import argparse
import json

from textgym.pipeline.classifier import train_classifier
from textgym.prompts import load_records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True,
                        help="{prompt, completions, scores} records: a .jsonl file or any source load_records reads")
    parser.add_argument("--out", required=True)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.05)
    args = parser.parse_args()
    texts, labels = [], []
    for record in load_records(args.data, what="preference"):
        for completion, score in zip(record["completions"], record["scores"]):
            texts.append(completion)
            labels.append(int(score > args.threshold))
    metrics = train_classifier(texts, labels, label_names=("other", "positive"), backbone=args.backbone,
                               output_dir=args.out, epochs=args.epochs)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
