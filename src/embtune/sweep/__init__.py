"""`embtune sweep`: short trainings over a grid of options, compared in one table and plots.

A sweep is a list of :class:`SweepPoint` (one resolved :class:`~embtune.config.TrainConfig`
each, the product of every axis given with several values, plus an optional data axis). Each
point trains in its own ``python -m embtune train`` process, into ``OUT/runs/<label>/``:

* peak memory is then the run's own (one process per run; see
  :func:`~embtune.sweep.runner._wait_for_child`),
* a crash or out-of-memory kill in one configuration is a failed row, not a failed sweep,
* the run folder is an ordinary embtune run: the same files, reopenable, resumable.

The sweep reads each run's ``train_log.jsonl`` and ``train_summary.json`` and writes
``sweep.md``, ``sweep.csv``, ``sweep.json``, ``loss.png`` and ``by_group_size.png`` into OUT.
A number a run did not report is "n/a" (null in JSON), never estimated. Running the same sweep
again reuses the runs that finished and trains the others.

Modules: :mod:`~embtune.sweep.plan` (the grid, labels, flags and every refusal up front),
:mod:`~embtune.sweep.runner` (the child processes), :mod:`~embtune.sweep.results` (reading a
run folder) and :mod:`~embtune.sweep.reports` (table, CSV, JSON, plots). None imports torch:
`embtune --help` imports the sweep command.
"""

from embtune.sweep.plan import (
    AXES,
    GROUP_PNG,
    LOSS_PNG,
    SWEEP_CSV,
    SWEEP_JSON,
    SWEEP_MD,
    DataVariant,
    SweepPlan,
    SweepPoint,
    parse_data_variant,
    plan_sweep,
    point_label,
    train_flags,
)
from embtune.sweep.reports import markdown_table, write_reports
from embtune.sweep.results import RunResult, first_error_line, read_run
from embtune.sweep.runner import child_command, run_sweep

__all__ = [
    "AXES",
    "GROUP_PNG",
    "LOSS_PNG",
    "SWEEP_CSV",
    "SWEEP_JSON",
    "SWEEP_MD",
    "DataVariant",
    "RunResult",
    "SweepPlan",
    "SweepPoint",
    "child_command",
    "first_error_line",
    "markdown_table",
    "parse_data_variant",
    "plan_sweep",
    "point_label",
    "read_run",
    "run_sweep",
    "train_flags",
    "write_reports",
]
