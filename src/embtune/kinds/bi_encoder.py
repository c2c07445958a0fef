"""The bi-encoder model kind: queries and passages embedded apart by one :class:`Encoder`.

A model kind answers what the training loop must not know: which parts a batch has (here
``passages`` and ``queries``, encoded in that order), which side they are padded on (the
tokenizer's, as in evaluation), which parts are shared across processes for cross-device
negatives (passages), the objective it trains by default (InfoNCE), how a model is loaded,
made ready for training, evaluated on a dev set and saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from embtune.config import TrainConfig
from embtune.data.batching import Batch, group_layout, pad_tokens
from embtune.data.formats import BeirDataset, TrainingData
from embtune.data.groups import Group, TrainingTexts, TrainRow
from embtune.data.pipeline import training_texts
from embtune.data.store import TokenTable, tokenize_store, usable_cache_dir
from embtune.models.encoder import (
    Encoder,
    EncoderSettings,
    check_dimensions,
    check_max_lengths,
    load_model_config,
    settings_with,
)
from embtune.models.instruction_format import instruction_prefix
from embtune.models.lora import LoraSettings, add_lora, is_peft_model, trainable_summary
from embtune.models.parity import check_settings, refuse_mismatch
from embtune.models.speedups.for_training import apply_training_speedups
from embtune.objectives.base import Objective
from embtune.objectives.from_options import objective_from_options


@dataclass
class BiEncoderTexts:
    """Training texts with their token tables (queries and passages tokenized once)."""

    texts: TrainingTexts
    query_tokens: TokenTable
    passage_tokens: TokenTable


def collate(
    groups: list[Group],
    rows: list[TrainRow],
    query_tokens: TokenTable,
    passage_tokens: TokenTable,
    pad_id: int,
    pad_to_multiple_of: int = 1,
    max_lengths: tuple[int, int] | None = None,
    padding_side: str = "right",
) -> Batch:
    """The batch of one step from its groups: every group's passages, positive first, then
    the queries; widths rounded up to ``pad_to_multiple_of``, at most ``max_lengths``
    (query, passage)."""
    query_cap, passage_cap = max_lengths or (None, None)
    queries = pad_tokens(
        [query_tokens[g.query] for g in groups], pad_id, pad_to_multiple_of, query_cap, padding_side
    )
    passages = pad_tokens(
        [passage_tokens[p] for g in groups for p in g.passages],
        pad_id,
        pad_to_multiple_of,
        passage_cap,
        padding_side,
    )
    layout = group_layout(groups, rows)
    return Batch({"passages": passages, "queries": queries}, layout, [g.row for g in groups])


class BiEncoder:
    """The bi-encoder kind (the default ``embtune train`` model)."""

    name = "bi-encoder"
    shared_parts = ("passages",)
    in_batch_scoring = True  # every passage of the batch is a candidate (--in-batch-negatives)

    def announce_lines(self, encoder: Encoder) -> list[str]:
        """With LoRA, what trains; else nothing: the negatives budget says it all."""
        if is_peft_model(encoder.model):
            return [f"LoRA: {trainable_summary(encoder.model)}"]
        return []

    def prepare_dev(
        self, config: TrainConfig, dev_data: BeirDataset | None, show: bool, device: torch.device
    ) -> list[str]:
        """Nothing: dev evaluation searches the dev corpus afresh each time."""
        return []

    def check_options(self, config: TrainConfig) -> None:
        """Refuse options the model cannot take, from its config alone (no weights loaded),
        and options that would embed it otherwise than its own sentence-transformers
        configuration does (models/parity.py), unless --allow-settings-mismatch."""
        model_config = load_model_config(config.model)
        check_max_lengths(model_config, config.query_max_len, config.passage_max_len)
        check_dimensions(model_config, config.matryoshka_dims, "--matryoshka-dims")
        if not (config.resuming or config.allow_settings_mismatch):
            report = check_settings(
                planned_settings(config),
                config.padding_side,
                config.model,
                config.append_eos_token,
            )
            refuse_mismatch(report, "--allow-settings-mismatch")

    def load(self, config: TrainConfig, weights_from: Path | None = None) -> Encoder:
        """The encoder to train; a resumed run takes its weights (and settings) from the
        checkpoint, an adapter there included. With --use-lora fresh adapters go on the base
        (--from-peft: the given ones, trainable). With --bf16 its evaluations (dev, reference
        sets, interpolation) encode in bf16 too, as the training steps compute."""
        adapter = None if weights_from else (config.from_peft or None)
        encoder = Encoder.from_pretrained(
            str(weights_from) if weights_from else config.model,
            **embedding_options(config),
            query_max_len=config.query_max_len,
            passage_max_len=config.passage_max_len,
            attn_implementation=config.attn_implementation,
            matryoshka_dims=config.matryoshka_dims,
            encode_precision="bf16" if config.bf16 else "fp32",
            append_eos_token=config.append_eos_token,
            padding_side=config.padding_side,
            adapter=adapter,
            trainable_adapter=True,
        )
        if config.use_lora and not is_peft_model(encoder.model):
            encoder.model = add_lora(encoder.model, lora_settings(config))
        return encoder

    def prepare_texts(
        self, encoder: Encoder, data: TrainingData, config: TrainConfig, show: bool
    ) -> BiEncoderTexts:
        """Rows with the encoder's instructions, every text tokenized once (disk-cached)."""
        settings = encoder.settings
        texts = training_texts(
            data,
            settings.query_instruction,
            settings.passage_instruction,
            config.query_instruction_format,
            config.row_prompts,
        )
        cache = usable_cache_dir(config.cache_dir)
        tokenizer = encoder.tokenizer
        query_tokens, _ = tokenize_store(
            texts.queries, tokenizer, settings.query_max_len, cache, "tokenizing queries", show
        )
        passage_tokens, _ = tokenize_store(
            texts.passages,
            tokenizer,
            settings.passage_max_len,
            cache,
            "tokenizing passages",
            show,
        )
        return BiEncoderTexts(texts, query_tokens, passage_tokens)

    def length_key(self, texts: BiEncoderTexts) -> Callable[[Group], int]:
        """A group's length for ``--group-by-length``: longest passage first, then query
        (a batch is padded to its longest text)."""
        query_lengths = texts.query_tokens.lengths()
        passage_lengths = texts.passage_tokens.lengths()

        def key(group: Group) -> int:
            longest = max((int(passage_lengths[p]) for p in group.passages), default=0)
            return longest * 65536 + int(query_lengths[group.query])

        return key

    def objective(self, config: TrainConfig) -> Objective:
        """The objective the options name: InfoNCE, distillation, Matryoshka dimensions."""
        return objective_from_options(config)

    def padding_side(self, encoder: Encoder) -> str:
        """The side batches are padded on: the tokenizer's, as evaluation pads."""
        return encoder.tokenizer.padding_side

    def batch(
        self, encoder: Encoder, groups: list[Group], texts: BiEncoderTexts, pad_multiple: int
    ) -> Batch:
        """One step's batch, padded on :meth:`padding_side`."""
        settings = encoder.settings
        return collate(
            groups,
            texts.texts.rows,
            texts.query_tokens,
            texts.passage_tokens,
            encoder.tokenizer.pad_token_id,
            pad_multiple,
            (settings.query_max_len, settings.passage_max_len),
            self.padding_side(encoder),
        )

    def prepare_for_training(
        self, encoder: Encoder, config: TrainConfig, device: torch.device
    ) -> None:
        """Memory and speed measures that keep results as they are, then the device."""
        apply_training_speedups(encoder.model, config, device)
        pooler = getattr(encoder.model, "pooler", None)
        if isinstance(pooler, torch.nn.Module):
            # BERT's pooler head is computed but never used by our pooling: frozen, it keeps
            # its weights (saved as they were) and DDP does not wait for gradients it will
            # never get.
            pooler.requires_grad_(False)
        if config.compile:
            # In place, so parameter names (and saved weights) stay those of the plain model.
            encoder.model.compile(dynamic=True)
        encoder.to(device)  # before the optimizer, which picks its kernel by device

    def evaluate(self, encoder: Encoder, dev_data: BeirDataset) -> dict[str, float]:
        """Retrieval metrics (nDCG@10, MRR@10, Recall@k, ...) on a BEIR-style dev set; with
        Matryoshka dimensions also each one's, suffixed ``_dim<d>`` (``ndcg@10_dim64``),
        from one encoding. The unsuffixed metrics are the full embedding's."""
        from embtune.eval.retrieval import evaluate_dimensions, evaluate_retrieval

        dims = encoder.settings.matryoshka_dims
        if not dims:
            return evaluate_retrieval(encoder, dev_data, show_progress=False)
        width = encoder.model.config.hidden_size
        by_dim = evaluate_dimensions(encoder, dev_data, [width, *dims], show_progress=False)
        metrics = dict(by_dim[width])
        for dim in dims:
            metrics.update({f"{key}_dim{dim}": value for key, value in by_dim[dim].items()})
        return metrics

    def save(self, encoder: Encoder, path: Path, state_dict: dict | None = None) -> None:
        """A folder that transformers, sentence-transformers and embtune load identically."""
        encoder.save(path, state_dict)

    def save_merged(self, encoder: Encoder, path: Path) -> None:
        """--save-merged-lora-model: the model with its adapter merged, as a plain folder."""
        encoder.merged().save(path)

    def passage_count(self, texts: BiEncoderTexts) -> int:
        """Passages the corpus fill may draw from."""
        return len(texts.texts.passages)

    def rows(self, texts: BiEncoderTexts) -> list:
        """The training rows (id form)."""
        return texts.texts.rows


def embedding_options(config: TrainConfig) -> dict[str, object]:
    """The options that decide how a text becomes a vector (None: the model's own), the
    instructions put in their formats."""
    return {
        "pooling": config.pooling,
        "normalize": config.normalize,
        "query_instruction": instruction_prefix(
            config.query_instruction_format, config.query_instruction
        ),
        "passage_instruction": instruction_prefix(
            config.passage_instruction_format, config.passage_instruction
        ),
    }


def planned_settings(config: TrainConfig) -> EncoderSettings:
    """The settings :meth:`BiEncoder.load` will embed ``config.model`` with, from its files
    (no weights loaded)."""
    return settings_with(config.model, **embedding_options(config))


def lora_settings(config: TrainConfig) -> LoraSettings:
    """The adapters --use-lora puts on the model."""
    return LoraSettings(
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        modules_to_save=list(config.modules_to_save),
    )
