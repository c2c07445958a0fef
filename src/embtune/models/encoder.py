"""The encoder: a Hugging Face model plus pooling, normalization and instructions.

Training, evaluation and mining all embed text through :class:`Encoder`, so a model scores the
same way everywhere. ``Encoder.save`` writes a folder that loads with
``transformers.AutoModel`` *and* ``sentence_transformers.SentenceTransformer`` (modules.json,
pooling and normalize modules, instructions as the ``query`` / ``document`` prompts), which
FlagEmbedding's saved models do not: they lose their pooling and normalization.

Example::

    enc = Encoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    q = enc.encode_queries(["what is a cell?"])
    p = enc.encode_passages(["A cell is the basic unit of life."])
    score = q @ p.T

A Matryoshka model (docs/matryoshka.md) at a smaller size, as
``SentenceTransformer(path, truncate_dim=128)``: ``Encoder.from_pretrained(path,
truncate_dim=128)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from embtune.choices import ENCODE_PRECISIONS, PADDING_SIDES, POOLING_MODES
from embtune.errors import UsageError
from embtune.models.lora import (
    adapter_base,
    is_adapter_folder,
    is_peft_model,
    load_adapter,
    merged_copy,
    save_adapter,
)
from embtune.models.special_tokens import append_eos, appends_eos

log = logging.getLogger(__name__)

SETTINGS_FILE = "embtune_encoder.json"

# sentence-transformers' legacy pooling keys: every release since 2.x reads them.
_ST_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "last_token": "pooling_mode_lasttoken",
}


@dataclass
class EncoderSettings:
    """How text becomes a vector, saved with the model so every later use matches training."""

    pooling: str = "cls"
    normalize: bool = True
    query_instruction: str = ""
    passage_instruction: str = ""
    query_max_len: int = 64
    passage_max_len: int = 256
    # The Matryoshka dimensions the model was trained at (--matryoshka-dims): the leading
    # slices that were trained to be embeddings on their own (docs/matryoshka.md).
    matryoshka_dims: list[int] = field(default_factory=list)
    # Every text ends with the tokenizer's EOS (--append-eos-token, or the model's tokenizer
    # does so itself); the saved tokenizer does it (models/special_tokens.py), this records it.
    append_eos_token: bool = False


def truncate_embeddings(embeddings: torch.Tensor, dim: int | None, normalize: bool) -> torch.Tensor:
    """The first ``dim`` components of each embedding, L2-normalized again when ``normalize``.

    sentence-transformers' ``truncate_dim`` cuts after its Normalize module and does not
    normalize again (``util.truncate_embeddings``: ``embeddings[..., :dim]``); its cosine
    similarity, which a normalized model saved by embtune declares (``similarity_fn_name``),
    and ``encode(normalize_embeddings=True)`` do. Normalizing here keeps the inner product a
    cosine, so search, mining and the Matryoshka objective need no other change: the vectors
    equal ``SentenceTransformer(path, truncate_dim=dim).encode(texts,
    normalize_embeddings=True)``. ``None`` or a ``dim`` of at least the width returns the
    embeddings unchanged (the encoder normalized them already).
    """
    if dim is None or dim >= embeddings.shape[-1]:
        return embeddings
    truncated = embeddings[..., :dim]
    return F.normalize(truncated, dim=-1) if normalize else truncated


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce token states [B, T, H] to one vector per text [B, H].

    ``cls`` takes the first token, ``mean`` averages real (unmasked) tokens, ``last_token``
    takes the last real token, whichever side the tokenizer pads on.
    """
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "last_token":
        # Position of the last 1 in each mask row: works for left and right padding alike.
        width = attention_mask.shape[1]
        last = width - 1 - attention_mask.flip(1).int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise UsageError(f"unknown pooling {mode!r}; choose one of {', '.join(POOLING_MODES)}")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_file(name_or_path: str, filename: str) -> Path | None:
    """A file of a local model folder or, for hub names, of the cached/downloaded repo."""
    local = Path(name_or_path)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name_or_path, filename))
    except Exception:  # offline, missing file or no such repo: the caller falls back
        return None


