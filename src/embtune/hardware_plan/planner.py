"""A plan from start to end: read the data, write worst-case rows, pick the precision, measure
the grid, fit, recommend, verify the recommendation when it was extrapolated, explain."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from embtune.atomic import atomic_write
from embtune.data.formats import load_training_data
from embtune.errors import UsageError
from embtune.hardware_plan.grid import measure_grid
from embtune.hardware_plan.measure import (
    STEPS_PER_POINT,
    Measurement,
    Point,
    free_memory_bytes,
    measure,
    native_bf16,
)
from embtune.hardware_plan.memory_budget import budget_from_free, parse_size
from embtune.hardware_plan.memory_fit import fit_line
from embtune.hardware_plan.probe import write_probe_rows
from embtune.hardware_plan.recommend import (
    GIB,
    Recommendation,
    choose_point,
    fit_reasons,
    format_table,
    recommended_options,
    texts_within,
)


@dataclass
class Planner:
    """The checked settings of one plan (api.planning.plan checks them)."""

    model: str
    train_data: list[str]
    group_size: int
    batch_size: int | None
    max_batch: int
    lengths: tuple[int, int]
    precision: str
    time_limit: float
    headroom: float
    device: str
    show: bool
    memory_budget: str | int | None = None

    def _say(self, line: str) -> None:
        if self.show:
            print(line, flush=True)

    def _budget(self) -> tuple[int, str]:
        if self.memory_budget is not None:
            budget = parse_size(self.memory_budget)
            return budget, f"budget {budget / GIB:.2f} GiB (--memory-budget)"
        free = free_memory_bytes(self.device)
        budget = budget_from_free(free, self.headroom)
        return budget, (
            f"budget {budget / GIB:.2f} GiB: {free / GIB:.2f} GiB free on the {self.device} "
            f"less {self.headroom:.0%} headroom"
        )

    def _probe(self, work: Path) -> Path:
        from transformers import AutoTokenizer

        records = load_training_data(self.train_data).records
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--model {self.model}: cannot load its tokenizer: {exc}") from None
        probe = work / "probe.jsonl"
        rows = max(self.batch_size or 0, self.max_batch) * STEPS_PER_POINT
        write_probe_rows(records, tokenizer, *self.lengths, rows, self.group_size, probe)
        return probe

    def _run_point(self, probe: Path, work: Path):  # noqa: ANN202
        def run(point: Point) -> Measurement:
            return measure(point, self.model, probe, work, self.lengths, self.device)

        return run

    def _show_point(self, m: Measurement) -> None:
        p = m.point
        what = f"failed: {m.error}" if m.error else (
            f"peak {m.peak_bytes / GIB:.2f} GiB, {m.texts_per_second:.1f} texts/s"
        )  # fmt: skip
        self._say(
            f"  measured batch {p.batch_size} x group {p.group_size}"
            f"{f' chunk {p.cache_chunk_size}' if p.cache_chunk_size else ''} {p.precision}: "
            f"{what} ({m.seconds:.0f} s)"
        )

    def _precision(self, run) -> tuple[str, list[Measurement], str]:  # noqa: ANN001
        if self.precision != "auto":
            return self.precision, [], f"precision {self.precision} (--precision)"
        if not native_bf16(self.device):
            return "fp32", [], (
                f"precision fp32: this {self.device} has no native bf16 (no AVX512-BF16 or AMX), "
                "where bf16 is emulated and slower than fp32"
            )  # fmt: skip
        pair = [run(Point(2, self.group_size, 0, p)) for p in ("fp32", "bf16")]
        for m in pair:
            self._show_point(m)
        fp32, bf16 = pair
        faster = not bf16.error and bf16.texts_per_second > fp32.texts_per_second
        if faster and bf16.peak_bytes <= max(fp32.peak_bytes, 1):
            return "bf16", pair, (
                f"precision bf16: native on this {self.device}, {bf16.texts_per_second:.1f} vs "
                f"{fp32.texts_per_second:.1f} texts/s in fp32 at batch 2; on the demo recipe bf16 "
                "training kept fp32's test nDCG@10 (docs/demo.md): check yours on dev"
            )  # fmt: skip
        return "fp32", pair, (
            f"precision fp32: bf16 measured {bf16.texts_per_second:.1f} vs "
            f"{fp32.texts_per_second:.1f} texts/s in fp32 (or more memory) at batch 2"
        )  # fmt: skip

    def run(self, work: Path) -> object:
        """Measure and recommend; returns an api.planning.PlanResult."""
        from embtune.api.planning import PlanResult

        start = time.perf_counter()
        budget, budget_line = self._budget()
        probe = self._probe(work)
        run = self._run_point(probe, work)
        self._say(f"embtune plan: {budget_line}; measuring on the data's longest texts")
        precision, compared, precision_line = self._precision(run)
        largest = self.batch_size or self.max_batch
        remaining = self.time_limit - (time.perf_counter() - start)
        grid = measure_grid(
            run, self.group_size, precision, budget, largest, remaining, self._show_point
        )
        good = [m for m in grid if not m.error]
        if good and good[0].peak_bytes > budget:
            raise UsageError(
                f"embtune plan: the smallest step (batch 1 x group {self.group_size}) took "
                f"{good[0].peak_bytes / GIB:.2f} GiB, over the {budget / GIB:.2f} GiB budget: "
                "raise --memory-budget, shorten --passage-max-len or use a smaller model"
            )
        if len(good) < 2:
            failed = next((m.error for m in grid if m.error), "the budget allows only one size")
            raise UsageError(f"embtune plan: could not measure two step sizes ({failed})")
        fit = fit_line([m.point.texts for m in good], [m.peak_bytes for m in good])
        measured_texts = max(m.point.texts for m in good)
        point = choose_point(
            fit, budget, self.group_size, precision, self.batch_size, self.max_batch,
            measured_texts,
        )  # fmt: skip
        recommendation = Recommendation(
            point,
            fit.predict(point.graph_texts),
            budget,
            extrapolated=point.graph_texts > measured_texts,
            reasons=[budget_line, *fit_reasons(fit, good, point), precision_line],
        )
        measured = [*compared, *grid]
        if recommendation.extrapolated or point.cache_chunk_size:
            check = self._check_recommendation(run, good, point, start)
            if isinstance(check, str):
                recommendation.reasons.append(check)
            else:
                recommendation.measured = check
                measured.append(check)
        recommendation.reasons += self._batch_reasons(point, fit, budget, recommendation, good)
        result = PlanResult(recommendation, measured, fit, self.device)
        result.options = recommended_options(point)
        result.text = self._report(result, time.perf_counter() - start)
        return result

    def _check_recommendation(self, run, good, point, start):  # noqa: ANN001, ANN202
        """Run the recommendation once when the time limit allows; else say why not."""
        largest = good_rate(good)
        startup = max(0.0, good[0].seconds - STEPS_PER_POINT * good[0].point.texts
                      / max(good[0].texts_per_second, 1e-9))  # fmt: skip
        estimate = startup + STEPS_PER_POINT * point.texts / max(largest.texts_per_second, 1e-9)
        left = self.time_limit - (time.perf_counter() - start)
        if estimate > left:
            spare = (
                f"{left:.0f} s of --time-limit are left" if left > 0 else "--time-limit is used up"
            )
            return (
                f"not checked by a run: it would take about {estimate:.0f} s and {spare} "
                "(raise it to check)"
            )
        measurement = run(point)
        self._show_point(measurement)
        return measurement

    def _batch_reasons(self, point, fit, budget, recommendation, good) -> list[str]:  # noqa: ANN001
        from embtune.api.inspection import inspect

        lines = []
        measured_texts = max(m.point.texts for m in good)
        plain = texts_within(fit, budget, measured_texts) // (1 + point.group_size)
        if point.cache_chunk_size:
            lines.append(
                f"batch {point.batch_size} does not fit plain (at most {plain} queries): the "
                f"cached loss keeps one chunk of {point.cache_chunk_size} texts' activations"
            )
        else:
            lines.append(f"batch {point.batch_size} fits plain (up to {plain} queries would)")
        if recommendation.measured is not None and not recommendation.measured.error:
            peak = recommendation.measured.peak_bytes
            verdict = "within" if peak <= budget else "OVER"
            lines.append(f"checked: the recommendation ran at {peak / GIB:.2f} GiB, {verdict} "
                         "the budget")  # fmt: skip
        budget_of_data = inspect(
            self.train_data, train_group_size=point.group_size, batch_size=point.batch_size,
            query_max_len=self.lengths[0], passage_max_len=self.lengths[1], show_progress=False,
        ).budget  # fmt: skip
        rate = (recommendation.measured or good_rate(good)).texts_per_second
        if rate > 0:
            steps = -(-budget_of_data.rows // point.batch_size)
            lines.append(
                f"at {rate:.1f} texts/s a step of {point.texts} texts takes about "
                f"{point.texts / rate:.1f} s; one epoch of {budget_of_data.rows} rows is {steps} "
                f"steps, about {steps * point.texts / rate / 60:.0f} min (longest texts: a bound)"
            )
        lines += negatives_reasons(budget_of_data, point)
        return lines

    def _report(self, result, seconds: float) -> str:  # noqa: ANN001
        rec = result.recommendation
        options = " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in result.options.items()
        )
        lines = [
            format_table(result.measurements, rec.budget),
            "",
            f"recommended: {options} (peak predicted {rec.predicted_peak / GIB:.2f} GiB)",
            *(f"  - {line}" for line in rec.reasons),
            f"plan took {seconds:.0f} s",
        ]
        return "\n".join(lines)

    def write_config(self, path: Path, result) -> None:  # noqa: ANN001
        """The recommended options, with the model and data, as a YAML for train --config."""
        options = {
            "model": self.model,
            "train_data": self.train_data,
            "query_max_len": self.lengths[0],
            "passage_max_len": self.lengths[1],
            **result.options,
        }
        text = "# written by embtune plan\n" + yaml.safe_dump(options, sort_keys=False)
        atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def good_rate(measured: list[Measurement]) -> Measurement:
    """The measurement whose rate stands for large steps: on a CPU texts/s rises with the step
    and then levels off, and a point slowed by another process only ever measures low, so the
    highest measured rate is the least disturbed estimate."""
    return max(measured, key=lambda m: m.texts_per_second)


def negatives_reasons(budget, point: Point) -> list[str]:  # noqa: ANN001
    """How the group size uses the data's negatives, and what the batch adds in-batch."""
    used = point.group_size - 1
    lines = [
        f"rows have {budget.negatives_median:g} negatives (median; {budget.negatives_min}-"
        f"{budget.negatives_max}); a group of {point.group_size} shows up to {used} per row per "
        f"epoch, and each query is scored against {budget.candidates_per_query} passages "
        "(its group + in-batch)"
    ]
    if used and budget.negatives_median > used:
        epochs = -(-int(budget.negatives_median) // used)
        lines.append(
            f"one epoch shows {used} of {budget.negatives_median:g}: --negative-sampling cycle "
            f"with {epochs} epochs shows every negative once, or a larger group spends the "
            "texts per step on more negatives per query and fewer queries"
        )
    elif budget.negatives_median == 0:
        lines.append(
            "the rows have no negatives: a group above 1 is filled by --negative-fill; mine "
            "hard negatives first (embtune mine), or train with in-batch negatives only "
            "(--train-group-size 1) and spend the texts on a larger batch"
        )
    elif budget.negatives_median < used:
        lines.append(
            f"the group asks for more negatives than rows have: --train-group-size "
            f"{int(budget.negatives_median) + 1} and a larger batch spend the same texts on "
            "real negatives instead of filled ones"
        )
    return lines
