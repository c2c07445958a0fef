"""Text store and token cache: each text once, tokenized once, cache hits only when valid."""

from __future__ import annotations

import copy
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from embtune.data.formats import Record
from embtune.data.groups import build_rows
from embtune.data.store import (
    TextStore,
    TokenTable,
    cache_problem,
    default_cache_dir,
    first_prefix_chars,
    tokenize_store,
    tokenize_texts,
    tokenizer_fingerprint,
    usable_cache_dir,
)
from embtune.errors import UsageError
from tests.conftest import minilm_path

TEXTS = ["a cell is the unit of life", "dogs bark", "the mitochondria is the powerhouse"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("tokens-*.npz"))


def warm(store: TextStore, tokenizer, max_len: int, folder: Path) -> TokenTable:
    """Tokenize until the cache hits, so later misses can only come from what a test changes.

    (The tokenizer's fingerprint also covers its last truncation setting: see
    test_the_tokenizer_fingerprint_does_not_depend_on_the_last_call.)
    """
    for _ in range(3):
        table, cached = tokenize_store(store, tokenizer, max_len, folder, show_progress=False)
        if cached:
            return table
    raise AssertionError("the token cache never hits")


# --- TextStore ----------------------------------------------------------------------------------


def test_the_same_text_gets_the_same_id() -> None:
    store = TextStore(["a", "b", "a"])
    assert store.texts == ["a", "b"]
    assert store.add("b") == 1
    assert store.add("c") == 2
    assert (store.id_of("a"), store.id_of("c"), store.id_of("zzz")) == (0, 2, None)
    assert len(store) == 3


def test_content_hash_follows_the_texts() -> None:
    assert TextStore(["a", "b"]).content_hash() == TextStore(["a", "b", "a"]).content_hash()
    assert TextStore(["a", "b"]).content_hash() != TextStore(["b", "a"]).content_hash()
    assert TextStore(["ab"]).content_hash() != TextStore(["a", "b"]).content_hash()


# --- build_rows ---------------------------------------------------------------------------------


def test_rows_hold_ids_of_deduplicated_texts() -> None:
    records = [
        Record(query="q1", pos=["p1"], neg=["n1", "n2", "n1"]),
        Record(query="q2", pos=["n1"], neg=["p1", "n3"]),
        Record(query="q1", pos=["p1"]),
    ]
    texts = build_rows(records)
    assert texts.queries.texts == ["q1", "q2"]
    assert texts.passages.texts == ["p1", "n1", "n2", "n3"]
    first, second, third = texts.rows
    assert (first.query, first.pos.tolist(), first.neg.tolist()) == (0, [0], [1, 2])
    assert (second.query, second.pos.tolist(), second.neg.tolist()) == (1, [1], [0, 3])
    assert (third.query, third.pos.tolist(), third.neg.tolist()) == (0, [0], [])


def test_instructions_are_prepended_and_a_row_prompt_overrides_the_query_one() -> None:
    records = [
        Record(query="q1", pos=["p1"], neg=["n1"]),
        Record(query="q2", pos=["p2"], prompt="Row prompt: "),
    ]
    texts = build_rows(records, "query: ", "passage: ", corpus=["extra", "p1"])
    assert texts.queries.texts == ["query: q1", "Row prompt: q2"]
    assert texts.passages.texts == ["passage: p1", "passage: n1", "passage: p2", "passage: extra"]
    assert [r.query for r in texts.rows] == [0, 1]


def test_a_text_both_positive_and_negative_is_dropped_from_the_negatives() -> None:
    texts = build_rows([Record(query="q", pos=["a", "b"], neg=["b", "c", "a", "d"])])
    row = texts.rows[0]
    by_id = texts.passages.texts
    assert sorted(by_id[i] for i in row.pos) == ["a", "b"]
    assert sorted(by_id[i] for i in row.neg) == ["c", "d"]


