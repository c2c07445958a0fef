"""``--interpolate-base``: the chosen model's weights mixed back toward the base model's.

WiSE-FT (Wortsman et al. 2022) and, for embedders, LM-Cocktail (Xiao et al. 2023): the model
``base + a x (fine-tuned - base)`` keeps most of the fine-tuned model's in-domain gain at a
fraction of its forgetting. After training, the run's selected model (``best/`` with
--save-best, else the final one) is mixed with the base: at a given factor, or with ``auto``
at each of --interpolate-factors, scored on the dev set and the reference sets and chosen by
the rule of :mod:`embtune.selection`. The mixed model goes to OUTPUT_DIR/interpolated/ with
the table (interpolation.md, interpolation.json) and a plot (interpolation.png).

Factors 0 and 1 reuse the step-0 (base) and the selected step's logged evaluations, so only
the factors in between cost an evaluation each.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from embtune.atomic import atomic_write, write_json_atomically
from embtune.checkpoint import is_write_failure, save_atomically, write_problem
from embtune.errors import TrainingStopped
from embtune.merging import interpolate_state_dicts
from embtune.run_cleanup import record_best_files
from embtune.run_files import (
    BEST_DIR,
    INTERPOLATED_DIR,
    INTERPOLATION_FILE,
    INTERPOLATION_PLOT,
    INTERPOLATION_TABLE,
)
from embtune.selection import RULE, Candidate, choose
from embtune.training.dev_eval import evaluation_record
from embtune.training.reference_sets import (
    HEADLINE_METRIC,
    base_record,
    mean_headline,
    metric_key,
)
from embtune.training.session import Session


@dataclass
class FactorScores:
    """One interpolation factor's scores (nDCG@10), and whether they were measured for it or
    taken from the run's log (0: the base model's step 0, 1: the selected step)."""

    factor: float
    dev: float | None
    reference: dict[str, float] = field(default_factory=dict)  # set name -> nDCG@10
    mean_reference: float | None = None
    source: str = "evaluated"


@dataclass
class Interpolation:
    """What --interpolate-base did: the factor, why, every factor's scores, the folder."""

    factor: float
    reason: str
    scores: list[FactorScores]
    folder: Path
    mixed: Path  # the fine-tuned model that was mixed with the base
    seconds: float = 0.0  # scoring the factors and saving the model

    def to_json(self) -> dict:
        """interpolation.json's content."""
        return {
            "factor": self.factor,
            "formula": "base + factor x (fine-tuned - base)",
            "rule": RULE,
            "reason": self.reason,
            "fine_tuned": str(self.mixed),
            "model": str(self.folder),
            "scores": [asdict(s) for s in self.scores],
            "seconds": self.seconds,
        }


def interpolate_with_base(session: Session) -> Interpolation:
    """Mix the selected model with the base at the given or chosen factor and save it."""
    started = time.perf_counter()
    config, out = session.config, session.out
    selected_step = session.run.best["step"] or session.total_steps
    mixed = out / BEST_DIR if session.run.best["step"] is not None else out
    device = session.accelerator.device
    working = session.kind.load(config, weights_from=mixed).to(device)
    tuned = {k: v.detach().clone() for k, v in working.state_dict().items()}
    base = {k: v.to(device) for k, v in session.kind.load(config).state_dict().items()}
    if config.interpolate_base == "auto":
        factors = sorted(set(config.interpolate_factors))
        print(f"embtune train: interpolating with the base model at factors {factors}")
        scores = [
            scores_at(session, working, base, tuned, factor, selected_step) for factor in factors
        ]
        candidates = [Candidate(s.factor, s.dev, s.mean_reference) for s in scores]
        choice = choose(candidates, config.auto_tolerance, "factor")
        factor, reason = choice.chosen.value, choice.reason
    else:
        factor, reason = float(config.interpolate_base), "given by --interpolate-base"
        watched = session.dev_data is not None or session.references
        scores = (
            [scores_at(session, working, base, tuned, factor, selected_step)] if watched else []
        )
    working.load_state_dict(interpolate_state_dicts(base, tuned, factor))
    folder = out / INTERPOLATED_DIR
    result = Interpolation(factor, reason, scores, folder, mixed, time.perf_counter() - started)
    try:
        save_atomically(folder, lambda path: _save(session, working, path))
        write_interpolation_files(out, result, session)
    except Exception as exc:
        if not is_write_failure(exc, out):
            raise
        # The run itself is finished (--resume refuses it), so the way on is the offline merge.
        raise TrainingStopped(
            f"could not write {folder}: {write_problem(exc, out)}; the fine-tuned model in "
            f"{mixed} is complete. Free disk space and run embtune merge --base {config.model} "
            f"--model {mixed} --alpha {factor:g} -o {folder}"
        ) from exc
    print(f"embtune train: interpolation factor {factor:g} ({reason})")
    print(
        f"embtune train: the interpolated model is in {folder} (table: {out / INTERPOLATION_TABLE})"
    )
    return result


