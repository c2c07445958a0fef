"""FlagEmbedding's command-line spellings for `embtune train`, so a launch line moves over.

FlagEmbedding's fine-tune scripts parse with Hugging Face's HfArgumentParser: underscored names
(``--per_device_train_batch_size 8``) and booleans given a value (``--normalize_embeddings
True``). :func:`translate` rewrites such a line into embtune's flags before argparse sees it:
names embtune has (its own, underscored, or FlagEmbedding's, config.ALIASES) are renamed;
options that change nothing here are accepted with a note saying why; options embtune does not
have are refused, all of them in one message, each with its reason. docs/flagembedding.md maps
every option and default.
"""

from __future__ import annotations

from dataclasses import fields

from embtune.config import ALIASES, TrainConfig, _field_type, flag
from embtune.errors import UsageError

# Accepted, changing nothing here, with why (printed as a note).
HARMLESS = {
    "dataloader_drop_last": "embtune's epoch plan makes every step a full global batch; the "
    "epoch's remainder starts the next epoch's plan",
    "dataloader_num_workers": "texts are tokenized once before training; no loader workers",
    "ddp_find_unused_parameters": "unused heads (BERT's pooler) are frozen, so DDP never waits",
    "remove_unused_columns": "rows keep only the fields embtune reads",
    "do_train": "`embtune train` always trains",
    "logging_dir": "TensorBoard events go to OUTPUT_DIR/tensorboard",
    "run_name": "the run is named by its output folder",
    "save_strategy": "checkpoints follow --save-steps",
    "logging_strategy": "logging follows --logging-steps",
    "eval_strategy": "dev evaluations follow --eval-steps",
    "evaluation_strategy": "dev evaluations follow --eval-steps",
    "overwrite_cache": "the token cache is keyed by the tokenizer and texts; it is never stale",
    "cache_dir": "FlagEmbedding's model-download cache: set HF_HOME instead (embtune's "
    "--cache-dir is its token cache)",
    "token": "give the Hugging Face token with HF_TOKEN (or --hub-token for --push-to-hub)",
    "local_rank": "set by the launcher; embtune reads LOCAL_RANK",
    "trust_remote_code": "only models transformers supports natively are loaded",
}

# Refused, with why and what to do instead.
UNSUPPORTED = {
    "deepspeed": "DeepSpeed is not wired in: use --fsdp full_shard (docs/llm-embedders.md)",
    "gradient_accumulation_steps": "with in-batch negatives accumulation changes the loss; "
    "raise --batch-size with --cache-chunk-size instead (the same gradients, less memory)",
    "fix_position_embedding": "freezing position embeddings is not built",
    "shuffle_ratio": "shuffling passage text is not built",
    "same_dataset_within_batch": "batches drawn from one file at a time are not built",
    "small_threshold": "merging small datasets is not built",
    "drop_threshold": "merging small datasets is not built",
    "max_example_num_per_dataset": "sampling rows per file is not built",
    "warmup_steps": "give the warm-up as --warmup-ratio",
    "lr_scheduler_type": "embtune's schedule is linear warm-up and decay",
    "optim": "embtune trains with AdamW",
    "config_name": "the model folder's own config is used",
    "tokenizer_name": "the model folder's own tokenizer is used",
    "use_slow_tokenizer": "embtune uses the fast tokenizer",
    "additional_special_tokens": "adding special tokens is not built",
    "peft_model_path": "give the adapter with --from-peft",
    "raw_peft": "give the adapter with --from-peft",
    "only_merge_lora_model": "merge a saved adapter with Encoder.from_pretrained(path).merged()",
    "unified_finetuning": "BGE-M3's unified fine-tuning is not built",
    "use_self_distill": "BGE-M3's self-distillation is not built",
}

# Values HfArgumentParser reads as booleans.
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


class OptionProblems(UsageError):
    """Every refused option of a command line, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))

    def lines(self) -> list[str]:
        return list(self.problems)


def translate(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` of `embtune train` with FlagEmbedding spellings rewritten, and the notes on
    accepted options that change nothing. Every unsupported or unknown underscored option is
    refused at once in one UsageError (one line each)."""
    known = {f.name: f for f in fields(TrainConfig)}
    out: list[str] = []
    notes: list[str] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        name, _, inline = token[2:].partition("=")
        theirs = "_" in name or name in UNSUPPORTED or name in HARMLESS
        if not token.startswith("--") or not (
            theirs or _bool_with_value(name, inline, argv[i : i + 1], known)
        ):
            out.append(token)
            continue
        values = [inline] if inline else []
        if not inline:
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        target = "attn_implementation" if name == "use_flash_attn" else ALIASES.get(name, name)
        if target in known and target != "config":
            boolean = name == "use_flash_attn" or _field_type(known[target]) is bool
            out += _renamed(name, target, values, boolean)
        elif name in HARMLESS:
            notes.append(f"--{name}: accepted, no effect: {HARMLESS[name]}")
        elif name in UNSUPPORTED:
            problems.append(f"--{name}: not supported: {UNSUPPORTED[name]}")
        else:
            problems.append(f"--{name}: not an embtune or FlagEmbedding option")
    if problems:
        raise OptionProblems(problems)
    return out, notes


def _bool_with_value(name: str, inline: str, following: list[str], known: dict) -> bool:
    """True for HfArgumentParser's ``--bf16 True`` on a one-word boolean option."""
    if name not in known or _field_type(known[name]) is not bool:
        return False
    value = inline or (following[0] if following else "")
    return value.lower() in _TRUE | _FALSE


def _renamed(name: str, target: str, values: list[str], boolean: bool) -> list[str]:
    """embtune's flag for one option given as ``--name values``."""
    if not boolean:
        return [flag(target), *values]
    word = values[0].lower() if values else "true"
    if len(values) > 1 or word not in _TRUE | _FALSE:
        raise UsageError(f"--{name}: expected True or False, got {' '.join(values)!r}")
    on = word in _TRUE
    if target == "attn_implementation":  # use_flash_attn
        return [flag(target), "flash_attention_2"] if on else []
    return [flag(target) if on else "--no-" + flag(target)[2:]]
