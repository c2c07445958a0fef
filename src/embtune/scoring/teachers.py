"""Teachers: models that give a (query, passage) pair one relevance score.

Two kinds, behind one call, ``score_pairs(queries, passages) -> list[float]``:

* :class:`CrossEncoderTeacher`: any ``AutoModelForSequenceClassification`` with one label (a
  bge-reranker, a sentence-transformers CrossEncoder); the score is the raw logit of the pair,
  as FlagEmbedding's ``add_reranker_score`` writes it. Pairs are built as FlagEmbedding's
  reranker builds them: the instructions put before query and passage, the query cut to 3/4
  of ``max_length`` tokens, the passage cut so that the pair fits ``max_length``.
* :class:`BiEncoderTeacher`: an :class:`~embtune.models.encoder.Encoder` (the model's saved
  pooling, normalization, instructions and max lengths); the score is the cosine similarity
  of the two embeddings, in [-1, 1].

:func:`teacher_kind` tells the kind from the model's config.json and sentence-transformers
files, before any weights load. ``identity()`` is everything that decides a teacher's scores
(a hash of its weights included): the score cache is keyed by it.

Example::

    teacher = load_teacher("BAAI/bge-reranker-base", "cross-encoder", TeacherSettings())
    teacher.score_pairs(["what is a cell?"], ["A cell is the basic unit of life."])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from embtune.data.store import tokenizer_fingerprint
from embtune.errors import UsageError
from embtune.eval.retrieval import weights_fingerprint
from embtune.models.encoder import SETTINGS_FILE, Encoder, check_max_lengths, model_file

# Part of every cache key: a change of how scores are computed must not meet old entries.
IDENTITY_FORMAT = 1

# Files only a sentence-transformers (or embtune) embedding model has.
EMBEDDER_FILES = (SETTINGS_FILE, "modules.json")

DEFAULT_MAX_LENGTH = 512  # FlagEmbedding's reranker default
# The query takes at most 3/4 of a pair (FlagEmbedding's rule); below this the rest could not
# hold a reranker's 3-4 special tokens and some passage.
MIN_MAX_LENGTH = 32


class PairScorer(Protocol):
    """What scoring pairs needs: one score per (query, passage) pair (a teacher, a reranker,
    the reranker being trained)."""

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> list[float]:
        """One score per (queries[i], passages[i]) pair, in input order."""
        ...


class Teacher(PairScorer, Protocol):
    """What `embtune score` needs from a teacher: its scores and what decides them."""

    kind: str

    def identity(self) -> dict[str, object]:
        """Everything that decides the scores: model, weights hash, settings, precision."""


@dataclass
class TeacherSettings:
    """The scoring options; None keeps a bi-encoder's saved setting (or the default)."""

    max_length: int | None = None  # cross-encoder: tokens of the whole pair (None: 512)
    query_instruction: str | None = None
    passage_instruction: str | None = None
    query_max_len: int | None = None  # bi-encoder only
    passage_max_len: int | None = None
    precision: str = "fp32"  # one of embtune.choices.ENCODE_PRECISIONS

    @property
    def pair_max_length(self) -> int:
        """A cross-encoder's token limit for a whole pair."""
        return self.max_length or DEFAULT_MAX_LENGTH


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def teacher_config(name: str, option: str = "--teacher") -> PretrainedConfig:
    """The teacher's config.json (no weights), or a one-line UsageError naming ``option``."""
    local = Path(name)
    if not local.exists() and (local.is_absolute() or name.startswith(".")):
        raise UsageError(f"{option}: folder {name} does not exist")
    if local.is_dir() and not (local / "config.json").is_file():
        raise UsageError(f"{option}: {name} has no config.json (is it a model folder?)")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option}: cannot load {name!r}: {_first_line(exc)}") from exc


def teacher_kind(name: str, config: PretrainedConfig) -> tuple[str, str]:
    """(kind, why) for ``--teacher-kind auto``: what config.json and the model's files say.

    A sequence-classification head makes a cross-encoder; sentence-transformers' or embtune's
    files, or a bare encoder (``BertModel``: FlagEmbedding saves its embedders so), make a
    bi-encoder. Anything else (a language-model head, no architecture recorded) is refused:
    guessing would score with a model used in a way it was never trained for.
    """
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "cross-encoder", f"config.json architecture {architectures[0]}"
    found = [f for f in EMBEDDER_FILES if model_file(name, f) is not None]
    if found:
        return "bi-encoder", f"it has {found[0]}"
    if architectures and all(_bare_encoder(a) for a in architectures):
        return "bi-encoder", (
            f"config.json architecture {architectures[0]} without sentence-transformers files: "
            "cls pooling and normalization assumed"
        )
    shown = ", ".join(architectures) or "none recorded"
    raise UsageError(
        f"--teacher-kind auto: cannot tell what kind of teacher {name} is (config.json "
        f"architectures: {shown}); pass --teacher-kind cross-encoder or bi-encoder"
    )