def test_corpus_texts_join_the_passage_store() -> None:
    texts = build_rows([Record(query="q", pos=["a"])], corpus=["a", "b", "c"])
    assert texts.passages.texts == ["a", "b", "c"]
    assert texts.rows[0].neg.tolist() == []


# --- TokenTable and tokenize_store -----------------------------------------------------------


def test_token_table_from_lists() -> None:
    table = TokenTable.from_lists([[5, 6, 7], [], [8]])
    assert len(table) == 3
    assert [table[i].tolist() for i in range(3)] == [[5, 6, 7], [], [8]]
    assert table.lengths().tolist() == [3, 0, 1]


def test_tokens_match_the_tokenizer_and_respect_max_len(tokenizer) -> None:
    store = TextStore([*TEXTS, "word " * 50])
    table, cached = tokenize_store(store, tokenizer, max_len=8, show_progress=False)
    assert not cached
    expected = tokenizer(store.texts, truncation=True, max_length=8)["input_ids"]
    assert [table[i].tolist() for i in range(len(store))] == expected
    assert table.lengths().max() == 8


def test_second_call_loads_identical_arrays_from_the_cache(tokenizer, tmp_path: Path) -> None:
    store = TextStore(TEXTS)
    first, cached_first = tokenize_store(store, tokenizer, 16, tmp_path, show_progress=False)
    second, cached_second = tokenize_store(store, tokenizer, 16, tmp_path, show_progress=False)
    assert (cached_first, cached_second) == (False, True)
    assert np.array_equal(first.flat, second.flat)
    assert np.array_equal(first.offsets, second.offsets)
    assert len(cache_files(tmp_path)) == 1
    assert not list(tmp_path.glob("*.tmp*"))  # nothing half-written left behind


def test_the_tokenizer_fingerprint_does_not_depend_on_the_last_call(tokenizer) -> None:
    before = tokenizer_fingerprint(tokenizer)
    tokenizer(["some text"], truncation=True, max_length=5)
    assert tokenizer_fingerprint(tokenizer) == before
    tokenizer(["some text"], truncation=True, max_length=7)
    assert tokenizer_fingerprint(tokenizer) == before


def test_no_cache_dir_means_no_caching(tokenizer, tmp_path: Path) -> None:
    store = TextStore(TEXTS)
    assert not tokenize_store(store, tokenizer, 16, None, show_progress=False)[1]
    assert not tokenize_store(store, tokenizer, 16, None, show_progress=False)[1]


def test_another_max_len_is_a_cache_miss(tokenizer, tmp_path: Path) -> None:
    store = TextStore(TEXTS)
    warm(store, tokenizer, 16, tmp_path)
    before = set(cache_files(tmp_path))
    table, cached = tokenize_store(store, tokenizer, 4, tmp_path, show_progress=False)
    assert not cached
    assert table.lengths().max() == 4
    assert len(set(cache_files(tmp_path)) - before) == 1


