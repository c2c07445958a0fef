"""The training loop, readable top to bottom.

records -> text stores (tokenized once, cached) -> group sampler -> batches -> encoder ->
contrastive loss -> AdamW step. It runs on accelerate, so the same code trains on a laptop CPU,
one GPU, or many processes under `torchrun` / `accelerate launch` (each process takes its
share of every global batch; gradients are averaged by DDP).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from embtune.config import TrainConfig
from embtune.data.batching import Batch, collate
from embtune.data.dev_split import carve_dev_split, dev_dataset, passage_corpus, save_dev_split
from embtune.data.formats import BeirDataset, load_beir, load_training_data
from embtune.data.groups import GroupSampler, NegativesBudget, build_rows, negatives_budget
from embtune.data.store import default_cache_dir, tokenize_store
from embtune.errors import UsageError
from embtune.losses import contrastive_loss
from embtune.model import Encoder

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.yaml"
BUDGET_FILE = "negatives_budget.json"
DEV_SPLIT_FILE = "dev_split.json"
BEST_DIR = "best"


@dataclass
class TrainResult:
    """What a finished run reports back to the caller."""

    output_dir: Path
    steps: int
    texts_per_second: float
    train_seconds: float
    history: list[dict] = field(default_factory=list)
    budget: NegativesBudget | None = None
    best_step: int | None = None
    best_ndcg: float | None = None


def check_output_dir(config: TrainConfig) -> Path:
    """Refuse to mix a new run into a previous run's folder unless told to."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not config.overwrite_output_dir:
        raise UsageError(
            f"--output-dir: {out} is not empty (a previous run?); pass --overwrite-output-dir "
            "to write into it or choose another folder"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".embtune-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--output-dir: cannot write to {out}: {exc.strerror or exc}") from exc
    return out


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # Biases and normalisation weights are excluded from weight decay, as in BERT's recipe.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save_atomically(target: Path, write) -> None:
    """Write a folder via ``write(tmp)`` then rename, so a kill never leaves half a checkpoint."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def train(
    config: TrainConfig, show_progress: bool = True, dev_data: BeirDataset | None = None
) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.train_data``; the model is saved to output_dir.

    ``dev_data`` (a caller-made dev set, e.g. the demo's) replaces --eval-data/--dev-fraction.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.validate()
    if config.fp16 and not torch.cuda.is_available():
        raise UsageError("--fp16 needs a CUDA GPU; on CPU train in fp32 (or --bf16)")
    # Data first: bad input is reported before any model is loaded or folder written.
    data = load_training_data(config.train_data, config.train_split)
    dev_rows = []
    if config.dev_fraction and dev_data is None:
        data.records, dev_rows = carve_dev_split(data.records, config.dev_fraction, config.seed)
        dev_data = dev_dataset(dev_rows, data.corpus or passage_corpus(data.records + dev_rows))
    elif config.eval_data and dev_data is None:
        dev_data = load_beir(Path(config.eval_data), config.eval_split)
    if config.save_best and dev_data is None:
        raise UsageError("--save-best needs a dev set: --eval-data DIR or --dev-fraction F")
    out = check_output_dir(config)

    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    accelerator = Accelerator(
        mixed_precision=precision, log_with="tensorboard", project_dir=str(out)
    )
    set_seed(config.seed)
    main = accelerator.is_main_process
    show = show_progress and main

    encoder = Encoder.from_pretrained(
        config.model,
        pooling=config.pooling,
        normalize=config.normalize,
        query_instruction=config.query_instruction,
        passage_instruction=config.passage_instruction,
        query_max_len=config.query_max_len,
        passage_max_len=config.passage_max_len,
    )
    settings = encoder.settings
    texts = build_rows(
        data.records,
        settings.query_instruction,
        settings.passage_instruction,
        list(data.corpus.values()),
    )
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    query_tokens, _ = tokenize_store(
        texts.queries, encoder.tokenizer, settings.query_max_len, cache, "tokenizing queries", show
    )
    passage_tokens, _ = tokenize_store(
        texts.passages,
        encoder.tokenizer,
        settings.passage_max_len,
        cache,
        "tokenizing passages",
        show,
    )

    sampler = GroupSampler(
        texts.rows, config.train_group_size, config.negative_fill, len(texts.passages), config.seed
    )
    world = accelerator.num_processes
    global_batch = config.batch_size * world
    steps_per_epoch = math.ceil(len(texts.rows) / global_batch)
    # --max-steps overrides --epochs (as in Hugging Face's Trainer), also beyond them.
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    budget = negatives_budget(
        texts.rows,
        config.train_group_size,
        global_batch,
        config.in_batch_negatives,
        config.negative_fill,
    )
    if main:
        print("embtune train: negatives budget")
        for line in budget.lines():
            print(f"  {line}")
        print(
            f"  steps: {total_steps} ({steps_per_epoch} per epoch, {global_batch} queries per step)"
        )
        with open(out / CONFIG_FILE, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
        (out / BUDGET_FILE).write_text(json.dumps(asdict(budget), indent=2) + "\n")
        if dev_rows:
            save_dev_split(out / DEV_SPLIT_FILE, dev_rows, config.dev_fraction, config.seed)
        if dev_data is not None:
            when = f"every {config.eval_steps} steps and " if config.eval_steps else ""
            print(
                f"  dev set: {len(dev_data.qrels)} queries over {len(dev_data.corpus)} passages "
                f"(evaluated {when}at the end)"
            )

    if config.gradient_checkpointing:
        encoder.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    optimizer = _optimizer(encoder, config)
    scheduler = _linear_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(encoder, optimizer, scheduler)
    accelerator.init_trackers(
        "tensorboard", config={k: str(v) for k, v in config.to_dict().items()}
    )
    model.train()

    history: list[dict] = []
    log_file = open(out / LOG_FILE, "w", encoding="utf-8") if main else None
    best: dict = {"step": None, "ndcg": None}

    def write_log(record: dict) -> None:
        history.append(record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def evaluate_dev(step: int) -> None:
        """Retrieval metrics on the dev set; the main process keeps the best model."""
        from embtune.evaluate import evaluate_retrieval

        accelerator.wait_for_everyone()
        if main:
            unwrapped = accelerator.unwrap_model(model)
            metrics = evaluate_retrieval(unwrapped, dev_data, show_progress=False)
            model.train()
            write_log({"step": step, **{f"dev_{k}": v for k, v in metrics.items()}})
            ndcg = metrics["ndcg@10"]
            tqdm.write(f"step {step}: dev nDCG@10 {ndcg:.4f}, MRR@10 {metrics['mrr@10']:.4f}")
            if config.save_best and (best["ndcg"] is None or ndcg > best["ndcg"]):
                best.update(step=step, ndcg=ndcg)
                _save_atomically(out / BEST_DIR, unwrapped.save)
        accelerator.wait_for_everyone()

    bar = tqdm(total=total_steps, desc="training", unit="step", disable=not show)
    pad_id = encoder.tokenizer.pad_token_id
    texts_seen, train_seconds = 0, 0.0
    window_loss, window_texts, window_seconds = 0.0, 0, 0.0

    epoch_batches: tuple[int, list] = (-1, [])
    for step in range(total_steps):
        started = time.perf_counter()
        epoch, index = divmod(step, steps_per_epoch)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, sampler.batches(epoch, global_batch))
        rows = epoch_batches[1][index]
        mine = rows[
            accelerator.process_index * config.batch_size : (accelerator.process_index + 1)
            * config.batch_size
        ]
        groups = [sampler.group(int(r), epoch) for r in mine]
        batch: Batch = collate(groups, texts.rows, query_tokens, passage_tokens, pad_id).to(
            accelerator.device
        )

        query_emb = model(batch.query_input_ids, batch.query_attention_mask)
        passage_emb = model(batch.passage_input_ids, batch.passage_attention_mask)
        out_loss = contrastive_loss(
            query_emb,
            passage_emb,
            batch.positive_index,
            batch.passage_owner,
            config.temperature,
            config.in_batch_negatives,
            batch.false_negative_mask,
        )
        accelerator.backward(out_loss.loss)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        seconds = time.perf_counter() - started
        train_seconds += seconds
        texts_seen += batch.num_texts * world
        window_loss += out_loss.loss.item()
        window_texts += batch.num_texts * world
        window_seconds += seconds
        bar.update(1)
        done = step + 1
        if done % config.logging_steps == 0 or done == total_steps:
            n = (
                config.logging_steps
                if done % config.logging_steps == 0
                else done % config.logging_steps
            )
            candidates = out_loss.candidates.float().mean().item()
            record = {
                "step": done,
                "epoch": epoch,
                "loss": window_loss / n,
                "chance_loss": math.log(candidates),
                "candidates_per_query": candidates,
                "learning_rate": scheduler.get_last_lr()[0],
                "texts_per_second": window_texts / window_seconds,
            }
            write_log(record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['learning_rate']:.2e}",
                texts_s=f"{record['texts_per_second']:.1f}",
            )
            window_loss, window_texts, window_seconds = 0.0, 0, 0.0
        if dev_data is not None and (
            done == total_steps or (config.eval_steps and done % config.eval_steps == 0)
        ):
            evaluate_dev(done)
        if config.save_steps and done % config.save_steps == 0 and done < total_steps:
            accelerator.wait_for_everyone()
            if main:
                _save_atomically(out / f"checkpoint-{done}", accelerator.unwrap_model(model).save)

    bar.close()
    if log_file:
        log_file.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if main:
        accelerator.unwrap_model(model).save(out)
    return TrainResult(
        output_dir=out,
        steps=total_steps,
        texts_per_second=texts_seen / train_seconds if train_seconds else 0.0,
        train_seconds=train_seconds,
        history=history,
        budget=budget,
        best_step=best["step"],
        best_ndcg=best["ndcg"],
    )
