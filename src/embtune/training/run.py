"""The training loop, readable top to bottom.

records -> text stores (tokenized once, cached) -> group sampler -> batches -> encoder ->
contrastive loss -> AdamW step. It runs on accelerate, so the same code trains on a laptop CPU,
one GPU, or many processes under `torchrun` / `accelerate launch` (each process takes its
share of every global batch; gradients are averaged by DDP).

Reliability (docs/reliability.md): every check that can refuse the run happens before the model
is loaded or anything is written; checkpoints are atomic and hold all a run needs to continue
exactly (`--resume`); a step with a non-finite loss or gradient is skipped and logged, and
``--max-nonfinite-steps`` of them in a row stop the run with a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from embtune.atomic import atomic_write, write_json_atomically
from embtune.checkpoint import (
    KILL_AT_STEP_ENV,
    STATE_FORMAT,
    TRAINER_STATE_FILE,
    check_disk_space,
    check_resume_compatible,
    checkpoint_step,
    data_fingerprint,
    estimate_save_bytes,
    exclude_model_from_state,
    existing_ancestor,
    kill_if_requested,
    latest_checkpoint,
    load_training_state,
    read_trainer_state,
    recover_interrupted,
    save_atomically,
    save_checkpoint,
)
from embtune.config import TrainConfig
from embtune.data.batching import Batch, collate
from embtune.data.dev_split import carve_dev_split, dev_dataset, passage_corpus, save_dev_split
from embtune.data.epoch_plan import EpochPlan, epochs_of_run
from embtune.data.formats import BeirDataset, load_beir, load_training_data
from embtune.data.groups import (
    GroupSampler,
    NegativeCoverage,
    NegativesBudget,
    build_rows,
    negatives_budget,
)
from embtune.data.length_grouping import length_grouped_batches
from embtune.data.store import default_cache_dir, tokenize_store
from embtune.errors import TrainingStopped, UsageError
from embtune.models.encoder import Encoder, check_max_lengths, load_model_config
from embtune.models.speedups.activation_recompute import (
    recompute_feed_forward_activations,
    recompute_norm_outputs,
)
from embtune.models.speedups.dropout import use_fast_cpu_dropout
from embtune.objectives.infonce import batch_signals, window_signals
from embtune.training.step import StepSettings, forward_backward

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.yaml"
BUDGET_FILE = "negatives_budget.json"
SUMMARY_FILE = "train_summary.json"
DEV_SPLIT_FILE = "dev_split.json"
BEST_DIR = "best"
TENSORBOARD_DIR = "tensorboard"


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
    resumed_from_step: int = 0  # 0 for a run that started fresh
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    peak_memory_bytes: int = 0  # peak resident (CPU) or allocated (GPU) memory of the run
    negative_coverage: float | None = None  # share of the data's negatives the run used


@dataclass
class _Progress:
    """Counters that a checkpoint carries over, so a resumed run logs what the whole run did."""

    texts_seen: int = 0
    train_seconds: float = 0.0
    # The logging window in progress: a resume in mid-window must log the same average.
    window_loss: float = 0.0
    window_steps: int = 0
    window_texts: int = 0
    window_seconds: float = 0.0
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    # Sums of losses.batch_signals over the window, and token positions computed / real.
    window_signals: dict = field(default_factory=dict)
    window_padded_tokens: int = 0
    window_real_tokens: int = 0
    # Widest padded query and passage batch of the window: on a GPU a step meeting a batch
    # width for the first time was measured slower (docs/performance.md).
    window_query_width: int = 0
    window_passage_width: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0


def pad_multiple_for(requested: int, device: torch.device) -> int:
    """The multiple batch widths are rounded up to: ``requested``, or for 0 the device's default.

    The GPU default follows the H100 benchmark: a step meeting a batch width for the first time
    took 0.28-3.6 s against 0.17-0.19 s (docs/performance.md); at most 15 extra padding
    positions per text bound the widths a run meets. On a CPU a new width costs nothing
    measurable (bench/shape_cost.py --device cpu), so there it pads to the longest text.
    """
    if requested:
        return requested
    return 16 if device.type == "cuda" else 1


def end_distributed(accelerator: Accelerator) -> None:
    """End the run on every process together, then close trackers and the process group.

    No process leaves while the main one still writes. The pause first fixes a hang at exit
    (two-process CPU runs, two at a time: 6 of 90 hung before, 0 of 180 after; torch 2.13,
    gloo): the process group's worker threads release a finished collective's tensors under
    the GIL, and when the process group was torn down right after a collective whose tensors
    were not yet released, the teardown (holding the GIL) and the worker (waiting for it)
    waited on each other forever. Sleeping hands the GIL over so that the last collectives
    are released; the barrier after it then holds no Python tensor.
    """
    if accelerator.num_processes > 1:
        time.sleep(0.1)
        accelerator.wait_for_everyone()
    accelerator.end_training()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: allocated GPU memory on CUDA, else resident memory."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def check_output_dir(config: TrainConfig) -> Path:
    """Refuse a folder that cannot be written or holds another run; creates nothing.

    A non-empty folder is accepted with --overwrite-output-dir (a new run replaces the old) or
    --resume (the run continues there).
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (config.overwrite_output_dir or config.resuming):
        raise UsageError(
            f"--output-dir: {out} is not empty (a previous run?); pass --overwrite-output-dir "
            "to replace it, --resume to continue it, or choose another folder"
        )
    # The folder is only created once every check has passed; here we ask the nearest existing
    # parent whether it could be.
    where = out if out.is_dir() else existing_ancestor(out)
    if not where.is_dir() or not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir: cannot write to {out} ({where} is not writable)")
    return out


