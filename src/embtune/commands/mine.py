"""`embtune mine`: hard negatives for a BEIR split or a FlagEmbedding jsonl file."""

from __future__ import annotations

import argparse
from pathlib import Path

from embtune.choices import POOLING_MODES

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
        "-o",
        "--output",
        required=True,
        type=Path,
        help="output jsonl file (written atomically; an existing one needs --overwrite)",
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
    _add_encoder_options(p)
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
        "--overwrite",
        action="store_true",
        help="replace the --output file if it exists (default: refuse; never allowed when it is "
        "one of the input files)",
    )
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="rows of --data that fail validation are left out, counted, and listed next to "
        "the output in OUTPUT_STEM.rejected_rows.jsonl (mined.jsonl -> "
        "mined.rejected_rows.jsonl) instead of refusing the whole input (default: off)",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="encode in bfloat16 (autocast): about 2x faster on CPUs with AVX-512 BF16 and on "
        "GPUs, embeddings within ~1e-2 of fp32 (default: fp32, equal to sentence-transformers')",
    )
    p.set_defaults(func=run)


def _add_encoder_options(p: argparse.ArgumentParser) -> None:
    """The options that override the model's saved settings for this run."""
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


def run(args: argparse.Namespace) -> int:
    """Mine (embtune.api.mine checks every option before the model loads), print the report."""
    from embtune import api

    result = api.mine(
        args.model,
        args.data,
        args.output,
        split=args.split,
        range=args.range,
        negatives=args.negatives,
        margin=args.margin,
        relative_margin=args.relative_margin,
        seed=args.seed,
        batch_size=args.batch_size,
        query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len,
        query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction,
        pooling=args.pooling,
        candidates=args.candidates,
        limit=args.limit,
        no_scores=args.no_scores,
        overwrite=args.overwrite,
        skip_bad_rows=args.skip_bad_rows,
        bf16=args.bf16,
    )
    print(result.text)
    return 0
