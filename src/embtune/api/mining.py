"""embtune.api.mine: mine hard negatives into FlagEmbedding jsonl, as `embtune mine`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.api.options import (
    PathLike,
    choice,
    input_files,
    int_option,
    optional_float,
    optional_int,
    output_file,
    precision,
    refuse_input_as_output,
    rejected_rows_file,
    save_result,
)
from embtune.choices import POOLING_MODES
from embtune.errors import UsageError

if TYPE_CHECKING:  # the real imports pull in torch / transformers
    from embtune.errors import InputProblem
    from embtune.mining.negatives import MinedRow, MiningInput, MiningReport, MiningResult
    from embtune.models.encoder import Encoder


@dataclasses.dataclass
class MineResult:
    """What `embtune mine` reports: the counts, where the rows went, and notes on the input."""

    report: MiningReport  # every candidate's fate, rows short of negatives, ...
    output: Path  # the jsonl written
    seconds: float
    source: str  # what was read (a BEIR split, jsonl files)
    notes: list[str]  # remarks on the input, e.g. queries of the split without a positive
    rows: list[MinedRow] = dataclasses.field(repr=False, default_factory=list)  # as written
    # skip_bad_rows: the problems of the input rows left out, and the file listing them.
    rejected: list[InputProblem] = dataclasses.field(repr=False, default_factory=list)
    rejected_report: Path | None = None

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
        *_rejected_line(result),
        ("time", f"{result.seconds:.1f} s"),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def _rejected_line(result: MineResult) -> list[tuple[str, str]]:
    """The report's line on rows left out by skip_bad_rows (none without it)."""
    if result.rejected_report is None:
        return []
    from embtune.data.formats import rejected_row_count

    count = rejected_row_count(result.rejected)
    return [("bad input rows left out", f"{count:,} (listed in {result.rejected_report})")]


def _rank_range(value: str | tuple[int, int]) -> tuple[int, int]:
    """``--range`` as (start, end): the command line's "START:END", or a pair from Python."""
    from embtune.mining.negatives import check_range, parse_range

    if isinstance(value, str):
        return parse_range(value)
    start, end = value
    rank_range = (int_option(start, "--range", 1), int_option(end, "--range", 1))
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
        "negatives": int_option(negatives, "--negatives", 1),
        "margin": optional_float(margin, "--margin"),
        "relative_margin": optional_float(relative_margin, "--relative-margin"),
    }
    check_margins(options["margin"], options["relative_margin"])  # type: ignore[arg-type]
    options["seed"] = int_option(seed, "--seed", 0)
    options["batch_size"] = int_option(batch_size, "--batch-size", 1)
    return options


def _check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to write over one of the inputs (ever), or over any file without ``overwrite``."""
    refuse_input_as_output(out, inputs, "--output", "the mined rows")
    if out.exists() and not overwrite:
        raise UsageError(f"--output: {out} exists; pass --overwrite to replace it")


def _checked_paths(
    output: PathLike,
    data: PathLike,
    split: str,
    candidates: PathLike | None,
    overwrite: bool,
    skip_bad_rows: bool,
) -> tuple[Path, Path | None, Path | None]:
    """The output file, the candidates file and (skip_bad_rows) the rejected-rows report,
    each checked before any work: writable, never an input, existing only with ``overwrite``."""
    out = output_file(output, "--output")
    pool = None if candidates is None else Path(candidates)
    if pool is not None and not pool.is_file():
        raise UsageError(f"--candidates: file {pool} does not exist")
    inputs = [*input_files(Path(data), split), *([] if pool is None else [pool])]
    _check_output(out, inputs, overwrite)
    report = rejected_rows_file(out) if skip_bad_rows else None
    if report is not None:
        _check_output(report, inputs, overwrite)
    return out, pool, report


def _save(
    out: Path, report: Path | None, mined: MiningResult, source: MiningInput, include_scores: bool
) -> None:
    """Write the report of the rows left out (first: it is small), then the mined rows."""
    from embtune.data.formats import write_rejected_rows
    from embtune.mining.negatives import write_mined_jsonl

    if report is not None:
        rejected = source.rejected
        save_result(report, lambda: write_rejected_rows(report, rejected), "the mining", "-o")
    save_result(
        out,
        lambda: write_mined_jsonl(mined.rows, out, include_scores=include_scores),
        "the mining",
        "-o",
    )


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
    overwrite: bool = False,
    skip_bad_rows: bool = False,
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
        overwrite: replace ``output`` when it exists (else refused); never when it is one of
            the input files.
        skip_bad_rows: rows of ``data`` that fail validation are left out, counted and listed
            in ``<output stem>.rejected_rows.jsonl`` beside ``output`` (always written then,
            empty when none were), instead of refusing the whole input.
        bf16: encode in bfloat16 autocast.
        show_progress: print what is mined and show encoding progress bars.

    Returns:
        :class:`MineResult`: ``report`` (a :class:`~embtune.mining.negatives.MiningReport`),
        ``output``, ``rows``, ``notes``, ``seconds``, and ``text``, the printed report.

    Raises:
        UsageError: a bad option, data or model, with the command's one-line message.
        TrainingStopped: the output file could not be written after the work (a full disk):
            nothing half-written is left; the command exits 3.

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
    query_max_len = optional_int(query_max_len, "--query-max-len", 1)
    passage_max_len = optional_int(passage_max_len, "--passage-max-len", 1)
    limit = optional_int(limit, "--limit", 1)
    choice(pooling, "--pooling", POOLING_MODES)
    out, pool, report = _checked_paths(output, data, split, candidates, overwrite, skip_bad_rows)

    import torch

    from embtune.mining.negatives import load_mining_input
    from embtune.models.encoder import Encoder

    started = time.perf_counter()
    source = load_mining_input(Path(data), split, pool, limit, skip_bad_rows=skip_bad_rows)
    encoder = Encoder.from_pretrained(
        os.fspath(model),
        pooling=pooling,
        query_instruction=query_instruction,
        passage_instruction=passage_instruction,
        query_max_len=query_max_len,
        passage_max_len=passage_max_len,
        encode_precision=precision(bf16),
    ).to("cuda" if torch.cuda.is_available() else "cpu")
    mined = _mine_source(encoder, source, show_progress, **mining)
    _save(out, report, mined, source, include_scores=not no_scores)
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
        rejected=source.rejected,
        rejected_report=report,
    )
