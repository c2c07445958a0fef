"""`embtune eval --reranker`: retrieve (or read candidates), rerank, report both columns.

The reranked metrics are checked against a run built by hand from the reranker's own logits,
the first stage against `embtune eval` without a reranker, and every bad candidates file
against the one line it must produce.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)

from embtune import api
from embtune.cli import main
from embtune.data.formats import BeirDataset, load_beir
from embtune.errors import UsageError
from embtune.eval.candidates import read_candidates
from embtune.eval.reranking import load_reranker
from embtune.eval.retrieval import retrieval_metrics
from embtune.models.cross_encoder import CrossEncoder, RerankerSettings
from tests.conftest import minilm_path, single_thread, subprocess_env
from tests.test_eval_cli import write_beir
from tests.test_score import tiny_config

K = ["--k", "1", "3", "10"]
KS = (1, 3, 10)


def tiny_classifier(folder: Path, labels: int = 1) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier with random weights and MiniLM's tokenizer."""
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config(num_labels=labels)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_classifier(tmp_path_factory.mktemp("tiny-reranker"))


@pytest.fixture(scope="module")
def beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_beir(tmp_path_factory.mktemp("data") / "tiny-beir")


@pytest.fixture(scope="module")
def data(beir: Path) -> BeirDataset:
    return load_beir(beir, "test")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with single_thread():  # tiny models run many times faster on the shared CPU cores
        yield


def run_eval(*args: str | Path) -> int:
    return main(["eval", *map(str, args)])