def _save(session: Session, model: object, folder: Path) -> None:
    """The mixed model, with the record of its files that --overwrite-output-dir goes by."""
    session.kind.save(model, folder)
    record_best_files(folder)


def scores_at(
    session: Session,
    working: object,
    base: Mapping,
    tuned: Mapping,
    factor: float,
    selected_step: int,
) -> FactorScores:
    """The factor's dev and reference nDCG@10: from the log for 0 and 1, else measured with
    the mixed weights loaded into ``working``."""
    logged = _logged_record(session, factor, selected_step)
    if logged is not None:
        return _factor_scores(session, factor, logged, "logged (base model, step 0)"
                              if factor == 0 else f"logged (step {selected_step})")  # fmt: skip
    working.load_state_dict(interpolate_state_dicts(base, tuned, factor))  # type: ignore[attr-defined]
    record = evaluation_record(session, working)
    scores = _factor_scores(session, factor, record, "evaluated")
    dev = f"dev nDCG@10 {scores.dev:.4f}" if scores.dev is not None else "no dev set"
    mean = scores.mean_reference
    reference = f", mean reference nDCG@10 {mean:.4f}" if mean is not None else ""
    tqdm.write(f"  factor {factor:g}: {dev}{reference}")
    return scores


def _logged_record(session: Session, factor: float, selected_step: int) -> Mapping | None:
    """The log record that already scored this factor's model, if it has every score."""
    history = session.run.history
    if factor == 0:
        record = base_record(history)
    elif factor == 1:
        record = next(
            (h for h in reversed(history) if h.get("step") == selected_step and _evaluated(h)),
            None,
        )
    else:
        return None
    if record is None or not _complete(record, session):
        return None
    return record


def _evaluated(record: Mapping) -> bool:
    return any(k.startswith("dev_") or k.startswith("reference/") for k in record)


def _complete(record: Mapping, session: Session) -> bool:
    """True when ``record`` holds the dev score (with a dev set) and every reference score."""
    if session.dev_data is not None and "dev_ndcg@10" not in record:
        return False
    return all(metric_key(s.name, HEADLINE_METRIC) in record for s in session.references)


def _factor_scores(session: Session, factor: float, record: Mapping, source: str) -> FactorScores:
    reference = {
        s.name: float(record[metric_key(s.name, HEADLINE_METRIC)]) for s in session.references
    }
    dev = record.get("dev_ndcg@10")
    return FactorScores(
        factor=factor,
        dev=float(dev) if dev is not None else None,
        reference=reference,
        mean_reference=mean_headline(record, session.references),
        source=source,
    )


def interpolation_table(result: Interpolation) -> str:
    """A markdown table: factor, dev nDCG@10, each reference set's nDCG@10, the source."""
    names = list(result.scores[0].reference) if result.scores else []
    header = "| factor | dev nDCG@10 | " + "".join(f"{n} nDCG@10 | " for n in names) + "scores |"
    lines = [header, "|---" * (3 + len(names)) + "|"]
    for s in result.scores:
        mark = "**" if s.factor == result.factor else ""
        dev = f"{s.dev:.4f}" if s.dev is not None else "n/a"
        cells = "".join(f"{s.reference[n]:.4f} | " for n in names)
        lines.append(f"| {mark}{s.factor:g}{mark} | {dev} | {cells}{s.source} |")
    return "\n".join(lines)


def write_interpolation_files(out: Path, result: Interpolation, session: Session) -> None:
    """interpolation.json, interpolation.md and (with scores) interpolation.png."""
    write_json_atomically(out / INTERPOLATION_FILE, result.to_json())
    text = (
        "# Interpolation with the base model\n\n"
        f"Model = base + factor x (fine-tuned - base); fine-tuned = `{result.mixed}`, base = "
        f"`{session.config.model}`.\n\nChosen factor **{result.factor:g}**: {result.reason}.\n\n"
        f"Rule: {RULE}.\n\n{interpolation_table(result)}\n"
    )
    atomic_write(out / INTERPOLATION_TABLE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    if len(result.scores) > 1:
        from embtune.report import plot_interpolation

        try:
            plot_interpolation(result.scores, result.factor, out / INTERPOLATION_PLOT)
        except Exception as exc:  # matplotlib's errors have no common type
            print(f"embtune train: could not write {INTERPOLATION_PLOT}: {exc}")