def saved_settings(name_or_path: str, own_file: bool = True) -> EncoderSettings:
    """Encoder settings recorded with a model: embtune's own file, else sentence-transformers'
    (only those with ``own_file=False``: what any sentence-transformers user gets).

    A model without either gets ``cls`` pooling (the BERT convention) and normalization on.
    """
    own = model_file(name_or_path, SETTINGS_FILE) if own_file else None
    if own and (data := _read_json(own)):
        known = EncoderSettings.__dataclass_fields__
        return EncoderSettings(**{k: v for k, v in data.items() if k in known})
    settings = EncoderSettings()
    modules_file = model_file(name_or_path, "modules.json")
    modules = _read_json(modules_file) if modules_file else None
    if not isinstance(modules, list):
        return settings
    settings.normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            cfg_file = model_file(name_or_path, f"{module.get('path', '')}/config.json")
            cfg = (_read_json(cfg_file) if cfg_file else None) or {}
            mode = cfg.get("pooling_mode")
            if isinstance(mode, list | tuple):
                mode = mode[0] if mode else None
            legacy = [m for m, key in _ST_POOLING_KEYS.items() if cfg.get(key)]
            mode = {"lasttoken": "last_token"}.get(mode, mode) or (legacy[0] if legacy else None)
            if mode in POOLING_MODES:
                settings.pooling = mode
    st_cfg_file = model_file(name_or_path, "config_sentence_transformers.json")
    prompts = ((_read_json(st_cfg_file) if st_cfg_file else None) or {}).get("prompts") or {}
    settings.query_instruction = prompts.get("query") or ""
    settings.passage_instruction = prompts.get("document") or prompts.get("passage") or ""
    return settings


def settings_with(name_or_path: str, **overrides: object) -> EncoderSettings:
    """The model's saved settings (:func:`saved_settings`) with every override not None."""
    settings = saved_settings(name_or_path)
    for key, value in overrides.items():
        if value is not None:
            setattr(settings, key, value)
    return settings


def check_max_lengths(model_config: object, query_max_len: int, passage_max_len: int) -> None:
    """Refuse max lengths the model cannot embed (beyond its position embeddings)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    for option, length in (
        ("--query-max-len", query_max_len),
        ("--passage-max-len", passage_max_len),
    ):
        if length < 1 or (limit and length > limit):
            raise UsageError(
                f"{option}: {length} is outside 1..{limit} (the model's position limit)"
            )


def check_dimensions(model_config: object, dims: Sequence[int], option: str) -> None:
    """Refuse embedding dimensions that are not positive or larger than the model's (its
    hidden size: the width of a pooled embedding)."""
    width = getattr(model_config, "hidden_size", None)
    if any(d < 1 for d in dims):
        raise UsageError(f"{option}: dimensions must be positive, got {list(dims)}")
    too_large = [d for d in dims if width and d > width]
    if too_large:
        raise UsageError(
            f"{option}: {too_large[0]} is larger than the model's embedding size ({width})"
        )


def load_model_config(name_or_path: str | Path) -> object:
    """The model's ``config.json`` only (no weights): enough to check options before loading."""
    from transformers import AutoConfig

    name = str(name_or_path)
    local = Path(name)
    if not local.exists() and (local.is_absolute() or name.startswith(".")):
        raise UsageError(f"--model: folder {name} does not exist")
    if is_adapter_folder(name):  # a LoRA adapter has no config.json: its base model's counts
        name = adapter_base(name)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load {name!r}: {first}") from exc