def error_line(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """The one line a refused `embtune eval` prints (after checking it exits 2)."""
    assert run_eval(*args) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("embtune eval: error: ")
    return line.removeprefix("embtune eval: error: ")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_lines(path, [json.dumps(row) for row in rows])


def logit_run(reranker: Path, data: BeirDataset, lists: dict[str, list[str]]) -> dict:
    """The reranker's own logits of every listed pair, one pair per forward pass."""
    tokenizer = AutoTokenizer.from_pretrained(reranker)
    model = AutoModelForSequenceClassification.from_pretrained(reranker).eval()
    run: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for qid, docs in lists.items():
            for doc in docs:
                pair = tokenizer(data.queries[qid], data.corpus[doc], return_tensors="pt")
                run.setdefault(qid, {})[doc] = model(**pair).logits.item()
    return run


def metrics_of(record: dict) -> dict[str, float]:
    return {key: value for key, value in record.items() if "@" in key}


# --- with a retriever ----------------------------------------------------------------------


def test_rerank_after_retrieval_equals_the_logits_and_plain_eval(
    tiny_model, reranker, beir, data, tmp_path, capsys
) -> None:
    plain, reranked = tmp_path / "plain.json", tmp_path / "reranked.json"
    assert run_eval("--model", tiny_model, "--data", beir, *K, "--json", plain) == 0
    capsys.readouterr()
    # Top 10 of a 6-document corpus: every document of every judged query is reranked.
    args = ["--model", tiny_model, "--data", beir, "--reranker", reranker, "--rerank-top-k", "10"]
    assert run_eval(*args, *K, "--json", reranked, "--rerank-batch-size", "4") == 0
    record = json.loads(reranked.read_text())
    assert record["first_stage"] == metrics_of(json.loads(plain.read_text()))
    everything = {qid: list(data.corpus) for qid in data.qrels}
    expected = retrieval_metrics(logit_run(reranker, data, everything), data.qrels, KS)
    assert record["reranked"] == pytest.approx(expected, abs=1e-12)
    assert record["reranked"] != record["first_stage"]  # a random reranker reorders
    assert record["model"] == str(tiny_model) and record["reranker"] == str(reranker)
    assert record["top_k"] == 10 and record["candidates"] is None
    assert record["pairs"] == {"total": 18, "distinct": 18, "cached": 0, "scored": 18}
    assert record["queries"] == 3 and record["corpus_size"] == 6
    assert record["settings"]["pooling"] == "cls"
    assert record["reranker_settings"]["max_length"] == 512  # not an embtune reranker
    assert record["seconds"] >= record["first_stage_seconds"] + record["rerank_seconds"] > 0
    assert not metrics_of(record)  # the metrics are in the two blocks only
    screen = capsys.readouterr().out.splitlines()
    assert screen[0].startswith(f"model {tiny_model} | data {beir} (test) | 3 queries")
    assert screen[1].startswith(f"reranker {reranker} | top 10 of each query: 18 pairs")
    assert screen[2].split() == ["metric", "first", "stage", "reranked", "change"]
    before, after = record["first_stage"]["ndcg@10"], record["reranked"]["ndcg@10"]
    row = screen[5].split()
    assert row[:3] == ["nDCG@10", f"{before:.4f}", f"{after:.4f}"]
    assert float(row[3]) == pytest.approx(after - before, abs=1e-4)


def test_only_the_top_k_are_reranked_and_cut_offs_past_them_say_so(
    tiny_model, reranker, beir, tmp_path, capsys
) -> None:
    out = tmp_path / "top2.json"
    args = ["--model", tiny_model, "--data", beir, "--reranker", reranker, "--rerank-top-k", "2"]
    assert run_eval(*args, "--k", "2", "3", "10", "--json", out) == 0
    record = json.loads(out.read_text())
    assert record["pairs"]["total"] == 3 * 2
    reranked, first = record["reranked"], record["first_stage"]
    # Two candidates: @3 and @10 count the same two documents, the rest are unretrieved, so
    # reranking reorders the retriever's top 2 but finds nothing it did not return.
    for metric in ("ndcg", "recall", "map", "mrr"):
        assert reranked[f"{metric}@3"] == reranked[f"{metric}@10"]
    assert reranked["recall@10"] == first["recall@2"] < first["recall@10"]
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (
        "note: reranked metrics at @3, @10 count only the top 2 candidates of each query; "
        "documents below them are unretrieved"
    )


def test_pair_scores_are_cached_across_evaluations(
    tiny_model, reranker, beir, data, tmp_path, monkeypatch
) -> None:
    from embtune.scoring.teachers import CrossEncoderTeacher

    cache = tmp_path / "cache"
    first, again, other = tmp_path / "first.json", tmp_path / "again.json", tmp_path / "o.json"
    base = ["--data", beir, "--reranker", reranker, "--cache-dir", cache, *K]
    assert run_eval(*base, "--model", tiny_model, "--json", first) == 0
    assert len(list(cache.glob("scores-*.sqlite"))) == 1
    assert len(list(cache.glob("corpus-*.pt"))) == 1  # the retriever's corpus, as eval caches

    def no_scoring(*args: object) -> list[float]:
        raise AssertionError("a cached pair was scored again")

    monkeypatch.setattr(CrossEncoderTeacher, "score_pairs", no_scoring)
    assert run_eval(*base, "--model", tiny_model, "--json", again) == 0
    record = json.loads(again.read_text())
    assert record["pairs"] == {"total": 18, "distinct": 18, "cached": 18, "scored": 0}
    assert record["reranked"] == json.loads(first.read_text())["reranked"]
    monkeypatch.undo()
    # Another first stage's lists: the pairs scored before (here all of them) are not again.
    lists = write_jsonl(tmp_path / "c.jsonl", [{"query_id": "q1", "doc_ids": ["d1", "d2"]}])
    assert run_eval(*base, "--candidates", lists, "--json", other) == 0
    assert json.loads(other.read_text())["pairs"]["scored"] == 0


def test_a_non_finite_reranker_score_stops_with_status_3_and_no_json(
    tiny_model, reranker, beir, tmp_path, capsys, monkeypatch
) -> None:
    from embtune.scoring.teachers import CrossEncoderTeacher

    monkeypatch.setattr(CrossEncoderTeacher, "score_pairs", lambda self, q, p: [math.nan] * len(q))
    out = tmp_path / "out.json"
    args = ["--model", tiny_model, "--data", beir, "--reranker", reranker, "--json", out]
    assert run_eval(*args) == 3
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("embtune eval: stopped: the teacher scored the pair (query ")
    assert line.endswith("pairs were not scored (is the model broken, or overflowing in --bf16?)")
    assert not out.exists()


def test_skip_bad_rows_reports_the_rows_left_out(tiny_model, reranker, tmp_path, capsys) -> None:
    beir = write_beir(tmp_path / "with-a-bad-row")
    with (beir / "corpus.jsonl").open("a") as f:
        f.write('{"_id": "d7", "text": }\n')
    out, report = tmp_path / "r.json", tmp_path / "r.rejected_rows.jsonl"
    args = ["--model", tiny_model, "--data", beir, "--reranker", reranker, "--json", out]
    assert run_eval(*args, "--skip-bad-rows") == 0
    last = capsys.readouterr().out.splitlines()[-1]
    left_out = "embtune eval: 1 bad rows of --data left out (--skip-bad-rows)"
    assert last == f"{left_out}, listed in {report}"
    assert json.loads(out.read_text())["rejected_rows"] == 1
    assert "corpus.jsonl" in report.read_text()


# --- with a candidates file ----------------------------------------------------------------


def test_candidates_file_is_reranked_and_compared_with_its_own_order(
    reranker, beir, data, tmp_path, capsys
) -> None:
    lists = {"q1": ["d3", "d2", "d1"], "q3": ["d6", "d3"]}  # q2 has no list: it scores 0
    rows = [{"query_id": "q1", "doc_ids": lists["q1"]}, {"qid": "q3", "docids": lists["q3"]}]
    candidates, out = write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "c.json"
    base = ["--reranker", reranker, "--candidates", candidates, "--data", beir]
    assert run_eval(*base, *K, "--json", out) == 0
    record = json.loads(out.read_text())
    assert record["first_stage"] == retrieval_metrics(lists, data.qrels, KS)
    expected = retrieval_metrics(logit_run(reranker, data, lists), data.qrels, KS)
    assert record["reranked"] == pytest.approx(expected, abs=1e-12)
    assert record["model"] is None and record["candidates"] == str(candidates)
    assert record["missing_queries"] == 1 and record["settings"] is None
    assert record["pairs"]["total"] == 5
    screen = capsys.readouterr().out.splitlines()
    assert screen[0] == f"candidates {candidates} | data {beir} (test) | 3 queries, 6 documents"
    assert screen[-1] == (
        f"note: 1 of the 3 judged queries have no list in {candidates}: they score 0 in both "
        "columns"
    )
    # --rerank-top-k cuts each list: q1's first document alone is reranked, ranked first.
    assert run_eval(*base, *K, "--json", out, "--rerank-top-k", "1") == 0
    record = json.loads(out.read_text())
    assert record["pairs"]["total"] == 2
    cut = {qid: docs[:1] for qid, docs in lists.items()}
    assert record["reranked"] == retrieval_metrics(cut, data.qrels, KS)


def test_trec_run_and_mteb_json_hold_the_reranked_ranking_and_metrics(
    reranker, beir, data, tmp_path
) -> None:
    from tests.test_eval_cli import read_trec_run

    lists = {"q1": ["d3", "d2", "d1"], "q3": ["d6", "d3"]}
    rows = [{"query_id": qid, "doc_ids": docs} for qid, docs in lists.items()]
    candidates = write_jsonl(tmp_path / "c.jsonl", rows)
    out, run_file, mteb = tmp_path / "c.json", tmp_path / "reranked.trec", tmp_path / "m.json"
    base = ["--reranker", reranker, "--candidates", candidates, "--data", beir, *K]
    files = ["--trec-run", run_file, "--mteb-json", mteb, "--mteb-task-name", "Tiny"]
    assert run_eval(*base, "--json", out, "--rerank-top-k", "2", *files) == 0
    record = json.loads(out.read_text())
    # Each list's top 2, ranked by the reranker's own logits.
    logits = logit_run(reranker, data, {qid: docs[:2] for qid, docs in lists.items()})
    lines = read_trec_run(run_file)
    assert list(lines) == ["q1", "q3"]
    for qid, rows in lines.items():
        assert [doc for doc, *_ in rows] == sorted(logits[qid], key=logits[qid].get, reverse=True)
        assert [rank for _, rank, _, _ in rows] == [1, 2]
        assert [score for _, _, score, _ in rows] == pytest.approx(
            sorted(logits[qid].values(), reverse=True), abs=1e-5
        )
    run = {qid: {doc: score for doc, _, score, _ in rows} for qid, rows in lines.items()}
    assert retrieval_metrics(run, data.qrels, KS) == record["reranked"]
    result = json.loads(mteb.read_text())
    assert result["task_name"] == "Tiny"
    [scores] = result["scores"]["test"]
    assert scores["main_score"] == scores["ndcg_at_10"] == record["reranked"]["ndcg@10"]
    assert scores["recall_at_3"] == record["reranked"]["recall@3"]


def test_trec_run_is_ranked_by_score_as_trec_eval_ranks(data, tmp_path) -> None:
    run = write_lines(
        tmp_path / "run.trec",
        [
            "q1 Q0 d2 1 0.5 bm25",  # the rank column is not read: scores decide
            "q1 Q0 d1 2 2.25 bm25",
            "q2\tQ0\td5\t1\t-3e-1\tbm25",  # tabs and exponents
            "",
            "q1 Q0 d4 3 0.5 bm25",  # tied with d2: the higher doc id first, as trec_eval
        ],
    )
    assert read_candidates(run, data) == {"q1": ["d1", "d4", "d2"], "q2": ["d5"]}
    jsonl = write_jsonl(
        tmp_path / "c.txt",  # told by its first character, not its name
        [{"query_id": "q3", "doc_ids": ["d6", "d3"]}, {"qid": "q1", "docids": ["d2"]}],
    )
    assert read_candidates(jsonl, data) == {"q3": ["d6", "d3"], "q1": ["d2"]}


BAD_TREC = [
    ("q1 Q0 d1 1 0.5", 1, None, "expected 6 columns 'qid Q0 docid rank score tag', got 5"),
    ("q9 Q0 d1 1 0.5 x", 1, "qid", "unknown query id 'q9' (not in queries.jsonl)"),
    ("q1 Q0 d9 1 0.5 x", 1, "docid", "unknown document id 'd9' (not in corpus.jsonl)"),
    ("q1 Q0 d1 1 high x", 1, "score", "must be a number, got 'high'"),
    ("q1 Q0 d1 1 nan x", 1, "score", "must be a number, got 'nan'"),
    ("q1 Q0 d2 1 1 x\nq1 Q0 d2 2 0 x", 2, "docid", "'d2' is given twice for query 'q1' (first"),
]
BAD_JSONL = [
    ('{"query_id": "q1", "doc_ids": []}', 1, "doc_ids", "must not be empty"),
    ('{"query_id": "q1"}', 1, "doc_ids", "missing"),
    ('{"doc_ids": ["d1"]}', 1, "query_id", "missing"),
    ('{"query_id": "q9", "doc_ids": ["d1"]}', 1, "query_id", "unknown query id 'q9'"),
    ('{"query_id": "q1", "doc_ids": ["d1", "d9"]}', 1, "doc_ids", "unknown document id 'd9'"),
    ('{"query_id": "q1", "doc_ids": "d1"}', 1, "doc_ids", "must be a list of doc ids, got str"),
    ('{"query_id": "q1", "doc_ids": [1.5]}', 1, "doc_ids", "item 0 must be a string, got float"),
    ('{"query_id": "q1", "doc_ids": ["d1", "d1"]}', 1, "doc_ids", "'d1' is given twice"),
    (
        '{"query_id": "q1", "doc_ids": ["d1"]}\n{"query_id": "q1", "doc_ids": ["d2"]}',
        2,
        "query_id",
        "'q1' is given twice (first on line 1)",
    ),
    ('{"query_id": "q1", "doc_ids": ["d1"]}\n{"query_id": "q2",', 2, None, "malformed JSON"),
    ('{"query_id": "q1", "doc_ids": ["d1"]}\n["q2"]', 2, None, "expected a JSON object"),
]


@pytest.mark.parametrize(("text", "line", "field", "reason"), BAD_TREC + BAD_JSONL)
def test_a_bad_candidates_file_is_one_line_naming_file_line_and_field(
    reranker, beir, tmp_path, capsys, text, line, field, reason
) -> None:
    candidates = tmp_path / "candidates"
    candidates.write_text(text + "\n", encoding="utf-8")
    out = tmp_path / "out.json"
    message = error_line(
        capsys, "--reranker", reranker, "--candidates", candidates, "--data", beir, "--json", out
    )
    where = f"{candidates}:{line}: " + (f"field '{field}': " if field else "")
    assert message.startswith(where + reason), message
    assert not out.exists()


def test_a_bad_candidates_file_exits_2_without_a_traceback(reranker, beir, tmp_path) -> None:
    candidates = write_lines(tmp_path / "run.trec", ["q1 Q0 d1 1 0.5 x", "q1 Q0 d3 2 fast x"])
    out = tmp_path / "out.json"
    args = ["--reranker", reranker, "--candidates", candidates, "--data", beir, "--json", out]
    result = subprocess.run(
        [sys.executable, "-m", "embtune", "eval", *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"embtune eval: error: {candidates}:2: field 'score': must be a number, got 'fast'"
    ]
    assert not out.exists()


def test_empty_missing_and_unjudged_candidates_files_are_refused(
    reranker, beir, tmp_path, capsys
) -> None:
    base = ["--reranker", reranker, "--data", beir, "--candidates"]
    empty = write_lines(tmp_path / "empty.trec", [])
    assert error_line(capsys, *base, empty) == f"{empty}: file is empty"
    missing = tmp_path / "nope.trec"
    assert error_line(capsys, *base, missing) == f"{missing}: file does not exist"
    # q4 is judged in the train split only: nothing of the test split would be reranked.
    train_only = write_jsonl(tmp_path / "c.jsonl", [{"query_id": "q4", "doc_ids": ["d4"]}])
    assert error_line(capsys, *base, train_only) == (
        f"--candidates: {train_only} has a list for none of the 3 judged queries (is it a run "
        "of another split or data set?)"
    )


# --- options -------------------------------------------------------------------------------


@pytest.fixture
def candidates(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "c.jsonl", [{"query_id": "q1", "doc_ids": ["d1", "d2"]}])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "M", "--candidates", "C"], "--candidates: only with --reranker"),
        (["--model", "M", "--rerank-top-k", "5"], "--rerank-top-k: only with --reranker"),
        (["--reranker", "R"], "--model: required, to retrieve what the reranker reorders"),
        (["--reranker", "R", "--model", "M", "--candidates", "C"], "--candidates: the lists"),
        (["--reranker", "R", "--model", "M", "--dims", "16"], "--dims: not with --reranker"),
        (["--reranker", "R", "--candidates", "C", "--pooling", "mean"], "--pooling: an option"),
        (["--reranker", "R", "--candidates", "C", "--faiss"], "--faiss: an option"),
        (["--reranker", "R", "--model", "M", "--rerank-top-k", "0"], "--rerank-top-k: must be"),
        (["--reranker", "R", "--model", "M", "--rerank-batch-size", "x"], "--rerank-batch-size"),
        (["--reranker", "R", "--model", "M", "--rerank-max-length", "8"], "8 is outside 32..512"),
        (["--reranker", "R", "--candidates", "C", "--json", "C"], "one of the input files"),
        (
            ["--reranker", "R", "--candidates", "C", "--trec-run", "C"],
            "--trec-run: " + "{C} is "
            "one of the input files ({C}); write the ranking to another file",
        ),
        (
            ["--reranker", "R", "--candidates", "C", "--mteb-json", "m", "--k", "5"],
            "--mteb-json: MTEB's main score is nDCG@10",
        ),
    ],
)
def test_bad_combinations_are_refused_before_any_work(
    tiny_model, reranker, beir, candidates, tmp_path, capsys, args, message
) -> None:
    names = {"M": str(tiny_model), "R": str(reranker), "C": str(candidates)}
    if "--rerank-batch-size" in args:  # argparse takes ints: the API check is for Python
        with pytest.raises(UsageError, match="--rerank-batch-size: expected a whole number"):
            api.evaluate_reranking(reranker, beir, model=tiny_model, rerank_batch_size="x")
        return
    out = tmp_path / "out.json"
    json_args = [] if "--json" in args else ["--json", str(out)]
    line = error_line(capsys, "--data", beir, *[names.get(a, a) for a in args], *json_args)
    assert message.format(**names) in line
    assert not out.exists()


