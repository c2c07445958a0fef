"""`embtune sweep`: short trainings over a grid of options, compared in one table and plots.

A sweep is a list of :class:`SweepPoint` (one resolved :class:`~embtune.config.TrainConfig`
each, the product of every axis given with several values, plus an optional data axis). Each
point trains in its own ``python -m embtune train`` process, into ``OUT/runs/<label>/``:

* peak memory is then the run's own (one process per run; see :func:`_wait_for_child`),
* a crash or out-of-memory kill in one configuration is a failed row, not a failed sweep,
* the run folder is an ordinary embtune run: the same files, reopenable, resumable.

The sweep reads each run's ``train_log.jsonl`` and ``train_summary.json`` and writes
``sweep.md``, ``sweep.csv``, ``sweep.json``, ``loss.png`` and ``by_group_size.png`` into OUT.
A number a run did not report is "n/a" (null in JSON), never estimated. Running the same sweep
again reuses the runs that finished and trains the others.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from embtune.atomic import atomic_write, write_json_atomically
from embtune.checkpoint import TRAINER_STATE_FILE
from embtune.config import TrainConfig, flag, resolve_config
from embtune.errors import UsageError

# Options that may take several values in one sweep (each value is one point of the grid).
AXES: tuple[str, ...] = (
    "train_group_size",
    "batch_size",
    "learning_rate",
    "temperature",
    "negative_sampling",
    "cache_chunk_size",
)
# Short names used in run labels ("neg10-g4-b16") and table headers.
AXIS_SHORT = {
    "data": "",
    "train_group_size": "g",
    "batch_size": "b",
    "learning_rate": "lr",
    "temperature": "t",
    "negative_sampling": "ns-",
    "cache_chunk_size": "cc",
}
AXIS_HEADER = {
    "data": "data",
    "train_group_size": "G",
    "batch_size": "B",
    "learning_rate": "lr",
    "temperature": "temp",
    "negative_sampling": "sampling",
    "cache_chunk_size": "cache chunk",
}
DATA_AXIS = "data"

RUNS_DIR = "runs"
LOGS_DIR = "logs"
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
SWEEP_CSV = "sweep.csv"
LOSS_PNG = "loss.png"
GROUP_PNG = "by_group_size.png"
# Files of a run folder: training.run's LOG_FILE, CONFIG_FILE and SUMMARY_FILE, named again
# here because importing embtune.training.run loads torch; `embtune --help` imports this module.
RUN_LOG = "train_log.jsonl"
RUN_CONFIG = "train_config.yaml"
RUN_SUMMARY = "train_summary.json"
RUN_STATE = TRAINER_STATE_FILE

# Never passed to a run: the sweep chooses the folder and whether a run restarts or resumes,
# and passes every option explicitly (so a --config file is read once, here).
NOT_PASSED = ("output_dir", "overwrite_output_dir", "resume", "resume_from", "config")
# Ignored when deciding whether a finished run still matches the sweep's options: they do not
# change what is trained.
NOT_COMPARED = (*NOT_PASSED, "cache_dir")

NA = "n/a"
_LABEL_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class DataVariant:
    """One value of the data axis: a name for labels and the --train-data paths it stands for."""

    name: str
    paths: tuple[str, ...]


def parse_data_variant(text: str) -> DataVariant:
    """``NAME=PATH`` (several paths separated by commas) -> :class:`DataVariant`."""
    name, sep, paths = text.partition("=")
    name = name.strip()
    if not sep or not paths.strip():
        raise UsageError(f"--data-variant: expected NAME=PATH, got {text!r}")
    if not _LABEL_SAFE.fullmatch(name):
        raise UsageError(
            f"--data-variant: name {name!r} must be letters, digits, '.', '_', '+' or '-' "
            "(it names the run folder)"
        )
    return DataVariant(name, tuple(p for p in paths.split(",") if p))


@dataclass
class SweepPoint:
    """One configuration of the grid: its label, its axis values and the full train options."""

    label: str
    values: dict[str, object]  # axis -> value; the data axis holds the variant's name
    config: TrainConfig  # validated; output_dir is OUT/runs/<label>


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


@dataclass
class SweepPlan:
    """Everything the sweep will do, decided (and every refusal raised) before any run starts."""

    out: Path
    points: list[SweepPoint]
    axes: dict[str, list[object]]  # every axis with several values, in grid order
    shared_flags: list[str]  # options passed unchanged to every run
    overwrite: bool = False


# --- planning --------------------------------------------------------------------------------


def _format_value(value: object) -> str:
    # repr() for floats: the shortest text that reads back as the same number, so two values
    # never share a label (":g" would print 2e-05 and 2.0000001e-05 alike).
    return repr(value) if isinstance(value, float) else str(value)


def point_label(values: Mapping[str, object], varied: Sequence[str]) -> str:
    """Run label from the axes that vary: ``neg10-g4-b16``; ``run`` for a one-point grid."""
    parts = [f"{AXIS_SHORT[axis]}{_format_value(values[axis])}" for axis in varied]
    return "-".join(parts) or "run"


def _field_default(name: str) -> object:
    f = TrainConfig.__dataclass_fields__[name]
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def train_flags(config: TrainConfig, skip: Iterable[str] = ()) -> list[str]:
    """The `embtune train` flags that reproduce ``config`` (options at their default omitted).

    Every option is spelled out, so a run does not depend on the YAML file the sweep read.
    Scalars use ``--flag=value`` so that a value starting with '-' is not taken for a flag.
    """
    out: list[str] = []
    skipped = set(NOT_PASSED) | set(skip)
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if f.name in skipped or value == _field_default(f.name):
            continue
        if isinstance(value, bool):
            out.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        elif isinstance(value, list):
            out.extend([flag(f.name), *map(str, value)])
        elif value is not None:
            out.append(f"{flag(f.name)}={_format_value(value)}")
    return out


def _config_differences(saved: Mapping[str, object], config: TrainConfig) -> list[str]:
    """``name: saved -> now`` for every compared option that differs."""
    now = config.to_dict()
    return [
        f"{name} {saved.get(name)!r} there, {now[name]!r} now"
        for name in now
        if name not in NOT_COMPARED and saved.get(name) != now[name]
    ]


def _read_saved_config(run_dir: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load((run_dir / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def run_finished(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a run that trained to its end.

    `embtune train` writes trainer_state.json with ``finished: true`` after the final model;
    train_summary.json, written last, counts as well.
    """
    if (run_dir / RUN_SUMMARY).is_file():
        return True
    try:
        state = json.loads((run_dir / RUN_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and bool(state.get("finished"))


def plan_sweep(
    args: argparse.Namespace,
    axes: Mapping[str, Sequence[object]],
    variants: Sequence[DataVariant],
    out: Path,
    overwrite: bool = False,
) -> SweepPlan:
    """Resolve and validate every configuration of the grid; raise UsageError before any work.

    ``args`` holds the `embtune train` options as parsed (only those given, as for
    :func:`~embtune.config.resolve_config`); ``axes`` the values of each grid option;
    ``variants`` the data axis (empty: --train-data of ``args``).
    """
    for axis, values in axes.items():
        seen: set[str] = set()
        for value in values:
            if _format_value(value) in seen:
                raise UsageError(f"{flag(axis)}: value {value} is given twice")
            seen.add(_format_value(value))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"--data-variant: name {twice!r} is given twice")
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    if variants and "train_data" in given:
        raise UsageError("--train-data and --data-variant exclude each other: give one of them")

    grid: dict[str, list[object]] = {}
    if variants:
        grid[DATA_AXIS] = list(names)
    grid.update({axis: list(values) for axis, values in axes.items()})
    varied = [axis for axis, values in grid.items() if len(values) > 1]
    by_name = {v.name: v for v in variants}

    points: list[SweepPoint] = []
    for combination in itertools.product(*grid.values()):
        values = dict(zip(grid, combination, strict=True))
        label = point_label(values, varied)
        point_args = dict(given)
        for name in NOT_PASSED:
            point_args.pop(name, None)
        point_args["config"] = given.get("config", "")
        point_args.update({axis: v for axis, v in values.items() if axis != DATA_AXIS})
        if DATA_AXIS in values:
            point_args["train_data"] = list(by_name[str(values[DATA_AXIS])].paths)
        point_args["output_dir"] = str(out / RUNS_DIR / label)
        try:
            config = resolve_config(argparse.Namespace(**point_args))
        except UsageError as exc:
            where = f" (configuration {label})" if varied else ""
            raise UsageError(f"{exc}{where}") from exc
        config.config = ""  # every option is passed as a flag; the YAML file is not reread
        points.append(SweepPoint(label, values, config))

    first = points[0].config
    if not (first.eval_data or first.dev_fraction):
        raise UsageError(
            "a sweep evaluates every configuration on a dev set: give --eval-data DIR (a BEIR "
            "folder, the same for every run) or --dev-fraction F"
        )
    _check_inputs(points)
    _check_output(out, points, overwrite)
    shared_skip = [*axes, *(["train_data"] if variants else [])]
    return SweepPlan(
        out=out,
        points=points,
        axes={axis: grid[axis] for axis in varied},
        shared_flags=train_flags(first, skip=shared_skip),
        overwrite=overwrite,
    )


def _check_inputs(points: Sequence[SweepPoint]) -> None:
    """Read every training data set, the dev set and the model's config once, up front.

    A typo in the third data variant must not surface after two finished trainings.
    """
    from embtune.data.formats import load_beir, load_training_data
    from embtune.models.encoder import check_max_lengths, load_model_config

    checked: set[tuple] = set()
    for point in points:
        key = (tuple(point.config.train_data), point.config.train_split)
        if key not in checked:
            load_training_data(list(point.config.train_data), point.config.train_split)
            checked.add(key)
    first = points[0].config
    if first.eval_data:
        load_beir(Path(first.eval_data), first.eval_split)
    model_config = load_model_config(first.model)
    check_max_lengths(model_config, first.query_max_len, first.passage_max_len)


def _check_output(out: Path, points: Sequence[SweepPoint], overwrite: bool) -> None:
    """Refuse a folder that is not a sweep's, or finished runs trained with other options."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not ((out / RUNS_DIR).is_dir() or (out / SWEEP_JSON).is_file()):
            raise UsageError(
                f"--output-dir: {out} is not empty and holds no sweep; choose another folder"
            )
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir: cannot write to {out} ({probe} is not writable)")
    if overwrite:
        return
    for point in points:
        run_dir = Path(point.config.output_dir)
        if not run_finished(run_dir):
            continue
        saved = _read_saved_config(run_dir)
        differences = _config_differences(saved or {}, point.config)
        if differences:
            raise UsageError(
                f"{run_dir} is a finished run with other options ({'; '.join(differences[:3])}); "
                "pass --overwrite-output-dir to train every configuration again, or choose "
                "another --output-dir"
            )


# --- running ---------------------------------------------------------------------------------


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
    saved = _read_saved_config(run_dir)
    if saved is not None and not _config_differences(saved, config):
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


def _read_jsonl(path: Path) -> list[dict]:
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


def _warnings(output: str) -> list[str]:
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
    history = _read_jsonl(run_dir / RUN_LOG)
    trained = [r for r in history if "loss" in r]
    dev = [r for r in history if "dev_ndcg@10" in r]
    try:
        summary = json.loads((run_dir / RUN_SUMMARY).read_text(encoding="utf-8"))
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


def _progress_poller(run_dir: Path, bar) -> Callable[[], None]:
    """Moves the progress bar to the run's last logged step (read from train_log.jsonl)."""

    def poll() -> None:
        records = _read_jsonl(run_dir / RUN_LOG)
        trained = [r for r in records if "loss" in r]
        if trained:
            bar.n = int(trained[-1]["step"])
            bar.set_postfix(loss=f"{trained[-1]['loss']:.4f}", refresh=False)
            bar.refresh()

    return poll


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _set_numbers(result: RunResult, numbers: Mapping[str, object]) -> None:
    for name, value in numbers.items():
        setattr(result, name, value)


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
        output = _read_text(log_file)
        _set_numbers(result, read_run(run_dir, output))
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
    output = _read_text(log_file)
    _set_numbers(result, read_run(run_dir, output))
    for line in _warnings(output):
        log(f"    {line}")
    if code == 0:
        result.status = "done"
        log(
            f"{prefix}: done in {result.seconds:.0f} s: loss {_fmt(result.loss, '.4f')} "
            f"(chance {_fmt(result.chance_loss, '.3f')}), "
            f"dev nDCG@10 {_fmt(result.dev_ndcg10, '.4f')}"
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
        f"{flag(a) if a != DATA_AXIS else 'data'} {_values(v)}" for a, v in plan.axes.items()
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


def _values(values: Sequence[object]) -> str:
    return " ".join(_format_value(v) for v in values)


# --- reports ---------------------------------------------------------------------------------


def _fmt(value: object, spec: str) -> str:
    return NA if value is None else format(value, spec)


def _mib(value: int | None) -> str:
    return NA if value is None else f"{value / 2**20:.0f} MiB"


def _pct(value: float | None) -> str:
    return NA if value is None else f"{100 * value:.0f}%"


def _table_axes(plan: SweepPlan) -> list[str]:
    """Axis columns of the table: the varied ones, plus G and B always (they set the budget)."""
    shown = list(plan.axes)
    for axis in ("train_group_size", "batch_size"):
        if axis not in shown:
            shown.append(axis)
    return shown


def _axis_value(point: SweepPoint, axis: str) -> object:
    return point.values[axis] if axis in point.values else getattr(point.config, axis)


def markdown_table(plan: SweepPlan, results: Sequence[RunResult]) -> str:
    """One row per configuration; failed runs say why."""
    axes = _table_axes(plan)
    header = [
        "run",
        *(AXIS_HEADER[a] for a in axes),
        "status",
        "steps",
        "candidates",
        "loss",
        "chance",
        "loss/chance",
        "dev nDCG@10",
        "texts/s",
        "peak memory",
        "neg. coverage",
        "seconds",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    points = {p.label: p for p in plan.points}
    for r in results:
        memory = _mib(r.memory_bytes)
        if r.peak_memory_bytes is None and r.max_rss_bytes is not None:
            memory += " (rss)"
        status = r.status if r.status != "failed" else f"failed: {r.error}".replace("|", "\\|")
        cells = [
            r.label,
            *(_format_value(_axis_value(points[r.label], a)) for a in axes),
            status,
            _fmt(r.steps, "d"),
            _fmt(r.candidates_per_query, ".0f"),
            _fmt(r.loss, ".4f"),
            _fmt(r.chance_loss, ".3f"),
            _fmt(r.loss_over_chance, ".3f"),
            _fmt(r.dev_ndcg10, ".4f"),
            _fmt(r.texts_per_second, ".1f"),
            memory,
            _pct(r.negative_coverage),
            _fmt(r.seconds, ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_COLUMNS = (
    "label",
    "status",
    "exit_code",
    "error",
    *(AXIS_HEADER[a] for a in (DATA_AXIS, *AXES)),
    "steps",
    "candidates_per_query",
    "loss",
    "chance_loss",
    "loss_over_chance",
    "accuracy",
    "dev_ndcg@10",
    "texts_per_second",
    "peak_memory_bytes",
    "max_rss_bytes",
    "negative_coverage",
    "seconds",
    "run_dir",
)


def _csv_rows(plan: SweepPlan, results: Sequence[RunResult]) -> list[dict[str, object]]:
    points = {p.label: p for p in plan.points}
    rows = []
    for r in results:
        point = points[r.label]
        row: dict[str, object] = {
            "label": r.label,
            "status": r.status,
            "exit_code": r.exit_code,
            "error": r.error,
            AXIS_HEADER[DATA_AXIS]: point.values.get(DATA_AXIS, ";".join(point.config.train_data)),
            **{AXIS_HEADER[a]: getattr(point.config, a) for a in AXES},
            "steps": r.steps,
            "candidates_per_query": r.candidates_per_query,
            "loss": r.loss,
            "chance_loss": r.chance_loss,
            "loss_over_chance": r.loss_over_chance,
            "accuracy": r.accuracy,
            "dev_ndcg@10": r.dev_ndcg10,
            "texts_per_second": r.texts_per_second,
            "peak_memory_bytes": r.peak_memory_bytes,
            "max_rss_bytes": r.max_rss_bytes,
            "negative_coverage": r.negative_coverage,
            "seconds": None if r.seconds is None else round(r.seconds, 1),
            "run_dir": r.run_dir,
        }
        rows.append({k: NA if v is None else v for k, v in row.items()})
    return rows


def plot_loss(plan: SweepPlan, results: Sequence[RunResult], path: Path) -> None:
    """Training loss against the step, one line per configuration, chance levels dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        history = [h for h in _read_jsonl(Path(r.run_dir) / RUN_LOG) if "loss" in h]
        if not history:
            continue
        color = colors[i % len(colors)]
        steps = [h["step"] for h in history]
        ax.plot(steps, [h["loss"] for h in history], color=color, label=r.label)
        chance = [(h["step"], h["chance_loss"]) for h in history if "chance_loss" in h]
        if chance:
            ax.plot(*zip(*chance, strict=True), color=color, ls="--", lw=0.8, alpha=0.7)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("training loss")
    ax.set_title("training loss per configuration (dashed: chance level ln(candidates))")
    if ax.lines:
        ax.legend(fontsize="small", ncol=2 if len(results) > 6 else 1)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_by_group_size(plan: SweepPlan, results: Sequence[RunResult], path: Path) -> None:
    """Dev nDCG@10, texts/s and peak memory against train_group_size.

    One line per combination of the other varied axes (e.g. per batch size or data variant).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [a for a in plan.axes if a != "train_group_size"]
    points = {p.label: p for p in plan.points}
    series: dict[str, list[tuple[int, RunResult]]] = {}
    for r in results:
        point = points[r.label]
        key = point_label(point.values, others) if others else "all"
        series.setdefault(key, []).append((point.config.train_group_size, r))
    panels = (
        ("dev nDCG@10", lambda r: r.dev_ndcg10),
        ("texts/s (training)", lambda r: r.texts_per_second),
        ("peak memory (MiB)", lambda r: None if r.memory_bytes is None else r.memory_bytes / 2**20),
    )
    fig, axs = plt.subplots(1, 3, figsize=(13, 4), dpi=120)
    sizes = sorted({p.config.train_group_size for p in plan.points})
    for ax, (title, value) in zip(axs, panels, strict=True):
        for key, runs in series.items():
            xy = sorted((g, v) for g, r in runs if (v := value(r)) is not None)
            if xy:
                ax.plot(*zip(*xy, strict=True), "o-", label=key)
        ax.set_xlabel("train_group_size")
        ax.set_title(title)
        ax.set_xticks(sizes)
        if len(series) > 1 and ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle("by group size (one line per " + (", ".join(others) or "sweep") + ")")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _markdown(plan: SweepPlan, results: Sequence[RunResult]) -> str:
    first = plan.points[0].config
    if first.max_steps:
        steps = f"{first.max_steps} steps (--max-steps)"
    else:
        steps = f"{first.epochs} epoch(s)"
    dev = (
        f"--eval-data {first.eval_data} (split {first.eval_split})"
        if first.eval_data
        else f"a seeded {first.dev_fraction:.0%} of each run's training rows (--dev-fraction)"
    )
    axes = "\n".join(
        f"* {flag(a) if a != DATA_AXIS else 'data (--data-variant)'}: {_values(v)}"
        for a, v in plan.axes.items()
    )
    failed = [r for r in results if r.status == "failed"]
    failures = "\n".join(f"* `{r.label}`: exit {r.exit_code}: {r.error} (log: {r.log_file})"
                         for r in failed)  # fmt: skip
    return f"""# embtune sweep

{len(plan.points)} configurations, each `embtune train` for {steps}, evaluated on the dev set:
{dev}.

Grid:

{axes or "* (a single configuration)"}

Options passed unchanged to every run: `{" ".join(plan.shared_flags) or "(defaults)"}`

{markdown_table(plan, results)}
{f"{chr(10)}Failed runs:{chr(10)}{chr(10)}{failures}{chr(10)}" if failed else ""}
* **loss**: the last logged training loss (mean over the last logging window), from
  `runs/<label>/train_log.jsonl`; **chance** = ln(candidates), the loss of a model that scores
  every candidate alike; **candidates**: passages each query is scored against.
* **dev nDCG@10**: the evaluation at the end of the run.
* **texts/s**: queries + passages encoded per second of training steps (`train_summary.json`,
  else the run's closing line).
* **peak memory**: the run's own figure (`train_summary.json`; on GPU the peak allocated);
  "(rss)": the process's peak resident memory measured by the sweep, when the run gave none.
* **neg. coverage**: share of the data's negatives the run used (`train_summary.json`).
* **seconds**: wall time of the run's process, model loading and dev evaluation included.
* n/a: the run did not report this number.

![loss per configuration]({LOSS_PNG})

![dev nDCG@10, throughput and memory by group size]({GROUP_PNG})
"""


def write_reports(plan: SweepPlan, results: Sequence[RunResult]) -> None:
    """sweep.md, sweep.csv, sweep.json, loss.png and by_group_size.png in plan.out."""
    out = plan.out
    text = _markdown(plan, results)
    atomic_write(out / SWEEP_MD, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(_csv_rows(plan, results))

    atomic_write(out / SWEEP_CSV, write_csv)
    points = {p.label: p for p in plan.points}
    write_json_atomically(
        out / SWEEP_JSON,
        {
            "axes": plan.axes,
            "shared_flags": plan.shared_flags,
            "runs": [{**asdict(r), "config": points[r.label].config.to_dict()} for r in results],
        },
    )
    plot_loss(plan, results, out / LOSS_PNG)
    plot_by_group_size(plan, results, out / GROUP_PNG)
