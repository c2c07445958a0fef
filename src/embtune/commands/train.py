"""`embtune train`: fine-tune an embedding model on query / positive / negative data."""

from __future__ import annotations

import argparse
import os

DESCRIPTION = """\
Fine-tune an embedding model with a contrastive loss over hard negatives.

Each step takes --batch-size queries; each query brings a group of --train-group-size
passages (1 positive + train_group_size-1 negatives sampled from its row) and, with in-batch
negatives on, is scored against every passage of the batch. The negatives budget (how many
negatives each query has, how many are used, candidates per query, chance-level loss) is
printed before training starts.

examples:
  embtune train --model BAAI/bge-small-en-v1.5 --train-data train.jsonl -o out/
  embtune train --model ./my-model --train-data scifact/ --train-split train \\
      --train-group-size 4 --batch-size 16 --temperature 0.05 -o out/
  embtune train --config run.yaml --learning-rate 1e-5     # flags override the YAML
  embtune train --config run.yaml --resume                  # continue after a kill
  embtune train --config run.yaml --learning-rate auto --dev-fraction 0.1  # chosen on dev
  torchrun --nproc_per_node 4 -m embtune train --config run.yaml
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` sub-command."""
    from embtune.commands import HelpFormatter
    from embtune.config import add_arguments

    parser = subparsers.add_parser(
        "train",
        help="fine-tune an embedding model",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve options (defaults < YAML < flags), train, and print where the model went."""
    from embtune import api
    from embtune.config import resolve_config

    result = api.train(resolve_config(args))
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun / accelerate launch the main process reports, once
    last = next((h for h in reversed(result.history) if "loss" in h), {})
    if result.resumed_from_step:
        print(f"embtune train: resumed at step {result.resumed_from_step}")
    if result.skipped_steps:
        print(
            f"embtune train: {result.skipped_steps} steps skipped for a non-finite loss or "
            "gradient (listed in train_log.jsonl)"
        )
    final = ""
    if last:
        # Chance level is the contrastive objectives'; a distillation loss has none.
        chance = f" (chance {last['chance_loss']:.3f})" if "chance_loss" in last else ""
        final = f", final loss {last['loss']:.4f}{chance}"
    print(
        f"embtune train: {result.steps} steps in {result.train_seconds:.1f} s, "
        f"{result.texts_per_second:.1f} texts/s{final}"
    )
    if result.best_step is not None:
        print(
            f"embtune train: best dev nDCG@10 {result.best_ndcg:.4f} at step {result.best_step}, "
            f"saved to {result.output_dir}/best"
        )
    for name, entry in result.reference.items():
        if {"base", "end"} <= set(entry):
            change = entry["end"] - entry["base"]
            print(
                f"embtune train: reference {name} nDCG@10 {entry['base']:.4f} (base) -> "
                f"{entry['end']:.4f} at the last evaluation ({change:+.4f})"
            )
    print(f"embtune train: model saved to {result.output_dir}")
    if result.interpolation is not None:
        print(
            f"embtune train: interpolated with the base at factor "
            f"{result.interpolation.factor:g}: {result.interpolation.folder}"
        )
    return 0
