"""The cross-encoder model kind (``--model-kind cross-encoder``): a reranker trained on the same
rows and groups as a bi-encoder, FlagEmbedding's ``finetune/reranker/encoder_only/base``.

A batch has one part, ``pairs``: each group's (query, passage) pairs, positive first, laid out
as a bi-encoder's passages, so the group layout, sampler, epoch plan, resume, NaN guard and the
cached step strategy (``--cache-chunk-size``: chunks of pairs) are the bi-encoder's. Nothing is
shared across processes: a pair is only scored with its own query, so there are no in-batch or
cross-device negatives and a query's candidates are its group (chance level ln G).

Dev evaluation reranks a fixed candidate list: the ``--dev-retriever``'s top ``--rerank-top-k``
passages per dev query, retrieved once before training (eval/reranking.py).
"""

from __future__ import annotations

import dataclasses
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
from embtune.errors import UsageError
from embtune.models.cross_encoder import (
    CrossEncoder,
    RerankerSettings,
    instruction_or_saved,
    is_reranker_config,
    saved_reranker_settings,
)
from embtune.models.encoder import load_model_config
from embtune.models.speedups.for_training import apply_training_speedups
from embtune.objectives.base import Objective

# Bi-encoder options a reranker has no use for: refused when given, so nobody believes they
# changed something (an option whose default is on, like --in-batch-negatives, is documented).
_BI_ENCODER_ONLY = {
    "pooling": None,
    "query_instruction": None,
    "passage_instruction": None,
    "matryoshka_dims": [],
    "negatives_cross_device": False,
}


@dataclass
class CrossEncoderTexts:
    """Training texts with their bare token tables (special tokens are added per pair)."""

    texts: TrainingTexts
    query_tokens: TokenTable
    passage_tokens: TokenTable


def reranker_settings(config: TrainConfig) -> RerankerSettings:
    """The pair settings of a run: the options, else what an embtune reranker was saved with."""
    saved = saved_reranker_settings(config.model) or RerankerSettings()
    return RerankerSettings(
        query_max_len=config.query_max_len,
        passage_max_len=config.passage_max_len,
        max_len=config.max_len or config.query_max_len + config.passage_max_len,
        query_instruction=instruction_or_saved(
            config.query_instruction_for_rerank, saved.query_instruction
        ),
        passage_instruction=instruction_or_saved(
            config.passage_instruction_for_rerank, saved.passage_instruction
        ),
    )


