"""embtune.api.score: add a teacher's pos_scores / neg_scores to jsonl rows, as `embtune score`."""

from __future__ import annotations

import dataclasses
import os
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
    path_list,
    precision,
    refuse_input_as_output,
    rejected_rows_file,
    save_result,
)
from embtune.choices import TEACHER_KINDS
from embtune.errors import UsageError

if TYPE_CHECKING:  # the real imports pull in torch / transformers
    from embtune.errors import InputProblem
    from embtune.scoring.pairs import PairCounts
    from embtune.scoring.rows import ScoreInput
    from embtune.scoring.teachers import Teacher, TeacherSettings


@dataclasses.dataclass
class ScoreResult:
    """What `embtune score` reports: where the scores came from and where the rows went."""

    output: Path  # the jsonl written
    rows: int
    counts: PairCounts  # pairs, distinct pairs, found in the cache, computed
    teacher: str
    teacher_kind: str
    kind_reason: str  # why --teacher-kind auto chose it ("given" when it was given)
    cache_file: Path
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    # skip_bad_rows: the problems of the input rows left out, and the file listing them.
    rejected: list[InputProblem] = dataclasses.field(repr=False, default_factory=list)
    rejected_report: Path | None = None

    @property
    def text(self) -> str:
        """The notes, then the report as a small aligned table (what the command prints)."""
        return "\n".join([*(f"note: {n}" for n in self.notes), format_score_report(self)])


def format_score_report(result: ScoreResult) -> str:
    """The scoring report as a small aligned table."""
    c = result.counts
    lines = [
        ("teacher", f"{result.teacher} ({result.teacher_kind}: {result.kind_reason})"),
        ("rows", f"{result.rows:,}"),
        ("pairs", f"{c.pairs:,} ({c.distinct:,} distinct)"),
        ("  from the cache", f"{c.cached:,}"),
        ("  computed", f"{c.computed:,}"),
        ("cache", str(result.cache_file)),
        ("output", str(result.output)),
        *_rejected_line(result),
        ("time", f"{result.seconds:.1f} s"),
    ]
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def _rejected_line(result: ScoreResult) -> list[tuple[str, str]]:
    """The report's line on rows left out by skip_bad_rows (none without it)."""
    if result.rejected_report is None:
        return []
    from embtune.data.formats import rejected_row_count

    count = rejected_row_count(result.rejected)
    return [("bad input rows left out", f"{count:,} (listed in {result.rejected_report})")]


def _check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to write over one of the inputs (ever), or over any file without ``overwrite``."""
    refuse_input_as_output(out, inputs, "--output", "the scored rows")
    if out.exists() and not overwrite:
        raise UsageError(f"--output: {out} exists; pass --overwrite to replace it")


def _checked_paths(
    output: PathLike, data: list[str], overwrite: bool, skip_bad_rows: bool
) -> tuple[Path, Path | None]:
    """The output file and (skip_bad_rows) the rejected-rows report, checked before any work:
    writable, never an input, existing only with ``overwrite``."""
    out = output_file(output, "--output")
    inputs = [path for entry in data for path in input_files(Path(entry), "train")]
    _check_output(out, inputs, overwrite)
    report = rejected_rows_file(out) if skip_bad_rows else None
    if report is not None:
        _check_output(report, inputs, overwrite)
    return out, report


def _choose_kind(name: str, kind: str, settings: TeacherSettings) -> tuple[str, str]:
    """The teacher's kind and why, its options checked against its config (no weights)."""
    from embtune.scoring.teachers import check_settings, teacher_config, teacher_kind

    config = teacher_config(name)
    chosen, why = teacher_kind(name, config) if kind == "auto" else (kind, "given")
    check_settings(chosen, config, settings)
    return chosen, why


def _save(out: Path, report: Path | None, source: ScoreInput, scores: list[float]) -> None:
    """Write the report of the rows left out (first: it is small), then the scored rows."""
    from embtune.data.formats import write_rejected_rows
    from embtune.scoring.rows import with_scores, write_rows

    if report is not None:
        rejected = source.rejected
        save_result(report, lambda: write_rejected_rows(report, rejected), "the scoring", "-o")
    rows = with_scores(source.rows, scores)
    save_result(out, lambda: write_rows(rows, out), "the scoring", "-o")


def _score_rows(
    teacher: Teacher, source: ScoreInput, cache_dir: Path, batch_size: int, show_progress: bool
) -> tuple[list[float], PairCounts, Path]:
    """Every pair of ``source`` scored through the teacher's cache in ``cache_dir``."""
    from embtune.scoring.cache import ScoreCache
    from embtune.scoring.pairs import score_all

    with ScoreCache.in_folder(cache_dir, teacher.identity()) as cache:
        scores, counts = score_all(teacher, source.pairs(), cache, batch_size, show_progress)
    return scores, counts, cache.path


