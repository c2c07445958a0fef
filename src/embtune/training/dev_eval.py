"""Dev evaluation during training: metrics logged as ``dev_*``, the best model kept."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from embtune.checkpoint import is_write_failure, save_atomically, stopped_writing
from embtune.run_cleanup import record_best_files
from embtune.run_files import BEST_DIR
from embtune.training.session import Session


def is_dev_step(session: Session, done: int) -> bool:
    """True when step ``done`` is followed by a dev evaluation."""
    every = session.config.eval_steps
    return session.dev_data is not None and (
        done == session.total_steps or bool(every and done % every == 0)
    )


def evaluate_dev(session: Session, step: int) -> None:
    """The model kind's metrics on the dev set; the main process keeps the best model."""
    accelerator = session.accelerator
    accelerator.wait_for_everyone()
    if session.main:
        unwrapped = accelerator.unwrap_model(session.model)
        metrics = session.kind.evaluate(unwrapped, session.dev_data)
        session.model.train()
        session.logbook.write({"step": step, **{f"dev_{k}": v for k, v in metrics.items()}})
        ndcg = metrics["ndcg@10"]  # the full embedding's: --save-best chooses on it
        tqdm.write(f"step {step}: dev {_headline(metrics)}")
        best = session.run.best
        if session.config.save_best and (best["ndcg"] is None or ndcg > best["ndcg"]):
            try:
                save_atomically(
                    session.out / BEST_DIR, lambda path: save_best(session, unwrapped, path)
                )
            except Exception as exc:
                if not is_write_failure(exc, session.out):
                    raise
                what = f"step {step}: could not write {BEST_DIR}/"
                raise stopped_writing(what, exc, session.out) from exc
            best.update(step=step, ndcg=ndcg)
    accelerator.wait_for_everyone()


def save_best(session: Session, model: object, folder: Path) -> None:
    """The best model, with the record of its files that --overwrite-output-dir goes by."""
    session.kind.save(model, folder)
    record_best_files(folder)


def _headline(metrics: dict[str, float]) -> str:
    """nDCG@10 and MRR@10, then nDCG@10 at each Matryoshka dimension (``ndcg@10_dim<d>``)."""
    line = f"nDCG@10 {metrics['ndcg@10']:.4f}, MRR@10 {metrics['mrr@10']:.4f}"
    dims = [(key.removeprefix("ndcg@10_dim"), v) for key, v in metrics.items()]
    shown = ", ".join(f"{dim}: {value:.4f}" for dim, value in dims if dim.isdigit())
    return f"{line} (nDCG@10 at dim {shown})" if shown else line