def _create_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".embtune-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--output-dir: cannot write to {out}: {exc.strerror or exc}") from exc


def _resume_point(config: TrainConfig, out: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint to continue from and its trainer state, or (None, None) to start fresh."""
    if config.resume_from:
        checkpoint = Path(config.resume_from)
        state = read_trainer_state(checkpoint, "--resume-from")
        if state.get("finished"):
            raise UsageError(
                f"--resume-from: {checkpoint} is a finished run ({state['step']} steps), not a "
                "checkpoint; use it as --model to train further"
            )
        return checkpoint, state
    if not config.resume:
        return None, None
    final = out / TRAINER_STATE_FILE
    if final.is_file():
        state = read_trainer_state(out, "--resume")
        if state.get("finished"):
            raise UsageError(
                f"--resume: {out} holds a finished run ({state['step']} steps); nothing to "
                "resume (--overwrite-output-dir trains it again)"
            )
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
            raise UsageError(
                f"--resume: {out} holds files but no embtune run (no {CONFIG_FILE}); "
                "choose the run's folder"
            )
        return None, None
    return checkpoint, read_trainer_state(checkpoint, "--resume")


def _clear_previous_run(out: Path) -> list[str]:
    """Remove a previous run's checkpoints, best model, events and state from ``out``.

    Left in place they would mix with the new run's: an old checkpoint-900 would be "the newest"
    to --resume, and TensorBoard would draw two runs as one.
    """
    removed = []
    for path in sorted(out.iterdir()):
        name = path.name
        is_ours = (
            checkpoint_step(path) is not None
            or name in (BEST_DIR, TENSORBOARD_DIR, TRAINER_STATE_FILE, DEV_SPLIT_FILE)
            or (name.startswith(".") and name.endswith((".tmp", ".old", ".deleting")))
        )
        if not is_ours:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(name)
    return removed


def _rewrite_log(path: Path, history: list[dict]) -> None:
    """Make train_log.jsonl hold exactly the checkpoint's history (drops lines logged after it)."""
    text = "".join(json.dumps(record) + "\n" for record in history)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _wait_for_a_later_events_file(folder: Path) -> None:
    """Sleep until the clock is past the second in which the newest TensorBoard file was made.

    TensorBoard reads a run's event files in name order, and a name starts with its creation
    second. A resumed run's writer created within the killed run's second could sort first (the
    process id decides) and then be read as the older file.
    """
    stamps = [
        int(match.group(1))
        for path in folder.glob("events.out.tfevents.*")
        if (match := re.match(r"events\.out\.tfevents\.(\d+)\.", path.name))
    ]
    if stamps and (wait := max(stamps) + 1 - time.time()) > 0:
        time.sleep(wait)


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
    # The fused CUDA kernel updates all parameters in one launch (same arithmetic).
    fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused or None)


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _finite_everywhere(accelerator: Any, value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every process: they must skip a step together."""
    bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0


def _coverage_of(sampler, steps, global_batch, epoch_batches):  # noqa: ANN001, ANN202
    plan = EpochPlan(sampler, global_batch)
    plan.batches = epoch_batches
    return plan.coverage_of(steps)


def train(
    config: TrainConfig, show_progress: bool = True, dev_data: BeirDataset | None = None
) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.train_data``; the model is saved to output_dir.

    ``dev_data`` (a caller-made dev set, e.g. the demo's) replaces --eval-data/--dev-fraction.
    With --resume / --resume-from the run continues from a checkpoint and ends exactly as the
    uninterrupted run would have (same seed: same batches, dropout, updates and log).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.validate()
    # Batches change shape every step, which fragments PyTorch's CUDA caching allocator;
    # expandable segments let it grow blocks in place instead of freeing and re-reserving.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
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
        # Without a GPU, accelerate only joins a torchrun launch (gloo) when told it is on CPU;
        # otherwise every process would train alone, each thinking it is the only one.
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with="tensorboard",
        project_dir=str(out),
        # Our step count is global (one call per optimizer step); by default accelerate would
        # step the schedule once per process and decay the learning rate N times too fast.
        step_scheduler_with_optimizer=False,
    )
    main = accelerator.is_main_process
    pad_multiple = pad_multiple_for(config.pad_to_multiple_of, accelerator.device)
    show = show_progress and main
    world = accelerator.num_processes
    global_batch = config.batch_size * world

    # --- every refusal before heavy work: resume point, options, model limits, disk ----------
    if config.resuming and main:
        for line in recover_interrupted(out):
            print(f"embtune train: {out}: {line} (left by an interrupted save)")
    accelerator.wait_for_everyone()
    resume_from, state = _resume_point(config, out)
    fingerprint = data_fingerprint(data.records, data.corpus.values())
    if state is not None and resume_from is not None:
        check_resume_compatible(state, config, resume_from, fingerprint)
        if state["global_batch"] != global_batch:
            raise UsageError(
                f"--resume: {resume_from} was trained with {state['global_batch']} queries per "
                f"step; this launch gives {global_batch} ({world} processes x --batch-size "
                f"{config.batch_size}). Launch as many processes as the run had"
            )
    check_max_lengths(load_model_config(config.model), config.query_max_len, config.passage_max_len)
    check_disk_space(
        out,
        estimate_save_bytes(config.model, with_optimizer=config.save_steps > 0),
        "a checkpoint (model + optimizer state)" if config.save_steps else "the model",
    )
    if main:
        _create_output_dir(out)
        if state is None and (config.overwrite_output_dir or config.resuming):
            removed = _clear_previous_run(out)
            if removed:
                print(f"embtune train: removed the previous run's {', '.join(removed)} in {out}")
    accelerator.wait_for_everyone()
    set_seed(config.seed)

    encoder = Encoder.from_pretrained(
        # A resumed run takes its weights from the checkpoint (same settings, saved with it).
        str(resume_from) if resume_from else config.model,
        pooling=config.pooling,
        normalize=config.normalize,
        query_instruction=config.query_instruction,
        passage_instruction=config.passage_instruction,
        query_max_len=config.query_max_len,
        passage_max_len=config.passage_max_len,
        attn_implementation=config.attn_implementation,
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
        texts.rows,
        config.train_group_size,
        config.negative_fill,
        len(texts.passages),
        config.seed,
        negative_sampling=config.negative_sampling,
    )
    query_lengths = query_tokens.lengths()
    passage_lengths = passage_tokens.lengths()

    def epoch_batches(epoch: int) -> list:
        """The global batches (row indices) of an epoch, in training order."""
        order = sampler.epoch_order(epoch)
        if config.group_by_length:
            # Longest passage first, then query length: batches are padded to their longest.
            keys = np.zeros(len(texts.rows), dtype=np.int64)
            for row in order.tolist():
                group = sampler.group(row, epoch)
                longest = max((int(passage_lengths[p]) for p in group.passages), default=0)
                keys[row] = longest * 65536 + int(query_lengths[group.query])
            batches = length_grouped_batches(order, keys, global_batch, config.seed, epoch)
        else:
            batches = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
        if len(batches) > 1 and len(batches[-1]) < world:
            # Every process needs at least one query: a tail smaller than the process count
            # joins the batch before it.
            batches[-2:] = [np.concatenate(batches[-2:])]
        return batches

    # = len(epoch_batches(e)) for every epoch, without sampling one.
    steps_per_epoch = math.ceil(len(texts.rows) / global_batch)
    if steps_per_epoch > 1 and 0 < len(texts.rows) % global_batch < world:
        steps_per_epoch -= 1
    # --max-steps overrides --epochs (as in Hugging Face's Trainer), also beyond them.
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    start_step = 0
    history: list[dict] = []
    progress = _Progress()
    best: dict = {"step": None, "ndcg": None}
    if state is not None:
        start_step = int(state["step"])
        position = state.get("position", {})
        expected = dict(zip(("epoch", "batch"), divmod(start_step, steps_per_epoch), strict=True))
        if (state["steps_per_epoch"], state["total_steps"], position) != (
            steps_per_epoch,
            total_steps,
            expected,
        ):
            raise UsageError(
                f"--resume: {resume_from} is at step {start_step} of {state['total_steps']} "
                f"({state['steps_per_epoch']} per epoch); these options give {total_steps} "
                f"({steps_per_epoch} per epoch)"
            )
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as exc:
            raise UsageError(f"--resume: {resume_from}: {exc}") from exc
        history = list(state["history"])
        progress = _Progress(**state["progress"])
        best = dict(state["best"])

    budget = negatives_budget(
        texts.rows,
        config.train_group_size,
        config.batch_size,
        config.in_batch_negatives,
        config.negative_fill,
        epochs=epochs_of_run(total_steps, len(texts.rows), global_batch),
        sampling=config.negative_sampling,
        world_size=world,
        cross_device=config.negatives_cross_device,
    )
    if main:
        print("embtune train: negatives budget")
        for line in budget.lines():
            print(f"  {line}")
        for finding in budget.findings():
            print(f"embtune train: warning: {finding}")
        print(
            f"  steps: {total_steps} ({steps_per_epoch} per epoch, {global_batch} queries per step)"
        )
        if pad_multiple > 1:
            print(
                f"  batch widths rounded up to a multiple of {pad_multiple} (--pad-to-multiple-of)"
            )
        if resume_from:
            print(f"  resuming from {resume_from} at step {start_step}")
        elif config.resuming:
            print(f"  no checkpoint in {out} yet: starting at step 0")
        with open(out / CONFIG_FILE, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config.to_dict(), fh, sort_keys=False)
        write_json_atomically(out / BUDGET_FILE, budget.to_json())
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
    if accelerator.device.type == "cpu" and config.attn_implementation == "sdpa":
        # Same dropout, drawn and applied without the unfused attention path (embtune/dropout.py).
        use_fast_cpu_dropout(encoder.model)
    if accelerator.device.type == "cpu" and not (
        config.bf16 or config.fp16 or config.gradient_checkpointing
    ):
        # Same results, less kept for backward: cheap activations are recomputed instead
        # (embtune/activation_recompute.py).
        recompute_feed_forward_activations(encoder.model)
        recompute_norm_outputs(encoder.model)
    pooler = getattr(encoder.model, "pooler", None)
    if isinstance(pooler, torch.nn.Module):
        # BERT's pooler head is computed but never used by our pooling: frozen, it keeps its
        # weights (saved as they were) and DDP does not wait for gradients it will never get.
        pooler.requires_grad_(False)
    if config.compile:
        # In place, so parameter names (and saved weights) stay those of the plain model.
        encoder.model.compile(dynamic=True)
    encoder.to(accelerator.device)  # before the optimizer, which picks its kernel by device
    optimizer = _optimizer(encoder, config)
    scheduler = _linear_schedule(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(encoder, optimizer, scheduler)
    exclude_model_from_state(accelerator)
    # Events logged after the checkpoint by the interrupted run are hidden from TensorBoard.
    tb_options = {"tensorboard": {"purge_step": start_step + 1}} if start_step else {}
    if start_step:
        _wait_for_a_later_events_file(out / TENSORBOARD_DIR)
    accelerator.init_trackers(
        "tensorboard",
        config={k: str(v) for k, v in config.to_dict().items()},
        init_kwargs=tb_options,
    )
    model.train()

    log_file = None
    if main:
        if start_step:
            _rewrite_log(out / LOG_FILE, history)
        log_file = open(out / LOG_FILE, "a" if start_step else "w", encoding="utf-8")

    def write_log(record: dict) -> None:
        history.append(record)
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        accelerator.log(numbers, step=record["step"])
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def trainer_state(done: int) -> dict:
        """Everything besides model and accelerate state that continuing at ``done`` needs."""
        epoch, batch_index = divmod(done, steps_per_epoch)
        return {
            "format": STATE_FORMAT,
            "step": done,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "global_batch": global_batch,
            "position": {"epoch": epoch, "batch": batch_index},  # the next batch to train
            "sampler": sampler.state_dict(),
            "data_fingerprint": fingerprint,
            "config": config.to_dict(),
            "progress": asdict(progress),
            "best": dict(best),
            "history": history,  # = train_log.jsonl up to this step
        }

    def checkpoint_at(done: int) -> Path:
        """Save checkpoint-``done`` (atomically, rotating old ones); returns its folder."""
        return save_checkpoint(
            accelerator,
            accelerator.unwrap_model(model),
            out,
            done,
            trainer_state(done),
            config.save_total_limit,
        )

    def evaluate_dev(step: int) -> None:
        """Retrieval metrics on the dev set; the main process keeps the best model."""
        from embtune.eval.retrieval import evaluate_retrieval

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
                save_atomically(out / BEST_DIR, unwrapped.save)
        accelerator.wait_for_everyone()

    if state is not None and resume_from is not None:
        # Last before the loop: optimizer, scheduler, loss scaler and every RNG as they were.
        load_training_state(accelerator, resume_from)

    bar = tqdm(
        total=total_steps, initial=start_step, desc="training", unit="step", disable=not show
    )
    pad_id = encoder.tokenizer.pad_token_id
    step_settings = StepSettings(
        temperature=config.temperature,
        in_batch_negatives=config.in_batch_negatives,
        negatives_cross_device=config.negatives_cross_device,
        cache_chunk_size=config.cache_chunk_size,
        pad_to_multiple_of=pad_multiple,
    )
    # Which of the data's negatives the run has trained on (a resumed run replays its past).
    coverage = (
        _coverage_of(sampler, start_step, global_batch, epoch_batches)
        if start_step
        else NegativeCoverage(texts.rows)
    )

    def finite(value: torch.Tensor) -> bool:
        return _finite_everywhere(accelerator, value)

    def no_sync():  # noqa: ANN202
        return accelerator.no_sync(model)

    current: tuple[int, list] = (-1, [])
    try:
        for step in range(start_step, total_steps):
            started = time.perf_counter()
            epoch, index = divmod(step, steps_per_epoch)
            if current[0] != epoch:
                current = (epoch, epoch_batches(epoch))
            rows = current[1][index]
            # Each process takes its share; shares differ by at most one query.
            mine = np.array_split(rows, world)[accelerator.process_index]
            groups = [sampler.group(int(r), epoch) for r in mine]
            batch: Batch = collate(
                groups,
                texts.rows,
                query_tokens,
                passage_tokens,
                pad_id,
                pad_multiple,
                (config.query_max_len, config.passage_max_len),
            ).to(accelerator.device)
            if main:
                local = {g.row: g for g in groups}
                for r in rows.tolist():
                    coverage.add(local.get(r) or sampler.group(r, epoch))

            # DDP averages gradients over processes; weighting by the share of queries makes
            # that average the mean over the global batch when shares differ.
            weight = len(mine) * world / len(rows)
            result = forward_backward(
                model, batch, step_settings, accelerator.backward, finite, weight, no_sync
            )
            # NaN guard: a non-finite loss or gradient must not reach the weights. fp16 is the
            # exception for gradients: there an overflow is the loss scaler's normal signal, and
            # accelerate's GradScaler skips that update and lowers the scale by itself.
            problem = None
            if not result.finite:
                problem = "non-finite loss"
            else:
                if config.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), config.max_grad_norm
                    )
                elif not config.fp16:
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    grad_norm = torch.nn.utils.get_total_norm(grads)
                if not config.fp16 and not _finite_everywhere(accelerator, grad_norm):
                    problem = "non-finite gradient"
                else:
                    optimizer.step()
            # The schedule follows the step count, skipped steps included, so that a step's
            # learning rate does not depend on how many steps before it were skipped.
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize(accelerator.device)

            seconds = time.perf_counter() - started
            done = step + 1
            kill_if_requested(KILL_AT_STEP_ENV, done)
            progress.train_seconds += seconds
            texts_this_step = batch.num_texts * world
            progress.texts_seen += texts_this_step
            progress.window_texts += texts_this_step
            progress.window_seconds += seconds
            progress.window_padded_tokens += result.padded_tokens
            progress.window_real_tokens += result.real_tokens
            progress.window_query_width = max(
                progress.window_query_width, batch.query_input_ids.shape[1]
            )
            progress.window_passage_width = max(
                progress.window_passage_width, batch.passage_input_ids.shape[1]
            )
            progress.padded_tokens += result.padded_tokens
            progress.real_tokens += result.real_tokens
            bar.update(1)
            if problem:
                progress.nonfinite_in_row += 1
                progress.skipped_steps += 1
                row_ids = [int(r) for r in rows]
                write_log(
                    {
                        "step": done,
                        "epoch": epoch,
                        "skipped": problem,
                        "rows": row_ids,
                        "sources": [texts.rows[r].source for r in row_ids],
                    }
                )
                if show:
                    tqdm.write(
                        f"step {done}: skipped ({problem}); rows {row_ids} "
                        f"(their files and lines are in {LOG_FILE})"
                    )
                if progress.nonfinite_in_row >= config.max_nonfinite_steps:
                    first = done - progress.nonfinite_in_row + 1
                    saved = checkpoint_at(done)
                    end_distributed(accelerator)
                    raise TrainingStopped(
                        f"steps {first}-{done}: {progress.nonfinite_in_row} steps in a row had a "
                        f"{problem} and were skipped (rows in {out / LOG_FILE}); stopped. "
                        f"{saved} holds the model from before the failure (after step "
                        f"{first - 1}): use it as --model for a new run with a lower "
                        "--learning-rate, a higher --temperature or the listed rows fixed"
                    )
            else:
                progress.nonfinite_in_row = 0
                progress.window_loss += result.loss.item()
                progress.window_steps += 1
                signals = batch_signals(result.output, result.positive_index, config.temperature)
                for key, value in signals.items():
                    progress.window_signals[key] = progress.window_signals.get(key, 0.0) + value
            if (done % config.logging_steps == 0 or done == total_steps) and (
                progress.window_steps
            ):
                sums = progress.window_signals
                if world > 1:
                    keys = sorted(sums)
                    totals = accelerator.reduce(
                        torch.tensor([sums[k] for k in keys], device=accelerator.device),
                        reduction="sum",
                    )
                    sums = dict(zip(keys, totals.tolist(), strict=True))
                means = window_signals(sums)
                candidates = means.get("candidates_per_query", 1.0)
                loss = progress.window_loss / progress.window_steps
                record = {
                    "step": done,
                    "epoch": epoch,
                    "loss": loss,
                    "chance_loss": math.log(candidates),
                    "loss_over_chance": loss / math.log(candidates) if candidates > 1 else None,
                    **means,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "texts_per_second": progress.window_texts / progress.window_seconds,
                    "window_texts": progress.window_texts,
                    "window_seconds": progress.window_seconds,
                    "padding_share": 1
                    - progress.window_real_tokens / max(progress.window_padded_tokens, 1),
                    "query_width": progress.window_query_width,
                    "passage_width": progress.window_passage_width,
                    "peak_memory_bytes": peak_memory_bytes(accelerator.device),
                }
                write_log({k: v for k, v in record.items() if v is not None})
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    chance=f"{record['chance_loss']:.2f}",
                    acc=f"{means.get('accuracy', 0):.2f}",
                    lr=f"{record['learning_rate']:.2e}",
                    texts_s=f"{record['texts_per_second']:.1f}",
                )
                progress.window_loss, progress.window_steps = 0.0, 0
                progress.window_texts, progress.window_seconds = 0, 0.0
                progress.window_signals = {}
                progress.window_padded_tokens = progress.window_real_tokens = 0
                progress.window_query_width = progress.window_passage_width = 0
            if dev_data is not None and (
                done == total_steps or (config.eval_steps and done % config.eval_steps == 0)
            ):
                evaluate_dev(done)
            if config.save_steps and done % config.save_steps == 0 and done < total_steps:
                checkpoint_at(done)
    finally:
        bar.close()
        if log_file:
            log_file.close()

    texts_per_second = (
        progress.texts_seen / progress.train_seconds if progress.train_seconds else 0.0
    )
    peak = peak_memory_bytes(accelerator.device)
    if world > 1:
        peak = int(accelerator.reduce(torch.tensor([peak], device=accelerator.device), "max"))
    accelerator.wait_for_everyone()
    if main:
        accelerator.unwrap_model(model).save(out)
        padding = 1 - progress.real_tokens / max(progress.padded_tokens, 1)
        summary = {
            "steps": total_steps,
            "texts_per_second": texts_per_second,
            "train_seconds": progress.train_seconds,
            "peak_memory_bytes": peak,
            "negative_coverage": coverage.fraction,
            "negatives_used": coverage.used,
            "negatives_total": coverage.total,
            "padding_share": padding,
            "skipped_steps": progress.skipped_steps,
            "best_step": best["step"],
            "best_dev_ndcg@10": best["ndcg"],
            "processes": world,
        }
        write_json_atomically(out / SUMMARY_FILE, summary)
        print(
            f"embtune train: {total_steps} steps, {texts_per_second:.1f} texts/s, peak memory "
            f"{peak / 2**30:.2f} GiB, padding {padding:.0%} of token positions; negatives used: "
            f"{coverage.used}/{coverage.total} ({coverage.fraction:.0%} of the data's)"
        )
        # Written after the model: its presence says the run finished (--resume refuses then).
        write_json_atomically(
            out / TRAINER_STATE_FILE, {**trainer_state(total_steps), "finished": True}
        )
    end_distributed(accelerator)
    return TrainResult(
        output_dir=out,
        steps=total_steps,
        texts_per_second=texts_per_second,
        train_seconds=progress.train_seconds,
        history=history,
        budget=budget,
        best_step=best["step"],
        best_ndcg=best["ndcg"],
        resumed_from_step=start_step,
        skipped_steps=progress.skipped_steps,
        peak_memory_bytes=peak,
        negative_coverage=coverage.fraction,
    )
