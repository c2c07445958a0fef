"""The plan of a sweep: the grid of configurations, their labels and `embtune train` flags.

:func:`plan_sweep` resolves every configuration and raises every refusal (a value given twice,
an unreadable input, a folder that is not a sweep's, finished runs with other options) before
any run starts. The options that may take several values are declared on
:class:`~embtune.config.TrainConfig`'s fields (``sweep`` metadata, see
:func:`embtune.config.option`); :data:`AXES` lists them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from embtune.config import TrainConfig, flag, resolve_config
from embtune.errors import UsageError
from embtune.run_files import CONFIG_FILE
from embtune.sweep.results import run_finished


def _declared_axes() -> dict[str, dict]:
    """Option -> its ``sweep`` metadata, for each TrainConfig field that has one, in grid order."""
    declared = sorted(
        (f for f in fields(TrainConfig) if "sweep" in f.metadata),
        key=lambda f: f.metadata["sweep"]["order"],
    )
    return {f.name: f.metadata["sweep"] for f in declared}


_DECLARED = _declared_axes()
# Options that may take several values in one sweep (each value is one point of the grid), in
# grid order: the order of a run label's parts ("g4-b16"), of the points and of the CSV columns.
AXES: tuple[str, ...] = tuple(_DECLARED)
DATA_AXIS = "data"  # --data-variant: the grid's first axis when given
# Short names used in run labels ("neg10-g4-b16") and table headers.
AXIS_SHORT: dict[str, str] = {DATA_AXIS: "", **{a: m["label"] for a, m in _DECLARED.items()}}
AXIS_HEADER: dict[str, str] = {DATA_AXIS: "data", **{a: m["header"] for a, m in _DECLARED.items()}}

# The sweep folder: runs/<label>/ (one embtune run folder each), logs/<label>.log, the reports.
RUNS_DIR = "runs"
LOGS_DIR = "logs"
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
SWEEP_CSV = "sweep.csv"
LOSS_PNG = "loss.png"
GROUP_PNG = "by_group_size.png"

# Never passed to a run: the sweep chooses the folder and whether a run restarts or resumes,
# and passes every option explicitly (so a --config file is read once, here).
NOT_PASSED = ("output_dir", "overwrite_output_dir", "resume", "resume_from", "config")
# Ignored when deciding whether a finished run still matches the sweep's options: they do not
# change what is trained.
NOT_COMPARED = (
    *NOT_PASSED,
    "cache_dir",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
    "hub_token",
)

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
class SweepPlan:
    """Everything the sweep will do, decided (and every refusal raised) before any run starts."""

    out: Path
    points: list[SweepPoint]
    axes: dict[str, list[object]]  # every axis with several values, in grid order
    shared_flags: list[str]  # options passed unchanged to every run
    overwrite: bool = False


def format_value(value: object) -> str:
    """An axis value as labels and tables show it."""
    # repr() for floats: the shortest text that reads back as the same number, so two values
    # never share a label (":g" would print 2e-05 and 2.0000001e-05 alike).
    return repr(value) if isinstance(value, float) else str(value)


def format_values(values: Sequence[object]) -> str:
    """An axis's values, space-separated, as the sweep's output lists them."""
    return " ".join(format_value(v) for v in values)


def point_label(values: Mapping[str, object], varied: Sequence[str]) -> str:
    """Run label from the axes that vary: ``neg10-g4-b16``; ``run`` for a one-point grid."""
    parts = [f"{AXIS_SHORT[axis]}{format_value(values[axis])}" for axis in varied]
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
            out.append(f"{flag(f.name)}={format_value(value)}")
    return out


def config_differences(saved: Mapping[str, object], config: TrainConfig) -> list[str]:
    """``name: saved -> now`` for every compared option that differs."""
    now = config.to_dict()
    return [
        f"{name} {saved.get(name)!r} there, {now[name]!r} now"
        for name in now
        if name not in NOT_COMPARED and saved.get(name) != now[name]
    ]


def read_saved_config(run_dir: Path) -> dict | None:
    """The options a run folder was trained with (its train_config.yaml); None if unreadable."""
    import yaml

    try:
        data = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


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
            if format_value(value) in seen:
                raise UsageError(f"{flag(axis)}: value {value} is given twice")
            seen.add(format_value(value))
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
        if config.learning_rate == "auto":
            # Each run would search its own rate: a sweep inside every point of the sweep.
            raise UsageError(
                "--learning-rate auto: a sweep's runs each take a number; give the rates to "
                "compare (--learning-rate 1e-5 2e-5 5e-5), or let one run choose with "
                "`embtune train --learning-rate auto`"
            )
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
            load_training_data(
                list(point.config.train_data),
                point.config.train_split,
                skip_bad_rows=point.config.skip_bad_rows,
            )
            checked.add(key)
    first = points[0].config
    if first.eval_data:
        load_beir(Path(first.eval_data), first.eval_split, skip_bad_rows=first.skip_bad_rows)
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
        saved = read_saved_config(run_dir)
        differences = config_differences(saved or {}, point.config)
        if differences:
            raise UsageError(
                f"{run_dir} is a finished run with other options ({'; '.join(differences[:3])}); "
                "pass --overwrite-output-dir to train every configuration again, or choose "
                "another --output-dir"
            )
