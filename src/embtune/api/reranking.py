"""embtune.api.evaluate_reranking: retrieve-then-rerank metrics, as `embtune eval --reranker`.

The first stage is a retriever ranking the whole corpus (``model``) or the lists of a
candidates file (``candidates``: a TREC run or jsonl, :mod:`embtune.eval.candidates`); the
reranker scores each judged query's top ``rerank_top_k`` (query, passage) pairs again. Both
rankings are scored by the same trec_eval-exact metrics at every ``k``, so the two columns
compare line by line. Documents below the candidates stay unretrieved: a reranked metric at a
cut-off above ``rerank_top_k`` counts only the candidates. A judged query the candidates file
has no list for scores 0 in both columns.

Example::

    from embtune import api

    result = api.evaluate_reranking(
        "BAAI/bge-reranker-base", "data/scifact", model="BAAI/bge-small-en-v1.5"
    )
    print(result.first_stage["ndcg@10"], result.reranked["ndcg@10"])
    print(result.table())
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.api.evaluation import (
    EncoderOverrides,
    Metrics,
    load_data,
    output_paths,
    save_evaluation,
    torch_device,
)
from embtune.api.options import (
    PathLike,
    int_option,
    optional_int,
    precision,
    refuse_input_as_output,
)
from embtune.api.result_files import ResultFiles
from embtune.errors import UsageError

if TYPE_CHECKING:  # the real imports pull in torch / transformers
    from embtune.api.result_files import Run
    from embtune.data.formats import BeirDataset
    from embtune.models.encoder import EncoderSettings
    from embtune.scoring.pairs import PairCounts
    from embtune.scoring.teachers import CrossEncoderTeacher, TeacherSettings

Lists = dict[str, list[str]]  # query id -> doc ids, best first
RERANK_TOP_K = 100
RERANK_BATCH_SIZE = 32


@dataclasses.dataclass
class Reranking:
    """The reranking stage of an evaluation: which reranker read how many pairs, how long."""

    reranker: str
    settings: TeacherSettings  # the pair length and instructions it scored with
    top_k: int
    counts: PairCounts  # the pairs reranked: all, distinct, found in the cache, computed
    seconds: float
    cache_file: Path | None = None  # the pair-score cache (None: no cache_dir)


@dataclasses.dataclass
class RerankMetrics:
    """What `embtune eval --reranker` reports: the first stage's metrics and the reranked ones,
    at the same cut-offs, and how the reranking went.

    ``first_stage`` is a :class:`~embtune.api.Metrics` of the retriever's ranking (or the
    candidates file's own order) that also carries what was evaluated: data, split, judged
    queries, corpus size, the retriever's settings, the rows left out; its ``seconds`` are the
    first stage's (0 for a candidates file).
    """

    first_stage: Metrics
    reranked: dict[str, float]
    reranking: Reranking
    seconds: float  # the whole evaluation, loading included
    candidates: str | None = None  # the candidates file (None: the retriever's ranking)
    missing_queries: int = 0  # judged queries the candidates file has no list for

    def summary(self) -> str:
        """Two lines: the first stage (retriever or candidates file, data, counts, time), then
        the reranker (top k, pairs, where their scores came from, pair length, time)."""
        first = self.first_stage
        if self.candidates is None:
            head = first.summary()
        else:
            head = (
                f"candidates {self.candidates} | data {first.data} ({first.split}) | "
                f"{first.queries} queries, {first.corpus_size} documents"
            )
        r, c = self.reranking, self.reranking.counts
        cached = f", {c.cached:,} from the cache" if r.cache_file else ""
        return (
            f"{head}\nreranker {r.reranker} | top {r.top_k} of each query: {c.pairs:,} pairs "
            f"({c.computed:,} scored{cached}) | max len {r.settings.pair_max_length} | "
            f"{r.seconds:.1f} s"
        )

    def table(self) -> str:
        """The metrics side by side: metric, first stage, reranked, change."""
        from embtune.eval.reranking import format_comparison

        return format_comparison(self.first_stage, self.reranked)

    def notes(self) -> list[str]:
        """What the table does not show: judged queries without candidates, and cut-offs past
        the candidates (where the reranked figures count only the candidates)."""
        notes = []
        if self.missing_queries:
            notes.append(
                f"{self.missing_queries} of the {self.first_stage.queries} judged queries have "
                f"no list in {self.candidates}: they score 0 in both columns"
            )
        top_k = self.reranking.top_k
        cut_offs = {int(key.partition("@")[2]) for key in self.reranked}
        if beyond := sorted(k for k in cut_offs if k > top_k):
            notes.append(
                f"reranked metrics at {', '.join(f'@{k}' for k in beyond)} count only the top "
                f"{top_k} candidates of each query; documents below them are unretrieved"
            )
        return notes

    def to_json(self) -> dict:
        """The record `embtune eval --reranker --json` writes: ``first_stage`` and ``reranked``
        metrics, then what was evaluated, the reranker, the pairs and the seconds of each
        stage."""
        r, s, c = self.reranking, self.reranking.settings, self.reranking.counts
        # The first stage's own record without its metrics: model, data, split, counts.
        described = {k: v for k, v in self.first_stage.to_json().items() if k not in self.reranked}
        return {
            "first_stage": dict(self.first_stage),
            "reranked": self.reranked,
            **described,
            "model": self.first_stage.model or None,
            "candidates": self.candidates,
            "missing_queries": self.missing_queries,
            "reranker": r.reranker,
            "top_k": r.top_k,
            "pairs": {
                "total": c.pairs,
                "distinct": c.distinct,
                "cached": c.cached,
                "scored": c.computed,
            },
            "seconds": round(self.seconds, 3),
            "first_stage_seconds": round(self.first_stage.seconds, 3),
            "rerank_seconds": round(r.seconds, 3),
            "reranker_settings": {
                "max_length": s.pair_max_length,
                "query_instruction": s.query_instruction or "",
                "passage_instruction": s.passage_instruction or "",
                "precision": s.precision,
            },
        }


def _check_first_stage(
    model: PathLike | None, candidates: PathLike | None, overrides: EncoderOverrides, faiss: bool
) -> None:
    """Exactly one first stage, a retriever or a candidates file; retriever options only with
    a retriever."""
    if model is None and candidates is None:
        raise UsageError(
            "--model: required, to retrieve what the reranker reorders (or give the lists "
            "with --candidates)"
        )
    if model is not None and candidates is not None:
        raise UsageError(
            "--candidates: the lists to rerank come from --model or from --candidates, not both"
        )
    if candidates is not None and (given := overrides.given() + (["--faiss"] if faiss else [])):
        raise UsageError(
            f"{given[0]}: an option of the retriever, but --candidates gives the lists (no --model)"
        )


def _judged_lists(path: PathLike, dataset: BeirDataset) -> Lists:
    """The candidates file's lists of the judged queries; refused when it has none of them."""
    from embtune.eval.candidates import read_candidates

    lists = read_candidates(path, dataset)
    judged = {qid: lists[qid] for qid in dataset.qrels if qid in lists}
    if not judged:
        raise UsageError(
            f"--candidates: {path} has a list for none of the {len(dataset.qrels)} judged "
            "queries (is it a run of another split or data set?)"
        )
    return judged


