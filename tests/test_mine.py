"""Hard-negative mining: ranks, positive removal, the margin guard, seeding, CLI and output."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from embtune.cli import main
from embtune.data.formats import read_flag_jsonl
from embtune.errors import InputError, UsageError
from embtune.mining.negatives import (
    load_mining_input,
    mine_negatives,
    parse_range,
    read_candidates,
    write_mined_jsonl,
)
from tests.conftest import FLAG_DIR
from tests.test_atomic import read_only_folder


class StubEncoder:
    """Returns chosen vectors, so every score (and hence every rank) is known exactly."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors
        self.passage_calls: list[list[str]] = []

    def encode_queries(
        self, queries: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> torch.Tensor:
        return torch.tensor([self.vectors[q] for q in queries])

    def encode_passages(
        self, passages: Sequence[str], batch_size: int = 64, show_progress: bool = False
    ) -> torch.Tensor:
        self.passage_calls.append(list(passages))
        return torch.tensor([self.vectors[p] for p in passages])


def scored_corpus(scores: list[float]) -> tuple[list[str], list[str], torch.Tensor]:
    """Docs whose score against the query [1, 0] is exactly ``scores[i]`` (binary fractions)."""
    texts = [f"doc {i}" for i in range(len(scores))]
    ids = [f"d{i}" for i in range(len(scores))]
    emb = torch.tensor([[s, 0.0] for s in scores])
    return texts, ids, emb


# Scores 1, 15/16, 14/16, ...: doc i is at rank i + 1.
SCORES = [1 - i / 16 for i in range(12)]


def test_negatives_are_inside_the_rank_window_and_positives_are_dropped() -> None:
    texts, ids, emb = scored_corpus(SCORES)
    texts[5] = "the positive, again"  # a copy of the positive's text under another id
    enc = StubEncoder({"q": [1.0, 0.0]})
    result = mine_negatives(
        enc,
        ["q"],
        [["the positive"]],
        texts,
        ids,
        query_ids=["q1"],
        positive_ids=[["d2"]],  # found by id: its corpus text differs from the row's text
        rank_range=(2, 7),
        negatives=10,
        corpus_embeddings=emb,
        show_progress=False,
    )
    # Ranks 2..7 are docs 1..6; doc 2 is the positive (by id: its corpus text differs).
    row = result.rows[0]
    assert row.neg_ranks == [2, 4, 5, 6, 7]
    assert row.neg_ids == ["d1", "d3", "d4", "d5", "d6"]
    assert "d2" not in row.neg_ids
    assert row.neg_scores == [SCORES[r - 1] for r in row.neg_ranks]
    assert row.pos_scores == [SCORES[2]]
    assert enc.passage_calls == []  # the positive's embedding came from the corpus
    report = result.report
    assert report.candidates_considered == 6
    assert report.removed_as_positive == 1
    assert report.kept == 5 and report.negatives_written == 5
    assert report.rows_short == 1 and report.rows_empty == 0

    # A positive given by text only (extra whitespace): doc 5 goes, doc 2 is a negative now.
    result = mine_negatives(
        enc,
        ["q"],
        [["the  positive, again "]],
        texts,
        ids,
        rank_range=(2, 7),
        negatives=10,
        corpus_embeddings=emb,
        show_progress=False,
    )
    assert result.rows[0].neg_ranks == [2, 3, 4, 5, 7]
    assert "the positive, again" not in result.rows[0].neg
    assert result.report.removed_as_positive == 1


def test_ranks_count_positives_and_window_is_capped_by_corpus() -> None:
    texts, ids, emb = scored_corpus(SCORES[:6])
    enc = StubEncoder({"q": [1.0, 0.0]})
    result = mine_negatives(
        enc,
        ["q"],
        [["doc 0"]],
        texts,
        ids,
        positive_ids=[["d0"]],
        rank_range=(3, 100),
        negatives=15,
        corpus_embeddings=emb,
        show_progress=False,
    )
    # The positive holds rank 1, so rank 3 is doc 2 (not doc 3): ranks include positives.
    assert result.rows[0].neg_ids == ["d2", "d3", "d4", "d5"]
    assert result.rows[0].neg_ranks == [3, 4, 5, 6]
    assert result.report.candidates_considered == 4


def test_query_text_and_repeated_texts_are_not_negatives() -> None:
    texts, ids, emb = scored_corpus(SCORES[:6])
    texts[1] = "q"
    texts[4] = texts[3]
    enc = StubEncoder({"q": [1.0, 0.0]})
    result = mine_negatives(
        enc, ["q"], [["doc 0"]], texts, ids, rank_range=(1, 6), negatives=9,
        corpus_embeddings=emb, show_progress=False,
    )  # fmt: skip
    assert result.rows[0].neg_ids == ["d2", "d3", "d5"]
    r = result.report
    assert (r.removed_as_positive, r.removed_same_as_query, r.removed_duplicate_text) == (1, 1, 1)


def test_margin_drops_exactly_the_candidates_above_the_threshold() -> None:
    # Positive d2 scores 0.75; candidates score 0.875 (d1, above it!), 0.8125, 0.6875, 0.625,
    # 0.5625, 0.5.
    scores = [1.0, 0.875, 0.75, 0.8125, 0.6875, 0.625, 0.5625, 0.5]
    texts, ids, emb = scored_corpus(scores)
    enc = StubEncoder({"q": [1.0, 0.0]})

    def mine(**guard: float) -> list[str]:
        result = mine_negatives(
            enc, ["q"], [["doc 2"]], texts, ids, positive_ids=[["d2"]], rank_range=(2, 8),
            negatives=20, corpus_embeddings=emb, show_progress=False, **guard,
        )  # fmt: skip
        mine.report = result.report  # type: ignore[attr-defined]
        return result.rows[0].neg_ids or []

    assert mine() == ["d1", "d3", "d4", "d5", "d6", "d7"]
    assert mine.report.removed_by_margin == 0  # type: ignore[attr-defined]
    # margin 1/16: keep score <= 0.75 - 0.0625 = 0.6875 (equal is kept).
    assert mine(margin=0.0625) == ["d4", "d5", "d6", "d7"]
    assert mine.report.removed_by_margin == 2  # type: ignore[attr-defined]
    # margin 0: anything scoring above the positive goes.
    assert mine(margin=0.0) == ["d4", "d5", "d6", "d7"]
    # relative 1/4: keep score <= 0.75 * 0.75 = 0.5625.
    assert mine(relative_margin=0.25) == ["d6", "d7"]
    assert mine.report.removed_by_margin == 4  # type: ignore[attr-defined]


def test_margin_uses_the_lowest_positive_even_when_it_is_not_retrieved() -> None:
    texts, ids, emb = scored_corpus(SCORES)  # 1, 15/16, ..., 5/16
    enc = StubEncoder({"q": [1.0, 0.0], "outside pool": [0.5, 0.0]})
    # Positives: d1 (15/16, retrieved) and d11 (5/16, outside the top 6).
    result = mine_negatives(
        enc, ["q"], [["doc 1", "doc 11"]], texts, ids, positive_ids=[["d1", "d11"]],
        rank_range=(1, 6), negatives=10, margin=0.0, corpus_embeddings=emb, show_progress=False,
    )  # fmt: skip
    assert result.rows[0].neg_ids == []  # everything in the window outscores 5/16
    assert result.rows[0].pos_scores == [15 / 16, 5 / 16]
    assert result.report.positives_outside_search == 1
    assert result.report.rows_empty == 1 and result.report.rows_short == 1

    # A positive that is not in the pool at all is encoded on its own and scored.
    result = mine_negatives(
        enc, ["q"], [["outside pool"]], texts, ids, rank_range=(1, 12), negatives=20,
        margin=0.0, corpus_embeddings=emb, show_progress=False,
    )  # fmt: skip
    assert enc.passage_calls == [["outside pool"]]
    assert result.rows[0].pos_scores == [0.5]
    assert result.rows[0].neg_ids == ["d8", "d9", "d10", "d11"]  # scores 0.5 and below


def test_sampling_is_seeded_and_per_row() -> None:
    texts, ids, emb = scored_corpus([1 - i / 64 for i in range(40)])
    enc = StubEncoder({f"q{i}": [1.0, 0.0] for i in range(3)})
    queries = ["q0", "q1", "q2"]

    def mine(seed: int, n_queries: int = 3) -> list[list[str]]:
        result = mine_negatives(
            enc, queries[:n_queries], [["doc 0"]] * n_queries, texts, ids, rank_range=(2, 40),
            negatives=5, seed=seed, corpus_embeddings=emb, show_progress=False,
        )  # fmt: skip
        for row in result.rows:
            assert len(row.neg) == 5 and len(set(row.neg)) == 5  # without replacement
            assert row.neg_ranks == sorted(row.neg_ranks)
        return [row.neg_ids or [] for row in result.rows]

    first = mine(seed=7)
    assert mine(seed=7) == first
    assert mine(seed=8) != first
    assert len({tuple(r) for r in first}) == 3  # identical queries still get their own draws
    assert mine(seed=7, n_queries=2) == first[:2]  # --limit gives a prefix of the full run


def test_real_encoder_never_returns_a_positive(tiny_model: Path) -> None:
    from embtune.models.encoder import Encoder

    enc = Encoder.from_pretrained(tiny_model, pooling="mean")
    corpus = [f"passage number {i} about topic {i % 7}" for i in range(60)]
    ids = [f"p{i}" for i in range(60)]
    corpus.append(corpus[3])  # same text as a positive, different id
    ids.append("copy-of-p3")
    queries = [f"question about topic {i}" for i in range(7)]
    pos_ids = [[f"p{i}", f"p{i + 7}"] for i in range(7)]
    positives = [[corpus[int(p[1:])] for p in row] for row in pos_ids]
    result = mine_negatives(
        enc, queries, positives, corpus, ids, positive_ids=pos_ids, rank_range=(1, 61),
        negatives=60, show_progress=False,
    )  # fmt: skip
    assert result.corpus_embeddings.shape == (61, 32)
    assert result.query_embeddings.shape == (7, 32)
    for row in result.rows:
        assert not set(row.neg_ids or []) & set(row.pos_ids or [])
        assert not set(row.neg) & set(row.pos)
        assert all(1 <= r <= 61 for r in row.neg_ranks)
    # Reusing the returned corpus embeddings gives the same result without re-encoding.
    again = mine_negatives(
        enc, queries, positives, corpus, ids, positive_ids=pos_ids, rank_range=(1, 61),
        negatives=60, corpus_embeddings=result.corpus_embeddings, show_progress=False,
    )  # fmt: skip
    assert [r.neg_ids for r in again.rows] == [r.neg_ids for r in result.rows]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10:100", (10, 100)), ("1:1", (1, 1)), (" 3 : 7 ", (3, 7))],
)
def test_parse_range_accepts(text: str, expected: tuple[int, int]) -> None:
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["100:10", "0:5", "a:b", "10", "10-100", "-1:5", "1:2:3"])
def test_parse_range_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="^--range: "):
        parse_range(text)


