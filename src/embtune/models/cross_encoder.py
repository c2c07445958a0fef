"""The cross-encoder (reranker): a one-label sequence classifier that scores a (query, passage)
pair read together, as FlagEmbedding's bge-reranker and sentence-transformers' CrossEncoder.

Any encoder checkpoint starts one: ``AutoModelForSequenceClassification`` with ``num_labels=1``
adds a new, randomly initialised head on top of the encoder's weights (said so on load); an
existing one-label reranker continues with its own head. The score of a pair is the raw logit.

Pairs are the tokenizer's text-pair encoding (``[CLS] query [SEP] passage [SEP]`` for BERT,
with token types), built from tokens kept as FlagEmbedding's reranker training keeps them: the
query at most ``query_max_len + passage_max_len // 4`` tokens, the passage at most
``passage_max_len + query_max_len // 2``, the pair cut on the passage's side to ``max_len``
(default ``query_max_len + passage_max_len``), so a short query leaves its room to the passage.

:meth:`CrossEncoder.save` writes a folder that loads unchanged in
``transformers.AutoModelForSequenceClassification`` and ``sentence_transformers.CrossEncoder``
(its ``predict`` returns the same raw logits: the identity activation is recorded, not the
sigmoid it would otherwise apply to one-label models), plus ``embtune_reranker.json`` with the
lengths and instructions, so ``embtune eval --reranker`` and ``embtune score`` score pairs as
training built them. FlagEmbedding's ``FlagReranker(path).compute_score(pairs)`` gives the same
logits (``normalize=True`` applies a sigmoid); it cuts the query at 3/4 of ``max_length``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from embtune.errors import UsageError

RERANKER_FILE = "embtune_reranker.json"
# sentence-transformers' CrossEncoder applies this to the logits in predict(); recorded so it
# returns the raw logits embtune trains and scores with (its default for one label: sigmoid).
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"


@dataclass
class RerankerSettings:
    """How a pair is built, saved with the model so scoring matches training."""

    query_max_len: int = 64
    passage_max_len: int = 256
    max_len: int = 320  # tokens of a whole pair, special tokens included
    query_instruction: str = ""  # FlagEmbedding's query_instruction_for_rerank
    passage_instruction: str = ""  # passage_instruction_for_rerank

    @property
    def query_tokens(self) -> int:
        """Query tokens kept before pairing (FlagEmbedding's reranker dataset rule)."""
        return self.query_max_len + self.passage_max_len // 4

    @property
    def passage_tokens(self) -> int:
        """Passage tokens kept before pairing."""
        return self.passage_max_len + self.query_max_len // 2


def saved_reranker_settings(folder: str | Path) -> RerankerSettings | None:
    """The settings a reranker was saved with by embtune (a folder or a hub name), or None
    (another tool's model)."""
    from embtune.models.encoder import model_file

    path = model_file(str(folder), RERANKER_FILE)
    if path is None:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    known = RerankerSettings.__dataclass_fields__
    return RerankerSettings(**{k: v for k, v in data.items() if k in known})


def instruction_or_saved(option: str | None, saved: str) -> str:
    """An instruction option, or the reranker's saved one when the option is not given (an
    empty string given is kept: it turns the saved instruction off)."""
    return saved if option is None else option


def is_reranker_config(config: object) -> bool:
    """True for a one-label sequence classifier (an existing reranker)."""
    architectures = list(getattr(config, "architectures", None) or [])
    return getattr(config, "num_labels", 0) == 1 and any(
        a.endswith("ForSequenceClassification") for a in architectures
    )


@dataclass
class PairTemplate:
    """Where a tokenizer puts its special tokens around a text pair, and the token types of
    each piece: ``[CLS] A [SEP] B [SEP]`` (types 0, 0, 0, 1, 1) for BERT, ``<s> A </s></s> B
    </s>`` for RoBERTa.

    Read once from the tokenizer's own pair encoding of two placeholder texts, so pairs built
    from token tables equal ``tokenizer(query, passage)`` of the same tokens. (transformers 5
    has no ``prepare_for_model`` for already tokenized ids.)
    """

    before: list[int]  # special tokens before the query
    between: list[int]  # between query and passage
    after: list[int]  # after the passage
    types: tuple[int, int, int, int, int] | None  # type of each piece; None: no token types

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> PairTemplate:
        """The template of ``tokenizer`` (a fast tokenizer: it reports sequence ids)."""
        encoded = tokenizer("a", "b", return_token_type_ids=True)
        ids, sequence = encoded["input_ids"], encoded.sequence_ids()
        first = [i for i, s in enumerate(sequence) if s == 0]
        second = [i for i, s in enumerate(sequence) if s == 1]
        if not first or not second or first[-1] > second[0]:
            raise UsageError(
                f"--model: the tokenizer {type(tokenizer).__name__} does not encode a text "
                "pair as query then passage; it cannot build reranker pairs"
            )
        pieces = (
            range(0, first[0]),
            first,
            range(first[-1] + 1, second[0]),
            second,
            range(second[-1] + 1, len(ids)),
        )
        found = encoded.get("token_type_ids")
        types = (
            tuple(found[p[0]] if len(p) else 0 for p in pieces)  # type: ignore[arg-type]
            if found is not None and any(found)
            else None
        )
        return cls(
            [ids[i] for i in pieces[0]],
            [ids[i] for i in pieces[2]],
            [ids[i] for i in pieces[4]],
            types,
        )

    @property
    def special_tokens(self) -> int:
        """Special tokens one pair adds."""
        return len(self.before) + len(self.between) + len(self.after)

    def join(
        self, query: list[int], passage: list[int], max_len: int
    ) -> tuple[list[int], list[int] | None]:
        """The pair's ids (and token types), the passage cut to fit ``max_len``; a query
        that alone would not fit is cut too, keeping one passage token."""
        room = max_len - self.special_tokens
        query = query[: max(room - 1, 1)]
        passage = passage[: max(room - len(query), 0)]
        ids = self.before + query + self.between + passage + self.after
        if self.types is None:
            return ids, None
        lengths = (len(self.before), len(query), len(self.between), len(passage), len(self.after))
        types = [t for t, n in zip(self.types, lengths, strict=True) for _ in range(n)]
        return ids, types


class CrossEncoder(torch.nn.Module):
    """A reranker being trained: ``forward(input_ids, attention_mask, token_type_ids)`` gives
    one logit per pair, shape [N]."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: RerankerSettings,
        head_added: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.head_added = head_added  # True when the classification head is new (random)
        self._template: PairTemplate | None = None

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        settings: RerankerSettings,
        attn_implementation: str | None = None,
    ) -> CrossEncoder:
        """Load a reranker, or start one from any encoder checkpoint (a new one-label head)."""
        from embtune.models.encoder import load_model_config

        config = load_model_config(name)
        head_added = not is_reranker_config(config)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **kwargs)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"--model: cannot load {name!r} as a reranker: {first}") from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if model.config.pad_token_id is None:
            # Decoder-based classifiers find each row's last real token through it.
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer, settings, head_added)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N] raw logits of the pairs."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits[:, 0]

    def pair(self, query: list[int], passage: list[int]) -> tuple[list[int], list[int] | None]:
        """(input ids, token type ids or None) of one pair from its kept tokens, the passage
        cut so that the pair fits ``max_len`` (FlagEmbedding's ``truncation='only_second'``)."""
        if self._template is None:
            self._template = PairTemplate.of(self.tokenizer)
        return self._template.join(query, passage, self.settings.max_len)

    def save(self, path: str | Path) -> None:
        """A folder that AutoModelForSequenceClassification, sentence-transformers'
        CrossEncoder and embtune load with the same scores."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.config.sentence_transformers = {"activation_fn": IDENTITY_ACTIVATION}
        self.model.save_pretrained(path, safe_serialization=True)
        # CrossEncoder truncates pairs at the tokenizer's model_max_length.
        limit = self.tokenizer.model_max_length
        self.tokenizer.model_max_length = self.settings.max_len
        try:
            self.tokenizer.save_pretrained(path)
        finally:
            self.tokenizer.model_max_length = limit
        text = json.dumps(asdict(self.settings), indent=2) + "\n"
        (path / RERANKER_FILE).write_text(text, encoding="utf-8")
