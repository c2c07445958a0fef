"""embtune.api.evaluate: retrieval metrics of a model, as `embtune eval`; Metrics, the device."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.api.options import (
    PathLike,
    choice,
    input_files,
    int_option,
    optional_int,
    output_file,
    precision,
    refuse_input_as_output,
    rejected_rows_file,
    save_json,
    save_result,
)
from embtune.api.result_files import ResultFiles
from embtune.choices import POOLING_MODES
from embtune.errors import UsageError

if TYPE_CHECKING:  # the real imports pull in torch / transformers
    import torch

    from embtune.api.result_files import Run
    from embtune.data.formats import BeirDataset
    from embtune.errors import InputProblem
    from embtune.models.encoder import Encoder, EncoderSettings


class Metrics(dict):
    """The metrics of one evaluation: a plain dict ``{"ndcg@10": 0.61, "mrr@10": ...}``.

    It also carries what was evaluated, for reports: ``model``, ``data``, ``split``,
    ``queries`` (judged queries evaluated), ``corpus_size``, ``seconds`` and ``settings`` (the
    :class:`~embtune.models.encoder.EncoderSettings` used). Evaluated at several Matryoshka
    dimensions (``dims``), ``by_dim`` holds ``{dim: metrics}`` and the dict itself the first
    dimension's metrics.
    """

    def __init__(
        self,
        metrics: dict[str, float] | None = None,
        *,
        model: str = "",
        data: str = "",
        split: str = "",
        queries: int = 0,
        corpus_size: int = 0,
        seconds: float = 0.0,
        settings: EncoderSettings | None = None,
        rejected: list[InputProblem] | None = None,
        rejected_report: Path | None = None,
        by_dim: dict[int, dict[str, float]] | None = None,
    ) -> None:
        # Every argument has a default so that copy and pickle, which call cls(), work.
        super().__init__(metrics or {})
        self.model, self.data, self.split = model, data, split
        self.queries, self.corpus_size = queries, corpus_size
        self.seconds, self.settings = seconds, settings
        # skip_bad_rows: the problems of the data rows left out (None: not skipping), and the
        # file listing them (beside the --json file; None without one).
        self.rejected, self.rejected_report = rejected, rejected_report
        self.by_dim = by_dim

    @property
    def rejected_rows(self) -> int | None:
        """How many rows of the data were left out by skip_bad_rows (None: not skipping)."""
        if self.rejected is None:
            return None
        from embtune.data.formats import rejected_row_count

        return rejected_row_count(self.rejected)

    def summary(self) -> str:
        """One line: model, data, counts, the encoder settings and the time taken."""
        s = self.settings
        assert s is not None, "summary() of metrics made by evaluate()"
        return (
            f"model {self.model} | data {self.data} ({self.split}) | {self.queries} queries, "
            f"{self.corpus_size} documents | {s.pooling} pooling, "
            f"{'normalized' if s.normalize else 'not normalized'}, max len "
            f"{s.query_max_len}/{s.passage_max_len} | {self.seconds:.1f} s"
        )

    def table(self) -> str:
        """The metrics as a table: one row per metric, one column per cut-off; with
        ``by_dim``, one row per dimension, one column per metric and cut-off."""
        from embtune.eval.retrieval import format_dimension_table, format_metrics

        return format_dimension_table(self.by_dim) if self.by_dim else format_metrics(self)

    def to_json(self) -> dict:
        """The record `embtune eval --json` writes: the metrics (with ``by_dim``, a block
        ``"dims": {"<dim>": metrics}`` instead), then what was evaluated."""
        scores = {"dims": {str(d): m for d, m in self.by_dim.items()}} if self.by_dim else self
        return {
            **scores,
            "model": self.model,
            "data": self.data,
            "split": self.split,
            "queries": self.queries,
            "corpus_size": self.corpus_size,
            "seconds": round(self.seconds, 3),
            "settings": dataclasses.asdict(self.settings) if self.settings else None,
            **({} if self.rejected is None else {"rejected_rows": self.rejected_rows}),
        }


@dataclasses.dataclass(frozen=True)
class EncoderOverrides:
    """The options that override a retriever's saved settings for one run (None: keep)."""

    query_max_len: int | None = None
    passage_max_len: int | None = None
    pooling: str | None = None
    normalize: bool | None = None
    query_instruction: str | None = None
    passage_instruction: str | None = None

    def checked(self) -> EncoderOverrides:
        """These overrides, their values checked (the command's messages), numbers as ints."""
        query_max_len = optional_int(self.query_max_len, "--query-max-len", 1)
        passage_max_len = optional_int(self.passage_max_len, "--passage-max-len", 1)
        choice(self.pooling, "--pooling", POOLING_MODES)
        return dataclasses.replace(
            self, query_max_len=query_max_len, passage_max_len=passage_max_len
        )

    def given(self) -> list[str]:
        """The options set, as the command spells them (``--pooling``)."""
        return [
            "--" + f.name.replace("_", "-")
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        ]

    def load(self, model: PathLike, device: torch.device, bf16: bool) -> Encoder:
        """The retriever ``model`` with these overrides, on ``device``."""
        from embtune.models.encoder import Encoder

        return Encoder.from_pretrained(
            os.fspath(model), **dataclasses.asdict(self), encode_precision=precision(bf16)
        ).to(device)


