"""The reports of a sweep, in its folder: sweep.md, sweep.csv, sweep.json and two plots.

One row per configuration, every number as the run reported it; "n/a" (null in JSON) where a
run gave none. Written again after every run, so an interrupted sweep still leaves a table.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from embtune.atomic import atomic_write, write_json_atomically
from embtune.config import flag
from embtune.run_files import LOG_FILE
from embtune.sweep.plan import (
    AXES,
    AXIS_HEADER,
    DATA_AXIS,
    GROUP_PNG,
    LOSS_PNG,
    SWEEP_CSV,
    SWEEP_JSON,
    SWEEP_MD,
    SweepPlan,
    SweepPoint,
    format_value,
    format_values,
    point_label,
)
from embtune.sweep.results import RunResult, read_jsonl

NA = "n/a"


def format_or_na(value: object, spec: str) -> str:
    """``format(value, spec)``; "n/a" for a number the run did not report."""
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
            *(format_value(_axis_value(points[r.label], a)) for a in axes),
            status,
            format_or_na(r.steps, "d"),
            format_or_na(r.candidates_per_query, ".0f"),
            format_or_na(r.loss, ".4f"),
            format_or_na(r.chance_loss, ".3f"),
            format_or_na(r.loss_over_chance, ".3f"),
            format_or_na(r.dev_ndcg10, ".4f"),
            format_or_na(r.texts_per_second, ".1f"),
            memory,
            _pct(r.negative_coverage),
            format_or_na(r.seconds, ".0f"),
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
        history = [h for h in read_jsonl(Path(r.run_dir) / LOG_FILE) if "loss" in h]
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
        f"* {flag(a) if a != DATA_AXIS else 'data (--data-variant)'}: {format_values(v)}"
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