def _rerank(
    scorer: CrossEncoderTeacher,
    dataset: BeirDataset,
    lists: Lists,
    top_k: int,
    k_values: tuple[int, ...],
    batch_size: int,
    cache_dir: Path | None,
    show_progress: bool,
) -> tuple[Run, dict[str, float], Reranking]:
    """The run of each list's top ``top_k`` reranked, its metrics and the stage's report; with
    ``cache_dir``, pair scores found in the reranker's score cache are not computed again."""
    from embtune.eval.reranking import rerank_run
    from embtune.eval.retrieval import retrieval_metrics
    from embtune.scoring.cache import ScoreCache

    started = time.perf_counter()
    candidates = {qid: docs[:top_k] for qid, docs in lists.items()}
    cache = None if cache_dir is None else ScoreCache.in_folder(cache_dir, scorer.identity())
    with cache or contextlib.nullcontext():
        run, counts = rerank_run(scorer, dataset, candidates, batch_size, show_progress, cache)
    seconds = time.perf_counter() - started
    cache_file = None if cache is None else cache.path
    report = Reranking(scorer.name, scorer.settings, top_k, counts, seconds, cache_file)
    return run, retrieval_metrics(run, dataset.qrels, k_values), report


def _output_paths(
    json: PathLike | None,
    data: Path,
    split: str,
    skip_bad_rows: bool,
    candidates: PathLike | None,
    files: ResultFiles,
    k_values: tuple[int, ...],
    limit_queries: int | None,
) -> tuple[Path | None, Path | None, ResultFiles]:
    """The --json file, the rejected-rows report and ``files`` (--trec-run, --mteb-json),
    checked as `embtune eval` checks them, and none over the candidates file either."""
    json_path, report = output_paths(json, data, split, skip_bad_rows)
    inputs = [Path(candidates)] if candidates is not None else []
    for path in (json_path, report):
        if path is not None:
            refuse_input_as_output(path, inputs, "--json", "the metrics")
    checked = files.checked(
        k_values, data, split, json_path, report, limit_queries, other_inputs=inputs
    )
    return json_path, report, checked


