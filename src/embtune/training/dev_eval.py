"""Dev evaluation during training: metrics logged as ``dev_*`` (and the reference sets' as
``reference/<name>/*``), the best model kept."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from embtune.checkpoint import is_write_failure, save_atomically, stopped_writing
from embtune.run_cleanup import record_best_files
from embtune.run_files import BEST_DIR
from embtune.training.card_facts import best_card, save_with_card
from embtune.training.reference_sets import base_record, change_line, evaluate_references
from embtune.training.session import Session


def is_dev_step(session: Session, done: int) -> bool:
    """True when step ``done`` is followed by a dev evaluation (dev set and reference sets)."""
    every = session.config.eval_steps
    watched = session.dev_data is not None or bool(session.references)
    return watched and (done == session.total_steps or bool(every and done % every == 0))


def needs_base_evaluation(session: Session) -> bool:
    """True when the base model is evaluated before the first step: reference sets are
    measured against it, and --interpolate-base auto compares the factors with it."""
    wanted = bool(session.references) or session.config.interpolate_base == "auto"
    return wanted and session.run.start_step == 0 and not base_record(session.run.history)


def evaluate_base(session: Session) -> None:
    """The base model's dev and reference metrics, logged as step 0 (a resumed run has
    them in its history)."""
    if session.evaluates:
        unwrapped = session.accelerator.unwrap_model(session.model)
        record = evaluation_record(session, unwrapped)
        session.model.train()
    if session.main:
        line = _headline(record, session)  # before the record is logged: no change to show
        session.logbook.write({"step": 0, **record})
        tqdm.write(f"base model: {line}")
    session.accelerator.wait_for_everyone()


def evaluation_record(session: Session, model: object) -> dict[str, float]:
    """``dev_*`` metrics (with a dev set) and ``reference/<name>/*`` (with reference sets)."""
    record: dict[str, float] = {}
    if session.dev_data is not None:
        started = time.perf_counter()
        metrics = session.kind.evaluate(model, session.dev_data)
        record.update({f"dev_{k}": v for k, v in metrics.items()})
        record["dev_seconds"] = time.perf_counter() - started
    if session.references:
        # Timed apart: what watching for forgetting costs is a figure users weigh.
        started = time.perf_counter()
        record.update(evaluate_references(session.kind.evaluate, model, session.references))
        record["reference_seconds"] = time.perf_counter() - started
    return record


def evaluate_dev(session: Session, step: int) -> None:
    """The model kind's metrics on the dev and reference sets; the main process keeps the
    best model (by dev nDCG@10)."""
    accelerator = session.accelerator
    accelerator.wait_for_everyone()
    if session.evaluates:
        record = evaluation_record(session, accelerator.unwrap_model(session.model))
        session.model.train()
        # Sharded, every process has the same record, so all take part in saving best/.
        if "dev_ndcg@10" in record:
            keep_if_best(session, step, record["dev_ndcg@10"])
    if session.main:
        session.logbook.write({"step": step, **record})
        tqdm.write(f"step {step}: {_headline(record, session)}")
    accelerator.wait_for_everyone()


def keep_if_best(session: Session, step: int, ndcg: float) -> None:
    """With --save-best, save the model as best/ when ``ndcg`` (the full embedding's dev
    nDCG@10) beats every earlier evaluation's. Called by every process that evaluates."""
    best = session.run.best
    if not session.config.save_best or (best["ndcg"] is not None and ndcg <= best["ndcg"]):
        return
    save_model = session.model_saver()
    if session.main:
        try:
            save_atomically(
                session.out / BEST_DIR, lambda path: save_best(session, save_model, path, step)
            )
        except Exception as exc:
            if not is_write_failure(exc, session.out):
                raise
            what = f"step {step}: could not write {BEST_DIR}/"
            raise stopped_writing(what, exc, session.out) from exc
    best.update(step=step, ndcg=ndcg)


def save_best(
    session: Session, save_model: Callable[[Path], None], folder: Path, step: int
) -> None:
    """The best model (after ``step``; ``save_model``: :meth:`Session.model_saver`'s) with its
    card, and the record of its files that --overwrite-output-dir goes by."""
    save_with_card(save_model, folder, best_card(session, step))
    record_best_files(folder)


def _headline(record: dict[str, float], session: Session) -> str:
    """Dev nDCG@10 and MRR@10, nDCG@10 at each Matryoshka dimension (``dev_ndcg@10_dim<d>``),
    then each reference set's nDCG@10 with its change against the base model."""
    parts = []
    if "dev_ndcg@10" in record:
        line = f"dev nDCG@10 {record['dev_ndcg@10']:.4f}, MRR@10 {record['dev_mrr@10']:.4f}"
        dims = [(key.removeprefix("dev_ndcg@10_dim"), v) for key, v in record.items()]
        shown = ", ".join(f"{dim}: {value:.4f}" for dim, value in dims if dim.isdigit())
        parts.append(f"{line} (nDCG@10 at dim {shown})" if shown else line)
    if references := change_line(record, base_record(session.run.history), session.references):
        parts.append(references)
    return "; ".join(parts)
