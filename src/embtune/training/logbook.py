"""The run's log: every record goes to train_log.jsonl (main process), the --report-to
trackers (training/trackers.py: TensorBoard by default) and the history a checkpoint carries,
so a resumed run's log is the uninterrupted run's."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from embtune.atomic import atomic_write
from embtune.checkpoint import stopped_writing
from embtune.run_files import LOG_FILE

if TYPE_CHECKING:
    from accelerate import Accelerator


def rewrite_log(path: Path, history: list[dict]) -> None:
    """Make train_log.jsonl hold exactly the checkpoint's history (drops lines logged after it)."""
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def wait_for_a_later_events_file(folder: Path) -> None:
    """Sleep until the clock is past the second in which the newest TensorBoard file was made.

    TensorBoard reads a run's event files in name order, and a name starts with its creation
    second. A resumed run's writer created within the killed run's second could sort first (the
    process id decides) and then be read as the older file.
    """
    stamps = [
        int(match.group(1))
        for path in folder.glob("events.out.tfevents.*")
        if (match := re.match(r"events\.out\.tfevents\.(\d+)\.", path.name))
    ]
    if stamps and (wait := max(stamps) + 1 - time.time()) > 0:
        time.sleep(wait)


class Logbook:
    """Writes records to the history, the trackers (numbers only) and train_log.jsonl."""

    def __init__(self, accelerator: Accelerator, history: list[dict], out: Path) -> None:
        self.accelerator = accelerator
        self.history = history
        self.out = out
        self.file: TextIO | None = None

    def open(self, start_step: int) -> None:
        """Open train_log.jsonl on the main process: new, or cut back to the checkpoint."""
        if not self.accelerator.is_main_process:
            return
        path = self.out / LOG_FILE
        if start_step:
            rewrite_log(path, self.history)
        self.file = open(path, "a" if start_step else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict) -> None:
        """Append one record (``step`` is its x axis in TensorBoard); a disk that filled up
        stops the run (exit 3) naming the checkpoint that holds the work."""
        self.history.append(record)
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        what = "TensorBoard events"
        try:
            # TensorBoard's writer thread re-raises its own OSError here, on any process.
            self.accelerator.log(numbers, step=record["step"])
            if self.file:
                what = LOG_FILE
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
        except OSError as exc:
            message = f"step {record['step']}: could not write {what}"
            raise stopped_writing(message, exc, self.out) from exc

    def close(self) -> None:
        """Close train_log.jsonl (a full disk's last error was reported by write)."""
        if self.file:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None
