"""`embtune eval`: retrieval metrics of a model on one split of a BEIR folder; with
--reranker, the first stage's metrics and the reranked ones side by side."""

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

With --reranker, each query's top --rerank-top-k documents are scored again by a reranker (a
one-label cross-encoder: a reranker embtune saved, a bge-reranker, a sentence-transformers
CrossEncoder) and both rankings are reported side by side: metric | first stage | reranked |
change; --json writes both ("first_stage", "reranked"). With --candidates FILE instead of
--model, the lists of a TREC run or a jsonl file are reranked and compared with their own
order. Documents below the candidates stay unretrieved, so a reranked metric at a --k above
--rerank-top-k counts only the candidates.

For other tools, --trec-run writes the ranking as a TREC run (trec_eval and pytrec_eval read
it back to the same metrics) and --mteb-json the metrics as an MTEB result file.

examples:
  embtune eval --model BAAI/bge-small-en-v1.5 --data data/scifact --split test \\
      --json results/scifact.json --cache-dir .cache/embeddings
  embtune eval --model runs/mrl --data data/scifact --dims 384 128 64
  embtune eval --model BAAI/bge-small-en-v1.5 --data data/scifact --k 1 10 100 \\
      --trec-run results/bge-small.trec --mteb-json results/SciFact.json \\
      --mteb-languages eng-Latn
  embtune eval --model BAAI/bge-small-en-v1.5 --data data/scifact \\
      --reranker BAAI/bge-reranker-base --rerank-top-k 100 --json results/rerank.json
  embtune eval --reranker runs/reranker --candidates runs/bm25.trec --data data/scifact \\
      --cache-dir .cache/embtune
