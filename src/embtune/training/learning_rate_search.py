"""``--learning-rate auto``: one short trial per grid value, the rule's choice, saved with the run.

A learning rate chosen on one data set does not carry over to another, so the run chooses its
own on the user's dev set. :func:`choose_learning_rate` is called by :func:`~embtune.training.
run.train` once the output folder is locked and every refusal is behind it, before the model is
loaded; it returns the options with the chosen number, so everything after (the optimizer, the
saved train_config.yaml, checkpoints) sees a float.

Each trial is a point of `embtune sweep` (:mod:`embtune.sweep.runner`): a child ``python -m
embtune train`` with the run's options except the learning rate (the grid value), --max-steps
(the trial's steps, with its own warm-up and decay), no evaluation before its end, no
checkpoints or best model, no interpolation, and its own folder. The search's folder,
``OUTPUT_DIR/learning_rate_search/``::

    runs/<label>/      one embtune run folder per trial (label: lr1e-05, ...)
    logs/<label>.log   its console output
    dev/               a dev set passed in memory (the demo's), as a BEIR folder the trials read
    choice.json        grid, trial steps, each trial's numbers, the rule, the chosen rate
    table.md           the table printed, with the choice and its reason

The run's own files never touch it (``--overwrite-output-dir`` clears only what a run writes).
A search killed half-way resumes with ``--resume``: finished trials are reused, an unfinished
one continues. ``--resume`` of a run whose search finished reuses its choice; one with a
checkpoint continues at the checkpoint's rate.

The trials are one-process trainings, so ``--learning-rate auto`` is refused under torchrun /
accelerate launch with several processes: their trials would train with another global batch
than the run's, and the other processes would wait at a barrier for the whole search.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.atomic import atomic_write, write_json_atomically
from embtune.config import TrainConfig
from embtune.data.epoch_plan import steps_per_epoch, total_steps
from embtune.errors import TrainingStopped, UsageError
from embtune.run_files import LEARNING_RATE_SEARCH_DIR, LOG_FILE
from embtune.sweep.plan import (
    SweepPoint,
    config_differences,
    format_value,
    point_label,
    read_saved_config,
)
from embtune.sweep.reports import format_or_na
from embtune.sweep.results import read_jsonl, run_finished
from embtune.sweep.runner import run_point
from embtune.training.learning_rate_choice import RULE, Choice, Trial
from embtune.training.learning_rate_choice import choose_learning_rate as apply_rule

if TYPE_CHECKING:
    from embtune.data.formats import BeirDataset
    from embtune.objectives.base import Objective
    from embtune.sweep.results import RunResult
    from embtune.training.preflight import Inputs, ResumePoint

RUNS_DIR = "runs"
LOGS_DIR = "logs"
DEV_DIR = "dev"  # a dev set given in memory, written for the trials
CHOICE_FILE = "choice.json"
TABLE_FILE = "table.md"

_DEFAULTS = TrainConfig()


@dataclasses.dataclass
class SearchPlan:
    """The trials of one search, decided before any of them trains."""

    folder: Path  # OUTPUT_DIR/learning_rate_search
    points: list[SweepPoint]  # one per grid value, in grid order
    trial_steps: int
    run_steps: int
    tolerance: float
    reference_sets: list[str]  # the --reference-data folders' names
    dev_data: BeirDataset | None = None  # a dev set given in memory, written to folder/dev


def say(line: str) -> None:
    """One line of the search's output."""
    print(f"embtune train: {line}", flush=True)


def check_search_launch(
    config: TrainConfig, processes: int, kind_name: str, objective: Objective | None
) -> None:
    """Refuse --learning-rate auto where its trials could not train what the run trains."""
    from embtune.choices import MODEL_KINDS

    if config.learning_rate != "auto":
        return
    if processes > 1 or "LOCAL_RANK" in os.environ:
        raise UsageError(
            "--learning-rate auto trains its trials as one-process runs, so it is not "
            "available under torchrun / accelerate launch: choose the rate with a one-process "
            "run (same options, --learning-rate auto) and pass the number it prints"
        )
    if objective is not None:
        raise UsageError(
            "--learning-rate auto trains its trials as `embtune train` processes, which cannot "
            "take an objective object; pass a number"
        )
    if kind_name not in MODEL_KINDS:
        raise UsageError(
            f"--learning-rate auto: model kind {kind_name!r} is not one `embtune train "
            "--model-kind` takes, so its trials cannot train it; pass a number"
        )


def saved_learning_rate(out: Path) -> float | None:
    """The learning rate a finished search in ``out`` chose (its choice.json), or None."""
    record = _read_choice(out / LEARNING_RATE_SEARCH_DIR)
    return record.get("chosen_learning_rate") if record else None