def test_without_model_or_reranker_the_old_message(beir, capsys) -> None:
    assert error_line(capsys, "--data", beir) == "the following arguments are required: --model"


def test_a_model_that_is_not_a_reranker_is_refused(tiny_model, tmp_path, beir, capsys) -> None:
    two_labels = tiny_classifier(tmp_path / "two-labels", labels=2)
    for model, shown in ((tiny_model, "BertModel"), (two_labels, "BertForSequenceClassification")):
        with pytest.raises(UsageError) as refused:
            load_reranker(str(model))
        assert str(refused.value) == (
            f"--reranker: {model} is not a reranker (a sequence classifier with one label): its "
            f"config.json has architectures {shown} and num_labels 2"
        )
    args = ["--data", beir, "--model", tiny_model, "--reranker", tmp_path / "none"]
    assert error_line(capsys, *args) == f"--reranker: folder {tmp_path / 'none'} does not exist"


def test_an_embtune_reranker_scores_with_its_saved_settings(reranker, tmp_path) -> None:
    saved = tmp_path / "embtune-reranker"
    settings = RerankerSettings(16, 48, 60, "query: ", "passage: ")
    model = AutoModelForSequenceClassification.from_pretrained(reranker)
    CrossEncoder(model, AutoTokenizer.from_pretrained(reranker), settings).save(saved)

    def pair_rule(name: Path, **options: object) -> tuple:
        s = load_reranker(str(name), **options).settings
        return s.pair_max_length, s.query_instruction, s.passage_instruction, s.precision

    assert pair_rule(saved, device=torch.device("cpu")) == (60, "query: ", "passage: ", "fp32")
    # Options override the saved settings; an empty instruction is one given.
    overridden = pair_rule(saved, max_length=100, query_instruction="", precision="bf16")
    assert overridden == (100, "", "passage: ", "bf16")
    # Another tool's reranker (no embtune_reranker.json): FlagReranker's defaults.
    assert pair_rule(reranker) == (512, None, None, "fp32")


def test_the_api_returns_both_columns_and_the_pairs(reranker, beir, candidates) -> None:
    result = api.evaluate_reranking(
        reranker,
        beir,
        candidates=candidates,
        k=[1, 3],
        rerank_max_length="64",  # text, as the command line passes it
        query_instruction_for_rerank="query: ",
        show_progress=False,
    )
    settings = result.reranking.settings
    assert (settings.pair_max_length, settings.query_instruction) == (64, "query: ")
    assert result.to_json()["reranker_settings"]["query_instruction"] == "query: "
    assert (
        set(result.first_stage)
        == set(result.reranked)
        == {f"{m}@{k}" for m in ("ndcg", "mrr", "recall", "map") for k in (1, 3)}
    )
    assert result.reranking.counts.pairs == 2 and result.reranking.top_k == 100
    assert result.missing_queries == 2 and result.first_stage.queries == 3
    assert result.reranking.cache_file is None