def _bare_encoder(architecture: str) -> bool:
    """``BertModel``, ``XLMRobertaModel``: no head (``GPT2LMHeadModel`` has one)."""
    return architecture.endswith("Model") and "LMHead" not in architecture


def check_settings(kind: str, config: PretrainedConfig, settings: TeacherSettings) -> None:
    """Refuse options the teacher cannot take, from its config alone (before weights load)."""
    if kind == "cross-encoder":
        labels = getattr(config, "num_labels", 1)
        if labels != 1:
            raise UsageError(
                f"--teacher: a cross-encoder teacher needs one output label (one score per "
                f"pair); this model has {labels} (num_labels in its config.json)"
            )
        check_pair_length(config, settings)
        for option in ("query_max_len", "passage_max_len"):
            if getattr(settings, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise UsageError(f"{flag}: only for a bi-encoder teacher; use --max-length")
    elif settings.max_length is not None:
        raise UsageError(
            "--max-length: only for a cross-encoder teacher; use --query-max-len / "
            "--passage-max-len"
        )
    else:
        check_max_lengths(config, settings.query_max_len or 1, settings.passage_max_len or 1)


def check_pair_length(
    config: PretrainedConfig, settings: TeacherSettings, option: str = "--max-length"
) -> None:
    """Refuse a cross-encoder's pair length outside MIN_MAX_LENGTH..the model's position limit."""
    limit = getattr(config, "max_position_embeddings", None)
    length = settings.pair_max_length
    if length < MIN_MAX_LENGTH or (limit and length > limit):
        given = "the default " if settings.max_length is None else ""
        raise UsageError(
            f"{option}: {given}{length} is outside {MIN_MAX_LENGTH}..{limit or 'any'} "
            "(the model's position limit)"
        )


def with_saved_reranker_settings(name: str, settings: TeacherSettings) -> TeacherSettings:
    """``settings`` with what an embtune reranker was saved with (embtune_reranker.json: pair
    length, instructions) filling the options not given, so it scores pairs as it was trained
    to; another tool's reranker keeps them as they are (512 tokens, no instructions)."""
    from embtune.models.cross_encoder import instruction_or_saved, saved_reranker_settings

    saved = saved_reranker_settings(name)
    if saved is None:
        return settings
    return replace(
        settings,
        max_length=settings.max_length or saved.max_len,
        query_instruction=instruction_or_saved(settings.query_instruction, saved.query_instruction),
        passage_instruction=instruction_or_saved(
            settings.passage_instruction, saved.passage_instruction
        ),
    )


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class CrossEncoderTeacher:
    """A one-label sequence classifier; the score of a pair is its raw logit."""

    kind = "cross-encoder"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: TeacherSettings,
        name: str = "",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        settings: TeacherSettings,
        option: str = "--teacher",
        device: torch.device | None = None,
    ) -> CrossEncoderTeacher:
        """Load a hub name or local folder (``from_pretrained``) on ``device`` (None: cuda when
        there is one); a model that cannot load is a UsageError naming ``option``."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForSequenceClassification.from_pretrained(name)
        except OSError as exc:
            raise UsageError(f"{option}: cannot load {name!r}: {_first_line(exc)}") from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if model.config.pad_token_id is None:
            # Decoder-based classifiers find each row's last real token through it.
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model.to(device or _device()), tokenizer, settings, name)

    def identity(self) -> dict[str, object]:
        """What decides this teacher's scores (the key of its score cache)."""
        s = self.settings
        return {
            "format": IDENTITY_FORMAT,
            "kind": self.kind,
            "model": self.name,
            "weights": weights_fingerprint(self.model),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "max_length": s.pair_max_length,
            "query_instruction": s.query_instruction or "",
            "passage_instruction": s.passage_instruction or "",
            "precision": s.precision,
            "device": next(self.model.parameters()).device.type,
        }

    def pair_inputs(self, queries: Sequence[str], passages: Sequence[str]) -> dict:
        """The padded batch of the pairs, truncated as FlagEmbedding's reranker truncates."""
        s = self.settings
        queries = [(s.query_instruction or "") + q for q in queries]
        passages = [(s.passage_instruction or "") + p for p in passages]
        length = s.pair_max_length
        fits = self.tokenizer.is_fast  # offsets (for the query cut) need a fast tokenizer
        if fits:
            queries = cut_to_tokens(self.tokenizer, queries, length * 3 // 4)
        return self.tokenizer(
            queries,
            passages,
            truncation="only_second" if fits else "longest_first",
            max_length=length,
            padding=True,
            return_tensors="pt",
        )

    @torch.inference_mode()
    def score_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> list[float]:
        """The raw logit of each (query, passage) pair, in input order."""
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in self.pair_inputs(queries, passages).items()}
        bf16 = self.settings.precision == "bf16"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = self.model(**inputs).logits
        return logits.float().view(-1).cpu().tolist()


