"""`embtune eval` end to end on a tiny BEIR folder, plus the evaluation library around it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from embtune.cli import main
from embtune.data.formats import BeirDataset, load_beir
from embtune.errors import UsageError
from embtune.eval.retrieval import (
    corpus_cache_key,
    corpus_embeddings,
    evaluate_retrieval,
    retrieval_metrics,
    retrieve,
    search_top_k,
)
from embtune.models.encoder import POOLING_MODES, Encoder

DOCS = {
    "d1": ("Cells", "A cell is the basic structural unit of all living organisms."),
    "d2": ("Mitochondria", "Mitochondria produce most of the chemical energy of a cell."),
    "d3": ("Volcanoes", "A volcano is a rupture in the crust of a planet."),
    "d4": ("Rivers", "A river is a natural stream of water flowing towards an ocean."),
    "d5": ("Photosynthesis", "Plants turn light, water and carbon dioxide into sugar."),
    "d6": ("", "Tectonic plates move a few centimetres each year."),
}
QUERIES = {
    "q1": "what is a cell",
    "q2": "how do plants make sugar",
    "q3": "why do volcanoes erupt",
    "q4": "a query judged only in the train split",
}
TEST_QRELS = [("q1", "d1", 2), ("q1", "d2", 1), ("q2", "d5", 1), ("q3", "d3", 1), ("q3", "d6", 0)]


def write_beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as f:
        for doc_id, (title, text) in DOCS.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as f:
        for qid, text in QUERIES.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    rows = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in TEST_QRELS]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq4\td4\t1\n")
    return folder


@pytest.fixture
def beir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "tiny-beir")


@pytest.fixture(scope="module")
def encoder(tiny_model: Path) -> Encoder:
    return Encoder.from_pretrained(tiny_model, pooling="mean")


def run_eval(*args: str) -> int:
    return main(["eval", *args])


# --- the command ---------------------------------------------------------------------------


def test_eval_writes_json_and_table(tiny_model, beir, tmp_path, capsys) -> None:
    out = tmp_path / "results" / "eval.json"
    rc = run_eval(
        "--model", str(tiny_model), "--data", str(beir), "--json", str(out), "--k", "1", "3", "10"
    )
    assert rc == 0
    record = json.loads(out.read_text())
    metric_keys = {f"{m}@{k}" for m in ("ndcg", "mrr", "recall", "map") for k in (1, 3, 10)}
    assert metric_keys <= set(record)
    assert all(0.0 <= record[key] <= 1.0 for key in metric_keys)
    # The corpus has 6 documents, so @10 retrieves everything: every relevant one is found.
    assert record["recall@10"] == 1.0
    assert record["model"] == str(tiny_model) and record["data"] == str(beir)
    assert record["split"] == "test" and record["queries"] == 3 and record["corpus_size"] == 6
    assert record["seconds"] > 0
    assert record["settings"]["pooling"] == "cls"  # tiny model saves no settings: the default
    screen = capsys.readouterr().out
    assert "3 queries, 6 documents" in screen
    assert "nDCG" in screen and "Recall" in screen and "@10" in screen
    # Written atomically: no temporary file is left beside the result.
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]


def test_eval_overrides_and_limit(tiny_model, beir, tmp_path) -> None:
    out = tmp_path / "eval.json"
    rc = run_eval(
        "--model",
        str(tiny_model),
        "--data",
        str(beir),
        "--json",
        str(out),
        "--pooling",
        "mean",
        "--no-normalize",
        "--passage-max-len",
        "16",
        "--query-instruction",
        "query: ",
        "--limit-queries",
        "2",
    )
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["queries"] == 2 and record["corpus_size"] == 6
    settings = record["settings"]
    assert settings["pooling"] == "mean" and settings["normalize"] is False
    assert settings["passage_max_len"] == 16 and settings["query_instruction"] == "query: "


def test_eval_with_faiss_matches_exact(tiny_model, beir, tmp_path) -> None:
    pytest.importorskip("faiss")
    exact, approx = tmp_path / "exact.json", tmp_path / "faiss.json"
    base = ["--model", str(tiny_model), "--data", str(beir), "--k", "1", "3"]
    assert run_eval(*base, "--json", str(exact)) == 0
    assert run_eval(*base, "--json", str(approx), "--faiss") == 0
    metrics = {k: v for k, v in json.loads(exact.read_text()).items() if "@" in k}
    assert {k: v for k, v in json.loads(approx.read_text()).items() if "@" in k} == metrics


def test_faiss_missing_exit_2(tiny_model, beir, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    assert run_eval("--model", str(tiny_model), "--data", str(beir), "--faiss") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install faiss-cpu" in err[0]


def test_a_json_file_that_cannot_be_written_is_refused_before_the_work(
    beir, tmp_path, capsys
) -> None:
    from tests.test_atomic import read_only_folder

    with read_only_folder(tmp_path) as folder:
        out = folder / "results" / "eval.json"  # results/ would be made: its parent is checked
        # The model does not exist: the refusal comes before it would load.
        assert (
            run_eval("--model", str(tmp_path / "no-model"), "--data", str(beir), "--json", str(out))
            == 2
        )
        assert capsys.readouterr().err.splitlines() == [
            f"embtune eval: error: --json: cannot write to folder {folder}: permission denied"
        ]
        assert not out.parent.exists()


def test_a_full_disk_when_writing_the_json_stops_with_status_3(
    tiny_model, beir, tmp_path, capsys, monkeypatch
) -> None:
    from tests.test_atomic import json_writer_on_a_full_disk

    monkeypatch.setattr("embtune.atomic.write_json_atomically", json_writer_on_a_full_disk)
    out = tmp_path / "results" / "eval.json"
    assert run_eval("--model", str(tiny_model), "--data", str(beir), "--json", str(out)) == 3
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"embtune eval: stopped: could not write {out}: No space left on device; the evaluation "
        "was done but not saved: free some space (or choose another --json) and run the command "
        "again"
    ]
    assert "nDCG" not in captured.out  # nothing printed as if it had worked
    assert list(out.parent.iterdir()) == []  # no file, no temporary file


def test_skip_bad_rows_evaluates_the_good_rows_and_lists_the_bad_ones(
    tiny_model, beir, tmp_path, capsys
) -> None:
    with (beir / "corpus.jsonl").open("a") as f:
        f.write('{"_id": "d7", "text": }\n')
    base = ["--model", str(tiny_model), "--data", str(beir)]
    assert run_eval(*base) == 2  # refused by default
    capsys.readouterr()
    out = tmp_path / "results" / "eval.json"
    report = tmp_path / "results" / "eval.rejected_rows.jsonl"
    assert run_eval(*base, "--json", str(out), "--skip-bad-rows") == 0
    printed = capsys.readouterr().out.splitlines()
    assert (
        printed[-1]
        == f"embtune eval: 1 bad rows of --data left out (--skip-bad-rows), listed in {report}"
    )
    assert json.loads(out.read_text())["rejected_rows"] == 1
    [listed] = [json.loads(line) for line in report.read_text().splitlines()]
    assert (Path(listed["file"]).name, listed["line"]) == ("corpus.jsonl", 7)
    assert "malformed JSON" in listed["reason"]
    # Without --json there is no file to put the list beside: the first problem is shown.
    assert run_eval(*base, "--skip-bad-rows") == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(
        "embtune eval: 1 bad rows of --data left out (--skip-bad-rows), the first: "
    )
    assert "corpus.jsonl:7" in last and last.endswith("; add --json FILE to list them all")
    # Without the option the record has no such key.
    assert run_eval(*base[:3], str(write_beir(tmp_path / "clean")), "--json", str(out)) == 0
    assert "rejected_rows" not in json.loads(out.read_text())


def test_a_json_file_over_the_data_is_refused(beir, tmp_path, capsys) -> None:
    corpus = beir / "corpus.jsonl"
    before = corpus.read_bytes()
    model = str(tmp_path / "no-model")  # refused before it would load
    assert run_eval("--model", model, "--data", str(beir), "--json", str(corpus)) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"embtune eval: error: --json: {corpus} is one of the input files ({corpus}); write the "
        "metrics to another file"
    ]
    assert corpus.read_bytes() == before


def test_bad_split_names_the_file(tiny_model, beir, capsys) -> None:
    rc = run_eval("--model", str(tiny_model), "--data", str(beir), "--split", "dev")
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(beir / "qrels" / "dev.tsv") in err[0]
    assert "available splits: test, train" in err[0]


def test_bad_data_is_one_line_per_problem(tiny_model, beir, capsys) -> None:
    with (beir / "corpus.jsonl").open("a") as f:
        f.write('{"_id": "d7", "text": }\n')
    rc = run_eval("--model", str(tiny_model), "--data", str(beir))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corpus.jsonl:7" in err[0] and "malformed JSON" in err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "0"], "--k"),
        (["--batch-size", "0"], "--batch-size"),
        (["--limit-queries", "-1"], "--limit-queries"),
        (["--passage-max-len", "100000"], "--passage-max-len"),
        (["--device", "nonsense"], "--device"),
    ],
)
def test_bad_options_exit_2(tiny_model, beir, capsys, args, message) -> None:
    assert run_eval("--model", str(tiny_model), "--data", str(beir), *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_data_folder_exit_2(tiny_model, tmp_path, capsys) -> None:
    assert run_eval("--model", str(tiny_model), "--data", str(tmp_path / "nope")) == 2
    assert "data folder does not exist" in capsys.readouterr().err


def test_cache_is_reused(tiny_model, beir, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    base = ["--model", str(tiny_model), "--data", str(beir), "--cache-dir", str(cache)]
    assert run_eval(*base, "--json", str(first)) == 0
    entries = list(cache.glob("corpus-*.pt"))
    assert len(entries) == 1
    stored = torch.load(entries[0], weights_only=True)
    assert stored["ids"] == list(DOCS) and stored["embeddings"].shape == (6, 32)

    def no_encoding(*args, **kwargs):
        raise AssertionError("passages were encoded although they are cached")

    monkeypatch.setattr(Encoder, "encode_passages", no_encoding)
    assert run_eval(*base, "--json", str(second)) == 0
    metrics = {k: v for k, v in json.loads(first.read_text()).items() if "@" in k}
    again = {k: v for k, v in json.loads(second.read_text()).items() if "@" in k}
    assert again == metrics
    # A query-side change keeps the entry; a passage-side change misses it (and encodes).
    assert run_eval(*base, "--query-max-len", "8") == 0
    with pytest.raises(AssertionError, match="encoded although"):
        run_eval(*base, "--passage-max-len", "8")


def read_trec_run(path: Path) -> dict[str, list[tuple[str, int, float, str]]]:
    """A TREC run file as {qid: [(docid, rank, score, tag), ...]} in file order; every line has
    the six columns with Q0 second."""
    lines: dict[str, list[tuple[str, int, float, str]]] = {}
    for line in path.read_text().splitlines():
        qid, q0, doc, rank, score, tag = line.split(" ")
        assert q0 == "Q0"
        lines.setdefault(qid, []).append((doc, int(rank), float(score), tag))
    return lines


def test_trec_run_reads_back_to_the_metrics_eval_printed(
    tiny_model, beir, tmp_path, capsys
) -> None:
    out, run_file = tmp_path / "eval.json", tmp_path / "runs" / "tiny.trec"
    base = ["--model", str(tiny_model), "--data", str(beir)]
    files = ["--trec-run", str(run_file), "--trec-run-tag", "tiny-run"]
    assert run_eval(*base, "--k", "1", "3", "10", "--json", str(out), *files) == 0
    record = json.loads(out.read_text())
    lines = read_trec_run(run_file)
    assert list(lines) == ["q1", "q2", "q3"]  # the judged queries, in qrels order
    for rows in lines.values():
        assert len(rows) == 6  # the depth is max(--k) = 10, capped by the 6 documents
        assert [rank for _, rank, _, _ in rows] == [1, 2, 3, 4, 5, 6]
        scores = [score for _, _, score, _ in rows]
        assert scores == sorted(scores, reverse=True)
        assert {tag for *_, tag in rows} == {"tiny-run"}
    run = {qid: {doc: score for doc, _, score, _ in rows} for qid, rows in lines.items()}
    qrels = load_beir(beir, "test").qrels
    # Scores are written to read back exactly: the same metrics, to the last bit.
    metrics = {key: value for key, value in record.items() if "@" in key}
    assert retrieval_metrics(run, qrels, (1, 3, 10)) == metrics
    pytrec_eval = pytest.importorskip("pytrec_eval")
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    ndcg = sum(q["ndcg_cut_10"] for q in per_query.values()) / len(per_query)
    assert ndcg == pytest.approx(record["ndcg@10"], abs=1e-12)
    # The table's nDCG row ends with nDCG@10 (the columns are @1 @3 @10).
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("nDCG")]
    assert row.split()[-1] == f"{ndcg:.4f}"
    assert sorted(p.name for p in run_file.parent.iterdir()) == ["tiny.trec"]  # no temp file
    # The depth follows --k: the top 3 only, tagged embtune by default.
    assert run_eval(*base, "--k", "1", "3", "--trec-run", str(run_file)) == 0
    rows = read_trec_run(run_file)["q1"]
    assert [rank for _, rank, _, _ in rows] == [1, 2, 3] and rows[0][3] == "embtune"


def test_mteb_json_has_mtebs_layout_and_names(tiny_model, beir, tmp_path) -> None:
    out, mteb = tmp_path / "eval.json", tmp_path / "mteb" / "result.json"
    base = ["--model", str(tiny_model), "--data", str(beir), "--k", "1", "10", "--json", str(out)]
    assert run_eval(*base, "--mteb-json", str(mteb)) == 0
    metrics = {k: v for k, v in json.loads(out.read_text()).items() if "@" in k}
    result = json.loads(mteb.read_text())
    assert set(result) == {
        "dataset_revision", "task_name", "mteb_version", "scores", "evaluation_time",
        "kg_co2_emissions",
    }  # fmt: skip
    # What embtune cannot know stays empty; the task is named after the data folder.
    assert result["dataset_revision"] is None and result["mteb_version"] is None
    assert result["kg_co2_emissions"] is None and result["evaluation_time"] > 0
    assert result["task_name"] == "tiny-beir"
    [scores] = result["scores"]["test"]
    assert scores.pop("hf_subset") == "default" and scores.pop("languages") == []
    assert scores.pop("main_score") == metrics["ndcg@10"]
    expected = {
        f"{name}_at_{k}": metrics[f"{name}@{k}"]
        for name in ("ndcg", "mrr", "recall", "map")
        for k in (1, 10)
    }
    assert scores == expected
    given = ["--mteb-task-name", "TinyRetrieval", "--mteb-dataset-revision", "abc123"]
    assert run_eval(*base, "--mteb-json", str(mteb), *given, "--mteb-languages", "eng-Latn") == 0
    result = json.loads(mteb.read_text())
    assert (result["task_name"], result["dataset_revision"]) == ("TinyRetrieval", "abc123")
    assert result["scores"]["test"][0]["languages"] == ["eng-Latn"]


def test_dataset_name_is_mtebs_for_beir_folders(tmp_path, monkeypatch) -> None:
    from embtune.data.dataset_names import dataset_name

    assert dataset_name("data/scifact") == "SciFact"
    assert dataset_name("data/fiqa/") == "FiQA2018"
    assert dataset_name(Path("trec-covid")) == "TRECCOVID"
    assert dataset_name("data/my-claims") == "my-claims"
    monkeypatch.chdir(tmp_path)
    assert dataset_name(".") == tmp_path.name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trec-run", "{tmp}"], "--trec-run: {tmp} is a folder; give a file name"),
        (["--mteb-json", "{tmp}/m.json", "--k", "1", "3"], "--mteb-json: MTEB's main score is "
         "nDCG@10, but --k does not include 10; add it (--k 10 1 3)"),
        (["--trec-run", "{tmp}/r.trec", "--trec-run-tag", "my run"], "--trec-run-tag: the run "
         "name must be one word without white space"),
        (["--trec-run-tag", "mine"], "--trec-run-tag: only with --trec-run FILE"),
        (["--mteb-languages", "eng-Latn"], "--mteb-languages: only with --mteb-json FILE"),
        (["--mteb-json", "{tmp}/m.json", "--mteb-languages", "english"], "--mteb-languages: "
         "'english' is not a language code as MTEB writes them"),
        (["--mteb-json", "{tmp}/m.json", "--mteb-task-name", " "], "--mteb-task-name: expected "
         "a non-empty text"),
        (["--json", "{tmp}/r.json", "--trec-run", "{tmp}/r.json"], "--trec-run: {tmp}/r.json "
         "is also the --json file; give each output its own file"),
        (["--trec-run", "{tmp}/r", "--mteb-json", "{tmp}/r"], "--mteb-json: {tmp}/r is also "
         "the --trec-run file"),
        (["--trec-run", "{tmp}/r", "--dims", "16"], "--trec-run: not with --dims"),
        (["--mteb-json", "{tmp}/m", "--limit-queries", "2"], "--mteb-json: not with "
         "--limit-queries"),
        (["--trec-run", "{data}/corpus.jsonl"], "--trec-run: {data}/corpus.jsonl is one of the "
         "input files"),
    ],
)  # fmt: skip
def test_bad_result_file_options_are_refused_before_the_work(
    beir, tmp_path, capsys, args, message
) -> None:
    corpus = (beir / "corpus.jsonl").read_bytes()
    values = [a.format(tmp=tmp_path, data=beir) for a in args]
    # The model does not exist: every refusal comes before it would load.
    model = str(tmp_path / "no-model")
    assert run_eval("--model", model, "--data", str(beir), *values) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("embtune eval: error: " + message.format(tmp=tmp_path, data=beir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-beir"]  # nothing written
    assert (beir / "corpus.jsonl").read_bytes() == corpus


def test_result_files_in_an_unwritable_folder_are_refused(beir, tmp_path, capsys) -> None:
    from tests.test_atomic import read_only_folder

    with read_only_folder(tmp_path) as folder:
        for option in ("--trec-run", "--mteb-json"):
            out = folder / "results" / "out"
            assert run_eval("--model", "none", "--data", str(beir), option, str(out)) == 2
            assert capsys.readouterr().err.splitlines() == [
                f"embtune eval: error: {option}: cannot write to folder {folder}: permission denied"
            ]


def test_ids_a_trec_run_cannot_hold_are_refused_before_the_model_loads(
    beir, tmp_path, capsys
) -> None:
    with (beir / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "d 7", "title": "", "text": "an id with a space"}) + "\n")
    out = tmp_path / "run.trec"
    args = ["--model", str(tmp_path / "no-model"), "--data", str(beir), "--trec-run", str(out)]
    assert run_eval(*args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "embtune eval: error: --trec-run: document id 'd 7' contains white space, which a TREC "
        "run cannot hold (its columns are separated by white space); write --json instead"
    ]
    assert not out.exists()


def test_a_full_disk_when_writing_the_trec_run_stops_with_status_3(
    tiny_model, beir, tmp_path, capsys, monkeypatch
) -> None:
    import errno

    def half_written(run, tag):
        yield "q1 Q0 d1 1 0.5 embtune\n"
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("embtune.eval.trec_run.trec_lines", half_written)
    out = tmp_path / "results" / "run.trec"
    assert run_eval("--model", str(tiny_model), "--data", str(beir), "--trec-run", str(out)) == 3
    assert capsys.readouterr().err.splitlines() == [
        f"embtune eval: stopped: could not write {out}: No space left on device; the evaluation "
        "was done but not saved: free some space (or choose another --trec-run) and run the "
        "command again"
    ]
    assert list(out.parent.iterdir()) == []  # no file, no temporary file


def test_every_command_offers_the_one_list_of_pooling_modes() -> None:
    from embtune import choices
    from embtune.cli import build_parser

    # A literal list in one command would drift from the others and from the model.
    subcommands = build_parser()._subparsers._group_actions[0].choices
    offered = {
        name: action.choices
        for name, parser in subcommands.items()
        for action in parser._actions
        if action.dest == "pooling"
    }
    assert {"eval", "mine", "train"} <= offered.keys()
    assert all(tuple(c) == choices.POOLING_MODES for c in offered.values()), offered
    assert POOLING_MODES == choices.POOLING_MODES


def test_command_module_imports_no_torch() -> None:
    import subprocess

    # `embtune --help` must stay instant: registering `eval` may not pull in torch.
    code = (
        "import argparse, sys, embtune.commands.eval as m; "
        "m.register(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


# --- the library ---------------------------------------------------------------------------


def test_perfect_embeddings_give_perfect_metrics(encoder, beir) -> None:
    """Hand-made embeddings that put each query on its best document score 1 everywhere."""
    data = load_beir(beir, "test")
    doc_ids = list(data.corpus)
    corpus = torch.eye(len(doc_ids))
    best = {"q1": "d1", "q2": "d5", "q3": "d3"}
    queries = torch.stack([corpus[doc_ids.index(best[q])] for q in data.split_queries()])
    # q1 has a second relevant document, d2: rank it second.
    queries[0, doc_ids.index("d2")] = 0.5
    run = retrieve(queries, corpus, list(data.split_queries()), doc_ids, k=10)
    metrics = retrieval_metrics(run, data.qrels, (10,))
    assert metrics == {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@10": 1.0, "map@10": 1.0}


def test_retrieve_drops_the_query_itself() -> None:
    corpus = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    queries = torch.tensor([[1.0, 0.0]])
    run = retrieve(queries, corpus, ["a"], ["a", "b", "c"], k=2)
    assert list(run["a"]) == ["b", "c"]  # "a" dropped, and still k results
    kept = retrieve(queries, corpus, ["a"], ["a", "b", "c"], k=2, ignore_identical_ids=False)
    assert list(kept["a"]) == ["a", "b"]


def test_faiss_matches_exact_search() -> None:
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    corpus = torch.nn.functional.normalize(torch.randn(500, 16, generator=gen), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(20, 16, generator=gen), dim=-1)
    exact_scores, exact_idx = search_top_k(queries, corpus, 10)
    faiss_scores, faiss_idx = search_top_k(queries, corpus, 10, use_faiss=True)
    assert torch.equal(exact_idx, faiss_idx)
    assert torch.allclose(exact_scores, faiss_scores, atol=1e-5)


def test_missing_faiss_is_a_usage_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(UsageError, match="pip install faiss-cpu"):
        search_top_k(torch.ones(1, 2), torch.ones(3, 2), 2, use_faiss=True)


def test_given_corpus_embeddings_skip_encoding(encoder, beir, monkeypatch) -> None:
    data = load_beir(beir, "test")
    texts, ids = list(data.corpus.values()), list(data.corpus)
    embeddings = corpus_embeddings(encoder, texts, ids, show_progress=False)
    expected = evaluate_retrieval(encoder, data, (3,), show_progress=False)

    def no_encoding(*args, **kwargs):
        raise AssertionError("corpus encoded twice")

    monkeypatch.setattr(Encoder, "encode_passages", no_encoding)
    given = evaluate_retrieval(encoder, data, (3,), show_progress=False, corpus_vectors=embeddings)
    assert given == expected
    with pytest.raises(UsageError, match="corpus has 6 documents"):
        evaluate_retrieval(encoder, data, corpus_vectors=embeddings[:4], show_progress=False)


def test_cache_key_follows_weights_settings_and_text(tiny_model, tmp_path) -> None:
    encoder = Encoder.from_pretrained(tiny_model)
    texts, ids = ["alpha beta", "gamma"], ["a", "b"]
    key = corpus_cache_key(encoder, texts, ids)
    # Encoding leaves truncation state on the tokenizer; the key must not depend on it.
    encoder.encode_passages(texts)
    encoder.encode_queries(texts)
    assert corpus_cache_key(encoder, texts, ids) == key
    assert corpus_cache_key(encoder, ["alpha", "beta gamma"], ids) != key
    assert corpus_cache_key(encoder, texts, ["a", "c"]) != key
    encoder.settings.query_instruction = "query: "  # does not change passage vectors
    assert corpus_cache_key(encoder, texts, ids) == key
    encoder.settings.passage_instruction = "passage: "
    assert corpus_cache_key(encoder, texts, ids) != key
    encoder.settings.passage_instruction = ""
    # A fine-tuned model saved over the same folder must not hit the old entry.
    folder = tmp_path / "model"
    encoder.save(folder)
    saved_key = corpus_cache_key(Encoder.from_pretrained(folder), texts, ids)
    with torch.no_grad():
        encoder.model.encoder.layer[-1].output.dense.weight[0, 0] += 1e-3
    encoder.save(folder)
    assert corpus_cache_key(Encoder.from_pretrained(folder), texts, ids) != saved_key


def test_corrupt_cache_is_rewritten(encoder, tmp_path, caplog) -> None:
    texts = ["one document", "another document"]
    first = corpus_embeddings(encoder, texts, cache_dir=tmp_path, show_progress=False)
    [entry] = tmp_path.glob("corpus-*.pt")
    entry.write_bytes(b"not a torch file")
    again = corpus_embeddings(encoder, texts, cache_dir=tmp_path, show_progress=False)
    assert torch.allclose(first, again)
    assert "ignoring unreadable corpus cache" in caplog.text
    assert torch.load(entry, weights_only=True)["embeddings"].shape == first.shape


def test_limit_queries_subset_matches_library(encoder, beir) -> None:
    data = load_beir(beir, "test")
    subset = BeirDataset(data.corpus, data.queries, {"q2": data.qrels["q2"]})
    metrics = evaluate_retrieval(encoder, subset, (10,), show_progress=False)
    assert metrics["recall@10"] == 1.0  # 6 documents: the relevant one is always in the top 10
