"""A run's model card facts (embtune/model_card.py), taken from the session: the final
model's card and best/'s, written inside their saves so a folder never lacks its card."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from embtune import __version__
from embtune.config import TrainConfig
from embtune.data.formats import rejected_row_count
from embtune.kinds.base import Model
from embtune.model_card import CardFacts, DataSummary, Evaluation, write_card
from embtune.models.lora import is_peft_model
from embtune.run_files import BEST_DIR, DEV_SPLIT_FILE
from embtune.training.reference_sets import reference_summary
from embtune.training.session import Session

# Shown in every card, at their default too: what anyone reproducing the run asks first.
_CORE_OPTIONS = {
    "bi-encoder": (
        "epochs",
        "max_steps",
        "batch_size",
        "learning_rate",
        "train_group_size",
        "temperature",
        "in_batch_negatives",
        "warmup_ratio",
        "seed",
    ),
    "cross-encoder": (
        "epochs",
        "max_steps",
        "batch_size",
        "learning_rate",
        "train_group_size",
        "reranker_loss",
        "warmup_ratio",
        "seed",
    ),
}
# Never shown: where the run kept its files, how it logged and shared, a secret; the base model
# and the data have sections of their own.
_NOT_SHOWN = {
    "model",
    "train_data",
    "output_dir",
    "cache_dir",
    "config",
    "overwrite_output_dir",
    "resume",
    "resume_from",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
    "hub_token",
}


def card_options(config: TrainConfig, kind: str) -> dict[str, object]:
    """The core options of ``kind`` and every other one not at its default, by field name."""
    core = _CORE_OPTIONS.get(kind, _CORE_OPTIONS["bi-encoder"])
    shown: dict[str, object] = {}
    for f in fields(TrainConfig):
        if f.name in _NOT_SHOWN:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        value = getattr(config, f.name)
        if f.name in core or value != default:
            shown[f.name] = value
    return shown


def dev_evaluations(history: list[dict]) -> list[Evaluation]:
    """The run's dev evaluations (records with ``dev_*`` metrics), metrics without the
    prefix; a logged time is no metric."""
    found = []
    for record in history:
        metrics = {
            key.removeprefix("dev_"): float(value)
            for key, value in record.items()
            if key.startswith("dev_") and key != "dev_seconds" and isinstance(value, int | float)
        }
        if metrics:
            found.append(Evaluation(int(record["step"]), metrics))
    return found


def dev_source(config: TrainConfig, has_dev: bool) -> str | None:
    """Where the run's dev set came from, in words (None without one)."""
    if config.eval_data:
        return f"`{config.eval_data}`, split {config.eval_split} (--eval-data)"
    if config.dev_fraction:
        return (
            f"{config.dev_fraction:g} of the training queries held out (--dev-fraction, seed "
            f"{config.seed}; the rows are in {DEV_SPLIT_FILE})"
        )
    return "a dev set the caller passed in" if has_dev else None


def model_settings(model: Model) -> dict[str, object]:
    """How the saved model embeds or scores: its settings, with the reranker's query token
    limit (what FlagReranker's query_max_length must be to match)."""
    settings = model.settings
    values = asdict(settings)
    if hasattr(settings, "query_tokens"):
        values["query_tokens"] = settings.query_tokens
    return values


def data_summary(session: Session) -> DataSummary:
    """The training data and dev set of the run, in counts."""
    config, dev = session.config, session.dev_data
    return DataSummary(
        train_files=list(config.train_data),
        rows=len(session.kind.rows(session.texts)),
        passages=session.kind.passage_count(session.texts),
        rejected_rows=rejected_row_count(session.rejected) if config.skip_bad_rows else None,
        dev_source=dev_source(config, dev is not None),
        dev_queries=len(dev.qrels) if dev is not None else None,
        dev_passages=len(dev.corpus) if dev is not None else None,
    )


def card_facts(session: Session, model_id: str, step: int, best_step: int | None) -> CardFacts:
    """What the card of the weights after ``step`` says (no training figures: the final card
    adds the measured ones)."""
    config = session.config
    return CardFacts(
        kind=session.kind.name,
        model_id=model_id,
        base_model=config.model,
        base_model_on_hub=not Path(config.model).exists(),
        settings=model_settings(session.encoder),
        data=data_summary(session),
        budget_lines=session.budget.lines(),
        budget=session.budget.to_json(),
        options=card_options(config, session.kind.name),
        step=step,
        total_steps=session.total_steps,
        processes=session.world,
        lora=is_peft_model(getattr(session.encoder, "model", None)),
        dev=dev_evaluations(session.run.history),
        best_step=best_step,
        reference=reference_summary(session.run.history, session.references),
        embtune_version=__version__,
    )


def final_card(session: Session, texts_per_second: float, peak: int) -> CardFacts:
    """The finished run's card: the model it saved, with the figures the run measured;
    the examples load it from --hub-model-id when it is pushed, else from its folder."""
    config, progress, coverage = session.config, session.run.progress, session.coverage
    model_id = config.hub_model_id if config.push_to_hub else str(session.out)
    facts = card_facts(session, model_id, session.total_steps, session.run.best["step"])
    facts.model_on_hub = config.push_to_hub
    facts.training = {
        "train_seconds": progress.train_seconds,
        "texts_per_second": texts_per_second,
        "peak_memory_bytes": peak,
        "skipped_steps": progress.skipped_steps,
    }
    if coverage is not None and coverage.fraction is not None:
        facts.training["negative_coverage"] = coverage.fraction
    return facts


def best_card(session: Session, step: int) -> CardFacts:
    """best/'s card: the weights after ``step``, chosen by dev nDCG@10."""
    facts = card_facts(session, str(session.out / BEST_DIR), step, step)
    facts.selected_by = (
        f"the best dev nDCG@10 of the run's evaluations up to step {step} (--save-best)"
    )
    return facts


def save_with_card(save_model: Callable[[Path], None], folder: Path, facts: CardFacts) -> None:
    """The model kind's save (``save_model``: :meth:`Session.model_saver`'s), then the card
    beside it."""
    save_model(folder)
    write_card(folder, facts)