def torch_device(name: str | None) -> torch.device:
    """The --device option as a torch device (None: cuda when available, else cpu)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: {name!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {name} requested but CUDA is not available here")
    return device


def output_paths(
    json: PathLike | None, data: Path, split: str, skip_bad_rows: bool
) -> tuple[Path | None, Path | None]:
    """The --json file and (skip_bad_rows) the rejected-rows report beside it, checked now, not
    after the whole evaluation: writable, and not one of the input files. Missing folders
    are made when they are written (results/<name>.json)."""
    if json is None:
        return None, None
    json_path = output_file(json, "--json", make_folders=True)
    report = rejected_rows_file(json_path) if skip_bad_rows else None
    for path in (json_path, report):
        if path is not None:
            refuse_input_as_output(path, input_files(data, split), "--json", "the metrics")
    return json_path, report


def load_data(
    data: Path, split: str, limit_queries: int | None, skip_bad_rows: bool
) -> BeirDataset:
    """The split, validated (bad rows left out with ``skip_bad_rows``), its first
    ``limit_queries`` judged queries only when given (the corpus stays whole)."""
    from embtune.data.formats import load_beir

    dataset = load_beir(data, split, skip_bad_rows=skip_bad_rows)
    if limit_queries:
        qrels = dict(list(dataset.qrels.items())[:limit_queries])
        dataset = dataclasses.replace(dataset, qrels=qrels)
    return dataset


def save_evaluation(
    json_path: Path | None,
    report: Path | None,
    record: dict,
    rejected: list[InputProblem] | None,
) -> None:
    """Write the report of the rows left out (first: it is small), then the metrics' record."""
    from embtune.data.formats import write_rejected_rows

    if report is not None:
        rows = rejected or []
        save_result(report, lambda: write_rejected_rows(report, rows), "the evaluation", "--json")
    if json_path is not None:
        save_json(json_path, record, "the evaluation", "--json")