class CrossEncoderKind:
    """The reranker kind."""

    name = "cross-encoder"
    shared_parts: tuple[str, ...] = ()
    in_batch_scoring = False  # a pair is scored with its own query only

    def __init__(self) -> None:
        self.dev_candidates: dict[str, list[str]] | None = None

    def check_options(self, config: TrainConfig) -> None:
        """Refuse bi-encoder options and lengths the model cannot take (no weights loaded)."""
        for name, default in _BI_ENCODER_ONLY.items():
            if getattr(config, name) != default:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag}: a bi-encoder option; a cross-encoder does not take it")
        for name in ("reference_data", "interpolate_base"):
            if getattr(config, name):
                # A reference set needs a first stage per set, and mixing with a base whose
                # head is new would mix in random weights: not built for rerankers yet.
                flag = "--" + name.replace("_", "-")
                raise UsageError(
                    f"{flag}: for bi-encoders only so far; a cross-encoder run does not take it"
                )
        model_config = load_model_config(config.model)
        settings = reranker_settings(config)
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit and settings.max_len > limit:
            raise UsageError(
                f"--max-len: a pair of {settings.max_len} tokens is beyond the model's position "
                f"limit ({limit}); lower --max-len or --query-max-len / --passage-max-len"
            )
        if config.train_group_size < 2 and config.reranker_loss == "listwise":
            raise UsageError(
                "--train-group-size 1 with a cross-encoder leaves each query only its positive "
                "(no in-batch negatives): the listwise loss is always 0. Raise the group size"
            )
        has_dev = bool(config.eval_data or config.dev_fraction)
        if has_dev and not config.dev_retriever and is_reranker_config(model_config):
            raise UsageError(
                f"--dev-retriever: dev evaluation reranks a retriever's top "
                f"{config.rerank_top_k}; {config.model} is a reranker, so name the bi-encoder "
                "whose candidates it reranks"
            )

    def load(self, config: TrainConfig, weights_from: Path | None = None) -> CrossEncoder:
        """The reranker to train: ``--model`` (a new head when it is not one), or a
        checkpoint's weights when resuming."""
        name = str(weights_from) if weights_from else config.model
        return CrossEncoder.from_pretrained(
            name, reranker_settings(config), config.attn_implementation
        )

    def announce_lines(self, model: CrossEncoder) -> list[str]:
        """What the run should say about the model before training."""
        s = model.settings
        lines = [
            f"cross-encoder: pairs of at most {s.max_len} tokens (query up to "
            f"{s.query_tokens}, passage up to {s.passage_tokens}); candidates per query = the "
            "group (no in-batch negatives)"
        ]
        if model.head_added:
            lines.append(
                "cross-encoder: the model has no reranker head: a new one-label head is added "
                "(randomly initialised) on top of its encoder"
            )
        return lines

    def prepare_texts(
        self, model: CrossEncoder, data: TrainingData, config: TrainConfig, show: bool
    ) -> CrossEncoderTexts:
        """Rows with the rerank instructions; queries and passages tokenized once, without
        special tokens, at FlagEmbedding's pre-pairing limits (disk-cached)."""
        s = model.settings
        texts = training_texts(
            data, s.query_instruction, s.passage_instruction, row_prompts=config.row_prompts
        )
        cache = usable_cache_dir(config.cache_dir)
        tokenizer = model.tokenizer
        query_tokens, _ = tokenize_store(
            texts.queries, tokenizer, s.query_tokens, cache, "tokenizing queries", show, False
        )
        passage_tokens, _ = tokenize_store(
            texts.passages, tokenizer, s.passage_tokens, cache, "tokenizing passages", show, False
        )
        return CrossEncoderTexts(texts, query_tokens, passage_tokens)

    def rows(self, texts: CrossEncoderTexts) -> list[TrainRow]:
        """The training rows (id form)."""
        return texts.texts.rows

    def passage_count(self, texts: CrossEncoderTexts) -> int:
        """Passages the corpus fill may draw from."""
        return len(texts.texts.passages)

    def length_key(self, texts: CrossEncoderTexts) -> Callable[[Group], int]:
        """A group's length for ``--group-by-length``: its longest pair."""
        query_lengths = texts.query_tokens.lengths()
        passage_lengths = texts.passage_tokens.lengths()

        def key(group: Group) -> int:
            longest = max((int(passage_lengths[p]) for p in group.passages), default=0)
            return int(query_lengths[group.query]) + longest

        return key

    def objective(self, config: TrainConfig) -> Objective:
        """``--reranker-loss`` (listwise by default), or distillation on the pair logits."""
        from embtune.objectives.reranking import reranker_objective

        # Candidates are the own group: m3_kd_loss must not look for in-batch ones.
        return reranker_objective(dataclasses.replace(config, in_batch_negatives=False))

    def batch(
        self, model: CrossEncoder, groups: list[Group], texts: CrossEncoderTexts, pad_multiple: int
    ) -> Batch:
        """One step's pairs, group by group with the positive first, padded on the
        tokenizer's side."""
        ids, types = [], []
        for group in groups:
            query = texts.query_tokens[group.query].tolist()
            for passage in group.passages:
                pair_ids, pair_types = model.pair(query, texts.passage_tokens[passage].tolist())
                ids.append(pair_ids)
                types.append(pair_types)
        pairs = pad_tokens(
            ids,
            model.tokenizer.pad_token_id,
            pad_multiple,
            model.settings.max_len,
            model.tokenizer.padding_side,
            types if all(t is not None for t in types) else None,
        )
        layout = group_layout(groups, texts.texts.rows)
        return Batch({"pairs": pairs}, layout, [g.row for g in groups])

    def prepare_for_training(
        self, model: CrossEncoder, config: TrainConfig, device: torch.device
    ) -> None:
        """Memory and speed measures that keep results as they are, then the device. (The
        pooler stays trainable: BERT's classification head reads it.)"""
        apply_training_speedups(model.model, config, device)
        if config.compile:
            model.model.compile(dynamic=True)
        model.to(device)

    def prepare_dev(
        self, config: TrainConfig, dev_data: BeirDataset | None, show: bool, device: torch.device
    ) -> list[str]:
        """The dev candidates (the retriever's top-k on ``device``, once); lines saying what
        they are."""
        if dev_data is None:
            return []
        from embtune.eval.reranking import first_stage_run, top_candidates
        from embtune.eval.retrieval import retrieval_metrics
        from embtune.models.encoder import Encoder

        retriever = config.dev_retriever or config.model
        encoder = Encoder.from_pretrained(retriever).to(device)
        run = first_stage_run(encoder, dev_data, config.rerank_top_k, show_progress=show)
        self.dev_candidates = top_candidates(run, config.rerank_top_k)
        first = retrieval_metrics(run, dev_data.qrels, (10,))
        return [
            f"dev candidates: top {config.rerank_top_k} of {retriever} per dev query "
            f"(first stage nDCG@10 {first['ndcg@10']:.4f}, MRR@10 {first['mrr@10']:.4f})"
        ]

    def evaluate(self, model: CrossEncoder, dev_data: BeirDataset) -> dict[str, float]:
        """Retrieval metrics of the dev candidates reranked by ``model`` (nDCG@10, MRR@10,
        Recall@k within the candidates)."""
        from embtune.eval.reranking import evaluate_reranking
        from embtune.scoring.teachers import CrossEncoderTeacher, TeacherSettings

        if self.dev_candidates is None:
            raise RuntimeError("prepare_dev was not called before evaluate")
        s = model.settings
        settings = TeacherSettings(
            max_length=s.max_len,
            query_instruction=s.query_instruction,
            passage_instruction=s.passage_instruction,
        )
        scorer = CrossEncoderTeacher(model.model, model.tokenizer, settings)
        return evaluate_reranking(scorer, dev_data, self.dev_candidates, show_progress=False)

    def save(self, model: CrossEncoder, path: Path, state_dict: dict | None = None) -> None:
        """A folder that transformers, sentence-transformers' CrossEncoder and embtune load
        with the same scores (never sharded: --fsdp trains bi-encoders)."""
        model.save(path)