def test_library_rejects_bad_arguments() -> None:
    texts, ids, emb = scored_corpus(SCORES)
    enc = StubEncoder({"q": [1.0, 0.0]})
    common = dict(corpus_embeddings=emb, show_progress=False)
    with pytest.raises(UsageError, match="--negatives"):
        mine_negatives(enc, ["q"], [["doc 0"]], texts, ids, negatives=0, **common)
    with pytest.raises(UsageError, match="--margin and --relative-margin"):
        mine_negatives(enc, ["q"], [["doc 0"]], texts, margin=0.1, relative_margin=0.1, **common)
    with pytest.raises(UsageError, match="--relative-margin"):
        mine_negatives(enc, ["q"], [["doc 0"]], texts, relative_margin=1.0, **common)
    with pytest.raises(ValueError, match="corpus_embeddings"):
        mine_negatives(enc, ["q"], [["doc 0"]], texts, corpus_embeddings=emb[:3])


# --- input files ----------------------------------------------------------------------------


def write_beir(folder: Path) -> Path:
    folder.mkdir()
    docs = [
        ("d1", "Cells", "A cell is the basic unit of life."),
        ("d2", "Mitochondria", "Mitochondria make energy for the cell."),
        ("d3", "Rivers", "A river flows to the sea."),
        ("d4", "Mountains", "Mountains are high."),
        ("d5", "", "Photosynthesis turns light into sugar."),
        ("d6", "Stars", "Stars are balls of hot gas."),
        ("d7", "Cells", "A cell is the basic unit of life."),  # same text as d1
        ("d8", "Bees", "Bees make honey."),
    ]
    with (folder / "corpus.jsonl").open("w") as f:
        for did, title, text in docs:
            f.write(json.dumps({"_id": did, "title": title, "text": text}) + "\n")
    queries = [("q1", "what is a cell"), ("q2", "how do plants eat"), ("q3", "what is a star")]
    with (folder / "queries.jsonl").open("w") as f:
        for qid, text in queries:
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (folder / "qrels").mkdir()
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\nq2\td5\t2\nq3\td6\t0\n"
    )
    return folder


