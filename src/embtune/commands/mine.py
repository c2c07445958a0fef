"""`embtune mine`: hard negatives for a BEIR split or a FlagEmbedding jsonl file."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.choices import POOLING_MODES

if TYPE_CHECKING:  # the real import pulls in torch, which `embtune --help` must not wait for
    from embtune.mining.negatives import MiningReport

DESCRIPTION = """\
Retrieve with an embedding model and write each query's hard negatives as FlagEmbedding jsonl
(query, pos, neg, plus query_id/pos_ids/neg_ids, model pos_scores/neg_scores and neg_ranks).

For each query the pool is ranked by exact search; documents at ranks START..END (1-based,
both included, counted with the positives still in the list) are candidates; positives (by id
and by text), the query's own text and repeated texts are dropped; the optional margin drops
likely false negatives; NEGATIVES of the rest are sampled (seeded). Rows with fewer candidates
keep what there is, and the report counts them.

--data is a BEIR folder (queries of --split with relevance > 0 documents as positives, pool =
corpus.jsonl) or FlagEmbedding jsonl (pool = --candidates, else every pos/neg text in it).
FlagEmbedding's hn_mine `--range_for_sampling 10-210` corresponds to `--range 11:210`.

example:
  embtune mine --model sentence-transformers/all-MiniLM-L6-v2 --data data/scifact \\
      --split train --range 10:100 --negatives 15 --relative-margin 0.05 -o scifact-hn.jsonl
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `mine` sub-command."""
    from embtune.commands import HelpFormatter

    p = subparsers.add_parser(
        "mine",
        help="mine hard negatives with an embedding model",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="model folder or hub name used to retrieve")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="BEIR folder, or FlagEmbedding jsonl file (or folder of .json/.jsonl files)",
    )
    p.add_argument("--split", default="train", help="BEIR qrels split to mine for (default: train)")
    p.add_argument(
        "-o", "--output", required=True, type=Path, help="output jsonl file (written atomically)"
    )
    p.add_argument(
        "--range",
        default="10:100",
        metavar="START:END",
        help="1-based ranks to sample negatives from, both included (default: 10:100)",
    )
    p.add_argument(
        "--negatives", default="15", metavar="N", help="negatives per query (default: 15)"
    )
    p.add_argument(
        "--margin",
        default=None,
        metavar="M",
        help="drop candidates scoring above (lowest positive score - M) (default: off)",
    )
    p.add_argument(
        "--relative-margin",
        default=None,
        metavar="R",
        help="drop candidates scoring above (1 - R) x lowest positive score, R in [0, 1) "
        "(default: off; at most one of --margin/--relative-margin)",
    )
    p.add_argument("--seed", default="0", help="seed of the negative sampling (default: 0)")
    p.add_argument(
        "--batch-size", default="64", metavar="N", help="texts per encoding batch (default: 64)"
    )
    p.add_argument(
        "--query-max-len",
        default=None,
        metavar="N",
        help="query token limit (default: the model's saved setting, else 64)",
    )
    p.add_argument(
        "--passage-max-len",
        default=None,
        metavar="N",
        help="passage token limit (default: the model's saved setting, else 256)",
    )
    p.add_argument(
        "--query-instruction",
        default=None,
        metavar="TEXT",
        help="text put before every query (default: the model's saved 'query' prompt, else none)",
    )
    p.add_argument(
        "--passage-instruction",
        default=None,
        metavar="TEXT",
        help="text put before every passage (default: the model's saved prompt, else none)",
    )
    p.add_argument(
        "--pooling",
        default=None,
        choices=POOLING_MODES,
        help="pooling (default: the model's sentence-transformers config, else cls)",
    )
    p.add_argument(
        "--candidates",
        default=None,
        metavar="FILE",
        type=Path,
        help="jsonl pool for jsonl --data, one {'text': ...} (or {'content': ...}) per line "
        "(default: every pos/neg text of --data)",
    )
    p.add_argument(
        "--limit", default=None, metavar="N", help="mine only the first N queries (default: all)"
    )
    p.add_argument(
        "--no-scores",
        action="store_true",
        help="leave out pos_scores/neg_scores, e.g. when a trainer would read them as "
        "distillation targets (default: written)",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="encode in bfloat16 (autocast): about 2x faster on CPUs with AVX-512 BF16 and on "
        "GPUs, embeddings within ~1e-2 of fp32 (default: fp32, equal to sentence-transformers')",
    )
    p.set_defaults(func=run)


def _bad(option: str, message: str) -> Exception:
    from embtune.errors import UsageError

    return UsageError(f"{option}: {message}")


def _int(value: str, option: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise _bad(option, f"expected a whole number, got {value!r}") from None
    if number < minimum:
        raise _bad(option, f"must be at least {minimum}, got {number}")
    return number


def _optional_int(value: str | None, option: str, minimum: int) -> int | None:
    return None if value is None else _int(value, option, minimum)


def _optional_float(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise _bad(option, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _bad(option, f"expected a finite number, got {value!r}")
    return number


def run(args: argparse.Namespace) -> int:
    """Check every option, read the input, mine, write the file atomically, print the report."""
    import time

    from embtune.errors import UsageError
    from embtune.mining.negatives import check_margins, parse_range

    # Every option is checked before the model loads, so a typo costs no waiting.
    rank_range = parse_range(args.range)
    negatives = _int(args.negatives, "--negatives", 1)
    margin = _optional_float(args.margin, "--margin")
    relative_margin = _optional_float(args.relative_margin, "--relative-margin")
    check_margins(margin, relative_margin)
    seed = _int(args.seed, "--seed", 0)
    batch_size = _int(args.batch_size, "--batch-size", 1)
    query_max_len = _optional_int(args.query_max_len, "--query-max-len", 1)
    passage_max_len = _optional_int(args.passage_max_len, "--passage-max-len", 1)
    limit = _optional_int(args.limit, "--limit", 1)
    output: Path = args.output
    if output.is_dir():
        raise UsageError(f"--output: {output} is a folder; give a file name")
    if not output.parent.is_dir():
        raise UsageError(f"--output: folder {output.parent} does not exist")
    if args.candidates is not None and not args.candidates.is_file():
        raise UsageError(f"--candidates: file {args.candidates} does not exist")

    import torch

    from embtune.mining.negatives import load_mining_input, mine_negatives, write_mined_jsonl
    from embtune.models.encoder import Encoder

    started = time.perf_counter()
    data = load_mining_input(args.data, args.split, args.candidates, limit)
    encoder = Encoder.from_pretrained(
        args.model,
        pooling=args.pooling,
        query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        encode_precision="bf16" if args.bf16 else "fp32",
    )
    if torch.cuda.is_available():
        encoder.to("cuda")
    print(
        f"mining {len(data.queries)} queries against {len(data.corpus_texts)} passages "
        f"from {data.source}"
    )
    result = mine_negatives(
        encoder,
        data.queries,
        data.positives,
        data.corpus_texts,
        data.corpus_ids,
        query_ids=data.query_ids,
        positive_ids=data.positive_ids,
        prompts=data.prompts,
        rank_range=rank_range,
        negatives=negatives,
        margin=margin,
        relative_margin=relative_margin,
        seed=seed,
        batch_size=batch_size,
        show_progress=True,
    )
    write_mined_jsonl(result.rows, output, include_scores=not args.no_scores)
    elapsed = time.perf_counter() - started
    for note in data.notes:
        print(f"note: {note}")
    if data.skipped_queries:
        print(f"note: {data.skipped_queries} queries of the split have no relevant document")
    print(format_report(result.report, output, elapsed))
    return 0


def format_report(report: MiningReport, output: Path, elapsed: float) -> str:
    """The mining report as a small aligned table."""
    start, end = report.rank_range
    if report.margin is not None:
        guard = f"margin {report.margin:g}"
    elif report.relative_margin is not None:
        guard = f"relative margin {report.relative_margin:g}"
    else:
        guard = "off"
    lines = [
        ("queries", f"{report.queries:,}"),
        (f"candidates considered (ranks {start}-{end})", f"{report.candidates_considered:,}"),
        ("  removed as positives", f"{report.removed_as_positive:,}"),
        ("  removed as the query's own text", f"{report.removed_same_as_query:,}"),
        ("  removed as repeated text", f"{report.removed_duplicate_text:,}"),
        (f"  removed by margin ({guard})", f"{report.removed_by_margin:,}"),
        ("  left for sampling", f"{report.kept:,}"),
        ("negatives written", f"{report.negatives_written:,}"),
        (
            f"rows with fewer than {report.negatives_wanted} negatives",
            f"{report.rows_short:,} ({report.rows_empty:,} with none)",
        ),
        ("positives outside the search's top-k", f"{report.positives_outside_search:,}"),
        ("output", str(output)),
        ("time", f"{elapsed:.1f} s"),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)