def _first_stage_metrics(
    lists: Mapping[str, Sequence[str]],
    dataset: BeirDataset,
    k_values: Sequence[int],
    model: PathLike | None,
    data: PathLike,
    split: str,
    seconds: float,
    settings: EncoderSettings | None,
    skip_bad_rows: bool,
    report: Path | None,
) -> Metrics:
    """The first stage's metrics (its lists in their own order) with what was evaluated."""
    from embtune.eval.retrieval import retrieval_metrics

    return Metrics(
        retrieval_metrics(lists, dataset.qrels, k_values),
        model=os.fspath(model) if model is not None else "",
        data=os.fspath(data),
        split=split,
        queries=len(dataset.qrels),
        corpus_size=len(dataset.corpus),
        seconds=seconds,
        settings=settings,
        rejected=dataset.rejected if skip_bad_rows else None,
        rejected_report=report,
    )


def _rerank_sizes(
    top_k: int | None, batch_size: int | None, max_length: int | None
) -> tuple[int, int, int | None]:
    """The reranking's candidates per query, pairs per batch and pair length, checked; None
    stands for the default, as on the command line, where it tells "not given"."""
    return (
        optional_int(top_k, "--rerank-top-k", 1) or RERANK_TOP_K,
        optional_int(batch_size, "--rerank-batch-size", 1) or RERANK_BATCH_SIZE,
        optional_int(max_length, "--rerank-max-length", 1),
    )


