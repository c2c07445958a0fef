"""The files an evaluation writes besides ``--json``: the ranking as a TREC run
(``--trec-run``) and the metrics as an MTEB result (``--mteb-json``).

:class:`ResultFiles` checks the options before any work (the files writable, none over an
input or over another output, the cut-offs MTEB needs), the data's ids once it is read, and
writes both files atomically after the work. `embtune eval` and `embtune eval --reranker`
(embtune.api.evaluate and evaluate_reranking) share it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from embtune.api.options import (
    PathLike,
    input_files,
    output_file,
    refuse_input_as_output,
    save_json,
    save_result,
)
from embtune.errors import UsageError

if TYPE_CHECKING:
    from embtune.data.formats import BeirDataset

Run = Mapping[str, Mapping[str, float]]
WHAT_IS_WRITTEN = {"--trec-run": "the ranking", "--mteb-json": "the metrics"}


@dataclasses.dataclass(frozen=True)
class ResultFiles:
    """The --trec-run and --mteb-json options of one evaluation (None: not given)."""

    trec_run: PathLike | None = None
    trec_run_tag: str | None = None
    mteb_json: PathLike | None = None
    mteb_task_name: str | None = None
    mteb_dataset_revision: str | None = None
    mteb_languages: Sequence[str] | None = None

    def checked(
        self,
        k_values: Iterable[int],
        data: Path,
        split: str,
        json_path: Path | None,
        report: Path | None,
        limit_queries: int | None = None,
        dims: Sequence[int] = (),
        other_inputs: Sequence[Path] = (),
    ) -> ResultFiles:
        """These options checked before the work, paths as Paths: each file writable and
        neither an input (the ``split`` of ``data``, ``other_inputs``) nor another output
        (``json_path``, the rejected-rows ``report``); the MTEB options only with --mteb-json,
        and --k including 10."""
        from embtune.eval.mteb_result import check_languages, check_main_score
        from embtune.eval.trec_run import DEFAULT_TAG, check_tag

        self._refuse_orphans()
        given = self._paths()
        if dims and given:
            raise UsageError(
                f"{next(iter(given))}: not with --dims (one ranking and one set of metrics "
                "per file); evaluate one dimension at a time for these files"
            )
        if self.mteb_json is not None:
            check_main_score(k_values)
            if limit_queries:
                raise UsageError(
                    "--mteb-json: not with --limit-queries (metrics of some of the queries are "
                    "no result of the task)"
                )
        files = {
            option: output_file(path, option, make_folders=True) for option, path in given.items()
        }
        inputs = [*input_files(data, split), *other_inputs]
        others = {"the --json file": json_path, "the --skip-bad-rows list of rows": report}
        _refuse_overlaps(files, inputs, others)
        return dataclasses.replace(
            self,
            trec_run=files.get("--trec-run"),
            trec_run_tag=check_tag(self.trec_run_tag or DEFAULT_TAG),
            mteb_json=files.get("--mteb-json"),
            mteb_languages=check_languages(self.mteb_languages or ()),
        )

    def _paths(self) -> dict[str, PathLike]:
        """The files given, by option as the command spells it."""
        paths = {"--trec-run": self.trec_run, "--mteb-json": self.mteb_json}
        return {option: path for option, path in paths.items() if path is not None}

    def _refuse_orphans(self) -> None:
        """A file's own options only with its file."""
        needs = {
            "--trec-run-tag": (self.trec_run_tag, self.trec_run, "--trec-run"),
            "--mteb-task-name": (self.mteb_task_name, self.mteb_json, "--mteb-json"),
            "--mteb-dataset-revision": (self.mteb_dataset_revision, self.mteb_json, "--mteb-json"),
            "--mteb-languages": (self.mteb_languages, self.mteb_json, "--mteb-json"),
        }
        for option, (value, file, file_option) in needs.items():
            if value is not None and file is None:
                raise UsageError(f"{option}: only with {file_option} FILE")
        for option, value in (
            ("--mteb-task-name", self.mteb_task_name),
            ("--mteb-dataset-revision", self.mteb_dataset_revision),
        ):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UsageError(f"{option}: expected a non-empty text, got {value!r}")

    def check_ids(self, data: BeirDataset) -> None:
        """With --trec-run, refuse ids a TREC line cannot hold (before a model loads)."""
        if self.trec_run is not None:
            from embtune.eval.trec_run import check_ids

            check_ids(data)

    def write(
        self, run: Run, metrics: Mapping[str, float], data: PathLike, split: str, seconds: float
    ) -> None:
        """Write the TREC run of ``run`` and the MTEB result of ``metrics``, each atomically;
        a full disk stops the command (exit 3) with nothing half-written."""
        if self.trec_run is not None:
            from embtune.eval.trec_run import DEFAULT_TAG, write_trec_run

            path, tag = Path(self.trec_run), self.trec_run_tag or DEFAULT_TAG
            write = functools.partial(write_trec_run, path, run, tag)
            save_result(path, write, "the evaluation", "--trec-run")
        if self.mteb_json is not None:
            from embtune.data.dataset_names import dataset_name
            from embtune.eval.mteb_result import task_result

            record = task_result(
                metrics,
                task_name=self.mteb_task_name or dataset_name(data),
                split=split,
                evaluation_time=seconds,
                dataset_revision=self.mteb_dataset_revision,
                languages=self.mteb_languages or (),
            )
            save_json(Path(self.mteb_json), record, "the evaluation", "--mteb-json")


def _refuse_overlaps(
    files: Mapping[str, Path], inputs: Sequence[Path], other_outputs: Mapping[str, Path | None]
) -> None:
    """Refuse a file over an input, or one that another output names too."""
    taken = {os.path.abspath(p): what for what, p in other_outputs.items() if p is not None}
    for option, path in files.items():
        refuse_input_as_output(path, inputs, option, WHAT_IS_WRITTEN[option])
        key = os.path.abspath(path)
        if key in taken:
            raise UsageError(
                f"{option}: {path} is also {taken[key]}; give each output its own file"
            )
        taken[key] = f"the {option} file"
