"""The Python API: the jobs of the `embtune` command line, as functions::

    from embtune import api

    result = api.train(model="BAAI/bge-small-en-v1.5", train_data=["train.jsonl"],
                       output_dir="out", train_group_size=4, max_steps=100)
    metrics = api.evaluate(result.output_dir, "data/scifact", split="test")
    print(metrics["ndcg@10"])
    reranked = api.evaluate_reranking("BAAI/bge-reranker-base", "data/scifact",
                                      model=result.output_dir, rerank_top_k=100)
    print(reranked.table())  # first stage | reranked | change
    print(api.inspect("train.jsonl", train_group_size=16).text)
    api.score("BAAI/bge-reranker-base", "train.jsonl", "scored.jsonl")  # teacher scores
    api.merge(result.output_dir, "merged", base="BAAI/bge-small-en-v1.5", alpha=0.5)

Each function takes the options of its command under the same names (``--train-group-size`` is
``train_group_size``) with the same defaults, checks them the same way, and raises
:class:`embtune.errors.UsageError` with the one-line message the command prints (exit 2).
Numbers may also be given as text, as the command line passes them: they are checked alike.
The commands (``embtune/commands/``) only parse arguments, call these functions and print, so
the command line and Python cannot drift apart.

Importing this module is light (no torch, no transformers): they load when a function runs,
which keeps `embtune --help` instant.
"""

from embtune.api.evaluation import Metrics, evaluate
from embtune.api.inspection import InspectResult, format_inspect_report, inspect
from embtune.api.merging import MergeResult, format_merge_report, merge
from embtune.api.mining import MineResult, format_mining_report, mine
from embtune.api.options import PathLike
from embtune.api.planning import PlanResult, plan
from embtune.api.reranking import Reranking, RerankMetrics, evaluate_reranking
from embtune.api.scoring import ScoreResult, format_score_report, score
from embtune.api.training import train

__all__ = [
    "InspectResult",
    "MergeResult",
    "Metrics",
    "MineResult",
    "PlanResult",
    "PathLike",
    "RerankMetrics",
    "Reranking",
    "ScoreResult",
    "evaluate",
    "evaluate_reranking",
    "format_inspect_report",
    "format_merge_report",
    "format_mining_report",
    "format_score_report",
    "inspect",
    "merge",
    "mine",
    "plan",
    "score",
    "train",
]