def evaluate_reranking(
    reranker: PathLike,
    data: PathLike,
    split: str = "test",
    *,
    model: PathLike | None = None,
    candidates: PathLike | None = None,
    rerank_top_k: int | None = None,
    rerank_batch_size: int | None = None,
    rerank_max_length: int | None = None,
    query_instruction_for_rerank: str | None = None,
    passage_instruction_for_rerank: str | None = None,
    k: Sequence[int] = (10, 100),
    batch_size: int = 64,
    json: PathLike | None = None,
    cache_dir: PathLike | None = None,
    faiss: bool = False,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    query_instruction: str | None = None,
    passage_instruction: str | None = None,
    limit_queries: int | None = None,
    device: str | None = None,
    bf16: bool = False,
    skip_bad_rows: bool = False,
    trec_run: PathLike | None = None,
    trec_run_tag: str | None = None,
    mteb_json: PathLike | None = None,
    mteb_task_name: str | None = None,
    mteb_dataset_revision: str | None = None,
    mteb_languages: Sequence[str] | None = None,
    show_progress: bool = True,
) -> RerankMetrics:
    """First-stage and reranked metrics on one split of a BEIR folder, as `embtune eval
    --reranker` computes them (the module's docstring says how).

    Args:
        reranker: a one-label sequence classifier (folder or hub name): an embtune reranker,
            with its saved pair length and instructions, a bge-reranker, a CrossEncoder.
        data, split: the BEIR folder, and which qrels/<split>.tsv to evaluate.
        model: the retriever, folder or hub name; exactly one of ``model`` and ``candidates``.
        candidates: a TREC run or jsonl file of the lists to rerank (:mod:`.eval.candidates`).
        rerank_top_k: candidates reranked per query (None: 100).
        rerank_batch_size: pairs per forward pass of the reranker (None: 32).
        rerank_max_length: tokens of a pair (None: the reranker's saved setting, else 512);
            the query takes at most 3/4 of them.
        query_instruction_for_rerank, passage_instruction_for_rerank: text put before every
            query / passage the reranker reads (None: its saved setting, else none), as
            FlagEmbedding and `embtune train --model-kind cross-encoder` name them.
        cache_dir: keeps corpus embeddings and the reranker's pair scores (keyed by its
            weights, settings and the texts): shared pairs of two evaluations score once.
        Others: as for :func:`~embtune.api.evaluate`; the retriever's options only with
            ``model``; ``device`` and ``bf16`` serve both models; ``trec_run`` and
            ``mteb_json`` get the reranked ranking and metrics.

    Returns:
        :class:`RerankMetrics`: ``first_stage`` (a :class:`~embtune.api.Metrics`) and
        ``reranked`` metrics, ``reranking`` (pairs, seconds), the judged queries missing.

    Raises:
        UsageError: a bad option, data, candidates file or model, in the command's one line.
        TrainingStopped: a non-finite reranker score, or ``json`` unwritable after the work.
    """
    from embtune.data.store import usable_cache_dir
    from embtune.eval.reranking import first_stage_run, load_reranker, top_candidates
    from embtune.eval.retrieval import check_k_values

    started = time.perf_counter()
    k_values = check_k_values([k] if isinstance(k, int) else k)
    batch_size = int_option(batch_size, "--batch-size", 1)
    limit_queries = optional_int(limit_queries, "--limit-queries", 1)
    top_k, pairs_per_batch, max_length = _rerank_sizes(
        rerank_top_k, rerank_batch_size, rerank_max_length
    )
    overrides = EncoderOverrides(
        query_max_len, passage_max_len, pooling, normalize, query_instruction, passage_instruction
    ).checked()
    _check_first_stage(model, candidates, overrides, faiss)
    files = ResultFiles(
        trec_run, trec_run_tag, mteb_json, mteb_task_name, mteb_dataset_revision, mteb_languages
    )
    json_path, report, files = _output_paths(
        json, Path(data), split, skip_bad_rows, candidates, files, k_values, limit_queries
    )
    scores_dir = usable_cache_dir(cache_dir) if cache_dir is not None else None
    where = torch_device(device)

    # The cheap refusals first: the data, the candidates file, the reranker's config.
    dataset = load_data(Path(data), split, limit_queries, skip_bad_rows)
    files.check_ids(dataset)
    lists = _judged_lists(candidates, dataset) if candidates is not None else None
    instructions = query_instruction_for_rerank, passage_instruction_for_rerank
    scorer = load_reranker(os.fspath(reranker), max_length, precision(bf16), *instructions, where)
    first_started, settings = time.perf_counter(), None
    if lists is None:
        encoder = overrides.load(model, where, bf16)
        depth = max(top_k, *k_values)  # enough for the candidates and for every cut-off
        run = first_stage_run(encoder, dataset, depth, batch_size, show_progress, cache_dir, faiss)
        lists, settings = top_candidates(run, depth), encoder.settings
    first_stage = _first_stage_metrics(
        lists, dataset, k_values, model, data, split, time.perf_counter() - first_started,
        settings, skip_bad_rows, report,
    )  # fmt: skip
    run, reranked, reranking = _rerank(
        scorer, dataset, lists, top_k, k_values, pairs_per_batch, scores_dir, show_progress
    )
    result = RerankMetrics(
        first_stage,
        reranked,
        reranking,
        seconds=time.perf_counter() - started,
        candidates=os.fspath(candidates) if candidates is not None else None,
        missing_queries=len(dataset.qrels) - len(lists),
    )
    save_evaluation(json_path, report, result.to_json(), first_stage.rejected)
    files.write(run, reranked, data, split, result.seconds)
    return result
