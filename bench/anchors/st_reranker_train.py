"""sentence-transformers 6.2 reranker anchor: a CrossEncoder fine-tuned from all-MiniLM-L6-v2
(a new one-label head) with ListNetLoss on the mined SciFact train rows, then saved.

Each query becomes one row (query, [positive, negative_1..negative_{G-1}], labels): its first
positive and its FIRST G-1 mined negatives (sentence-transformers cannot redraw a row's
negatives each epoch, embtune and FlagEmbedding do), labels 0 for the positive and -inf for the
negatives: ListNetLoss takes the softmax of the labels as its target, so the target is one-hot
and the loss is -log softmax(group scores)[positive], the listwise cross-entropy embtune's
default and FlagEmbedding's reranker train (bench/_common.py explains the choice of loss).

The settings are the embtune run's, passed in: epochs, batch (queries per step), group size,
learning rate (linear schedule, warm-up ratio), weight decay, pair max length, seed; fp32 CPU.

usage: python st_reranker_train.py --train ROWS --output DIR --max-length 288 --group 4 ...
writes DIR/model (a CrossEncoder folder) and DIR/train_info.json (seconds, pairs, pairs/s)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import __version__ as st_version  # noqa: E402
from sentence_transformers.cross_encoder import (  # noqa: E402
    CrossEncoder,
    CrossEncoderTrainer,
    CrossEncoderTrainingArguments,
    losses,
)


def load_rows(path: str, negatives: int) -> Dataset:
    """One (query, docs, labels) row per training row: the positive, then the first negatives."""
    queries, docs = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if len(row["neg"]) < negatives:
                raise SystemExit(f"{path}:{number}: {len(row['neg'])} negatives, need {negatives}")
            queries.append(row["query"])
            docs.append([row["pos"][0], *row["neg"][:negatives]])
    labels = [0.0] + [float("-inf")] * negatives
    return Dataset.from_dict({"query": queries, "docs": docs, "labels": [labels] * len(queries)})


def main() -> None:
    """Train, save, and write the timing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    dataset = load_rows(args.train, args.group - 1)
    model = CrossEncoder(args.model, num_labels=1, max_length=args.max_length, device="cpu")
    # mini_batch_size = the whole batch: one forward over all pairs, as embtune's plain step.
    loss = losses.ListNetLoss(model, mini_batch_size=args.batch_size)
    training_args = CrossEncoderTrainingArguments(
        output_dir=str(args.output / "trainer"),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        lr_scheduler_type="linear",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
        save_strategy="no",
        logging_steps=10,
        report_to="none",
    )
    trainer = CrossEncoderTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.save_pretrained(str(args.output / "model"))
    steps = trainer.state.global_step
    pairs = min(steps * args.batch_size, len(dataset) * args.epochs) * args.group
    info = {
        "tool": f"sentence-transformers {st_version} CrossEncoder + ListNetLoss",
        "train_seconds": seconds,
        "steps": steps,
        "pairs": pairs,
        "pairs_per_second": pairs / seconds,
        "settings": vars(args) | {"output": str(args.output)},
    }
    (args.output / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