def evaluate(
    model: PathLike,
    data: PathLike,
    split: str = "test",
    *,
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
    dims: Sequence[int] | None = None,
    allow_settings_mismatch: bool = False,
    trec_run: PathLike | None = None,
    trec_run_tag: str | None = None,
    mteb_json: PathLike | None = None,
    mteb_task_name: str | None = None,
    mteb_dataset_revision: str | None = None,
    mteb_languages: Sequence[str] | None = None,
    show_progress: bool = True,
) -> Metrics:
    """Retrieval metrics of a model on one split of a BEIR folder, as `embtune eval` computes.

    Args:
        model: model folder or Hugging Face hub name.
        data: BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
        split: which qrels/<split>.tsv to evaluate.
        k: cut-offs; every metric (nDCG, MRR, Recall, MAP) is reported at each.
        batch_size: texts per forward pass when encoding.
        json: also write the metrics with model, data, split, counts and seconds to this file.
        cache_dir: reuse corpus embeddings cached here (keyed by weights, settings and text).
        faiss: search with a faiss IndexFlatIP (needs faiss-cpu) instead of torch.
        query_max_len, passage_max_len, pooling, normalize, query_instruction,
            passage_instruction: override the model's saved settings for this run (None: keep).
        limit_queries: evaluate only the first N judged queries (the whole corpus is searched).
        device: torch device, e.g. "cpu", "cuda:1" (None: cuda when available, else cpu).
        bf16: encode in bfloat16 autocast (faster, embeddings within ~1e-2 of fp32).
        skip_bad_rows: rows of ``data`` that fail validation (and the judgements that need
            them) are left out and counted (``Metrics.rejected_rows``) instead of refusing the
            whole input; with ``json`` they are listed in ``<json stem>.rejected_rows.jsonl``
            beside it (``Metrics.rejected_report``).
        dims: Matryoshka dimensions to evaluate at: embedded once, each dimension's vectors
            cut to their first ``dim`` components and re-normalized as
            ``Encoder.from_pretrained(model, truncate_dim=dim)`` makes them
            (``Metrics.by_dim``; None: the full embedding only).
        allow_settings_mismatch: evaluate even when the overrides embed ``model`` otherwise
            than its own sentence-transformers configuration (by default a UsageError lists
            what differs: models/parity.py).
        trec_run, trec_run_tag, mteb_json, mteb_task_name, mteb_dataset_revision,
            mteb_languages: the ranking as a TREC run, the metrics as an MTEB result, as
            `embtune eval --help` says (:mod:`embtune.api.result_files`).
        show_progress: show encoding progress bars.

    Returns:
        :class:`Metrics`, a dict ``{"ndcg@10": ..., "mrr@10": ..., "recall@100": ...}`` that
        also carries ``queries``, ``corpus_size``, ``seconds`` and ``settings``.

    Raises:
        UsageError: a bad option, data or model, with the command's one-line message.
        TrainingStopped: ``json`` could not be written after the work (a full disk):
            nothing half-written is left; the command exits 3.

    Example:
        ::

            from embtune import api

            metrics = api.evaluate("BAAI/bge-small-en-v1.5", "data/scifact", k=[10])
            print(metrics["ndcg@10"], metrics.seconds)
    """
    from embtune.eval.retrieval import check_k_values

    started = time.perf_counter()
    k_values = check_k_values([k] if isinstance(k, int) else k)
    batch_size = int_option(batch_size, "--batch-size", 1)
    limit_queries = optional_int(limit_queries, "--limit-queries", 1)
    overrides = EncoderOverrides(
        query_max_len, passage_max_len, pooling, normalize, query_instruction, passage_instruction
    ).checked()
    dim_list = _dims(dims)
    json_path, report = output_paths(json, Path(data), split, skip_bad_rows)
    files = ResultFiles(
        trec_run, trec_run_tag, mteb_json, mteb_task_name, mteb_dataset_revision, mteb_languages
    ).checked(k_values, Path(data), split, json_path, report, limit_queries, dim_list)
    where = torch_device(device)

    # Data first: a typo in the data path should fail before a model download or load.
    dataset = load_data(Path(data), split, limit_queries, skip_bad_rows)
    files.check_ids(dataset)

    encoder = _retriever(overrides, model, where, bf16, allow_settings_mismatch)
    scores, by_dim, run = _scores(
        encoder, dataset, dim_list, k_values, batch_size, show_progress, cache_dir, faiss
    )
    metrics = Metrics(
        scores,
        model=os.fspath(model),
        data=os.fspath(data),
        split=split,
        queries=len(dataset.qrels),
        corpus_size=len(dataset.corpus),
        seconds=time.perf_counter() - started,
        settings=encoder.settings,
        rejected=dataset.rejected if skip_bad_rows else None,
        rejected_report=report,
        by_dim=by_dim,
    )
    save_evaluation(json_path, report, metrics.to_json(), metrics.rejected)
    files.write(run or {}, metrics, data, split, metrics.seconds)
    return metrics


def _retriever(
    overrides: EncoderOverrides,
    model: PathLike,
    device: torch.device,
    bf16: bool,
    allow_settings_mismatch: bool,
) -> Encoder:
    """The retriever with ``overrides``, refused (unless ``allow_settings_mismatch``) when they
    embed it otherwise than its own sentence-transformers configuration."""
    encoder = overrides.load(model, device, bf16)
    if not allow_settings_mismatch:
        from embtune.models.parity import check_settings, refuse_mismatch

        settings = encoder.settings
        parity = check_settings(
            settings, encoder.tokenizer.padding_side, str(model), settings.append_eos_token
        )
        refuse_mismatch(parity, "--allow-settings-mismatch")
    return encoder


def _dims(dims: Sequence[int] | None) -> list[int]:
    """``--dims`` as a list of distinct positive whole numbers ([] when not given)."""
    if dims is None:
        return []
    values = [int_option(d, "--dims", 1) for d in ([dims] if isinstance(dims, int) else dims)]
    if not values:
        raise UsageError("--dims: give at least one dimension")
    if len(set(values)) != len(values):
        raise UsageError(f"--dims: a dimension is given twice: {values}")
    return values


def _scores(
    encoder: Encoder,
    dataset: BeirDataset,
    dims: list[int],
    k_values: tuple[int, ...],
    batch_size: int,
    show_progress: bool,
    cache_dir: PathLike | None,
    faiss: bool,
) -> tuple[dict[str, float], dict[int, dict[str, float]] | None, Run | None]:
    """(the metrics, None, the run they score) of the full embedding, or with ``dims`` (the
    first dimension's metrics, every dimension's, None) from one encoding."""
    from embtune.eval.retrieval import evaluate_dimensions, retrieval_metrics, retrieve_split
    from embtune.models.encoder import check_dimensions

    options = {"show_progress": show_progress, "cache_dir": cache_dir, "use_faiss": faiss}
    if not dims:
        depth = max(k_values)
        run = retrieve_split(encoder, dataset, depth, batch_size, **options)
        return retrieval_metrics(run, dataset.qrels, k_values), None, run
    check_dimensions(encoder.model.config, dims, "--dims")
    by_dim = evaluate_dimensions(encoder, dataset, dims, k_values, batch_size, **options)
    return by_dim[dims[0]], by_dim, None