def cut_to_tokens(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], limit: int
) -> list[str]:
    """Each text cut after its first ``limit`` tokens (special tokens not counted).

    FlagEmbedding truncates the query alone first, then lets the passage fill the pair; a
    text is cut where its last kept token ends, so tokenizing the cut text gives those tokens.
    """
    found = tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=True,
        max_length=limit,
        return_offsets_mapping=True,
    )
    cut = []
    for text, ids, offsets in zip(texts, found["input_ids"], found["offset_mapping"], strict=True):
        cut.append(text[: offsets[-1][1]] if len(ids) == limit and offsets else text)
    return cut


class BiEncoderTeacher:
    """An :class:`Encoder`; the score of a pair is the cosine of its two embeddings."""

    kind = "bi-encoder"

    def __init__(self, encoder: Encoder, name: str = "") -> None:
        self.encoder = encoder
        self.name = name

    @classmethod
    def from_pretrained(cls, name: str, settings: TeacherSettings) -> BiEncoderTeacher:
        """Load with the model's saved settings, the options given overriding them."""
        try:
            encoder = Encoder.from_pretrained(
                name,
                query_instruction=settings.query_instruction,
                passage_instruction=settings.passage_instruction,
                query_max_len=settings.query_max_len,
                passage_max_len=settings.passage_max_len,
                encode_precision=settings.precision,
            )
        except UsageError as exc:  # Encoder names its own option; this command's is --teacher
            raise UsageError(str(exc).replace("--model:", "--teacher:", 1)) from exc
        return cls(encoder.to(_device()), name)

    def identity(self) -> dict[str, object]:
        """What decides this teacher's scores (the key of its score cache)."""
        return {
            "format": IDENTITY_FORMAT,
            "kind": self.kind,
            "model": self.name,
            "weights": weights_fingerprint(self.encoder.model),
            "tokenizer": tokenizer_fingerprint(self.encoder.tokenizer),
            "settings": json.dumps(asdict(self.encoder.settings), sort_keys=True),
            "precision": self.encoder.encode_precision,
            "device": self.encoder.device.type,
        }

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> list[float]:
        """The cosine similarity of each (query, passage) pair, in input order."""
        # A text repeated in the batch (a query with several passages) is embedded once.
        distinct_queries = list(dict.fromkeys(queries))
        distinct_passages = list(dict.fromkeys(passages))
        size = max(len(distinct_queries), len(distinct_passages))
        q = self.encoder.encode_queries(distinct_queries, batch_size=size)
        p = self.encoder.encode_passages(distinct_passages, batch_size=size)
        q_rows = {text: i for i, text in enumerate(distinct_queries)}
        p_rows = {text: i for i, text in enumerate(distinct_passages)}
        q = q[[q_rows[text] for text in queries]]
        p = p[[p_rows[text] for text in passages]]
        return F.cosine_similarity(q, p, dim=-1).tolist()


def load_teacher(name: str, kind: str, settings: TeacherSettings) -> Teacher:
    """The teacher of ``kind`` ("cross-encoder" or "bi-encoder") loaded from ``name``; an
    embtune reranker with its saved pair length and instructions unless options give them."""
    if kind == "cross-encoder":
        return CrossEncoderTeacher.from_pretrained(
            name, with_saved_reranker_settings(name, settings)
        )
    if kind == "bi-encoder":
        return BiEncoderTeacher.from_pretrained(name, settings)
    raise ValueError(f"unknown teacher kind {kind!r}")
