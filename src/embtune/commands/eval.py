"""`embtune eval`: retrieval metrics of a model on one split of a BEIR folder."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from embtune.choices import POOLING_MODES

if TYPE_CHECKING:
    from embtune.api import Metrics

DESCRIPTION = """\
Embed every judged query of a split and the whole corpus, retrieve by inner product
(cosine for normalized models), and report nDCG, MRR, Recall and MAP at each --k, computed
exactly as trec_eval / pytrec_eval (and so BEIR and MTEB) compute them.

The model's saved settings (embtune_encoder.json, else its sentence-transformers config) are
used; the options below override them for this run only.

With --dims, the embeddings are computed once and evaluated at each leading size
(Matryoshka): cut to their first DIM components and re-normalized, as
SentenceTransformer(model, truncate_dim=DIM) with cosine similarity scores them.

examples:
  embtune eval --model BAAI/bge-small-en-v1.5 --data data/scifact --split test \\
      --json results/scifact.json --cache-dir .cache/embeddings
  embtune eval --model runs/mrl --data data/scifact --dims 384 128 64
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` sub-command."""
    from embtune.commands import HelpFormatter

    p = subparsers.add_parser(
        "eval",
        help="evaluate retrieval (nDCG, MRR, Recall, MAP) on a BEIR folder",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="model folder or Hugging Face hub name (required)",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/<split>.tsv (required)",
    )
    p.add_argument(
        "--split",
        default="test",
        help="which qrels/<split>.tsv to evaluate (default: test)",
    )
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[10, 100],
        metavar="K",
        help="cut-offs; every metric is reported at each (default: 10 100)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="N",
        help="texts per forward pass when encoding (default: 64)",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="also write the metrics, with model, data, split, counts and seconds, to this "
        "JSON file (default: none)",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="reuse corpus embeddings cached here, keyed by model weights, settings and "
        "corpus text; written after encoding (default: no cache)",
    )
    p.add_argument(
        "--faiss",
        action="store_true",
        help="search with a faiss IndexFlatIP (exact, faster on large corpora; needs "
        "`pip install faiss-cpu`) instead of chunked torch search (default: off)",
    )
    p.add_argument(
        "--dims",
        type=int,
        nargs="+",
        metavar="DIM",
        help="evaluate at each of these embedding sizes (Matryoshka): encoded once, each "
        "truncated to its first DIM components and re-normalized; one table row and one JSON "
        'block (under "dims") per dimension (default: the full size only)',
    )
    _add_encoder_options(p)
    p.add_argument(
        "--limit-queries",
        type=int,
        metavar="N",
        help="evaluate only the first N judged queries, for a quick check; the whole corpus "
        "is still searched (default: all)",
    )
    p.add_argument(
        "--device",
        metavar="DEV",
        help="torch device to encode on, e.g. cpu, cuda, cuda:1 (default: cuda when "
        "available, else cpu)",
    )
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="rows of --data that fail validation (and the judgements that need them) are "
        "left out, counted, and listed next to the --json file in JSON_STEM.rejected_rows.jsonl "
        "instead of refusing the whole input (default: off)",
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
        type=int,
        metavar="N",
        help="truncate queries to N tokens (default: the model's saved setting, else 64)",
    )
    p.add_argument(
        "--passage-max-len",
        type=int,
        metavar="N",
        help="truncate passages to N tokens (default: the model's saved setting, else 256)",
    )
    p.add_argument(
        "--pooling",
        choices=POOLING_MODES,
        help="how token vectors become one vector: cls, mean or last_token (default: the "
        "model's saved setting, else cls)",
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalize embeddings, so scores are cosine similarities (default: the "
        "model's saved setting, else on)",
    )
    p.add_argument(
        "--query-instruction",
        metavar="TEXT",
        help="text put before every query (default: the model's saved setting, else none)",
    )
    p.add_argument(
        "--passage-instruction",
        metavar="TEXT",
        help="text put before every passage (default: the model's saved setting, else none)",
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate (embtune.api.evaluate checks the options), print the table."""
    from embtune import api

    metrics = api.evaluate(
        args.model,
        args.data,
        args.split,
        k=args.k,
        batch_size=args.batch_size,
        json=args.json,
        cache_dir=args.cache_dir,
        faiss=args.faiss,
        query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len,
        pooling=args.pooling,
        normalize=args.normalize,
        query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction,
        limit_queries=args.limit_queries,
        device=args.device,
        bf16=args.bf16,
        skip_bad_rows=args.skip_bad_rows,
        dims=args.dims,
        show_progress=sys.stderr.isatty(),
    )
    print(metrics.summary())
    print(metrics.table())
    if metrics.rejected is not None:
        print(f"embtune eval: {_rejected_note(metrics)}")
    return 0


def _rejected_note(metrics: Metrics) -> str:
    """How many rows --skip-bad-rows left out, and where they are listed."""
    left_out = f"{metrics.rejected_rows} bad rows of --data left out (--skip-bad-rows)"
    if metrics.rejected_report is not None:
        return f"{left_out}, listed in {metrics.rejected_report}"
    if not metrics.rejected:
        return left_out
    return f"{left_out}, the first: {metrics.rejected[0]}; add --json FILE to list them all"