def _load_model(
    name: str, attn_implementation: str | None, tokenizer_from: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and its tokenizer (from ``tokenizer_from`` when given: an adapter folder
    keeps the tokenizer it was trained with); a model or an attention kind that cannot load
    is a one-line UsageError."""
    try:
        own = tokenizer_from and _has_tokenizer(tokenizer_from)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from if own else name)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModel.from_pretrained(name, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load {name!r}: {first}") from exc
    except (ImportError, ValueError) as exc:
        if not attn_implementation:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--attn-implementation {attn_implementation}: {first}") from exc
    return model, tokenizer


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _has_settings(folder: str | Path) -> bool:
    """True when a folder records encoder settings (embtune's or sentence-transformers')."""
    return any((Path(folder) / f).is_file() for f in (SETTINGS_FILE, "modules.json"))


def _apply_tokenizer_policy(
    tokenizer: PreTrainedTokenizerBase,
    settings: EncoderSettings,
    padding_side: str | None,
    append_eos_token: bool | None,
) -> None:
    """A pad token where there is none, the padding side asked for, EOS appended when asked
    (or when the settings say the model was trained so): written into the tokenizer, so its
    saved copy does the same elsewhere. The settings record what the tokenizer then does."""
    if tokenizer.pad_token is None:
        # Decoder-style models (last_token pooling) often ship without a pad token.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if padding_side is not None:
        if padding_side not in PADDING_SIDES:
            raise UsageError(
                f"--padding-side: unknown value {padding_side!r}; choose left or right"
            )
        tokenizer.padding_side = padding_side
    wanted = settings.append_eos_token if append_eos_token is None else append_eos_token
    if wanted:
        append_eos(tokenizer)
    elif append_eos_token is False and appends_eos(tokenizer):
        raise UsageError(
            "--no-append-eos-token: this model's tokenizer ends every text with EOS itself "
            "(its tokenizer.json); embtune does not take that away"
        )
    # What the tokenizer does, whoever asked for it (Qwen3-Embedding's appends EOS itself).
    settings.append_eos_token = appends_eos(tokenizer)


class Encoder(torch.nn.Module):
    """Hugging Face encoder + pooling + optional L2 normalization + instructions."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: EncoderSettings,
    ) -> None:
        super().__init__()
        if settings.pooling not in POOLING_MODES:
            raise UsageError(
                f"--pooling: unknown value {settings.pooling!r}; "
                f"choose one of {', '.join(POOLING_MODES)}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        # Precision of encode*(): "fp32" by default (embeddings equal sentence-transformers' to
        # 1e-5); "bf16" autocasts (CPUs with AVX-512 BF16 / AMX and GPUs run it ~2x faster).
        self.encode_precision = "fp32"
        # Leading components encode*() keep (None: all); training (forward) always sees all.
        self.truncate_dim: int | None = None
        # The model a LoRA adapter is saved against (from_pretrained sets the name it loaded).
        self.base_name: str = str(getattr(model.config, "_name_or_path", "") or "")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        pooling: str | None = None,
        normalize: bool | None = None,
        query_instruction: str | None = None,
        passage_instruction: str | None = None,
        query_max_len: int | None = None,
        passage_max_len: int | None = None,
        attn_implementation: str | None = None,
        encode_precision: str = "fp32",
        matryoshka_dims: Sequence[int] | None = None,
        truncate_dim: int | None = None,
        append_eos_token: bool | None = None,
        padding_side: str | None = None,
        adapter: str | Path | None = None,
        trainable_adapter: bool = False,
    ) -> Encoder:
        """Load a hub name or local folder; arguments left as None keep the model's own settings.

        Pooling defaults to what the model's sentence-transformers config says, else ``cls``.
        ``attn_implementation`` is passed to transformers (sdpa, eager, flash_attention_2);
        ``encode_precision`` ("fp32" or "bf16") is the precision of :meth:`encode_tokens`.
        ``matryoshka_dims`` is recorded with the model when it is saved (the dimensions it is
        trained at); ``truncate_dim``, as in ``SentenceTransformer(path, truncate_dim=d)``,
        makes the ``encode*`` methods return the first ``d`` components, re-normalized when the
        model normalizes (:func:`truncate_embeddings`). ``append_eos_token`` ends every text
        with EOS (models/special_tokens.py); ``padding_side`` ("left" or "right") is where
        batches are padded, in training and evaluation alike. A folder holding a LoRA adapter
        loads with the base model it names; ``adapter`` puts one on ``name_or_path``
        (``--from-peft``), ``trainable_adapter`` to go on training it.
        """
        if encode_precision not in ENCODE_PRECISIONS:
            raise UsageError(
                f"encode precision {encode_precision!r}: choose one of "
                f"{', '.join(ENCODE_PRECISIONS)}"
            )
        name = str(name_or_path)
        local = Path(name)
        if not local.exists() and (local.is_absolute() or name.startswith(".")):
            raise UsageError(f"--model: folder {name} does not exist")
        if adapter is None and is_adapter_folder(name):
            name, adapter = adapter_base(name), name
        settings = settings_with(
            str(adapter) if adapter and _has_settings(adapter) else name,
            pooling=pooling,
            normalize=normalize,
            query_instruction=query_instruction,
            passage_instruction=passage_instruction,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            matryoshka_dims=list(matryoshka_dims) if matryoshka_dims is not None else None,
        )
        model, tokenizer = _load_model(name, attn_implementation, str(adapter) if adapter else None)
        if adapter is not None:
            model = load_adapter(model, adapter, trainable_adapter)
        check_max_lengths(model.config, settings.query_max_len, settings.passage_max_len)
        if truncate_dim is not None:
            check_dimensions(model.config, [truncate_dim], "truncate_dim")
        _apply_tokenizer_policy(tokenizer, settings, padding_side, append_eos_token)
        encoder = cls(model, tokenizer, settings)
        encoder.base_name = name
        encoder.encode_precision = encode_precision
        encoder.truncate_dim = truncate_dim
        return encoder

    # --- embedding -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (inputs are moved there before a forward pass)."""
        return next(self.model.parameters()).device

    @property
    def _no_split_modules(self) -> list[str]:
        """The model's transformer-block classes (transformers' attribute of this name): what
        FSDP shards one by one (accelerate's transformer_based_wrap reads it)."""
        return list(getattr(self.model, "_no_split_modules", None) or [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, H] for a padded batch of token ids."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        emb = pool(out.last_hidden_state, attention_mask, self.settings.pooling)
        if self.settings.normalize:
            emb = F.normalize(emb.float(), dim=-1)
        return emb

    def tokenize(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        """Token ids per text, truncated to ``max_len``, no padding."""
        return self.tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)[
            "input_ids"
        ]

    def pad(self, token_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """A padded batch (input_ids, attention_mask) from unpadded token id lists."""
        return self.tokenizer.pad({"input_ids": list(token_ids)}, padding=True, return_tensors="pt")

    @torch.inference_mode()
    def encode_tokens(
        self,
        token_ids: Sequence[Sequence[int]],
        batch_size: int = 64,
        show_progress: bool = False,
        desc: str = "encoding",
    ) -> torch.Tensor:
        """Embed pre-tokenized texts; float32 [N, H] on the CPU, in input order (H is
        :attr:`truncate_dim` when set).

        Texts are batched in order of length so little padding is computed.
        """
        was_training = self.training
        self.eval()
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
        chunks: list[torch.Tensor] = []
        device = self.device
        bar = tqdm(total=len(order), desc=desc, unit="text", disable=not show_progress, leave=False)
        for start in range(0, len(order), batch_size):
            batch = self.pad([token_ids[i] for i in order[start : start + batch_size]])
            # Full precision by default on every device: embeddings then equal
            # sentence-transformers' to 1e-5 and metrics are reproducible across machines.
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=self.encode_precision == "bf16"
            ):
                emb = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            emb = truncate_embeddings(emb.float(), self.truncate_dim, self.settings.normalize)
            chunks.append(emb.cpu())
            bar.update(len(batch["input_ids"]))
        bar.close()
        self.train(was_training)
        if not chunks:
            return torch.empty(0, self.truncate_dim or self.model.config.hidden_size)
        stacked = torch.cat(chunks)
        result = torch.empty_like(stacked)
        result[torch.tensor(order)] = stacked
        return result

    def encode(
        self,
        texts: Sequence[str],
        max_len: int,
        batch_size: int = 64,
        show_progress: bool = False,
        desc: str = "encoding",
    ) -> torch.Tensor:
        """Embed raw texts (no instruction added); float32 [N, H] on the CPU, in input order."""
        return self.encode_tokens(self.tokenize(texts, max_len), batch_size, show_progress, desc)

    def encode_queries(
        self, queries: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> torch.Tensor:
        """Embed queries with the query instruction prepended, at the query max length."""
        s = self.settings
        texts = [s.query_instruction + q for q in queries]
        return self.encode(texts, s.query_max_len, batch_size, show_progress, "encoding queries")

    def encode_passages(
        self, passages: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> torch.Tensor:
        """Embed passages with the passage instruction prepended, at the passage max length."""
        s = self.settings
        texts = [s.passage_instruction + p for p in passages]
        return self.encode(texts, s.passage_max_len, batch_size, show_progress, "encoding passages")

    def merged(self) -> Encoder:
        """This encoder with its LoRA adapter added into the base weights: a plain model that
        embeds the same (to float rounding) and loads without peft; ``self`` is unchanged."""
        encoder = Encoder(merged_copy(self.model), self.tokenizer, replace(self.settings))
        encoder.base_name = self.base_name
        encoder.encode_precision = self.encode_precision
        return encoder

    # --- saving ----------------------------------------------------------------------------

    def save(self, path: str | Path, state_dict: dict | None = None) -> None:
        """Write a folder that AutoModel, SentenceTransformer and embtune all load identically.

        ``state_dict``: this encoder's full weights (its own ``state_dict()`` keys) when its
        parameters are shards (--fsdp); they are written instead of the shards."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        s = self.settings
        weights = _model_weights(state_dict)
        if is_peft_model(self.model):
            # The adapter only: checkpoints and the saved model stay small; every loader
            # (transformers, sentence-transformers, embtune) adds the base it names.
            save_adapter(self.model, path, self.base_name, weights)
        else:
            self.model.save_pretrained(path, safe_serialization=True, state_dict=weights)
        self.tokenizer.save_pretrained(path)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
        ]
        if s.normalize:
            modules.append(
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
            (path / "2_Normalize").mkdir(exist_ok=True)
        _write_json(path / "modules.json", modules)
        pooling_cfg = {"word_embedding_dimension": self.model.config.hidden_size}
        pooling_cfg.update({key: mode == s.pooling for mode, key in _ST_POOLING_KEYS.items()})
        pooling_cfg.update(
            {
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "include_prompt": True,
            }
        )
        (path / "1_Pooling").mkdir(exist_ok=True)
        _write_json(path / "1_Pooling" / "config.json", pooling_cfg)
        # sentence-transformers has one max length for every text; the passage length is the
        # one that matters for retrieval. Its queries are therefore cut at passage_max_len, not
        # query_max_len: identical embeddings for queries up to query_max_len tokens.
        _write_json(
            path / "sentence_bert_config.json",
            {"max_seq_length": s.passage_max_len, "do_lower_case": False},
        )
        _write_json(
            path / "config_sentence_transformers.json",
            {
                "prompts": {"query": s.query_instruction, "document": s.passage_instruction},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine" if s.normalize else "dot",
            },
        )
        _write_json(path / SETTINGS_FILE, asdict(s))


def _model_weights(state_dict: dict | None) -> dict | None:
    """The Hugging Face model's part of an encoder's state dict, under the model's own keys."""
    if state_dict is None:
        return None
    return {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