def choose_learning_rate(
    config: TrainConfig, inputs: Inputs, resume: ResumePoint, kind_name: str
) -> TrainConfig:
    """``config`` with the learning rate --learning-rate auto stands for (unchanged for a
    number): the checkpoint's when resuming one, a finished search's choice on --resume, else
    the choice of a search run now."""
    if config.learning_rate != "auto":
        return config
    if resume.state is not None:
        rate = resume.state["config"]["learning_rate"]
        say(f"--learning-rate auto: {rate!r}, the search's choice, as {resume.checkpoint} has it")
        return dataclasses.replace(config, learning_rate=rate)
    plan = plan_search(config, inputs, kind_name)
    saved = _read_choice(plan.folder) if config.resuming else None
    if saved is not None and _same_search(saved, plan):
        rate = saved["chosen_learning_rate"]
        say(
            f"--learning-rate auto: {rate!r}, chosen by the earlier search "
            f"({plan.folder / CHOICE_FILE}): {saved.get('reason')}"
        )
        return dataclasses.replace(config, learning_rate=rate)
    choice = run_search(plan, overwrite=config.overwrite_output_dir)
    return dataclasses.replace(config, learning_rate=choice.learning_rate)


def plan_search(config: TrainConfig, inputs: Inputs, kind_name: str) -> SearchPlan:
    """One trial per grid value: the run's options, with the trial's rate, steps and folder."""
    folder = inputs.out / LEARNING_RATE_SEARCH_DIR
    per_epoch = steps_per_epoch(len(inputs.data.records), config.batch_size)
    run_steps = total_steps(per_epoch, config.epochs, config.max_steps)
    trial_steps = config.learning_rate_trial_steps or max(1, run_steps // 4)
    trial = dataclasses.replace(
        config,
        model_kind=kind_name,
        max_steps=trial_steps,
        eval_steps=0,  # the dev set once, at the trial's end: the number the rule compares
        save_best=False,
        save_steps=0,
        interpolate_base="",
        # A trial is a plain run with a number: the search's own options at their defaults.
        learning_rate_grid=list(_DEFAULTS.learning_rate_grid),
        learning_rate_trial_steps=0,
        resume=False,
        resume_from="",
        overwrite_output_dir=False,
        config="",
        # A trial's model is not the run's: only the run's final model is shared.
        push_to_hub=False,
        hub_model_id="",
        hub_private_repo=False,
        hub_token=None,
    )
    if inputs.dev_in_memory:
        dev = str(folder / DEV_DIR)
        trial = dataclasses.replace(trial, eval_data=dev, eval_split="dev", dev_fraction=0.0)
    points = []
    for rate in config.learning_rate_grid:
        label = point_label({"learning_rate": rate}, ["learning_rate"])
        output = str(folder / RUNS_DIR / label)
        point_config = dataclasses.replace(trial, learning_rate=rate, output_dir=output)
        points.append(SweepPoint(label, {"learning_rate": rate}, point_config))
    return SearchPlan(
        folder=folder,
        points=points,
        trial_steps=trial_steps,
        run_steps=run_steps,
        tolerance=config.auto_tolerance,
        reference_sets=[Path(p).name for p in config.reference_data],
        dev_data=inputs.dev_data if inputs.dev_in_memory else None,
    )


def run_search(plan: SearchPlan, overwrite: bool = False) -> Choice:
    """Train (or reuse) every trial, print the table and the choice, save them; the choice."""
    from embtune.data.formats import write_beir

    count, steps = len(plan.points), plan.trial_steps
    say(
        f"--learning-rate auto: {count} trials x {steps} steps = {count * steps} steps, "
        f"{count * steps / plan.run_steps:.1f}x the run's {plan.run_steps} (in {plan.folder})"
    )
    if plan.dev_data is not None:
        write_beir(plan.folder / DEV_DIR, plan.dev_data, "dev")
    # Seconds of the trials a killed search finished: a reused run folder does not record them.
    earlier = (_read_choice(plan.folder, chosen=False) or {}).get("trials", [])
    previous = {t.get("label"): t for t in earlier if isinstance(t, dict)}
    trials: list[Trial] = []
    timed = False
    log = _trial_log()
    for index, point in enumerate(plan.points, start=1):
        again = overwrite or _finished_with_other_options(point)
        result = run_point(
            point, index, count, plan.folder / LOGS_DIR, again, previous.get(point.label), log
        )
        trials.append(trial_of(result, plan.reference_sets))
        if not timed and result.status != "reused" and result.seconds:
            timed = True
            left = sum(_will_train(p, overwrite) for p in plan.points[index:])
            if left:
                log(
                    f"the first trial took {result.seconds:.0f} s: about "
                    f"{left * result.seconds:.0f} s for the {left} left"
                )
    try:
        choice = apply_rule(trials, plan.tolerance)
    except TrainingStopped:
        _save(plan, trials, None)
        raise
    _save(plan, trials, choice)
    return choice


def _trial_log() -> Callable[[str], None]:
    """Prints the trials' lines indented; a warning every trial repeats (the negatives
    budget's) is printed once."""
    seen: set[str] = set()

    def log(line: str) -> None:
        if line.lstrip().startswith("embtune") and line in seen:
            return
        seen.add(line)
        print(f"  {line}", flush=True)

    return log


def _will_train(point: SweepPoint, overwrite: bool) -> bool:
    """True for a trial that trains (rather than reusing a finished run)."""
    finished = run_finished(Path(point.config.output_dir))
    return overwrite or not finished or _finished_with_other_options(point)


def _finished_with_other_options(point: SweepPoint) -> bool:
    """True for a trial folder holding a finished run of other options (trained again)."""
    run_dir = Path(point.config.output_dir)
    if not run_finished(run_dir):
        return False
    return bool(config_differences(read_saved_config(run_dir) or {}, point.config))


def trial_of(result: RunResult, reference_sets: list[str]) -> Trial:
    """The rule's view of one trial: its final dev nDCG@10 and the reference sets' from the
    same (last) evaluation record of its train_log.jsonl."""
    dev_records = [r for r in read_jsonl(Path(result.run_dir) / LOG_FILE) if "dev_ndcg@10" in r]
    last = dev_records[-1] if dev_records else {}
    reference = {name: _number(last.get(f"reference/{name}/ndcg@10")) for name in reference_sets}
    status, error = result.status, result.error
    if status != "failed" and result.dev_ndcg10 is None:
        status, error = "failed", f"no dev nDCG@10 in its {LOG_FILE}"
    rate = result.values["learning_rate"]
    return Trial(rate, result.dev_ndcg10, reference, status, result.seconds, error)  # type: ignore[arg-type]


def _number(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None  # type: ignore[arg-type]


def markdown_table(plan: SearchPlan, trials: list[Trial], choice: Choice | None) -> str:
    """lr, dev nDCG@10, each reference set's nDCG@10, seconds and status; the chosen marked."""
    header = ["lr", "dev nDCG@10", *(f"{name} nDCG@10" for name in plan.reference_sets)]
    header += ["seconds", "status"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in trials:
        status = f"failed: {trial.error}" if trial.status == "failed" else trial.status
        if choice is not None and trial.learning_rate == choice.learning_rate:
            status += ", chosen"
        cells = [
            format_value(trial.learning_rate),
            format_or_na(trial.dev_ndcg10, ".4f"),
            *(format_or_na(trial.reference_ndcg10.get(n), ".4f") for n in plan.reference_sets),
            format_or_na(trial.seconds, ".0f"),
            status,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _save(plan: SearchPlan, trials: list[Trial], choice: Choice | None) -> None:
    """Print the table and the choice; write table.md and choice.json."""
    table = markdown_table(plan, trials, choice)
    rule = "rule: " + RULE.replace("--auto-tolerance", f"--auto-tolerance ({plan.tolerance:g})")
    if choice is not None:
        verdict = f"learning rate {format_value(choice.learning_rate)}: {choice.reason}"
    else:
        verdict = "no learning rate chosen: every trial failed"
    print(f"\n{table}\n", flush=True)
    say(f"--learning-rate auto: {verdict}")
    say(f"  {rule}")
    text = f"# --learning-rate auto\n\n{table}\n\n{verdict}\n\n{rule}\n"
    atomic_write(plan.folder / TABLE_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    record = {
        "grid": [p.values["learning_rate"] for p in plan.points],
        "trial_steps": plan.trial_steps,
        "run_steps": plan.run_steps,
        "tolerance": plan.tolerance,
        "reference_sets": plan.reference_sets,
        "rule": RULE,
        "trials": [
            {
                "label": point.label,
                **dataclasses.asdict(trial),
                "reference_mean": trial.reference_mean,
                "run_dir": point.config.output_dir,
                "config": point.config.to_dict(),
            }
            for point, trial in zip(plan.points, trials, strict=True)
        ],
        "chosen_learning_rate": choice.learning_rate if choice else None,
        "reason": choice.reason if choice else verdict,
    }
    write_json_atomically(plan.folder / CHOICE_FILE, record)


def _read_choice(folder: Path, chosen: bool = True) -> dict | None:
    """choice.json of a search folder; None when missing, unreadable or (with ``chosen``)
    without a usable chosen learning rate."""
    import json

    try:
        record = json.loads((folder / CHOICE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    rate = record.get("chosen_learning_rate")
    usable = isinstance(rate, float) and rate > 0 and math.isfinite(rate)
    return record if usable or not chosen else None


def _same_search(record: dict, plan: SearchPlan) -> bool:
    """True when a saved choice was made by the trials ``plan`` would train, under its rule."""
    saved = [t for t in record.get("trials", []) if isinstance(t, dict)]
    if len(saved) != len(plan.points) or record.get("tolerance") != plan.tolerance:
        return False
    return all(
        t.get("label") == p.label
        and isinstance(t.get("config"), dict)
        and not config_differences(t["config"], p.config)
        for t, p in zip(saved, plan.points, strict=True)
    )
