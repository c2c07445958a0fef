"""`embtune score`: teacher scores (pos_scores / neg_scores) for distillation."""

from __future__ import annotations

import argparse

from embtune.choices import TEACHER_KINDS

DESCRIPTION = """\
Score every (query, passage) pair of FlagEmbedding jsonl rows with a teacher model and write
the rows with pos_scores / neg_scores added, aligned with pos / neg: the distillation targets
FlagEmbedding and `embtune train --knowledge-distillation` read. Every other field of a row
(prompt, ids, ...) is kept, in order; scores already in the rows are replaced.

Teachers: a cross-encoder (a one-label sequence classifier such as bge-reranker; the score is
its raw logit, as FlagEmbedding's add_reranker_score writes) or a bi-encoder (an embedding
model; the score is the cosine of the two embeddings, in [-1, 1]: distill with
--teacher-temperature near the student's --temperature, e.g. 0.05).

Each distinct pair is scored once and committed to a cache (SQLite in --cache-dir, keyed by
the teacher's weights and settings and the two texts) after every batch: a killed run
continues where it stopped, and a rerun scores nothing.

examples:
  embtune score --teacher BAAI/bge-reranker-base --train-data train.jsonl -o scored.jsonl
  embtune score --teacher BAAI/bge-base-en-v1.5 --teacher-kind bi-encoder \\
      --query-instruction "Represent this sentence for searching relevant passages: " \\
      --train-data train.jsonl -o scored.jsonl
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `score` sub-command."""
    from embtune.commands import HelpFormatter

    p = subparsers.add_parser(
        "score",
        help="add a teacher's pos_scores / neg_scores to training rows (distillation)",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--teacher", required=True, help="teacher model folder or hub name")
    p.add_argument(
        "--train-data",
        required=True,
        nargs="+",
        metavar="IN",
        help="FlagEmbedding jsonl file(s), or folders of .json/.jsonl files; the rows of all "
        "of them are written, in order, to --output",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output jsonl file (written atomically; an existing one needs --overwrite)",
    )
    p.add_argument(
        "--teacher-kind",
        default="auto",
        choices=TEACHER_KINDS,
        help="cross-encoder (score = raw logit), bi-encoder (score = cosine), or auto: from "
        "the model's config.json and sentence-transformers files (default: auto)",
    )
    p.add_argument(
        "--batch-size", default="64", metavar="N", help="pairs per forward pass (default: 64)"
    )
    _add_teacher_options(p)
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="folder of the score cache, scores-<teacher key>.sqlite (default: $EMBTUNE_CACHE "
        "or ~/.cache/embtune)",
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
        help="rows of --train-data that fail validation are left out, counted, and listed next "
        "to the output in OUTPUT_STEM.rejected_rows.jsonl (scored.jsonl -> "
        "scored.rejected_rows.jsonl) instead of refusing the whole input (default: off)",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="score in bfloat16 (autocast): about 2x faster on CPUs with AVX-512 BF16 and on "
        "GPUs, scores within ~1e-2 of fp32 and cached apart from them (default: fp32)",
    )
    p.set_defaults(func=run)


def _add_teacher_options(p: argparse.ArgumentParser) -> None:
    """Token limits and instructions: the cross-encoder's, then the bi-encoder's."""
    p.add_argument(
        "--max-length",
        default=None,
        metavar="N",
        help="cross-encoder: tokens of a (query, passage) pair; the query takes at most 3/4, "
        "as in FlagEmbedding's reranker (default: 512)",
    )
    p.add_argument(
        "--query-max-len",
        default=None,
        metavar="N",
        help="bi-encoder: query token limit (default: the model's saved setting, else 64)",
    )
    p.add_argument(
        "--passage-max-len",
        default=None,
        metavar="N",
        help="bi-encoder: passage token limit (default: the model's saved setting, else 256)",
    )
    p.add_argument(
        "--query-instruction",
        default=None,
        metavar="TEXT",
        help="text put before every query (default: none for a cross-encoder, as "
        "FlagEmbedding's query_instruction_for_rerank; a bi-encoder's saved 'query' prompt)",
    )
    p.add_argument(
        "--passage-instruction",
        default=None,
        metavar="TEXT",
        help="text put before every passage (default: none for a cross-encoder; a "
        "bi-encoder's saved prompt)",
    )


def run(args: argparse.Namespace) -> int:
    """Score (embtune.api.score checks every option before the teacher loads), print the report."""
    from embtune import api

    result = api.score(
        args.teacher,
        args.train_data,
        args.output,
        teacher_kind=args.teacher_kind,
        batch_size=args.batch_size,
        max_length=args.max_length,
        query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len,
        query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction,
        cache_dir=args.cache_dir,
        overwrite=args.overwrite,
        skip_bad_rows=args.skip_bad_rows,
        bf16=args.bf16,
    )
    print(result.text)
    return 0
