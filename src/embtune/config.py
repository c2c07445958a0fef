"""Training options: one dataclass that is the single source of names, defaults and help.

The command line (`embtune train --help`) and YAML files (`--config run.yaml`) are both built
from :class:`TrainConfig`, so an option is defined once and a newcomer finds where it is used
by searching for its field name. Precedence: dataclass default < YAML file < command line.

YAML keys are the field names (``train_group_size: 8``). FlagEmbedding's names for the same
things are accepted too (``per_device_train_batch_size``, ``num_train_epochs``,
``sentence_pooling_method``, ``query_instruction_for_retrieval``, ...) so configs move over.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from embtune.choices import (
    ATTENTION_IMPLEMENTATIONS,
    FSDP_MODES,
    KD_LOSS_TYPES,
    MODEL_KINDS,
    NEGATIVE_FILL_POLICIES,
    NEGATIVE_SAMPLING_POLICIES,
    PADDING_SIDES,
    POOLING_MODES,
    REPORT_TO,
    RERANKER_LOSSES,
    ROW_PROMPT_RULES,
)
from embtune.errors import UsageError, shorten
from embtune.text_files import foreign_encoding


def option(
    default: object = MISSING, help: str = "", choices: tuple | None = None, **extra: object
):
    """A dataclass field carrying its command-line help (and choices).

    ``extra`` metadata: ``metavar``; ``aliases`` (more flag spellings); ``words`` (texts the
    option takes besides a value of its type: ``("auto",)`` beside a number);
    ``resume_may_change`` (the option may differ when a run is resumed, because it does not
    change what is trained);
    ``sweep``: `embtune sweep` may give the option several values (one run each), declared as
    ``{"order": N, "label": "g", "header": "G"}``: ``order`` places it among the sweep's axes
    (the order of a run label's parts and of the CSV columns: existing axes keep their number),
    ``label`` prefixes its value in run labels ("g4-b16"), ``header`` names its table column,
    an optional ``help`` replaces the option's help in `embtune sweep --help`.
    """
    meta = {"help": help, "choices": choices, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every option of `embtune train`."""

    # --- data -------------------------------------------------------------------------------
    train_data: list[str] = option(
        [],
        help="FlagEmbedding jsonl files, folders of them, or BEIR folders",
        metavar="PATH",
        # A resumed run may find its data at another path; its content is compared instead.
        resume_may_change=True,
    )
    train_split: str = option("train", help="qrels split used when --train-data is a BEIR folder")
    skip_bad_rows: bool = option(
        False,
        help="rows that fail validation are left out, counted, and listed in "
        "OUTPUT_DIR/rejected_rows.jsonl instead of refusing the whole input",
    )
    output_dir: str = option(
        "",
        help="folder for the fine-tuned model, logs and checkpoints",
        resume_may_change=True,
    )
    # --- model ------------------------------------------------------------------------------
    model: str = option("", help="Hugging Face model name or local folder")
    model_kind: str = option(
        "bi-encoder",
        help="bi-encoder = an embedder (queries and passages embedded apart); cross-encoder = "
        "a reranker scoring each (query, passage) pair read together (docs/reranker.md): any "
        "encoder checkpoint starts one with a new one-label head",
        choices=MODEL_KINDS,
    )
    pooling: str | None = option(
        None,
        help="how token states become one vector; default: the model's sentence-transformers "
        "config, else cls",
        choices=POOLING_MODES,
    )
    normalize: bool = option(
        True, help="L2-normalize embeddings (scores are then cosine similarities)"
    )
    query_instruction: str | None = option(
        None,
        help="text put before every query (a row's 'prompt' overrides it); "
        "default: the model's own",
    )
    passage_instruction: str | None = option(
        None, help="text put before every passage; default: the model's own"
    )
    query_instruction_format: str = option(
        "{}{}",
        help="how the query instruction (or a row's prompt) and the query are joined "
        "(FlagEmbedding's format): '{}{}' puts one straight before the other; "
        "'<instruct>{}\\n<query>{}' as bge-en-icl, 'Instruct: {}\\nQuery:{}' as "
        "Qwen3-Embedding. The query's {} comes last: the rest is saved as the model's query "
        "prompt",
        metavar="FORMAT",
    )
    passage_instruction_format: str = option(
        "{}{}", help="the same for the passage instruction and the passage", metavar="FORMAT"
    )
    row_prompts: str = option(
        "flagembedding",
        help="when a row's own 'prompt' replaces the query instruction: flagembedding = only "
        "when a query instruction is set (--query-instruction or the model's saved one), as "
        "FlagEmbedding does, otherwise rows' prompts are ignored; always = every row's prompt "
        "goes before its query; never = rows' prompts are ignored",
        choices=ROW_PROMPT_RULES,
    )
    append_eos_token: bool | None = option(
        None,
        help="end every text with the tokenizer's EOS token, as decoder embedders' recipes do "
        "(Qwen3-Embedding, e5-mistral, RepLLaMA) for last_token pooling; written into the "
        "saved tokenizer, so transformers and sentence-transformers do the same; default: "
        "what the model's tokenizer does",
    )
    padding_side: str | None = option(
        None,
        help="pad batches on the left or the right, in training and evaluation; default: the "
        "tokenizer's (saved with the model)",
        choices=PADDING_SIDES,
    )
    query_max_len: int = option(64, help="queries are truncated to this many tokens")
    passage_max_len: int = option(256, help="passages are truncated to this many tokens")
    max_len: int = option(
        0,
        help="cross-encoder: tokens of a whole (query, passage) pair, special tokens included; "
        "the passage is cut to fit (0 = query_max_len + passage_max_len, as FlagEmbedding)",
    )
    query_instruction_for_rerank: str | None = option(
        None,
        help="cross-encoder: text put before every query (FlagEmbedding's name); default: "
        "the reranker's own, else none",
    )
    passage_instruction_for_rerank: str | None = option(
        None, help="cross-encoder: text put before every passage; default: the reranker's own"
    )
    allow_settings_mismatch: bool = option(
        False,
        help="train even when the options embed --model differently from its own "
        "sentence-transformers configuration (pooling, normalization, EOS, a shipped "
        "instruction); by default such a run is refused before it starts (embtune "
        "check-model shows the comparison)",
        resume_may_change=True,
    )
    # --- LoRA (peft) ------------------------------------------------------------------------
    use_lora: bool = option(
        False,
        help="train LoRA adapters instead of every weight (docs/llm-embedders.md): the base "
        "stays frozen, checkpoints hold the adapter; the saved folder is the adapter, loaded "
        "with its base by transformers and sentence-transformers",
    )
    lora_rank: int = option(64, help="LoRA rank r of each update B A", metavar="R")
    lora_alpha: float = option(16.0, help="LoRA alpha: updates are scaled by alpha / r")
    lora_dropout: float = option(0.1, help="dropout on the LoRA branch's input")
    target_modules: list[str] = option(
        [],
        help="module names LoRA adapts; default: q_proj k_proj v_proj o_proj gate_proj "
        "up_proj down_proj where the model has them (FlagEmbedding's), else every linear layer",
        metavar="NAME",
    )
    modules_to_save: list[str] = option(
        [], help="modules trained in full beside the adapters and saved with them", metavar="NAME"
    )
    from_peft: str = option(
        "", help="a LoRA adapter folder made for --model: training goes on from it"
    )
    save_merged_lora_model: bool = option(
        False,
        help="also save the model with the adapter merged into its weights, to "
        "OUTPUT_DIR/merged_model (a plain model, no peft needed to load it)",
    )
    # --- groups and loss --------------------------------------------------------------------
    train_group_size: int = option(
        8,
        help="passages per query per step: 1 positive + (train_group_size - 1) sampled negatives",
        sweep={"order": 1, "label": "g", "header": "G"},
    )
    negative_fill: str = option(
        "corpus",
        help="when a row has fewer negatives than needed: corpus = fill with random passages "
        "(never the row's positives); repeat = resample its negatives with duplicates "
        "(FlagEmbedding); shrink = use fewer",
        choices=NEGATIVE_FILL_POLICIES,
    )
    negative_sampling: str = option(
        "random",
        help="which of a row's negatives a step uses: random = a fresh random draw each epoch "
        "(FlagEmbedding); cycle = walk a seeded shuffle of the row's negatives across epochs, "
        "so every negative is used before any repeats",
        choices=NEGATIVE_SAMPLING_POLICIES,
        sweep={"order": 5, "label": "ns-", "header": "sampling"},
    )
    in_batch_negatives: bool = option(
        True, help="also score each query against every other passage in the batch"
    )
    negatives_cross_device: bool = option(
        False,
        help="under torchrun / accelerate launch, score each query against the passages of "
        "every process (the global batch), with gradients flowing back to each process",
    )
    fsdp: str = option(
        "off",
        help="under torchrun / accelerate launch, shard weights, gradients and optimizer state "
        "over the processes (PyTorch FSDP2 through accelerate), for models too large for one "
        "device: full_shard = least memory; shard_grad_op = keep gathered weights from forward "
        "to backward (faster, more memory); off = every process holds the whole model (DDP)",
        choices=FSDP_MODES,
    )
    reranker_loss: str = option(
        "listwise",
        help="cross-encoder objective: listwise = cross-entropy over the group, positive as "
        "target (FlagEmbedding); pointwise = binary cross-entropy per pair, positive 1, "
        "negatives 0 (sentence-transformers' BinaryCrossEntropyLoss)",
        choices=RERANKER_LOSSES,
    )
    temperature: float = option(
        0.02,
        help="bi-encoder: scores are q.p / temperature before the softmax",
        sweep={"order": 4, "label": "t", "header": "temp"},
    )
    # --- distillation from teacher scores (rows' pos_scores / neg_scores) -------------------
    knowledge_distillation: bool = option(
        False,
        help="train toward the teacher's scores of each group (the rows' pos_scores / "
        "neg_scores, e.g. from `embtune score`) with --kd-loss-type; rows without scores are "
        "refused unless --allow-unscored-rows",
    )
    kd_loss_type: str = option(
        "kl_div",
        help="kl_div = soft cross-entropy toward softmax(teacher / teacher_temperature) over "
        "the query's group, plus InfoNCE (FlagEmbedding); m3_kd_loss = every group passage a "
        "target weighted by the teacher, with the earlier ones masked (FlagEmbedding's bge-m3); "
        "margin_mse = squared error of positive-negative score margins (sentence-transformers' "
        "MarginMSELoss)",
        choices=KD_LOSS_TYPES,
    )
    teacher_temperature: float = option(
        1.0,
        help="teacher scores are divided by it before their softmax (1.0 = FlagEmbedding, "
        "which has none); above 1 flattens the targets, below 1 sharpens them. A reranker's "
        "logits suit 1.0; a bi-encoder teacher's cosines want about --temperature",
    )
    allow_unscored_rows: bool = option(
        False,
        help="with --knowledge-distillation, train rows without teacher scores on the hard "
        "term only instead of refusing them",
    )
    drop_teacher_false_negatives: float | None = option(
        None,
        help="before sampling, remove negatives whose teacher score is above (the row's "
        "lowest positive score - MARGIN): likely false negatives; 0 drops those the teacher "
        "ranks above a positive",
        metavar="MARGIN",
    )
    # --- Matryoshka embeddings ------------------------------------------------------------
    matryoshka_dims: list[int] = option(
        [],
        help="also train each leading slice of the embedding (e.g. 384 256 128 64): the "
        "objective is applied to every truncated, re-normalized embedding and the terms are "
        "weighted; dev evaluation reports every dimension",
        metavar="DIM",
    )
    matryoshka_weights: list[float] = option(
        [],
        help="one weight per --matryoshka-dims entry (default: 1 each)",
        metavar="W",
    )
    # --- optimisation -----------------------------------------------------------------------
    batch_size: int = option(
        16,
        help="queries per optimizer step (per process)",
        sweep={"order": 2, "label": "b", "header": "B"},
    )
    epochs: int = option(1, help="passes over the training rows")
    max_steps: int = option(0, help="stop after this many steps (0 = run all epochs)")
    learning_rate: float | str = option(
        2e-5,
        help="peak AdamW learning rate, or auto: one short trial per --learning-rate-grid value "
        "is trained and evaluated on the dev set, and the rate is chosen by the --auto-tolerance "
        "rule (docs/learning-rate-search.md); needs --eval-data or --dev-fraction",
        # A sweep's runs each take a number (auto is refused there: sweep/plan.py).
        sweep={"order": 3, "label": "lr", "header": "lr", "help": "peak AdamW learning rate"},
        words=("auto",),
        metavar="LR|auto",
    )
    learning_rate_grid: list[float] = option(
        [1e-5, 2e-5, 5e-5, 1e-4, 2e-4],
        help="the learning rates --learning-rate auto tries, one trial each",
        metavar="LR",
        # What is trained is decided by the learning rate chosen, which --resume compares.
        resume_may_change=True,
    )
    learning_rate_trial_steps: int = option(
        0,
        help="steps of each --learning-rate auto trial, with its own warm-up and decay (0 = a "
        "quarter of the run's steps, at least 1)",
        metavar="N",
        resume_may_change=True,
    )
    weight_decay: float = option(0.01, help="AdamW weight decay (not applied to biases and norms)")
    warmup_ratio: float = option(
        0.1, help="share of steps with linear warm-up, then linear decay to 0"
    )
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0 = off)")
    seed: int = option(42, help="seed for sampling, shuffling and initialisation")
    gradient_checkpointing: bool = option(
        False, help="recompute activations to save memory", resume_may_change=True
    )
    cache_chunk_size: int = option(
        0,
        help="cached contrastive loss (GradCache): encode the batch in chunks of this many "
        "texts without keeping activations, then re-encode chunk by chunk with gradients; "
        "memory then depends on the chunk, not the batch (0 = off)",
        resume_may_change=True,
        sweep={"order": 6, "label": "cc", "header": "cache chunk"},
    )
    group_by_length: bool = option(
        False,
        help="draw each step's queries from a pool of nearby lengths (pools shuffled) so "
        "batches carry less padding",
    )
    pad_to_multiple_of: int = option(
        0,
        help="round each batch's padded width up to a multiple of N (at most the max length), "
        "so a run meets few batch shapes: on a GPU a step meeting a shape for the first time "
        "was measured up to 3.5 s slower (docs/performance.md). 1 pads to the longest text; "
        "0 (default): 16 on a GPU, 1 on a CPU",
        metavar="N",
    )
    attn_implementation: str = option(
        "sdpa",
        help="attention kernel: sdpa (PyTorch scaled-dot-product), eager, or flash_attention_2 "
        "(GPU, needs the flash-attn package; computes without padding)",
        choices=ATTENTION_IMPLEMENTATIONS,
        resume_may_change=True,
    )
    compile: bool = option(
        False, help="torch.compile the encoder (slower start, faster steps)", resume_may_change=True
    )
    bf16: bool = option(
        False, help="bfloat16 mixed precision (GPU, or a CPU with AVX512-BF16 or AMX)"
    )
    fp16: bool = option(False, help="float16 mixed precision with loss scaling (GPU only)")
    # --- evaluation during training ---------------------------------------------------------
    eval_data: str = option(
        "",
        help="BEIR folder evaluated (nDCG@10, MRR@10, Recall@k) during and after training",
        resume_may_change=True,
    )
    eval_split: str = option(
        "dev", help="qrels split of --eval-data; never select on test", resume_may_change=True
    )
    dev_fraction: float = option(
        0.0,
        help="hold out this seeded share of the training queries as the dev set (instead of "
        "--eval-data); the held-out rows are saved as dev_split.json",
    )
    eval_steps: int = option(
        0, help="evaluate every N steps (0 = only at the end)", resume_may_change=True
    )
    dev_retriever: str = option(
        "",
        help="cross-encoder: the bi-encoder whose top --rerank-top-k passages per dev query "
        "are reranked in dev evaluation (retrieved once, before training); default: --model "
        "when it is an embedder",
        metavar="MODEL",
    )
    rerank_top_k: int = option(
        100,
        help="cross-encoder: candidates per dev query reranked in dev evaluation",
        metavar="K",
    )
    reference_data: list[str] = option(
        [],
        help="BEIR folders of general (out-of-domain) retrieval sets, evaluated before training "
        "and at each dev evaluation and logged as reference/<folder name>/<metric>, with the "
        "change against the base model printed: what fine-tuning costs outside the domain",
        metavar="DIR",
        resume_may_change=True,
    )
    reference_split: str = option(
        "test",
        help="qrels split of every --reference-data folder (reference sets are only watched, "
        "never trained on)",
        resume_may_change=True,
    )
    interpolate_base: str = option(
        "",
        help="after training, mix the chosen model's weights with the base model's: base + "
        "A x (fine-tuned - base), saved in OUTPUT_DIR/interpolated. A number A in [0, 1], or "
        "auto: each --interpolate-factors value is scored on dev and the reference sets and "
        "one is picked by the --auto-tolerance rule (table and plot saved); '' = off",
        metavar="auto|A",
    )
    interpolate_factors: list[float] = option(
        [0.25, 0.5, 0.75, 1.0],
        help="factors --interpolate-base auto chooses from (1 = the fine-tuned model)",
        metavar="A",
    )
    auto_tolerance: float = option(
        0.005,
        help="rule of the automatic choices (--interpolate-base auto and --learning-rate auto): "
        "keep the candidates whose dev nDCG@10 is within this of the best one's; of those, "
        "take the best mean reference nDCG@10, or without reference sets the one closest to "
        "the base model (the smallest factor, the smallest learning rate)",
    )
    save_best: bool = option(
        False,
        help="keep the checkpoint with the best dev nDCG@10 in OUTPUT_DIR/best (with "
        "--matryoshka-dims: the full-size embedding's nDCG@10)",
        resume_may_change=True,
    )
    # --- output -----------------------------------------------------------------------------
    logging_steps: int = option(
        10, help="log training signals every N steps", resume_may_change=True
    )
    save_steps: int = option(
        500,
        help="write a checkpoint (model + optimizer, scheduler, RNG and data position) every N "
        "steps as OUTPUT_DIR/checkpoint-N (0 = only the final model)",
        resume_may_change=True,
    )
    save_total_limit: int = option(
        0,
        help="keep only the newest N checkpoints, deleting older ones (0 = keep all)",
        resume_may_change=True,
    )
    overwrite_output_dir: bool = option(
        False,
        help="start a new run in a non-empty output folder, replacing a previous run's model, "
        "checkpoints and logs",
        aliases=("--overwrite",),
        resume_may_change=True,
    )
    resume: bool = option(
        False,
        help="continue the run in --output-dir from its newest checkpoint (model, optimizer, "
        "scheduler, RNG, data position, logs); starts fresh when none was written yet",
        resume_may_change=True,
    )
    resume_from: str = option(
        "",
        help="continue from this checkpoint folder (implies --resume)",
        metavar="DIR",
        resume_may_change=True,
    )
    max_nonfinite_steps: int = option(
        5,
        help="a step whose loss or gradient is NaN/inf is skipped (logged with its rows); this "
        "many in a row stop the run, with a checkpoint saved",
        resume_may_change=True,
    )
    cache_dir: str = option(
        "",
        help="token cache folder; default: $EMBTUNE_CACHE or ~/.cache/embtune",
        resume_may_change=True,
    )
    # --- reporting and sharing (docs/sharing.md) --------------------------------------------
    report_to: list[str] = option(
        ["tensorboard"],
        help="where the log goes besides train_log.jsonl, one or more of tensorboard "
        "(OUTPUT_DIR/tensorboard), wandb, mlflow (their own settings: WANDB_MODE, "
        "WANDB_PROJECT, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, ...), or none",
        metavar="NAME",
        resume_may_change=True,
    )
    push_to_hub: bool = option(
        False,
        help="after the run, upload the saved model (its files, the model card README.md, "
        "train_summary.json, train_config.yaml, negatives_budget.json; no checkpoints or "
        "logs) to the Hugging Face Hub repository --hub-model-id, made if missing",
        resume_may_change=True,
    )
    hub_model_id: str = option(
        "",
        help="the Hub repository --push-to-hub uploads to, NAME or OWNER/NAME (NAME alone: "
        "under the token's account); default: the output folder's name",
        metavar="NAME",
        resume_may_change=True,
    )
    hub_private_repo: bool = option(
        False,
        help="make the repository --push-to-hub creates private (an existing one keeps its "
        "visibility)",
        resume_may_change=True,
    )
    hub_token: str | None = option(
        None,
        help="the Hub token --push-to-hub uses; default: HF_TOKEN or the one `hf auth login` "
        "saved. Never written to the run's files",
        metavar="TOKEN",
        resume_may_change=True,
    )
    config: str = option(
        "",
        help="YAML file supplying any option; command-line flags override it",
        resume_may_change=True,
    )

    def __post_init__(self) -> None:
        # A plain string for a list option is one item (`train_data="nli.jsonl"`), never its
        # characters: iterating it would read "n", "l", ... and "." as whole folders.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str | int | float) and _field_type(f) is list:
                setattr(self, f.name, [value])

    def validate(self) -> None:
        """Refuse inconsistent options with a one-line message naming the option."""
        required = {
            "model": self.model,
            "train_data": self.train_data,
            "output_dir": self.output_dir,
        }
        for name, value in required.items():
            if not value:
                raise OptionError(name, "is required")
        positive_ints = (
            "train_group_size",
            "batch_size",
            "epochs",
            "query_max_len",
            "passage_max_len",
            "rerank_top_k",
        )
        for name in (*positive_ints, "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, got {getattr(self, name)}")
        non_negative = ("max_steps", "save_steps", "logging_steps")
        for name in (
            *non_negative,
            "learning_rate_trial_steps",
            "eval_steps",
            "save_total_limit",
            "cache_chunk_size",
            "pad_to_multiple_of",
            "max_len",
        ):
            # `not >=` also refuses NaN, which every comparison calls False.
            if not getattr(self, name) >= 0:
                raise OptionError(name, f"must not be negative, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            # numpy and torch take 32-bit seeds; outside that they fail after the output exists.
            raise OptionError("seed", f"must be in [0, 2**32 - 1], got {self.seed}")
        for name in ("weight_decay", "max_grad_norm"):
            # inf passes `>= 0` and would train a non-finite model; `not >=` also catches NaN.
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise OptionError(name, f"must be a finite number >= 0, got {value}")
        if self.logging_steps < 1:
            raise OptionError("logging_steps", f"must be at least 1, got {self.logging_steps}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise OptionError("temperature", f"must be a positive number, got {self.temperature}")
        self._validate_learning_rate()
        if not 0 <= self.warmup_ratio < 1:
            raise OptionError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.dev_fraction < 1:
            raise OptionError("dev_fraction", f"must be in [0, 1), got {self.dev_fraction}")
        for name in _FLOAT_FIELDS:
            # The checks above refuse NaN and inf already; this keeps a new float option safe.
            if not math.isfinite(getattr(self, name)):
                raise OptionError(name, f"must be a finite number, got {getattr(self, name)}")
        if self.dev_fraction and self.eval_data:
            raise UsageError("--dev-fraction and --eval-data exclude each other; pick one dev set")
        if self.bf16 and self.fp16:
            raise UsageError("--bf16 and --fp16 exclude each other; pick one")
        if (self.resume or self.resume_from) and self.overwrite_output_dir:
            raise UsageError(
                "--resume and --overwrite-output-dir exclude each other: resume continues the run "
                "in --output-dir, overwrite replaces it"
            )
        self._validate_distillation()
        self._validate_matryoshka()
        self._validate_interpolation()
        self._validate_decoder_options()
        self._validate_reporting()
        if self.negatives_cross_device and not self.in_batch_negatives:
            raise UsageError(
                "--negatives-cross-device with --no-in-batch-negatives: other processes' "
                "passages are in-batch negatives; allow in-batch negatives or drop the option"
            )
        if self.train_group_size == 1 and not self.in_batch_negatives:
            raise UsageError(
                "--train-group-size 1 with --no-in-batch-negatives leaves each query only its "
                "positive: the loss is always 0. Raise the group size or allow in-batch negatives"
            )

    def _validate_reporting(self) -> None:
        """--report-to known names (none alone); the Hub options only with --push-to-hub."""
        names = self.report_to
        unknown = [name for name in names if name not in REPORT_TO]
        if not names or unknown:
            got = shorten(unknown[0]) if unknown else "nothing"
            raise OptionError("report_to", f"takes {', '.join(REPORT_TO)}; got {got}")
        if "none" in names and len(names) > 1:
            others = " ".join(name for name in names if name != "none")
            raise OptionError("report_to", f"none reports nowhere; drop it or {others}")
        hub_only = {
            "hub_model_id": self.hub_model_id,
            "hub_private_repo": self.hub_private_repo,
            "hub_token": self.hub_token,
        }
        for name, value in hub_only.items():
            if value and not self.push_to_hub:
                raise UsageError(f"{flag(name)} only applies with --push-to-hub")

    def _validate_learning_rate(self) -> None:
        """--learning-rate a positive number or auto; the grid positive, finite and distinct."""
        rate = self.learning_rate
        if isinstance(rate, str):
            if rate != "auto":
                reason = f"must be a positive number or auto, got {rate!r}"
                raise OptionError("learning_rate", reason)
        elif not (rate > 0 and math.isfinite(rate)):
            raise OptionError("learning_rate", f"must be a positive number, got {rate}")
        grid = self.learning_rate_grid
        if not grid or any(not (r > 0 and math.isfinite(r)) for r in grid):
            raise OptionError(
                "learning_rate_grid", f"must be one or more positive numbers, got {grid}"
            )
        if len(set(grid)) != len(grid):
            twice = next(r for r in grid if grid.count(r) > 1)
            raise OptionError("learning_rate_grid", f"has {twice} twice: {grid}")

    def _validate_distillation(self) -> None:
        """--teacher-temperature, --drop-teacher-false-negatives and what needs distillation."""
        if not (self.teacher_temperature > 0 and math.isfinite(self.teacher_temperature)):
            raise OptionError(
                "teacher_temperature", f"must be a positive number, got {self.teacher_temperature}"
            )
        margin = self.drop_teacher_false_negatives
        if margin is not None and not math.isfinite(margin):
            raise OptionError(
                "drop_teacher_false_negatives", f"must be a finite number, got {margin}"
            )
        if self.allow_unscored_rows and not self.knowledge_distillation:
            raise UsageError("--allow-unscored-rows only applies with --knowledge-distillation")
        if self.teacher_temperature != 1.0 and not self.knowledge_distillation:
            raise UsageError("--teacher-temperature only applies with --knowledge-distillation")
        if self.kd_loss_type != "kl_div" and not self.knowledge_distillation:
            raise UsageError(f"--kd-loss-type {self.kd_loss_type} needs --knowledge-distillation")

    def _validate_interpolation(self) -> None:
        """--interpolate-base auto or a factor in [0, 1]; factors in [0, 1]; tolerance >= 0."""
        value = self.interpolate_base
        if not is_interpolation_value(value):
            raise OptionError(
                "interpolate_base", f"must be auto or a number in [0, 1], got {value!r}"
            )
        factors = self.interpolate_factors
        if not factors or any(not 0 <= a <= 1 for a in factors):
            raise OptionError(
                "interpolate_factors", f"must be one or more numbers in [0, 1], got {factors}"
            )
        tolerance = self.auto_tolerance
        if not (tolerance >= 0 and math.isfinite(tolerance)):
            raise OptionError("auto_tolerance", f"must be a finite number >= 0, got {tolerance}")

    def _validate_decoder_options(self) -> None:
        """Instruction formats of the form '<text>{}<text>{}'; LoRA options in range and
        only with LoRA; what LoRA cannot be combined with yet."""
        from embtune.models.instruction_format import check_format

        check_format(self.query_instruction_format, "--query-instruction-format")
        check_format(self.passage_instruction_format, "--passage-instruction-format")
        if self.lora_rank < 1:
            raise OptionError("lora_rank", f"must be at least 1, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise OptionError("lora_alpha", f"must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise OptionError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        self._validate_sharding()
        if self.lora:
            if self.model_kind != "bi-encoder":
                raise UsageError(
                    f"--use-lora trains bi-encoders; --model-kind {self.model_kind} trains "
                    "every weight (LoRA rerankers are not built yet)"
                )
            if self.interpolate_base:
                raise UsageError(
                    "--interpolate-base mixes full weights; with LoRA, scale the adapter "
                    "instead: drop --interpolate-base (not built yet for adapters)"
                )
            return
        lora_only = {
            "save_merged_lora_model": self.save_merged_lora_model,
            "target_modules": self.target_modules,
            "modules_to_save": self.modules_to_save,
        }
        for name, value in lora_only.items():
            if value:
                raise UsageError(f"{flag(name)} only applies with --use-lora or --from-peft")

    def _validate_sharding(self) -> None:
        """What --fsdp cannot be combined with yet, each with the way around it."""
        if self.fsdp == "off":
            return
        refused = {
            "model_kind": (
                self.model_kind != "bi-encoder",
                "sharded rerankers are not built yet: train the cross-encoder unsharded",
            ),
            "interpolate_base": (
                bool(self.interpolate_base),
                "mixing with the base needs the whole model in one process: drop "
                "--interpolate-base, or mix afterwards with `embtune merge`",
            ),
            "save_merged_lora_model": (
                self.save_merged_lora_model,
                "merging gathers the whole model in one process: load the saved adapter "
                "and merge it after training (docs/llm-embedders.md)",
            ),
        }
        for name, (clash, reason) in refused.items():
            if clash:
                raise UsageError(f"--fsdp with {flag(name)}: {reason}")

    @property
    def lora(self) -> bool:
        """True when the run trains LoRA adapters (--use-lora, or --from-peft's adapter)."""
        return self.use_lora or bool(self.from_peft)

    def _validate_matryoshka(self) -> None:
        """Dimensions positive and distinct (in any order); one weight each."""
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if any(d < 1 for d in dims):
            raise OptionError("matryoshka_dims", f"must be positive, got {dims}")
        if len(set(dims)) != len(dims):
            raise OptionError("matryoshka_dims", f"has a dimension twice: {dims}")
        if weights and not dims:
            raise UsageError("--matryoshka-weights needs --matryoshka-dims")
        if weights and len(weights) != len(dims):
            raise OptionError(
                "matryoshka_weights",
                f"needs one weight per dimension ({len(dims)}), got {len(weights)}",
            )
        if any(not (w >= 0 and math.isfinite(w)) for w in weights) or (
            weights and not any(weights)
        ):
            raise OptionError(
                "matryoshka_weights", f"must be finite, >= 0 and not all 0, got {weights}"
            )

    def to_dict(self) -> dict:
        """The options as a plain dict (saved with the run and its checkpoints, logged to the
        trackers); a --hub-token is left out: it must not end up in files or dashboards."""
        values = asdict(self)
        if values["hub_token"]:
            values["hub_token"] = HIDDEN_TOKEN
        return values

    @property
    def resuming(self) -> bool:
        """True when the run continues from a checkpoint (--resume or --resume-from)."""
        return bool(self.resume or self.resume_from)


HIDDEN_TOKEN = "<hidden>"  # what to_dict() gives for a --hub-token


def is_interpolation_value(value: str) -> bool:
    """True for an --interpolate-base value: "" (off), "auto" or a factor in [0, 1]."""
    if value in ("", "auto"):
        return True
    try:
        return 0 <= float(value) <= 1  # NaN compares False
    except ValueError:
        return False


def flag(name: str) -> str:
    """The command-line spelling of a field name."""
    return "--" + name.replace("_", "-")


class OptionError(UsageError):
    """A bad value of one option; it knows which, so a YAML file's line can be named."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{flag(name)} {reason}")


# FlagEmbedding / Hugging Face argument names -> ours, so their YAML/JSON configs work as-is.
ALIASES = {
    "model_name_or_path": "model",
    "per_device_train_batch_size": "batch_size",
    "num_train_epochs": "epochs",
    "sentence_pooling_method": "pooling",
    "query_instruction_for_retrieval": "query_instruction",
    "passage_instruction_for_retrieval": "passage_instruction",
    "normalize_embeddings": "normalize",
    "warmup_ratio": "warmup_ratio",
    "overwrite_output_dir": "overwrite_output_dir",
    "overwrite": "overwrite_output_dir",
    "resume_from_checkpoint": "resume_from",
    "save_total_limit": "save_total_limit",
}


@functools.cache
def type_hints() -> dict[str, object]:
    """TrainConfig's field types, resolved once: resolving them for every field of every
    parser built took 0.28 s of each `embtune` start."""
    return typing.get_type_hints(TrainConfig)


# Options read as floats; none may be NaN or infinite (validate refuses them).
_FLOAT_FIELDS = tuple(name for name, hint in type_hints().items() if hint is float)


def _optional(f) -> bool:
    """True when the field's type admits None (``str | None``)."""
    return type(None) in typing.get_args(type_hints()[f.name])


def _field_type(f) -> type:
    hint = type_hints()[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return args[0]
    if typing.get_origin(hint) is list:
        return list
    return hint


def argument_type(f) -> Callable[[str], object]:
    """What argparse calls on a flag's text: the field's type, or for a field with ``words``
    (``auto`` of --learning-rate) a number or one of the words."""
    kind = _field_type(f)
    words = f.metadata.get("words", ())
    if not words:
        return kind

    def number_or_word(text: str) -> object:
        if text in words:
            return text
        try:
            return kind(text)
        except ValueError:
            return text  # validate() refuses it in one line naming the option and the words

    number_or_word.__name__ = kind.__name__
    return number_or_word


def _item_type(f) -> type:
    """The element type of a list option (str, int or float)."""
    return typing.get_args(type_hints()[f.name])[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one option per TrainConfig field; defaults are SUPPRESSed so YAML can sit between."""
    for f in fields(TrainConfig):
        kind = _field_type(f)
        meta = f.metadata
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        shown = (
            "required"
            if f.name in ("model", "train_data", "output_dir")
            else f"default: {default!r}"
        )
        if f.name in ("config", "cache_dir", "pooling", "query_instruction", "passage_instruction"):
            shown = "" if default in ("", None) else shown
        help_text = meta["help"] + (f" ({shown})" if shown else "")
        names = [flag(f.name), *meta.get("aliases", ())]
        if f.name == "output_dir":
            names.insert(0, "-o")
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kwargs.update(nargs="+", type=_item_type(f), metavar=meta.get("metavar", "VALUE"))
        else:
            kwargs["type"] = argument_type(f)
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(*names, **kwargs)


def _yaml_values(path: Path) -> dict[str, tuple[object, int]]:
    """Top-level YAML mapping as {key: (value, line)}; line numbers make errors precise."""
    import yaml

    if not path.is_file():
        raise UsageError(f"--config: {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--config: cannot read {path}: {exc.strerror or exc}") from exc
    if encoding := foreign_encoding(raw):
        raise UsageError(f"{path}:1: file is {encoding}; save it as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not valid UTF-8 (byte {exc.start})") from exc
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{where}: malformed YAML: {problem}") from exc
    except RecursionError as exc:
        raise UsageError(f"{path}: malformed YAML: nested too deeply") from exc
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise UsageError(f"{path}:1: expected a mapping of option: value")
    lines: dict[str, int] = {}
    for key_node, _ in node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        # YAML lets a later key silently replace an earlier one; in a config that is a mistake.
        if key in lines:
            raise UsageError(
                f"{path}:{line}: field {shorten(key)}: duplicate key (first on line {lines[key]})"
            )
        lines[key] = line
    return {str(k): (v, lines.get(str(k), 1)) for k, v in data.items()}


def _coerce(
    name: str,
    value: object,
    kind: type,
    where: str,
    optional: bool = False,
    item: type = str,
    words: tuple[str, ...] = (),
) -> object:
    """Check a YAML value's type against the field's: int->float widening, text that reads as
    a float for a float field (YAML 1.1 takes ``1e-5`` for a string), and the field's
    ``words`` (``auto``); nothing else."""
    if isinstance(value, str) and value in words:
        return value
    if value is None:
        if optional:
            return None
        raise UsageError(f"{where}: field '{name}': expected {kind.__name__}, got no value")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-5` (no dot) as a string, yet that is how people write it.
            with contextlib.suppress(ValueError):
                return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is list:
        if not isinstance(value, list):
            value = [value]  # `train_data: one.jsonl`, `matryoshka_dims: 64`
        return [_coerce_item(name, i, v, item, where) for i, v in enumerate(value)]
    elif kind is str:
        if isinstance(value, str):
            return value
    expected = " or ".join([kind.__name__, *words])
    raise UsageError(f"{where}: field '{name}': expected {expected}, got {type(value).__name__}")


def _coerce_item(name: str, index: int, value: object, kind: type, where: str) -> object:
    """One item of a YAML list option, refused with its position."""
    try:
        return _coerce(name, value, kind, where)
    except UsageError:
        word = {str: "a string", int: "an integer", float: "a number"}[kind]
        raise UsageError(
            f"{where}: field '{name}': item {index} must be {word}, got {type(value).__name__}"
        ) from None


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the YAML file (if any) and command-line flags into a validated config."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    values: dict[str, object] = {}
    from_yaml: dict[str, str] = {}  # field -> "file:line: field 'key'", for validation messages
    if given.get("config"):
        path = Path(str(given["config"]))
        known = {f.name: f for f in fields(TrainConfig)}
        keys: dict[str, tuple[str, int]] = {}  # field -> (the key that set it, its line)
        entries = sorted(_yaml_values(path).items(), key=lambda item: item[1][1])
        for key, (value, line) in entries:
            name = ALIASES.get(key, key)
            where = f"{path}:{line}"
            if name not in known or name == "config":
                raise UsageError(
                    f"{where}: unknown option {shorten(key)} (see `embtune train --help`)"
                )
            if name in keys:
                # batch_size and its alias per_device_train_batch_size: the last would win.
                first, first_line = keys[name]
                raise UsageError(
                    f"{where}: field {shorten(key)}: names the same option as {shorten(first)} "
                    f"(line {first_line}); keep one"
                )
            keys[name] = (key, line)
            field_ = known[name]
            kind = _field_type(field_)
            item = _item_type(field_) if kind is list else str
            words = field_.metadata.get("words", ())
            coerced = _coerce(key, value, kind, where, _optional(field_), item, words)
            choices = known[name].metadata.get("choices")
            if choices and coerced is not None and coerced not in choices:
                raise UsageError(
                    f"{where}: field '{key}': {coerced!r} is not one of {', '.join(choices)}"
                )
            values[name] = coerced
            from_yaml[name] = f"{where}: field '{key}'"
    values.update(given)
    config = TrainConfig(**values)  # type: ignore[arg-type]
    try:
        config.validate()
    except OptionError as exc:
        # A bad value from the YAML file is reported at its line, not as a flag never typed.
        if exc.name in from_yaml and exc.name not in given:
            raise UsageError(f"{from_yaml[exc.name]}: {exc.reason}") from exc
        raise
    return config