def test_a_changed_text_is_a_cache_miss(tokenizer, tmp_path: Path) -> None:
    warm(TextStore(TEXTS), tokenizer, 16, tmp_path)
    changed = TextStore([*TEXTS[:-1], "the mitochondria is not the powerhouse"])
    table, cached = tokenize_store(changed, tokenizer, 16, tmp_path, show_progress=False)
    assert not cached
    expected = tokenizer(changed.texts[-1], truncation=True, max_length=16)["input_ids"]
    assert table[2].tolist() == expected


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"this is not an npz file",
        lambda data: data[: len(data) // 2],  # an interrupted copy
        lambda data: b"",
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_a_corrupt_cache_file_is_rebuilt(tokenizer, tmp_path: Path, damage) -> None:
    store = TextStore(TEXTS)
    good = warm(store, tokenizer, 16, tmp_path)
    for path in cache_files(tmp_path):
        path.write_bytes(damage(path.read_bytes()))
    rebuilt, cached = tokenize_store(store, tokenizer, 16, tmp_path, show_progress=False)
    assert not cached
    assert np.array_equal(rebuilt.flat, good.flat)
    assert np.array_equal(rebuilt.offsets, good.offsets)
    assert tokenize_store(store, tokenizer, 16, tmp_path, show_progress=False)[1]  # valid again


def _replace_cache(folder: Path, flat: np.ndarray, offsets: np.ndarray) -> None:
    (path,) = cache_files(folder)
    with open(path, "wb") as fh:
        np.savez(fh, flat=flat, offsets=offsets)


def _tamper_cases(good: TokenTable, vocab: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Valid .npz tables that are wrong for the store they are keyed by."""
    flat, offsets = good.flat.copy(), good.offsets.copy()
    beyond = flat.copy()
    beyond[1] = vocab + 5
    negative = flat.copy()
    negative[-2] = -1
    short_offsets = offsets.copy()
    short_offsets[-1] -= 1  # the last row claims fewer ids than the array holds
    crossing = offsets.copy()
    crossing[1], crossing[2] = crossing[2], crossing[1]  # a negative length
    swapped = TokenTable.from_lists([good[1].tolist(), good[0].tolist(), good[2].tolist()])
    long_rows = TokenTable.from_lists([[*good[i].tolist(), 101, 101] for i in range(3)])
    return {
        "id-beyond-vocab": (beyond, offsets),
        "negative-id": (negative, offsets),
        "offsets-short-of-ids": (flat, short_offsets),
        "offsets-not-increasing": (flat, crossing),
        "rows-swapped": (swapped.flat, swapped.offsets),
        "rows-longer-than-max-len": (long_rows.flat, long_rows.offsets),
        "one-row-missing": (flat[: offsets[2]], offsets[:3]),
        "float-ids": (flat.astype(np.float32), offsets),
        "2d-ids": (flat[None, :], offsets),
    }


TAMPERED = list(_tamper_cases(TokenTable.from_lists([[1, 2], [3], [4, 5, 6]]), 10))


@pytest.mark.parametrize("case", TAMPERED)
def test_a_valid_cache_file_with_wrong_ids_is_rebuilt(tokenizer, tmp_path: Path, case) -> None:
    # A readable table whose ids are wrong once reached the model: IndexError in the embedding.
    store = TextStore(TEXTS)
    good = warm(store, tokenizer, 16, tmp_path)
    tampered = _tamper_cases(good, len(tokenizer))[case]
    assert cache_problem(TokenTable(*tampered), store, tokenizer, 16)  # named, not an exception
    _replace_cache(tmp_path, *tampered)
    rebuilt, cached = tokenize_store(store, tokenizer, 16, tmp_path, show_progress=False)
    assert not cached
    assert np.array_equal(rebuilt.flat, good.flat)
    assert np.array_equal(rebuilt.offsets, good.offsets)
    assert tokenize_store(store, tokenizer, 16, tmp_path, show_progress=False)[1]  # valid again


def test_the_cache_check_passes_a_good_table_and_an_empty_store(tokenizer, tmp_path) -> None:
    store = TextStore([f"text number {i}" for i in range(100)])
    table, _ = tokenize_store(store, tokenizer, 16, None, show_progress=False)
    assert cache_problem(table, store, tokenizer, 16) is None
    assert cache_problem(TokenTable.from_lists([]), TextStore(), tokenizer, 16) is None
    other = TextStore([f"text number {i + 1}" for i in range(100)])
    assert cache_problem(table, other, tokenizer, 16) == "row 0 differs from the tokenizer's ids"


# --- usable_cache_dir ----------------------------------------------------------------------------


def test_the_cache_folder_is_created_and_nothing_is_left_in_it(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b" / "cache"
    assert usable_cache_dir(folder) == folder
    assert folder.is_dir() and not list(folder.iterdir())  # the write probe is removed
    assert usable_cache_dir(str(folder)) == folder  # an existing one is fine too


def test_the_default_is_embtune_cache_then_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "env"))
    assert usable_cache_dir(None) == tmp_path / "env" == default_cache_dir()
    monkeypatch.delenv("EMBTUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert usable_cache_dir(None) == tmp_path / "home" / ".cache" / "embtune"
    assert usable_cache_dir(tmp_path / "given") == tmp_path / "given"  # the option wins


def test_a_cache_path_under_a_regular_file_is_one_line(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError) as info:
        usable_cache_dir(tmp_path / "file" / "cache")
    (line,) = info.value.lines()
    assert line.startswith(f"--cache-dir: cannot create cache folder {tmp_path}/file/cache: ")
    assert line.endswith("(choose another with --cache-dir or EMBTUNE_CACHE)")
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "file"))
    with pytest.raises(UsageError, match=r"^EMBTUNE_CACHE: cache folder .* is not a folder"):
        usable_cache_dir(None)
    with pytest.raises(UsageError, match=r"^--passage-cache: cache folder .* is not a folder"):
        usable_cache_dir(tmp_path / "file", option="--passage-cache")


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path: Path, monkeypatch) -> None:
    # Root writes through permission bits, so a read-only folder is simulated at the write.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path))
    with pytest.raises(UsageError) as info:
        usable_cache_dir(None)
    assert info.value.lines() == [
        f"EMBTUNE_CACHE: cannot write to cache folder {tmp_path}: Permission denied "
        "(choose another with --cache-dir or EMBTUNE_CACHE)"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="cannot write to cache folder"):
            usable_cache_dir(folder)
        with pytest.raises(UsageError, match="cannot create cache folder"):
            usable_cache_dir(folder / "sub")
    finally:
        folder.chmod(0o755)


# --- long texts: a bounded prefix, the same ids -----------------------------------------------

PIECES = [
    "cell", "mitochondria", "the", "Ünïcödé", "naïve", "東京大学", "生命", "😀", "x" * 30,
    "e\u0301", "a\u0308\u0301", "(", ")", ".", "...", "—", "don't", "1234567", "ℌ", "ﬁ",
    "\u200b", "\u200d", "\ufeff", "[SEP]", "[UNK]",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", "\n", "\t", "\u3000", "\u00a0", "", "\r\n", "  "]


def random_text(rng: random.Random, chars: int) -> str:
    """Words, scripts, combining marks, invisible characters and odd spacing, ``chars`` long."""
    parts: list[str] = []
    size = 0
    while size < chars:
        letters = (rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 14)))
        piece = rng.choice(PIECES) if rng.random() < 0.7 else "".join(letters)
        parts.append(piece + rng.choice(SEPARATORS))
        size += len(parts[-1])
    return "".join(parts)[:chars]


def special_texts(rng: random.Random) -> dict[str, str]:
    """Long texts made to trip a prefix: words that reach past any cut, late first tokens."""
    words = random_text(rng, 3_000)
    return {
        "one-unbroken-word": "z" * 200_000,
        "words-then-an-unbroken-word": words[:900] + " " + "q" * 100_000 + " tail words",
        "an-unbroken-word-past-the-first-cut": words[:1_500] + "w" * 60_000 + " " + words,
        "whitespace-before-the-first-word": " " * 80_000 + words,
        "invisible-characters-join-words": ("ab\u200b" * 40_000) + words,
        "zero-width-joined-word-at-the-cut": words[:1_400] + "hello" + "\u200b" * 5_000 + "world",
        "punctuation-only": "!?." * 30_000,
        "combining-marks-over-the-cut": words[:1_500] + "e" + "\u0301" * 3_000 + " " + words,
        "cjk-no-spaces": "".join(rng.choice("東京大学生命科学的研究") for _ in range(40_000)),
    }


def full_ids(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return [tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts]


@pytest.mark.parametrize("max_len", [8, 33, 128])
def test_long_texts_give_exactly_the_ids_of_the_whole_text(tokenizer, max_len: int) -> None:
    rng = random.Random(max_len)
    texts = [random_text(rng, rng.randint(3_000, 60_000)) for _ in range(12)]
    texts += list(special_texts(rng).values())
    assert tokenize_texts(tokenizer, texts, max_len) == full_ids(tokenizer, texts, max_len)


def test_the_store_of_long_and_short_texts_matches_the_tokenizer(tokenizer) -> None:
    rng = random.Random(7)
    store = TextStore([*TEXTS, random_text(rng, 90_000), "dogs", *special_texts(rng).values()])
    table, _ = tokenize_store(store, tokenizer, 16, None, show_progress=False)
    assert [table[i].tolist() for i in range(len(store))] == full_ids(tokenizer, store.texts, 16)


class Spy:
    """A tokenizer that records how many characters each call was given."""

    def __init__(self, tokenizer, is_fast: bool | None = None) -> None:
        self.tokenizer = tokenizer
        self.is_fast = tokenizer.is_fast if is_fast is None else is_fast
        self.sizes: list[int] = []

    def __call__(self, text, **kwargs):
        self.sizes.append(sum(map(len, text)) if isinstance(text, list) else len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def test_a_huge_line_is_tokenized_from_a_short_prefix(tokenizer) -> None:
    # A 50 MB line once took 89 s and 7 GB; only a prefix of ~ 64 characters per token is read.
    text = random_text(random.Random(1), 5_000_000)
    spy = Spy(tokenizer)
    ids = tokenize_texts(spy, [text], 128)
    assert max(spy.sizes) <= first_prefix_chars(128)
    assert ids == full_ids(tokenizer, [text[:200_000]], 128)  # what the whole text would give


def test_a_slow_tokenizer_reads_the_whole_text(tokenizer) -> None:
    # Without offsets and word ids nothing proves a prefix right, so the text is read whole.
    text = random_text(random.Random(2), 50_000)
    spy = Spy(tokenizer, is_fast=False)
    assert tokenize_texts(spy, [text], 16) == full_ids(tokenizer, [text], 16)
    assert spy.sizes == [len(text)]


def byte_level_bpe():
    """A small GPT-2 style (byte-level BPE) tokenizer trained here, with <s> ... </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"])
    rng = random.Random(3)
    backend.train_from_iterator([random_text(rng, 2_000) for _ in range(50)], trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def test_long_texts_with_a_byte_level_bpe_tokenizer() -> None:
    bpe = byte_level_bpe()
    rng = random.Random(4)
    texts = [random_text(rng, rng.randint(3_000, 40_000)) for _ in range(8)]
    texts += list(special_texts(rng).values())
    for max_len in (8, 40):
        assert tokenize_texts(bpe, texts, max_len) == full_ids(bpe, texts, max_len)


def test_a_tokenizer_without_word_splits_reads_the_whole_text(tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.pre_tokenizer = None  # one "word": no prefix can be proven to give the same ids
    whole = PreTrainedTokenizerFast(tokenizer_object=backend)
    # Without "[SEP]" written in the text, which would split it (rightly) into parts.
    text = random_text(random.Random(5), 20_000).replace("[", "(")
    spy = Spy(whole)
    assert tokenize_texts(spy, [text], 8) == full_ids(whole, [text], 8)
    assert spy.sizes[-1] == len(text)


def test_a_cache_that_cannot_be_written_does_not_stop_tokenizing(
    tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache only saves the next run's work: a full disk there is a warning, not a stop."""
    import errno

    def full_disk(path, write):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("embtune.data.store.atomic_write", full_disk)
    store = TextStore(TEXTS)
    with caplog.at_level("WARNING"):
        table, cached = tokenize_store(store, tokenizer, 16, tmp_path, show_progress=False)
    assert not cached and len(table) == len(TEXTS)
    assert table[1].tolist() == tokenizer("dogs bark", truncation=True, max_length=16)["input_ids"]
    assert "token cache not written" in caplog.text and "No space left" in caplog.text
    assert cache_files(tmp_path) == []
