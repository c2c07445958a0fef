"""Text store: every distinct text once, tokenized once per max length, cached on disk.

Rows refer to texts by integer id, so a passage that is a negative for 50 queries is stored
and tokenized once, and the training loop never calls the tokenizer. The token table is cached
under a key made of the tokenizer's full definition, the max length and the texts themselves,
so a second run on the same data skips tokenizing and any change invalidates the cache; a
loaded table is checked against the store and tokenizer (:func:`cache_problem`) and rebuilt when
it does not fit. Very long texts are tokenized from a prefix that gives the same ids
(:func:`tokenize_long_text`). :func:`usable_cache_dir` checks the cache folder before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from embtune.atomic import atomic_write
from embtune.errors import UsageError

TOKENIZE_CHUNK = 4096

log = logging.getLogger(__name__)


class TextStore:
    """Distinct texts with stable integer ids in insertion order."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.texts: list[str] = []
        self._ids: dict[str, int] = {}
        for text in texts:
            self.add(text)

    def add(self, text: str) -> int:
        """The id of ``text``, adding it if new."""
        found = self._ids.get(text)
        if found is None:
            found = self._ids[text] = len(self.texts)
            self.texts.append(text)
        return found

    def id_of(self, text: str) -> int | None:
        """The id of a stored text, or None."""
        return self._ids.get(text)

    def __len__(self) -> int:
        return len(self.texts)

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode("utf-8"))
            digest.update(b"\0")
        return digest.hexdigest()


