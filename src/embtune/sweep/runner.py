"""Running a sweep: each configuration in its own `python -m embtune train` process.

One process per run, so its peak memory is its own (see :func:`_wait_for_child`) and a crash or
an out-of-memory kill fails one row, not the sweep. A run that finished in an earlier sweep is
reused, an unfinished one with the same options continues from its checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from embtune.config import TrainConfig, flag
from embtune.run_files import LOG_FILE
from embtune.sweep.plan import (
    DATA_AXIS,
    LOGS_DIR,
    RUNS_DIR,
    SWEEP_JSON,
    SweepPlan,
    SweepPoint,
    config_differences,
    format_values,
    read_saved_config,
    train_flags,
)
from embtune.sweep.reports import format_or_na, write_reports
from embtune.sweep.results import (
    RunResult,
    first_error_line,
    read_jsonl,
    read_run,
    read_text,
    run_finished,
    set_numbers,
    warning_lines,
)


def child_command(point: SweepPoint, restart: str | None) -> list[str]:
    """``python -m embtune train ...`` for one point; ``restart`` is --resume / --overwrite."""
    command = [sys.executable, "-m", "embtune", "train", *train_flags(point.config)]
    command += ["--output-dir", point.config.output_dir]
    if restart:
        command.append(restart)
    return command


def _restart_flag(run_dir: Path, config: TrainConfig, overwrite: bool) -> str | None:
    """How to start in ``run_dir``: fresh (None), --resume, or --overwrite-output-dir.

    An unfinished run with the same options continues from its newest checkpoint (or starts
    over when it has none); anything else in the folder is replaced.
    """
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    if overwrite:
        return "--overwrite-output-dir"
    saved = read_saved_config(run_dir)
    if saved is not None and not config_differences(saved, config):
        return "--resume"
    return "--overwrite-output-dir"


def _wait_for_child(
    process: subprocess.Popen, on_poll: Callable[[], None], interval: float = 0.5
) -> tuple[int, int | None]:
    """Wait for ``process``; return (exit code, its peak resident memory in bytes).

    ``os.wait4`` reports the resource usage of that one child (ru_maxrss: the high-water mark of
    its resident memory, kB on Linux). ``getrusage(RUSAGE_CHILDREN)`` would not do: it is the
    maximum over *all* children waited for so far, so every run after the largest would
    report the largest run's memory.
    """
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        on_poll()
        time.sleep(interval)
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code  # reaped here; Popen must not wait for it again
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
    return code, (usage.ru_maxrss * scale if usage.ru_maxrss else None)


def _progress_poller(run_dir: Path, bar) -> Callable[[], None]:
    """Moves the progress bar to the run's last logged step (read from train_log.jsonl)."""

    def poll() -> None:
        records = read_jsonl(run_dir / LOG_FILE)
        trained = [r for r in records if "loss" in r]
        if trained:
            bar.n = int(trained[-1]["step"])
            bar.set_postfix(loss=f"{trained[-1]['loss']:.4f}", refresh=False)
            bar.refresh()

    return poll


def run_point(
    point: SweepPoint,
    index: int,
    total: int,
    logs: Path,
    overwrite: bool,
    previous: Mapping[str, object] | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train one configuration in a child process (or reuse its finished run) and read it."""
    from tqdm.auto import tqdm

    run_dir = Path(point.config.output_dir)
    log_file = logs / f"{point.label}.log"
    result = RunResult(point.label, dict(point.values), run_dir=str(run_dir))
    result.log_file = str(log_file)
    prefix = f"[{index}/{total}] {point.label}"
    if not overwrite and run_finished(run_dir):
        # Measured by the earlier sweep; a finished run folder does not record them itself.
        if previous:
            result.seconds = previous.get("seconds")  # type: ignore[assignment]
            result.max_rss_bytes = previous.get("max_rss_bytes")  # type: ignore[assignment]
            result.command = list(previous.get("command") or [])  # type: ignore[call-overload]
        output = read_text(log_file)
        set_numbers(result, read_run(run_dir, output))
        result.status = "reused"
        log(f"{prefix}: finished in an earlier sweep, reused ({run_dir})")
        return result

    restart = _restart_flag(run_dir, point.config, overwrite)
    command = child_command(point, restart)
    result.command = command
    note = {"--resume": ", continuing the unfinished run", "--overwrite-output-dir": ""}
    log(f"{prefix}: training (log: {log_file}{note.get(restart or '', '')})")
    logs.mkdir(parents=True, exist_ok=True)
    # Unbuffered, so the log can be followed (tail -f) while the run goes.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    bar = tqdm(
        total=point.config.max_steps or None,
        desc=prefix,
        unit="step",
        disable=None,  # only on a terminal
        leave=False,
    )
    try:
        with open(log_file, "w", encoding="utf-8") as fh:
            process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
            try:
                code, rss = _wait_for_child(process, _progress_poller(run_dir, bar))
            except BaseException:
                # Ctrl-C or an error here: do not leave a training running unseen.
                process.terminate()
                process.wait()
                raise
    finally:
        bar.close()
    result.seconds = time.perf_counter() - started
    result.exit_code = code
    result.max_rss_bytes = rss
    output = read_text(log_file)
    set_numbers(result, read_run(run_dir, output))
    for line in warning_lines(output):
        log(f"    {line}")
    if code == 0:
        result.status = "done"
        log(
            f"{prefix}: done in {result.seconds:.0f} s: loss {format_or_na(result.loss, '.4f')} "
            f"(chance {format_or_na(result.chance_loss, '.3f')}), "
            f"dev nDCG@10 {format_or_na(result.dev_ndcg10, '.4f')}"
        )
    else:
        result.status = "failed"
        result.error = first_error_line(output, code)
        log(f"{prefix}: FAILED (exit {code}): {result.error}")
    return result


def _previous_results(out: Path) -> dict[str, dict]:
    try:
        data = json.loads((out / SWEEP_JSON).read_text(encoding="utf-8"))
        return {r["label"]: r for r in data.get("runs", []) if isinstance(r, dict)}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def run_sweep(plan: SweepPlan, log: Callable[[str], None] = print) -> list[RunResult]:
    """Run (or reuse) every configuration, then write the table, plots and JSON to plan.out."""
    out = plan.out
    (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    previous = _previous_results(out)
    total = len(plan.points)
    reusable = sum(1 for p in plan.points if run_finished(Path(p.config.output_dir)))
    what = ", ".join(
        f"{flag(a) if a != DATA_AXIS else 'data'} {format_values(v)}" for a, v in plan.axes.items()
    )
    plural = "s" if total != 1 else ""
    log(f"embtune sweep: {total} configuration{plural}" + (f" ({what})" if what else ""))
    if reusable and not plan.overwrite:
        log(
            f"embtune sweep: {reusable} of them finished in an earlier sweep and are reused "
            "(--overwrite-output-dir trains them again)"
        )
    results: list[RunResult] = []
    for index, point in enumerate(plan.points, start=1):
        results.append(
            run_point(
                point,
                index,
                total,
                out / LOGS_DIR,
                plan.overwrite,
                previous.get(point.label),
                log,
            )
        )
        # Written after every run, so an interrupted sweep still leaves a table of what ran.
        write_reports(plan, results)
    return results
