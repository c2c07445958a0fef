"""`embtune plan`: measure what this machine affords; recommend batch, group, chunk, precision."""

from __future__ import annotations

import argparse

from embtune.config import TrainConfig

DESCRIPTION = """\
Run a few real training steps (forward, backward, optimizer) on rows made of the data's longest
texts, for batch sizes 1, 2, 4, ... at your group size, each in a fresh process; measure peak
memory and texts/s; fit memory against texts per step; and recommend the largest batch x group
that fits the memory budget, whether to switch on --cache-chunk-size and at what chunk, the
precision, and how the group size uses the data's negatives. A recommendation beyond the
measured sizes is run once more to check it. About 2 minutes for all-MiniLM-L6-v2 on 2 CPU cores.

examples:
  embtune plan --model sentence-transformers/all-MiniLM-L6-v2 --train-data train.jsonl
  embtune plan --model BAAI/bge-base-en-v1.5 --train-data train.jsonl --memory-budget 20GiB \\
      --batch-size 64 --train-group-size 8 --write-config run.yaml
  embtune train --config run.yaml --output-dir out
"""

_TRAIN = TrainConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `embtune plan` to the CLI."""
    from embtune.commands import HelpFormatter

    p = subparsers.add_parser(
        "plan", help="measure what the machine affords; recommend batch x group",
        description=DESCRIPTION, formatter_class=HelpFormatter,
    )  # fmt: skip
    p.add_argument("--model", required=True, help="Hugging Face model name or local folder")
    p.add_argument("--train-data", nargs="+", required=True, help="training data, as train's")
    p.add_argument(
        "--memory-budget",
        help="the most memory training may take (20GiB, 512MiB; default: free memory less "
        "--headroom)",
    )
    p.add_argument("--headroom", default="0.1", help="share of free memory kept free (0.1)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: the GPU if there is one")
    p.add_argument(
        "--train-group-size", default=str(_TRAIN.train_group_size),
        help=f"1 positive + negatives per query, kept as given ({_TRAIN.train_group_size})",
    )  # fmt: skip
    p.add_argument(
        "--batch-size",
        help="the batch you want (kept; the cached loss makes it fit); default: the largest "
        "that fits, up to --max-batch-size",
    )
    p.add_argument("--max-batch-size", default="128", help="largest batch recommended (128)")
    p.add_argument("--query-max-len", default=str(_TRAIN.query_max_len), help="as train's")
    p.add_argument("--passage-max-len", default=str(_TRAIN.passage_max_len), help="as train's")
    p.add_argument(
        "--precision", choices=("auto", "fp32", "bf16"), default="auto",
        help="auto: bf16 where the device has it natively and it measures faster (auto)",
    )  # fmt: skip
    p.add_argument("--time-limit", default="150", help="seconds the measured grid may take (150)")
    p.add_argument("--write-config", help="write the recommended options as YAML for --config")
    p.add_argument("--json", help="write the plan (measurements, fit, reasons) as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measure, print the table and the recommendation."""
    from embtune.api.options import output_file, save_json
    from embtune.api.planning import plan

    json_file = output_file(args.json, "--json") if args.json else None

    result = plan(
        args.model, args.train_data, memory_budget=args.memory_budget, headroom=args.headroom,
        device=args.device, train_group_size=args.train_group_size, batch_size=args.batch_size,
        max_batch_size=args.max_batch_size, query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len, precision=args.precision,
        time_limit=args.time_limit, write_config=args.write_config,
    )  # fmt: skip
    print(result.text)
    if json_file is not None:
        save_json(json_file, result.to_json(), "the plan", "--json")
        print(f"wrote {json_file}")
    return 0