def test_load_mining_input_from_beir(tmp_path: Path) -> None:
    data = load_mining_input(write_beir(tmp_path / "beir"), "train")
    assert data.queries == ["what is a cell", "how do plants eat"]
    assert data.positive_ids == [["d1", "d2"], ["d5"]]
    assert data.query_ids == ["q1", "q2"]
    assert data.skipped_queries == 1  # q3 has only a relevance-0 judgement
    assert len(data.corpus_texts) == 8 and data.corpus_ids is not None
    assert load_mining_input(tmp_path / "beir", "train", limit=1).queries == ["what is a cell"]
    with pytest.raises(UsageError, match="--candidates"):
        load_mining_input(tmp_path / "beir", "train", candidates=tmp_path / "x.jsonl")


def test_load_mining_input_from_jsonl_pool_and_candidates(tmp_path: Path) -> None:
    rows = [
        {"query": "q a", "pos": ["alpha"], "neg": ["beta", "gamma"], "prompt": "Find: "},
        {"query": "q b", "pos": ["beta "], "neg": ["delta"], "neg_scores": [0.5]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_mining_input(path)
    assert data.corpus_texts == ["alpha", "beta", "gamma", "delta"]  # "beta " is a repeat
    assert data.prompts == ["Find: ", None]
    assert data.corpus_ids is None

    toy = FLAG_DIR / "research_old-examples_finetune_toy_evaluation_data_toy_corpus.json"
    data = load_mining_input(path, candidates=toy)
    assert data.corpus_texts[0] == "A is ..."


def test_read_candidates_formats_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "pool.jsonl"
    good.write_text('{"text": "one", "_id": "a"}\n\n{"content": "two", "id": 2}\n{"text": "one"}\n')
    assert read_candidates(good) == (["one", "two"], ["a", "2"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"body": "two"}\n{"text": "  "}\n')
    with pytest.raises(InputError) as info:
        read_candidates(bad)
    assert [str(p) for p in info.value.problems] == [
        f"{bad}:2: field 'text': missing (expected 'text' or 'content')",
        f"{bad}:3: field 'text': must not be empty or whitespace",
    ]


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embtune.mining.negatives import MinedRow

    rows = [MinedRow("q", ["p"], [f"n{i}"], [0.9], [0.1], [3]) for i in range(3)]
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    calls = {"n": 0}
    real = MinedRow.to_json

    def failing(self: MinedRow, include_scores: bool = True) -> dict:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(self, include_scores)

    monkeypatch.setattr(MinedRow, "to_json", failing)
    with pytest.raises(OSError, match="disk full"):
        write_mined_jsonl(rows, out)
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left

    monkeypatch.setattr(MinedRow, "to_json", real)
    write_mined_jsonl(rows, out, include_scores=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["neg"] for r in lines] == [["n0"], ["n1"], ["n2"]]
    assert "neg_scores" not in lines[0] and "query_id" not in lines[0]


# --- command line -----------------------------------------------------------------------------


def test_cli_mines_a_beir_folder(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beir = write_beir(tmp_path / "beir")
    out = tmp_path / "mined.jsonl"
    args = ["mine", "--model", str(tiny_model), "--data", str(beir), "--range", "1:8"]
    code = main([*args, "--negatives", "3", "--relative-margin", "0.0", "-o", str(out)])
    assert code == 0
    shown = capsys.readouterr().out
    assert "removed as positives" in shown and str(out) in shown
    records = read_flag_jsonl([out])
    assert [r.query for r in records] == ["what is a cell", "how do plants eat"]
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    for row in raw:
        assert row["query_id"] in {"q1", "q2"}
        assert not set(row["neg_ids"]) & set(row["pos_ids"])
        assert not set(row["neg"]) & set(row["pos"])
        if row["query_id"] == "q1":
            assert "d7" not in row["neg_ids"]  # same text as positive d1
        assert len(row["neg"]) == len(row["neg_scores"]) == len(row["neg_ranks"]) <= 3
        assert all(s <= min(row["pos_scores"]) for s in row["neg_scores"])  # relative 0 guard

    # Same command, same file: refused without --overwrite; with it, the seeded run repeats.
    first = out.read_text()
    again = [*args, "--negatives", "3", "--relative-margin", "0.0", "-o", str(out)]
    assert main(again) == 2
    assert f"--output: {out} exists; pass --overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0
    assert out.read_text() == first


def test_cli_mines_flagembedding_jsonl_with_toy_corpus(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "train.jsonl"
    src.write_text(
        json.dumps({"query": "what is A", "pos": ["A is ..."], "neg": [], "prompt": "Q: "}) + "\n"
    )
    out = tmp_path / "mined.jsonl"
    toy = FLAG_DIR / "research_old-examples_finetune_toy_evaluation_data_toy_corpus.json"
    code = main(
        ["mine", "--model", str(tiny_model), "--data", str(src), "--candidates", str(toy),
         "--range", "1:4", "--negatives", "2", "-o", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (record,) = read_flag_jsonl([out])
    assert record.prompt == "Q: "
    assert len(record.neg) == 2 and "A is ..." not in record.neg


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--range", "100:10", "--range"),
        ("--range", "0:5", "--range"),
        ("--range", "ten:100", "--range"),
        ("--negatives", "0", "--negatives"),
        ("--negatives", "many", "--negatives"),
        ("--margin", "nan", "--margin"),
        ("--batch-size", "0", "--batch-size"),
    ],
)
def test_cli_bad_options_exit_2_without_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, named: str
) -> None:
    out = tmp_path / "mined.jsonl"
    # The model path does not exist: the option check must come first and never load it.
    code = main(
        ["mine", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path), option, value,
         "-o", str(out)]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"embtune mine: error: {named}: ")
    assert not out.exists()


def test_cli_both_margins_and_bad_data_exit_2(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mined.jsonl"
    base = ["mine", "--model", str(tiny_model), "-o", str(out)]
    code = main([*base, "--data", str(tmp_path), "--margin", "0.1", "--relative-margin", "0.1"])
    assert code == 2
    assert "--margin and --relative-margin" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": []}\n')
    assert main([*base, "--data", str(bad)]) == 2
    assert f"{bad}:1: field 'pos'" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "missing")]) == 2
    assert "--data" in capsys.readouterr().err
    assert not out.exists()
    assert main([*base, "--data", str(bad), "-o", str(tmp_path / "nope" / "x.jsonl")]) == 2
    assert "--output: folder" in capsys.readouterr().err


def test_cli_refuses_an_output_folder_it_cannot_write_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beir = write_beir(tmp_path / "beir")
    with read_only_folder(tmp_path) as folder:
        out = folder / "mined.jsonl"
        # The model does not exist: the refusal must come before it would load.
        argv = ["mine", "--model", str(tmp_path / "no-model"), "--data", str(beir), "-o", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [
            f"embtune mine: error: --output: cannot write to folder {folder}: permission denied"
        ]
        assert not out.exists()


def test_cli_refuses_to_write_over_an_input_or_an_existing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"text": "p"}\n')
    linked = tmp_path / "linked.jsonl"
    linked.hardlink_to(src)
    beir = write_beir(tmp_path / "beir")
    # The model does not exist: every refusal comes before it would load.
    base = ["mine", "--model", str(tmp_path / "no-model"), "--overwrite"]
    for data, out, extra, named in (
        (src, src, [], src),
        (src, linked, [], src),  # the same file under another name
        (tmp_path, src, [], linked),  # a folder of jsonl files: the first one that is it
        (src, pool, ["--candidates", str(pool)], pool),
        (beir, beir / "corpus.jsonl", [], beir / "corpus.jsonl"),
        (beir, beir / "qrels" / "train.tsv", [], beir / "qrels" / "train.tsv"),
    ):
        before = out.read_bytes()
        assert main([*base, "--data", str(data), "-o", str(out), *extra]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"embtune mine: error: --output: {out} is one of the input files ({named}); write "
            "the mined rows to another file"
        ]
        assert out.read_bytes() == before
    # Any other existing file needs --overwrite.
    other = tmp_path / "old-mined.jsonl"
    other.write_text("keep me\n")
    argv = ["mine", "--model", str(tmp_path / "no-model"), "--data", str(src), "-o", str(other)]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"embtune mine: error: --output: {other} exists; pass --overwrite to replace it"
    ]
    assert other.read_text() == "keep me\n"
    # A BEIR folder's other splits are not inputs of this one.
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
    assert main([*base, "--data", str(beir), "-o", str(beir / "qrels" / "test.tsv")]) == 2
    assert "no-model" in capsys.readouterr().err  # got as far as loading the model