class TokenTable:
    """Token ids of every text of a store: one flat array plus offsets (compact, fast to load)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat = flat
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, token_lists: Sequence[Sequence[int]]) -> TokenTable:
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(
            (tok for t in token_lists for tok in t), dtype=np.int32, count=int(offsets[-1])
        )
        return cls(flat, offsets)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The serialized tokenizer also records the truncation/padding of its last call, which
        # says nothing about the ids it produces; drop it so the key is stable across calls.
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        digest.update(json.dumps(definition, sort_keys=True).encode("utf-8"))
    else:  # slow tokenizers have no serialized form; vocabulary plus init options cover them
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
        digest.update(json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str).encode())
    digest.update(repr(tokenizer.all_special_ids).encode())
    return digest.hexdigest()


def _save_table(table: TokenTable, tmp: Path) -> None:
    with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a bare name
        np.savez(fh, flat=table.flat, offsets=table.offsets)


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_len: int,
    special_tokens: bool = True,
) -> list[list[int]]:
    """Token ids of ``texts``, truncated to ``max_len`` (special tokens included, unless
    ``special_tokens`` is False: a cross-encoder adds them when it pairs two texts).

    With a fast tokenizer a very long text is tokenized from a prefix that provably gives the
    same ids (:func:`tokenize_long_text`): tokenizers cut only after tokenizing everything,
    so one 50 MB line cost 89 s and 7 GB for the few hundred tokens kept.
    """
    texts = list(texts)
    short = first_prefix_chars(max_len)
    options = {"truncation": True, "max_length": max_len, "add_special_tokens": special_tokens}
    if not tokenizer.is_fast or all(len(t) <= short for t in texts):
        return tokenizer(texts, **options)["input_ids"]
    ids: list[list[int] | None] = [None] * len(texts)
    usual = [i for i, t in enumerate(texts) if len(t) <= short]
    if usual:
        found = tokenizer([texts[i] for i in usual], **options)
        for i, row in zip(usual, found["input_ids"], strict=True):
            ids[i] = row
    for i, text in enumerate(texts):
        if ids[i] is None:
            ids[i] = tokenize_long_text(tokenizer, text, max_len, special_tokens)
    return ids  # type: ignore[return-value]


# The prefix tried first: 64 characters per kept token is far above any real text's ratio
# (English runs ~4-5 per token, CJK ~1-2), so a long text is decided on the first try.
def first_prefix_chars(max_len: int) -> int:
    """Characters of a long text tokenized first (doubled while they do not decide)."""
    return 64 * max_len + 1024


# Characters between the end of the last kept token's word and the cut. The models tokenize
# each pre-tokenized word on its own (WordPiece, BPE, Unigram, WordLevel); what can reach back
# from the cut is the normalizer, and it rewrites only short runs: NFC/NFKC/NFD a base character
# and its combining marks (bounded in practice by Unicode's stream-safe limit of 30 marks),
# SentencePiece's precompiled map a few characters, lowercasing and accent stripping one.
CUT_MARGIN = 512


def tokenize_long_text(
    tokenizer: PreTrainedTokenizerBase, text: str, max_len: int, special_tokens: bool = True
) -> list[int]:
    """``tokenizer(text, truncation=True, max_length=max_len)`` ids, from a prefix of ``text``.

    A prefix decides when its tokens go past the ones kept, and the last kept token's word is
    followed by another word in the prefix and ends at least :data:`CUT_MARGIN` characters
    before the cut. Then that word and every one before it are words of the full text too:
    pre-tokenizers split at characters with at most one character of look-ahead (whitespace and
    punctuation for BERT, GPT-2's ``\\s+(?!\\S)``), so only the prefix's last word can differ,
    and the margin keeps the normalizer's reach (above) away from them. Each word's tokens
    depend on that word alone, so the kept ids are the full text's. WordPiece turns a word longer
    than ``max_input_chars_per_word`` (100) into one [UNK] spanning the whole word: a long
    unbroken word that reaches the cut ends at the cut, fails the margin, and the prefix grows.
    A tokenizer without word splits (every token in word 0) never decides and so reads the
    whole text, as does any text the doubling reaches the end of.
    """
    options = {"truncation": True, "max_length": max_len, "add_special_tokens": special_tokens}
    keep = max_len - (tokenizer.num_special_tokens_to_add(pair=False) if special_tokens else 0)
    size = first_prefix_chars(max_len)
    while size < len(text) and keep > 0:
        prefix = text[:size]
        if _prefix_decides(tokenizer, prefix, keep):
            return tokenizer(prefix, **options)["input_ids"]
        size *= 2
    return tokenizer(text, **options)["input_ids"]


def _prefix_decides(tokenizer: PreTrainedTokenizerBase, prefix: str, keep: int) -> bool:
    """True when the first ``keep`` tokens of ``prefix`` are those of any longer text."""
    enc = tokenizer(prefix, return_offsets_mapping=True, verbose=False)
    # Sequence ids are None exactly for the tokens the post-processor adds ([CLS], [SEP]),
    # which truncation does not count; a special token written in the text counts.
    own = [i for i, seq in enumerate(enc.sequence_ids()) if seq == 0]
    if len(own) <= keep:
        return False
    words = enc.word_ids()
    last_word = words[own[keep - 1]]
    if last_word is None or not any(words[i] is not None and words[i] > last_word for i in own):
        return False
    word_end = max(enc["offset_mapping"][i][1] for i in own if words[i] == last_word)
    return word_end <= len(prefix) - CUT_MARGIN


SPOT_CHECKS = 8  # texts re-tokenized to check a loaded cache against the tokenizer


def cache_problem(
    table: TokenTable,
    store: TextStore,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    special_tokens: bool = True,
) -> str | None:
    """Why a token table loaded from disk cannot be trusted for ``store``, or None.

    The cache key covers the tokenizer, max length and texts, but not the file's content: a
    file written by another version, edited, or damaged while still a valid .npz must not reach
    the model, where an id beyond the vocabulary is an IndexError deep inside the embedding.
    Every check is a pass over the arrays plus a few texts re-tokenized, cheap next to
    tokenizing everything again.
    """
    flat, offsets = table.flat, table.offsets
    if flat.ndim != 1 or offsets.ndim != 1:
        return "arrays are not one-dimensional"
    if flat.dtype.kind not in "iu" or offsets.dtype.kind not in "iu":
        return "arrays are not integers"
    if len(offsets) != len(store) + 1:
        return f"{len(offsets) - 1} rows for {len(store)} texts"
    if offsets[0] != 0 or offsets[-1] != len(flat):
        return "offsets do not span the ids"
    lengths = np.diff(offsets)
    if len(lengths) and (lengths.min() < 0 or lengths.max() > max_len):
        return f"row lengths outside 0..{max_len}"
    if len(flat) and (flat.min() < 0 or flat.max() >= len(tokenizer)):
        return f"ids outside 0..{len(tokenizer) - 1}"
    if not len(store):
        return None
    # Spread over the store, always the first and last text: a table shifted by a row, or made
    # for other texts of the same count, differs somewhere among them.
    sample = np.unique(np.linspace(0, len(store) - 1, SPOT_CHECKS).round().astype(np.int64))
    fresh = tokenize_texts(tokenizer, [store.texts[i] for i in sample], max_len, special_tokens)
    for i, ids in zip(sample, fresh, strict=True):
        if table[int(i)].tolist() != list(ids):
            return f"row {int(i)} differs from the tokenizer's ids"
    return None


CACHE_VARIABLE = "EMBTUNE_CACHE"


def default_cache_dir() -> Path:
    """$EMBTUNE_CACHE, else ~/.cache/embtune."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "embtune")


def usable_cache_dir(cache_dir: str | Path | None, option: str = "--cache-dir") -> Path:
    """The cache folder to use, created and checked writable; a one-line UsageError otherwise.

    ``cache_dir`` is the option's value; None means $EMBTUNE_CACHE, else ~/.cache/embtune. Call
    it before any work: a read-only $EMBTUNE_CACHE or a path under a regular file would
    otherwise fail with a traceback once tokenizing is done, when the cache is first written.
    """
    if cache_dir is not None and str(cache_dir) != "":
        folder, named = Path(cache_dir).expanduser(), option
    elif os.environ.get(CACHE_VARIABLE):
        folder, named = Path(os.environ[CACHE_VARIABLE]).expanduser(), CACHE_VARIABLE
    else:
        folder, named = default_cache_dir(), f"{option} (default)"
    fix = f"choose another with {option} or {CACHE_VARIABLE}"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{named}: cache folder {folder} is not a folder ({fix})")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"{named}: cannot create cache folder {folder}: {exc.strerror or exc} ({fix})"
        ) from None
    # Permission bits do not tell (ACLs, read-only mounts, root squash): writing a file does.
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".embtune-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"{named}: cannot write to cache folder {folder}: {exc.strerror or exc} ({fix})"
        ) from None
    return folder