def _notes(source: ScoreInput) -> list[str]:
    """Remarks on the input: scores it held, which this run replaced."""
    held = source.rows_with_scores()
    if not held:
        return []
    return [f"pos_scores/neg_scores already in {held:,} of the rows: replaced by this teacher's"]


def score(
    teacher: PathLike,
    train_data: PathLike | Sequence[PathLike],
    output: PathLike,
    *,
    teacher_kind: str = "auto",
    batch_size: int = 64,
    max_length: int | None = None,
    query_max_len: int | None = None,
    passage_max_len: int | None = None,
    query_instruction: str | None = None,
    passage_instruction: str | None = None,
    cache_dir: PathLike | None = None,
    overwrite: bool = False,
    skip_bad_rows: bool = False,
    bf16: bool = False,
    show_progress: bool = True,
) -> ScoreResult:
    """Score every (query, passage) pair of FlagEmbedding rows with a teacher; write the rows
    with ``pos_scores`` / ``neg_scores`` added, as `embtune score` does.

    The rows keep every other field, in order; existing scores are replaced. Each distinct
    pair is scored once, longest first in batches of ``batch_size``, and its score committed
    to a SQLite cache keyed by the teacher (weights, tokenizer, settings) and the two texts:
    a killed run continues where it stopped, a rerun scores nothing. The output is written
    atomically, once every pair is scored.

    Args:
        teacher: model folder or hub name.
        train_data: FlagEmbedding jsonl file(s), or folders of .json/.jsonl files.
        output: the jsonl file to write.
        teacher_kind: "auto" (from the model's config.json and sentence-transformers files),
            "cross-encoder" (a one-label sequence classifier; score = raw logit) or
            "bi-encoder" (an embedding model; score = cosine similarity).
        batch_size: pairs per forward pass.
        max_length: cross-encoder: tokens of a pair (default 512); the query takes at most
            3/4 of them, as FlagEmbedding's reranker does.
        query_max_len, passage_max_len: bi-encoder: token limits (default: the model's saved
            settings).
        query_instruction, passage_instruction: text put before every query / passage (a
            cross-encoder: FlagEmbedding's rerank instructions, default none; a bi-encoder:
            default the model's saved prompts).
        cache_dir: the score cache's folder (default: $EMBTUNE_CACHE or ~/.cache/embtune).
        overwrite: replace ``output`` when it exists (else refused); never when it is one of
            the input files.
        skip_bad_rows: rows of ``train_data`` that fail validation are left out, counted and
            listed in ``<output stem>.rejected_rows.jsonl`` beside ``output`` (always written
            then, empty when none were), instead of refusing the whole input.
        bf16: score in bfloat16 autocast (faster; scores within ~1e-2 of fp32, cached apart).
        show_progress: print what is scored and show a progress bar.

    Returns:
        :class:`ScoreResult`: ``counts`` (pairs, distinct, cached, computed), ``output``,
        ``cache_file``, ``notes``, ``seconds``, and ``text``, the printed report.

    Raises:
        UsageError: a bad option, data or teacher, with the command's one-line message.
        TrainingStopped: a non-finite score, or the output could not be written after the
            work (a full disk): the scores computed are cached; the command exits 3.

    Example:
        ::

            from embtune import api

            result = api.score("BAAI/bge-reranker-base", "train.jsonl", "scored.jsonl")
            print(result.text)
    """
    import time

    from embtune.data.store import usable_cache_dir
    from embtune.scoring.rows import read_rows
    from embtune.scoring.teachers import TeacherSettings, load_teacher

    # Every option is checked before the model loads, so a typo costs no waiting.
    choice(teacher_kind, "--teacher-kind", TEACHER_KINDS)
    batch_size = int_option(batch_size, "--batch-size", 1)
    settings = TeacherSettings(
        max_length=optional_int(max_length, "--max-length", 1),
        query_instruction=query_instruction,
        passage_instruction=passage_instruction,
        query_max_len=optional_int(query_max_len, "--query-max-len", 1),
        passage_max_len=optional_int(passage_max_len, "--passage-max-len", 1),
        precision=precision(bf16),
    )
    data = path_list(train_data)
    out, report = _checked_paths(output, data, overwrite, skip_bad_rows)
    cache = usable_cache_dir(cache_dir)
    started = time.perf_counter()
    source = read_rows(data, skip_bad_rows=skip_bad_rows)
    name = os.fspath(teacher)
    kind, why = _choose_kind(name, teacher_kind, settings)
    model = load_teacher(name, kind, settings)
    if show_progress:
        print(f"scoring {len(source.rows):,} rows of {', '.join(data)} with {name} ({kind})")
    scores, counts, cache_file = _score_rows(model, source, cache, batch_size, show_progress)
    _save(out, report, source, scores)
    return ScoreResult(
        output=out,
        rows=len(source.rows),
        counts=counts,
        teacher=name,
        teacher_kind=kind,
        kind_reason=why,
        cache_file=cache_file,
        seconds=time.perf_counter() - started,
        notes=_notes(source),
        rejected=source.rejected,
        rejected_report=report,
    )