def test_cli_a_full_disk_while_writing_stops_with_status_3_and_no_partial_file(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import errno

    from embtune.mining.negatives import MinedRow

    real = MinedRow.to_json
    calls = {"n": 0}

    def disk_fills(self: MinedRow, include_scores: bool = True) -> dict:
        calls["n"] += 1
        if calls["n"] == 2:  # the first row is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, include_scores)

    monkeypatch.setattr(MinedRow, "to_json", disk_fills)
    beir = write_beir(tmp_path / "beir")
    out = tmp_path / "out" / "mined.jsonl"
    out.parent.mkdir()
    argv = ["mine", "--model", str(tiny_model), "--data", str(beir), "--range", "1:8"]
    assert main([*argv, "-o", str(out)]) == 3
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("embtune")] == [
        f"embtune mine: stopped: could not write {out}: No space left on device; the mining was "
        "done but not saved: free some space (or choose another -o) and run the command again"
    ]
    assert list(out.parent.iterdir()) == []  # neither the file nor its temporary file


def test_cli_skip_bad_rows_mines_the_good_rows_and_lists_the_bad_ones(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "train.jsonl"
    good = [
        {"query": f"question {i}", "pos": [f"answer {i}"], "neg": [f"other {i}"]} for i in range(3)
    ]
    lines = [json.dumps(good[0]), '{"query": "no positive", "pos": []}', json.dumps(good[1])]
    src.write_text("\n".join([*lines, "{not json", json.dumps(good[2])]) + "\n")
    out = tmp_path / "mined.jsonl"
    report = tmp_path / "mined.rejected_rows.jsonl"
    argv = ["mine", "--model", str(tiny_model), "--data", str(src), "--range", "1:6"]
    assert main([*argv, "--negatives", "2", "-o", str(out)]) == 2  # refused by default
    assert f"{src}:2: field 'pos'" in capsys.readouterr().err
    assert not out.exists() and not report.exists()

    assert main([*argv, "--negatives", "2", "-o", str(out), "--skip-bad-rows"]) == 0
    shown = capsys.readouterr().out
    assert [r.query for r in read_flag_jsonl([out])] == ["question 0", "question 1", "question 2"]
    listed = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in listed] == [(str(src), 2), (str(src), 4)]
    assert listed[0]["field"] == "pos"
    [line] = [line for line in shown.splitlines() if line.startswith("bad input rows left out")]
    assert line.endswith(f"  2 (listed in {report})"), line

    # The report is an output too: an earlier one is replaced only with --overwrite.
    out.unlink()
    assert main([*argv, "-o", str(out), "--skip-bad-rows"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"embtune mine: error: --output: {report} exists; pass --overwrite to replace it"
    ]
    assert not out.exists()


def test_skip_bad_rows_of_a_beir_folder(tmp_path: Path) -> None:
    beir = write_beir(tmp_path / "beir")
    with (beir / "queries.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "q4", "text": "  "}) + "\n")
    with (beir / "qrels" / "train.tsv").open("a") as f:
        f.write("q4\td3\t1\n")
    with pytest.raises(InputError):
        load_mining_input(beir, "train")
    data = load_mining_input(beir, "train", skip_bad_rows=True)
    assert data.query_ids == ["q1", "q2"]
    assert [(Path(p.file).name, p.line) for p in data.rejected] == [
        ("queries.jsonl", 4),
        ("train.tsv", 6),  # the judgement of the rejected query goes with it
    ]
