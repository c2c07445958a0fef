"""What one run of a sweep reported: :class:`RunResult` and reading a run folder's files.

Every number comes from the run's own files (``train_summary.json``, ``train_log.jsonl``) or
its console output; one it did not report stays None ("n/a" in the tables), never estimated.
"""

from __future__ import annotations

import json
import math
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from embtune.run_files import LOG_FILE, SUMMARY_FILE, TRAINER_STATE_FILE


@dataclass
class RunResult:
    """One row of the sweep table; None means the run did not report the number."""

    label: str
    values: dict[str, object]
    status: str = "not run"  # done | reused | failed | not run
    exit_code: int | None = None
    error: str | None = None
    seconds: float | None = None  # wall time of the run's process (start-up and dev eval too)
    steps: int | None = None
    loss: float | None = None
    chance_loss: float | None = None
    loss_over_chance: float | None = None
    candidates_per_query: float | None = None
    accuracy: float | None = None
    dev_ndcg10: float | None = None
    texts_per_second: float | None = None
    peak_memory_bytes: int | None = None  # the run's own measure (train_summary.json or log)
    max_rss_bytes: int | None = None  # the process's peak resident memory, measured here
    negative_coverage: float | None = None
    run_dir: str = ""
    log_file: str = ""
    command: list[str] = field(default_factory=list)

    @property
    def memory_bytes(self) -> int | None:
        """Peak memory for the table: the run's own figure, else the sweep's RSS measure."""
        return self.peak_memory_bytes if self.peak_memory_bytes is not None else self.max_rss_bytes


def run_finished(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a run that trained to its end.

    `embtune train` writes trainer_state.json with ``finished: true`` after the final model;
    train_summary.json, written last, counts as well.
    """
    if (run_dir / SUMMARY_FILE).is_file():
        return True
    try:
        state = json.loads((run_dir / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and bool(state.get("finished"))


def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl log; a line cut short by a killed process is skipped."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def first_error_line(output: str, exit_code: int) -> str:
    """The line that says why a run failed, from its console output.

    embtune's own refusals ("embtune train: error: ...") come first; for a crash, the
    exception at the end of the traceback; for a signal, which one (SIGKILL is usually the
    out-of-memory killer).
    """
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    lines = [line.strip() for line in re.split(r"[\r\n]+", output) if line.strip()]
    for line in lines:
        if re.match(r"embtune \w+: (error|stopped): ", line):
            return line
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        exceptions = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        if exceptions:
            return exceptions[-1]
    return lines[-1] if lines else f"exit status {exit_code}"


def warning_lines(output: str) -> list[str]:
    """The run's own warnings (e.g. about unused negatives), to repeat in the sweep's output."""
    found = []
    for line in re.split(r"[\r\n]+", output):
        line = line.strip()
        if line.startswith("embtune") and re.search(r"\bwarning\b", line, re.I):
            found.append(line)
    return list(dict.fromkeys(found))


_TRAIN_DONE = re.compile(r"embtune train: (\d+) steps in ([\d.]+) s, ([\d.]+) texts/s")


def read_run(run_dir: Path, output: str = "") -> dict[str, object]:
    """The numbers a run reported: from train_summary.json, train_log.jsonl and its output.

    ``loss`` is the last logged loss (the mean over the last logging window); ``dev_ndcg10``
    the last dev evaluation (at the end of the run). Anything not reported is None.
    """
    history = read_jsonl(run_dir / LOG_FILE)
    trained = [r for r in history if "loss" in r]
    dev = [r for r in history if "dev_ndcg@10" in r]
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    last = trained[-1] if trained else {}

    def number(value: object) -> float | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok and math.isfinite(value) else None  # type: ignore[arg-type]

    loss, chance = number(last.get("loss")), number(last.get("chance_loss"))
    over_chance = number(last.get("loss_over_chance"))
    if over_chance is None and loss is not None and chance:
        over_chance = loss / chance
    steps = summary.get("steps")
    if not isinstance(steps, int):
        steps = max((int(r["step"]) for r in history if isinstance(r.get("step"), int)), default=0)
        steps = steps or None
    texts_per_second = number(summary.get("texts_per_second"))
    if texts_per_second is None and (match := _TRAIN_DONE.search(output)):
        texts_per_second = float(match.group(3))  # the run's closing line, when no summary
    memory = number(summary.get("peak_memory_bytes"))
    if memory is None:
        logged = [m for r in history if (m := number(r.get("peak_memory_bytes"))) is not None]
        memory = max(logged) if logged else None
    return {
        "steps": steps,
        "loss": loss,
        "chance_loss": chance,
        "loss_over_chance": over_chance,
        "candidates_per_query": number(last.get("candidates_per_query")),
        "accuracy": number(last.get("accuracy")),
        "dev_ndcg10": number(dev[-1].get("dev_ndcg@10")) if dev else None,
        "texts_per_second": texts_per_second,
        "peak_memory_bytes": int(memory) if memory is not None else None,
        "negative_coverage": number(summary.get("negative_coverage")),
    }


def read_text(path: Path) -> str:
    """A run's console log (undecodable bytes replaced); "" when there is none."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def set_numbers(result: RunResult, numbers: Mapping[str, object]) -> None:
    """Copy the numbers of :func:`read_run` onto ``result``."""
    for name, value in numbers.items():
        setattr(result, name, value)
