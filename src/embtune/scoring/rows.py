"""The rows `embtune score` reads and writes: FlagEmbedding jsonl, every field passed through.

Rows are read and validated by the training reader's own checks
(:func:`embtune.data.formats.flag_rows`), so a file `train` would refuse is refused here with
the same lines, and kept as the JSON objects they are: ``prompt``, ids and any other field
come out unchanged and in their order. Scores go into ``pos_scores`` / ``neg_scores``, aligned
with ``pos`` / ``neg``: an existing field is replaced where it stands, a new one is appended.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embtune.atomic import atomic_write
from embtune.data.formats import flag_rows, is_beir_dir, refuse_no_rows, training_files
from embtune.errors import InputProblem, ProblemCollector

# Scores as mine writes them: float32 logits and cosines hold no more than this.
DECIMALS = 6


@dataclass
class ScoreInput:
    """The validated rows of every input file, in reading order."""

    rows: list[dict]
    files: list[Path]
    rejected: list[InputProblem] = field(default_factory=list)  # skip_bad_rows: rows left out

    def pairs(self) -> list[tuple[str, str]]:
        """Every (query, passage) pair: each row's positives, then its negatives."""
        return [(row["query"], text) for row in self.rows for text in passages(row)]

    def rows_with_scores(self) -> int:
        """Rows that already hold teacher scores (replaced by this run's)."""
        return sum(1 for r in self.rows if r.get("pos_scores") or r.get("neg_scores"))


def passages(row: dict) -> list[str]:
    """A row's passages in scoring order: ``pos``, then ``neg``."""
    return [*row["pos"], *(row.get("neg") or [])]


def _input_files(entries: Sequence[Path], problems: ProblemCollector) -> list[Path]:
    """The jsonl files the --train-data entries name; problems for those that name none."""
    files: list[Path] = []
    for entry in entries:
        if not entry.exists():
            problems.add(str(entry), None, None, "file or folder does not exist")
        elif is_beir_dir(entry):
            problems.add(
                str(entry),
                None,
                None,
                "is a BEIR folder, which has no negatives to score: write rows with "
                "`embtune mine` and score those",
            )
        elif not (found := training_files(entry)):
            problems.add(str(entry), None, None, "folder has no .json/.jsonl files")
        else:
            files.extend(found)
    return files


def read_rows(entries: Sequence[Path | str], *, skip_bad_rows: bool = False) -> ScoreInput:
    """Read and validate every row (InputError, up to 20 problems, else ``skip_bad_rows``).

    Finding no row at all is refused too, naming how many bad rows were left out.
    """
    problems = ProblemCollector(skip_bad_rows=skip_bad_rows)
    entries = [Path(e) for e in entries]
    if not entries:
        problems.add("--train-data", None, None, "no training data given")
    files = _input_files(entries, problems)
    rows = [row for _, _, row in flag_rows(files, problems)]
    refuse_no_rows(problems, entries, found=bool(rows))
    problems.raise_if_any()
    return ScoreInput(rows, files, problems.rejected)


def with_scores(rows: Sequence[dict], scores: Sequence[float]) -> list[dict]:
    """Each row with its share of ``scores`` (in :meth:`ScoreInput.pairs` order) as
    ``pos_scores`` / ``neg_scores``; every other field unchanged and in place."""
    out: list[dict] = []
    at = 0
    for row in rows:
        count = len(row["pos"])
        scored = dict(row)
        scored["pos_scores"] = [round(s, DECIMALS) for s in scores[at : at + count]]
        at += count
        count = len(row.get("neg") or [])
        scored["neg_scores"] = [round(s, DECIMALS) for s in scores[at : at + count]]
        at += count
        out.append(scored)
    if at != len(scores):
        raise ValueError(f"{len(scores)} scores for {at} passages")
    return out


def write_rows(rows: Sequence[dict], path: Path) -> None:
    """Write rows as jsonl, atomically: readers see the old file or the whole new one."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write)