def tokenize_store(
    store: TextStore,
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    cache_dir: Path | None = None,
    desc: str = "tokenizing",
    show_progress: bool = True,
    special_tokens: bool = True,
) -> tuple[TokenTable, bool]:
    """Token table for every text of ``store`` at ``max_len``; (table, loaded_from_cache).
    ``special_tokens=False`` keeps the bare tokens (a cross-encoder pairs them later)."""
    # Tables with special tokens keep the key they always had (existing caches stay valid).
    bare = "" if special_tokens else "|no-special-tokens"
    key = hashlib.sha256(
        f"{tokenizer_fingerprint(tokenizer)}|{max_len}|{store.content_hash()}{bare}".encode()
    ).hexdigest()[:32]
    path = Path(cache_dir) / f"tokens-{key}.npz" if cache_dir else None
    if path and path.is_file():
        try:
            with np.load(path) as saved:
                table = TokenTable(saved["flat"], saved["offsets"])
            if cache_problem(table, store, tokenizer, max_len, special_tokens) is None:
                return table, True
        except Exception:
            pass  # any unreadable cache (truncated zip, empty file) is simply rebuilt below
    token_lists: list[list[int]] = []
    bar = tqdm(total=len(store), desc=desc, unit="text", disable=not show_progress, leave=False)
    for start in range(0, len(store), TOKENIZE_CHUNK):
        chunk = store.texts[start : start + TOKENIZE_CHUNK]
        token_lists.extend(tokenize_texts(tokenizer, chunk, max_len, special_tokens))
        bar.update(len(chunk))
    bar.close()
    table = TokenTable.from_lists(token_lists)
    if path:
        try:
            atomic_write(path, lambda tmp: _save_table(table, tmp))
        except OSError as exc:
            # The cache only saves the next run's tokenizing: a full disk must not end this run
            # (atomic_write has removed its partial file).
            log.warning("token cache not written (%s): %s", path, exc.strerror or exc)
    return table, False