"""

# The options `embtune eval` passes to embtune.api.evaluate and evaluate_reranking alike,
# under their own names.
SHARED_OPTIONS = (
    "k",
    "batch_size",
    "json",
    "cache_dir",
    "faiss",
    "query_max_len",
    "passage_max_len",
    "pooling",
    "normalize",
    "query_instruction",
    "passage_instruction",
    "limit_queries",
    "device",
    "bf16",
    "skip_bad_rows",
    "trec_run",
    "trec_run_tag",
    "mteb_json",
    "mteb_task_name",
    "mteb_dataset_revision",
    "mteb_languages",
)
# The reranking options; any of them given means a reranking evaluation (None: not given).
RERANK_OPTIONS = (
    "candidates",
    "rerank_top_k",
    "rerank_batch_size",
    "rerank_max_length",
    "query_instruction_for_rerank",
    "passage_instruction_for_rerank",
)


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
        metavar="M",
        help="model folder or Hugging Face hub name: the retriever (required, unless "
        "--candidates gives the lists for --reranker)",
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
    _add_result_file_options(p)
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="reuse corpus embeddings cached here, keyed by model weights, settings and "
        "corpus text; written after encoding; with --reranker also its pair scores (keyed "
        "by its weights, settings and the texts), so pairs already scored are not scored "
        "again (default: no cache)",
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
    _add_reranker_options(p)
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
        help="torch device to encode (and rerank) on, e.g. cpu, cuda, cuda:1 (default: cuda "
        "when available, else cpu)",
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
        help="encode (and rerank) in bfloat16 (autocast): about 2x faster on CPUs with AVX-512 "
        "BF16 and on GPUs, embeddings within ~1e-2 of fp32 (default: fp32, equal to "
        "sentence-transformers')",
    )
    p.add_argument(
        "--allow-settings-mismatch",
        action="store_true",
        help="evaluate even when the options embed --model otherwise than its own "
        "sentence-transformers configuration (pooling, normalization, EOS, a shipped "
        "instruction); by default that is refused (embtune check-model shows the comparison)",
    )
    p.set_defaults(func=run)


def _add_result_file_options(p: argparse.ArgumentParser) -> None:
    """The ranking as a TREC run and the metrics as an MTEB result, for other tools."""
    p.add_argument(
        "--trec-run",
        metavar="FILE",
        help="also write the ranking to this file as a TREC run, trec_eval's and "
        "pytrec_eval's input: 'qid Q0 docid rank score tag' lines, each judged query's top "
        "max(--k) documents (the ones the metrics count), rank from 1; with --reranker the "
        "reranked candidates and their reranker scores (default: none)",
    )
    p.add_argument(
        "--trec-run-tag",
        metavar="NAME",
        help="the run's name, the last column of --trec-run; one word (default: embtune)",
    )
    p.add_argument(
        "--mteb-json",
        metavar="FILE",
        help="also write the metrics to this file as an MTEB result (its TaskResult JSON: "
        "scores.<split>[0] holds ndcg_at_10, mrr_at_10, recall_at_100, map_at_100, ... for "
        "every metric and --k, main_score = ndcg_at_10, so --k must include 10; with "
        "--reranker the reranked metrics); mteb_version, kg_co2_emissions and, unless given "
        "below, dataset_revision are null and languages [] (default: none)",
    )
    p.add_argument(
        "--mteb-task-name",
        metavar="NAME",
        help="task_name of --mteb-json (default: from --data's folder name: MTEB's name of a "
        "BEIR data set, scifact -> SciFact, fiqa -> FiQA2018, else the folder's own name)",
    )
    p.add_argument(
        "--mteb-dataset-revision",
        metavar="REV",
        help="dataset_revision of --mteb-json: the Hugging Face dataset revision --data was "
        "made from, when known; MTEB's result loader needs one (default: null)",
    )
    p.add_argument(
        "--mteb-languages",
        nargs="+",
        metavar="LANG",
        help="languages of --mteb-json's scores as MTEB writes them, e.g. eng-Latn; MTEB's "
        "score aggregations count only results with languages (default: none, [])",
    )


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


def _add_reranker_options(p: argparse.ArgumentParser) -> None:
    """The options of retrieve-then-rerank evaluation."""
    p.add_argument(
        "--reranker",
        metavar="R",
        help="rerank each query's top candidates with this one-label cross-encoder (folder or "
        "hub name): a reranker embtune saved (its pair length and instructions are used), a "
        "bge-reranker, a sentence-transformers CrossEncoder; prints the first stage's metrics "
        "and the reranked ones side by side (default: no reranking)",
    )
    p.add_argument(
        "--candidates",
        metavar="FILE",
        help="with --reranker, rerank the lists of this file instead of retrieving with "
        "--model: a TREC run ('qid Q0 docid rank score tag' lines, ranked by score as "
        'trec_eval ranks them) or jsonl ({"query_id": ..., "doc_ids": [...]} lines, best '
        "first); judged queries without a list score 0 (default: retrieve with --model)",
    )
    p.add_argument(
        "--rerank-top-k",
        type=int,
        metavar="N",
        help="candidates reranked per query; a reranked metric at a --k above N counts only "
        "these N, the documents below them are unretrieved (default: 100)",
    )
    p.add_argument(
        "--rerank-batch-size",
        type=int,
        metavar="N",
        help="(query, passage) pairs per forward pass of the reranker (default: 32)",
    )
    p.add_argument(
        "--rerank-max-length",
        type=int,
        metavar="N",
        help="tokens of a (query, passage) pair for the reranker, the query at most 3/4 of "
        "them (default: the reranker's saved setting, else 512)",
    )
    p.add_argument(
        "--query-instruction-for-rerank",
        metavar="TEXT",
        help="text put before every query the reranker reads (default: the reranker's saved "
        "setting, else none)",
    )
    p.add_argument(
        "--passage-instruction-for-rerank",
        metavar="TEXT",
        help="text put before every passage the reranker reads (default: the reranker's saved "
        "setting, else none)",
    )


def _shared(args: argparse.Namespace) -> dict[str, object]:
    """The values of SHARED_OPTIONS, by name."""
    return {name: getattr(args, name) for name in SHARED_OPTIONS}


def run(args: argparse.Namespace) -> int:
    """Evaluate (embtune.api.evaluate checks the options), print the table; with --reranker
    (or another reranking option), the reranking evaluation."""
    from embtune import api
    from embtune.errors import UsageError

    if args.reranker is not None or any(getattr(args, o) is not None for o in RERANK_OPTIONS):
        return _run_reranking(args)
    if args.model is None:
        # argparse's words, from when --model was required outright.
        raise UsageError("the following arguments are required: --model")
    metrics = api.evaluate(
        args.model,
        args.data,
        args.split,
        **_shared(args),
        dims=args.dims,
        allow_settings_mismatch=args.allow_settings_mismatch,
        show_progress=sys.stderr.isatty(),
    )
    print(metrics.summary())
    print(metrics.table())
    if metrics.rejected is not None:
        print(f"embtune eval: {_rejected_note(metrics)}")
    return 0


def _run_reranking(args: argparse.Namespace) -> int:
    """Rerank (embtune.api.evaluate_reranking checks the options), print the two columns."""
    from embtune import api
    from embtune.errors import UsageError

    if args.reranker is None:
        given = next(o for o in RERANK_OPTIONS if getattr(args, o) is not None)
        raise UsageError(f"--{given.replace('_', '-')}: only with --reranker")
    if args.dims:
        raise UsageError(
            "--dims: not with --reranker (the reranker scores texts, not embeddings); evaluate "
            "the dimensions without it"
        )
    result = api.evaluate_reranking(
        args.reranker,
        args.data,
        args.split,
        model=args.model,
        **{option: getattr(args, option) for option in RERANK_OPTIONS},
        **_shared(args),
        show_progress=sys.stderr.isatty(),
    )
    print(result.summary())
    print(result.table())
    for note in result.notes():
        print(f"note: {note}")
    if result.first_stage.rejected is not None:
        print(f"embtune eval: {_rejected_note(result.first_stage)}")
    return 0


def _rejected_note(metrics: Metrics) -> str:
    """How many rows --skip-bad-rows left out, and where they are listed."""
    left_out = f"{metrics.rejected_rows} bad rows of --data left out (--skip-bad-rows)"
    if metrics.rejected_report is not None:
        return f"{left_out}, listed in {metrics.rejected_report}"
    if not metrics.rejected:
        return left_out
    return f"{left_out}, the first: {metrics.rejected[0]}; add --json FILE to list them all"
