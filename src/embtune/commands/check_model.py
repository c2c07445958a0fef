"""`embtune check-model`: does embtune embed a model as the model's own configuration does?"""

from __future__ import annotations

import argparse
from pathlib import Path

from embtune.choices import PADDING_SIDES, POOLING_MODES

DESCRIPTION = """\
Compare the settings embtune would embed MODEL with (its saved settings, or the options
below) against the model's own sentence-transformers configuration: pooling, normalization,
EOS at the end of every text, the query and passage instructions (prompts), the padding side,
and modules embtune does not run (a Dense layer, say). Where sentence-transformers is
installed, a few probe texts are embedded by both and the largest difference is reported.

Exit status: 0 when both embed alike, 2 when a setting differs (each one is listed) or the
embeddings differ by more than 1e-4. Adding an instruction where the model ships none, and
another padding side, are reported but do not fail the check. `embtune train` runs the same
settings comparison before it starts (and refuses unless --allow-settings-mismatch); a model
embtune saved passes it by construction.

examples:
  embtune check-model sentence-transformers/all-MiniLM-L6-v2
  embtune check-model Qwen/Qwen3-Embedding-0.6B --pooling last_token
  embtune check-model runs/qwen-lora --json parity.json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `check-model` sub-command."""
    from embtune.commands import HelpFormatter

    p = subparsers.add_parser(
        "check-model",
        help="compare embtune's embeddings of a model with its own configuration's",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="model folder or Hugging Face hub name")
    p.add_argument("--pooling", choices=POOLING_MODES, help="pooling to check (default: saved)")
    p.add_argument(
        "--normalize", action=argparse.BooleanOptionalAction, default=None,
        help="L2-normalize embeddings (default: the model's saved setting)",
    )  # fmt: skip
    p.add_argument("--query-instruction", default=None, help="text put before every query")
    p.add_argument("--passage-instruction", default=None, help="text put before every passage")
    p.add_argument(
        "--query-instruction-format", default="{}{}", metavar="FORMAT",
        help="how instruction and query are joined, FlagEmbedding's format (default: '{}{}')",
    )  # fmt: skip
    p.add_argument(
        "--append-eos-token", action=argparse.BooleanOptionalAction, default=None,
        help="end every text with EOS (default: what the model's tokenizer does)",
    )  # fmt: skip
    p.add_argument(
        "--padding-side", choices=PADDING_SIDES, default=None,
        help="pad on this side (default: the tokenizer's)",
    )  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the comparison; 0 when embtune embeds the model as its own configuration does."""
    from embtune.atomic import write_json_atomically
    from embtune.models.encoder import Encoder
    from embtune.models.instruction_format import check_format, instruction_prefix
    from embtune.models.parity import check_model

    check_format(args.query_instruction_format, "--query-instruction-format")
    encoder = Encoder.from_pretrained(
        args.model,
        pooling=args.pooling,
        normalize=args.normalize,
        query_instruction=instruction_prefix(args.query_instruction_format, args.query_instruction),
        passage_instruction=args.passage_instruction,
        append_eos_token=args.append_eos_token,
        padding_side=args.padding_side,
    )
    report = check_model(encoder, args.model)
    for line in report.lines():
        print(f"embtune check-model: {line}")
    verdict = "embeds as its own configuration does" if report.ok else "embeds differently"
    print(f"embtune check-model: {args.model} {verdict}")
    if args.json:
        write_json_atomically(Path(args.json), report.to_json())
    return 0 if report.ok else 2
