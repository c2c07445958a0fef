"""Retrieve-then-rerank evaluation: a retriever's top-k per query, scored again by a reranker.

A run is ``{query id: {doc id: score}}`` as in eval/retrieval.py. :func:`first_stage_run` is
the bi-encoder's top-k; :func:`rerank_run` replaces each candidate's score by the reranker's
score of the (query, passage) pair, so the reranked order is the reranker's and documents the
retriever did not return stay unretrieved (they score 0 in every metric, as in
sentence-transformers' CrossEncoderRerankingEvaluator and BEIR's reranking). Metrics are then
:func:`~embtune.eval.retrieval.retrieval_metrics` of either run, so first-stage and reranked
figures are comparable line by line.

The scorer is anything with ``score_pairs(queries, passages) -> list[float]``: a
:class:`~embtune.scoring.teachers.CrossEncoderTeacher` (a saved reranker, loaded by
:func:`load_reranker`, or the model being trained during dev evaluation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.errors import UsageError
from embtune.eval.retrieval import (
    check_k_values,
    metric_label,
    rank_documents,
    retrieval_metrics,
    retrieve_split,
)
from embtune.models.cross_encoder import is_reranker_config
from embtune.scoring.pairs import PairCounts, score_all
from embtune.scoring.teachers import (
    CrossEncoderTeacher,
    PairScorer,
    TeacherSettings,
    check_pair_length,
    teacher_config,
    with_saved_reranker_settings,
)

if TYPE_CHECKING:
    import torch

    from embtune.data.formats import BeirDataset
    from embtune.models.encoder import Encoder
    from embtune.scoring.cache import ScoreCache

Run = dict[str, dict[str, float]]


def load_reranker(
    name: str,
    max_length: int | None = None,
    precision: str = "fp32",
    query_instruction: str | None = None,
    passage_instruction: str | None = None,
    device: torch.device | None = None,
) -> CrossEncoderTeacher:
    """A saved reranker as the pair scorer of ``embtune eval --reranker``, on ``device`` (None:
    cuda when there is one).

    A reranker embtune saved gives the pair length (``max_len``) and the instructions of its
    embtune_reranker.json; another tool's (a bge-reranker, a sentence-transformers
    CrossEncoder) gets 512 tokens and no instructions, FlagReranker's defaults; the arguments
    given override either. Pairs are cut as FlagReranker cuts them when scoring (the query at
    most 3/4 of the pair). A model that is not a one-label sequence classifier is refused
    before its weights load: transformers would add a random head and score noise.
    """
    config = teacher_config(name, option="--reranker")
    if not is_reranker_config(config):
        shown = ", ".join(getattr(config, "architectures", None) or []) or "none recorded"
        raise UsageError(
            f"--reranker: {name} is not a reranker (a sequence classifier with one label): "
            f"its config.json has architectures {shown} and num_labels {config.num_labels}"
        )
    given = TeacherSettings(
        max_length=max_length,
        query_instruction=query_instruction,
        passage_instruction=passage_instruction,
        precision=precision,
    )
    settings = with_saved_reranker_settings(name, given)
    check_pair_length(config, settings, "--rerank-max-length")
    return CrossEncoderTeacher.from_pretrained(name, settings, "--reranker", device)


def first_stage_run(
    encoder: Encoder,
    data: BeirDataset,
    top_k: int,
    batch_size: int = 64,
    show_progress: bool = True,
    cache_dir: str | Path | None = None,
    use_faiss: bool = False,
) -> Run:
    """The retriever's top ``top_k`` documents of every judged query (BEIR's rule: a document
    whose id is the query's is dropped)."""
    return retrieve_split(
        encoder, data, top_k, batch_size, show_progress, cache_dir=cache_dir, use_faiss=use_faiss
    )


def top_candidates(run: Mapping[str, Mapping[str, float]], top_k: int) -> dict[str, list[str]]:
    """Each query's ``top_k`` documents of ``run``, best first, ranked as the metrics rank them
    (ties by doc id, descending: trec_eval's order), so the candidates cut at ``top_k`` are the
    documents the first-stage metrics count."""
    return {qid: rank_documents(docs)[:top_k] for qid, docs in run.items()}


def rerank_run(
    scorer: PairScorer,
    data: BeirDataset,
    candidates: Mapping[str, Sequence[str]],
    batch_size: int = 32,
    show_progress: bool = True,
    cache: ScoreCache | None = None,
) -> tuple[Run, PairCounts]:
    """Every candidate of every query scored by ``scorer``: the reranked run, and how its
    scores were found.

    Pairs go through :func:`~embtune.scoring.pairs.score_all`: each distinct (query, passage)
    text pair once, those in ``cache`` looked up, the rest in batches of similar length
    (longest first, so little padding is computed and a batch too large for memory fails at
    once), each batch stored in ``cache`` before the next.
    """
    pairs = [(qid, pid) for qid, pids in candidates.items() for pid in pids]
    texts = [(data.queries[qid], data.corpus[pid]) for qid, pid in pairs]
    scores, counts = score_all(scorer, texts, cache, batch_size, show_progress)
    run: Run = {qid: {} for qid in candidates}
    for (qid, pid), score in zip(pairs, scores, strict=True):
        run[qid][pid] = float(score)
    return run, counts


def evaluate_reranking(
    scorer: PairScorer,
    data: BeirDataset,
    candidates: Mapping[str, Sequence[str]],
    k_values: Sequence[int] = (10, 100),
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict[str, float]:
    """Retrieval metrics of the reranked ``candidates`` ({"ndcg@10": ...})."""
    ks = check_k_values(k_values)
    run, _ = rerank_run(scorer, data, candidates, batch_size, show_progress)
    return retrieval_metrics(run, data.qrels, ks)


def format_comparison(first_stage: Mapping[str, float], reranked: Mapping[str, float]) -> str:
    """A plain-text table for the screen: one row per metric and cut-off, with the first
    stage's value, the reranked one and the change."""
    labels = {key: metric_label(key) for key in first_stage}
    width = max([len(label) for label in labels.values()] + [len("metric")]) + 2
    lines = [f"{'metric':<{width}}{'first stage':>12}{'reranked':>10}{'change':>10}"]
    for key, label in labels.items():
        before, after = first_stage[key], reranked[key]
        lines.append(f"{label:<{width}}{before:>12.4f}{after:>10.4f}{after - before:>+10.4f}")
    return "\n".join(lines)
