"""`embtune score`: teacher scores equal the models' own, rows pass through, the cache resumes."""

from __future__ import annotations

import inspect as signatures
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
)

from embtune import api
from embtune.cli import build_parser, main
from embtune.data.formats import load_training_data
from embtune.data.groups import build_rows
from embtune.errors import TrainingStopped, UsageError
from embtune.models.encoder import Encoder
from embtune.scoring.cache import teacher_key
from embtune.scoring.teachers import (
    BiEncoderTeacher,
    CrossEncoderTeacher,
    TeacherSettings,
    teacher_config,
    teacher_kind,
)
from tests.conftest import minilm_path, single_thread, subprocess_env
from tests.test_bad_inputs import CASES, EXPECTED, _check_error_lines, _prepare

ROWS = [
    {
        "query": "what is a cell",
        "pos": ["A cell is the basic unit of life."],
        "neg": ["Volcanoes erupt when magma rises.", "Plants make sugar from light."],
        "prompt": "Represent this query: ",
        "type": "normal",
    },
    {
        "id": 7,
        "query": "how do plants make sugar",
        "pos": ["Plants make sugar from light.", "Photosynthesis turns light into sugar."],
        "neg": ["A cell is the basic unit of life."],
        "pos_scores": [1, 2],  # replaced, in place
        "neg_scores": [0.5],
    },
    {"query": "why do volcanoes erupt", "pos": ["Volcanoes erupt when magma rises."]},
    # The first row's pairs again: scored once.
    {"query": "what is a cell", "pos": ["A cell is the basic unit of life."], "neg": []},
]
PAIRS = 8
DISTINCT = 7


def tiny_config(**extra: object) -> BertConfig:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        **extra,
    )


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random one-label BERT cross-encoder with MiniLM's tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-reranker")
    BertForSequenceClassification(tiny_config(num_labels=1)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_score(teacher: Path, data: Path, out: Path, **options: object) -> api.ScoreResult:
    options.setdefault("cache_dir", out.parent / "cache")
    with single_thread():
        return api.score(teacher, data, out, show_progress=False, **options)


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one line `embtune score` prints for a usage error (after checking it exits 2)."""
    assert main(["score", *argv]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("embtune score: error: ")
    return line.removeprefix("embtune score: error: ")


def test_cross_encoder_scores_are_the_models_logits(reranker: Path) -> None:
    queries = ["what is a cell", "why", "how do plants make sugar from light and water"]
    passages = ["A cell is the basic unit of life.", "because", "Plants make sugar."]
    settings = TeacherSettings(query_instruction="query: ", passage_instruction="passage: ")
    teacher = CrossEncoderTeacher.from_pretrained(str(reranker), settings)
    tokenizer = AutoTokenizer.from_pretrained(reranker)
    model = AutoModelForSequenceClassification.from_pretrained(reranker).eval()
    inputs = tokenizer(
        ["query: " + q for q in queries],
        ["passage: " + p for p in passages],
        padding=True,
        truncation=True,
        max_length=512,
        return_tensors="pt",
    )
    with torch.no_grad():
        direct = model(**inputs).logits.view(-1)
    assert torch.allclose(torch.tensor(teacher.score_pairs(queries, passages)), direct, atol=1e-5)


def test_a_long_query_takes_three_quarters_of_the_pair_as_in_flagembedding(
    reranker: Path,
) -> None:
    teacher = CrossEncoderTeacher.from_pretrained(str(reranker), TeacherSettings(max_length=32))
    inputs = teacher.pair_inputs(["cell " * 100], ["life " * 100])
    ids = inputs["input_ids"][0].tolist()
    sep = teacher.tokenizer.sep_token_id
    assert len(ids) == 32
    assert ids.index(sep) == 1 + 24  # [CLS], then 3/4 of 32 query tokens
    assert inputs["token_type_ids"][0].tolist().count(1) == 32 - 26  # the passage fills the rest


def test_bi_encoder_scores_are_cosines_of_the_encoder_embeddings(tiny_model: Path) -> None:
    queries = ["what is a cell", "why", "what is a cell"]
    passages = ["A cell is the basic unit of life.", "because", "Plants make sugar."]
    teacher = BiEncoderTeacher.from_pretrained(str(tiny_model), TeacherSettings())
    encoder = Encoder.from_pretrained(tiny_model)
    expected = F.cosine_similarity(
        encoder.encode_queries(queries), encoder.encode_passages(passages), dim=-1
    )
    assert torch.allclose(torch.tensor(teacher.score_pairs(queries, passages)), expected, atol=1e-5)


def test_rows_keep_every_field_in_order_with_aligned_scores(reranker: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    result = run_score(reranker, data, tmp_path / "scored.jsonl")
    written = read_jsonl(result.output)
    teacher = CrossEncoderTeacher.from_pretrained(str(reranker), TeacherSettings())
    for row, out in zip(ROWS, written, strict=True):
        assert list(out) == [*row, *(k for k in ("pos_scores", "neg_scores") if k not in row)]
        assert {k: v for k, v in out.items() if not k.endswith("_scores")} == {
            k: v for k, v in row.items() if not k.endswith("_scores")
        }
        negatives = row.get("neg", [])
        scores = teacher.score_pairs(
            [row["query"]] * (len(row["pos"]) + len(negatives)), [*row["pos"], *negatives]
        )
        assert out["pos_scores"] == pytest.approx(scores[: len(row["pos"])], abs=1e-5)
        assert out["neg_scores"] == pytest.approx(scores[len(row["pos"]) :], abs=1e-5)
    assert (result.counts.pairs, result.counts.distinct) == (PAIRS, DISTINCT)
    assert (result.counts.cached, result.counts.computed) == (0, DISTINCT)
    assert result.teacher_kind == "cross-encoder"
    assert result.notes == [
        "pos_scores/neg_scores already in 1 of the rows: replaced by this teacher's"
    ]


def test_the_training_reader_reads_the_scores(tiny_model: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    result = run_score(tiny_model, data, tmp_path / "scored.jsonl")
    assert result.teacher_kind == "bi-encoder"
    written = read_jsonl(result.output)
    texts = build_rows(load_training_data([result.output]).records)
    for row, out in zip(texts.rows, written, strict=True):
        assert row.has_scores
        texts_of_row = out["pos"] + out.get("neg", [])
        pairs = zip(texts_of_row, out["pos_scores"] + out["neg_scores"], strict=True)
        by_text = dict(pairs)
        got = zip([*row.pos, *row.neg], [*row.pos_scores, *row.neg_scores], strict=True)
        assert {texts.passages.texts[i]: s for i, s in got} == pytest.approx(by_text)
        assert all(-1 <= s <= 1 for s in by_text.values())


def test_a_rerun_scores_nothing(
    reranker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    first = run_score(reranker, data, tmp_path / "first.jsonl")

    def no_scoring(*args: object) -> list[float]:
        raise AssertionError("a cached pair was scored again")

    monkeypatch.setattr(CrossEncoderTeacher, "score_pairs", no_scoring)
    again = run_score(reranker, data, tmp_path / "again.jsonl")
    assert (again.counts.cached, again.counts.computed) == (DISTINCT, 0)
    assert again.output.read_bytes() == first.output.read_bytes()
    assert again.cache_file == first.cache_file
    assert f"from the cache  {DISTINCT}" in again.text and "computed        0" in again.text


def test_a_killed_run_continues_from_the_cache(
    reranker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    whole = run_score(reranker, data, tmp_path / "whole.jsonl", batch_size=3)
    real = CrossEncoderTeacher.score_pairs
    batches: list[int] = []

    def killed_after_one_batch(self: CrossEncoderTeacher, queries: list, passages: list) -> list:
        if batches:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) does between two batches
        batches.append(len(queries))
        return real(self, queries, passages)

    monkeypatch.setattr(CrossEncoderTeacher, "score_pairs", killed_after_one_batch)
    out = tmp_path / "resumed.jsonl"
    resumed_cache = tmp_path / "resumed-cache"
    with pytest.raises(KeyboardInterrupt):
        run_score(reranker, data, out, batch_size=3, cache_dir=resumed_cache)
    assert batches == [3] and not out.exists()
    monkeypatch.setattr(CrossEncoderTeacher, "score_pairs", real)
    resumed = run_score(reranker, data, out, batch_size=3, cache_dir=resumed_cache)
    assert (resumed.counts.cached, resumed.counts.computed) == (3, DISTINCT - 3)
    assert out.read_bytes() == whole.output.read_bytes()


def test_a_non_finite_score_stops_the_run_and_keeps_the_batches_before_it(
    reranker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    real = CrossEncoderTeacher.score_pairs
    batches: list[int] = []

    def nan_in_the_second_batch(self: CrossEncoderTeacher, queries: list, passages: list) -> list:
        batches.append(len(queries))
        scores = real(self, queries, passages)
        return scores if len(batches) == 1 else [math.nan, *scores[1:]]

    monkeypatch.setattr(CrossEncoderTeacher, "score_pairs", nan_in_the_second_batch)
    out = tmp_path / "scored.jsonl"
    with pytest.raises(TrainingStopped, match=r"nan; 4 pairs were not scored"):
        run_score(reranker, data, out, batch_size=3)
    assert not out.exists()
    monkeypatch.setattr(CrossEncoderTeacher, "score_pairs", real)
    assert run_score(reranker, data, out, batch_size=3).counts.cached == 3


def test_the_cache_is_keyed_by_every_scoring_setting(reranker: Path) -> None:
    plain = CrossEncoderTeacher.from_pretrained(str(reranker), TeacherSettings())
    keys = {teacher_key(plain.identity())}
    for settings in (
        TeacherSettings(query_instruction="q: "),
        TeacherSettings(passage_instruction="p: "),
        TeacherSettings(max_length=256),
        TeacherSettings(precision="bf16"),
    ):
        teacher = CrossEncoderTeacher.from_pretrained(str(reranker), settings)
        keys.add(teacher_key(teacher.identity()))
    with torch.no_grad():
        next(plain.model.parameters()).add_(1e-3)  # other weights, the same folder name
    keys.add(teacher_key(plain.identity()))
    assert len(keys) == 6


def test_the_command_line_in_a_subprocess(reranker: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "scored.jsonl"
    argv = ["--teacher", str(reranker), "--train-data", str(data), "-o", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--batch-size", "4"]
    run = subprocess.run(
        [sys.executable, "-m", "embtune", "score", *argv],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"computed        {DISTINCT}" in run.stdout
    assert "cross-encoder: config.json architecture BertForSequenceClassification" in run.stdout
    assert [len(r["pos_scores"]) + len(r["neg_scores"]) for r in read_jsonl(out)] == [3, 3, 1, 1]


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("flag/")])
def test_bad_input_is_refused_like_train_refuses_it(
    case: str, reranker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, data = _prepare(case, tmp_path)
    out = tmp_path / "scored.jsonl"
    argv = ["--teacher", str(reranker), "--train-data", str(data), "-o", str(out)]
    assert main(["score", *argv, "--cache-dir", str(tmp_path / "cache")]) == 2
    _check_error_lines(capsys.readouterr().err, "score", EXPECTED[case].format(path=path))
    assert not out.exists()


def test_skip_bad_rows_scores_the_rest_and_lists_the_others(reranker: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    lines = [json.dumps(ROWS[0]), "{not json", json.dumps({"query": "q"}), json.dumps(ROWS[2])]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_score(reranker, data, tmp_path / "scored.jsonl", skip_bad_rows=True)
    assert [r["query"] for r in read_jsonl(result.output)] == [ROWS[0]["query"], ROWS[2]["query"]]
    assert result.rejected_report == tmp_path / "scored.rejected_rows.jsonl"
    rejected = read_jsonl(result.rejected_report)
    assert [(r["line"], r["field"]) for r in rejected] == [(2, None), (3, "pos")]
    assert "bad input rows left out  2" in result.text


def test_output_is_never_an_input_nor_an_existing_file_without_overwrite(
    reranker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    before = data.read_bytes()
    base = ["--teacher", str(reranker), "--train-data", str(data)]
    line = cli_error(capsys, [*base, "-o", str(data), "--overwrite"])
    assert line.startswith(f"--output: {data} is one of the input files")
    existing = tmp_path / "scored.jsonl"
    existing.write_text("keep\n")
    line = cli_error(capsys, [*base, "-o", str(existing)])
    assert line == f"--output: {existing} exists; pass --overwrite to replace it"
    assert existing.read_text() == "keep\n" and data.read_bytes() == before
    run_score(reranker, data, existing, overwrite=True)
    assert len(read_jsonl(existing)) == len(ROWS)


def test_unusable_inputs_and_teachers_get_one_line_each(
    reranker: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    two_labels = tmp_path / "two-labels"
    tiny_config(num_labels=2, architectures=["BertForSequenceClassification"]).save_pretrained(
        two_labels
    )
    masked_lm = tmp_path / "masked-lm"
    BertForMaskedLM(tiny_config()).save_pretrained(masked_lm)
    out = ["-o", str(tmp_path / "scored.jsonl"), "--cache-dir", str(tmp_path / "cache")]
    base = ["--teacher", str(reranker), *out]
    assert cli_error(capsys, [*base, "--train-data", str(empty)]) == f"{empty}: file is empty"
    missing = tmp_path / "nothing-here"
    assert cli_error(capsys, [*base, "--train-data", str(missing)]) == (
        f"{missing}: file or folder does not exist"
    )
    with_data = ["--train-data", str(data), *out]
    assert cli_error(capsys, ["--teacher", str(missing), *with_data]) == (
        f"--teacher: folder {missing} does not exist"
    )
    assert "needs one output label" in cli_error(capsys, ["--teacher", str(two_labels), *with_data])
    line = cli_error(capsys, ["--teacher", str(masked_lm), *with_data])
    assert line.startswith("--teacher-kind auto: cannot tell") and "BertForMaskedLM" in line
    line = cli_error(capsys, [*base, "--train-data", str(data), "--query-max-len", "32"])
    assert line == "--query-max-len: only for a bi-encoder teacher; use --max-length"
    assert not (tmp_path / "scored.jsonl").exists()


def test_auto_kind_reads_the_models_files(reranker: Path, tiny_model: Path, tmp_path: Path) -> None:
    assert teacher_kind(str(reranker), teacher_config(str(reranker)))[0] == "cross-encoder"
    assert teacher_kind(str(tiny_model), teacher_config(str(tiny_model)))[0] == "bi-encoder"
    saved = tmp_path / "saved"
    Encoder.from_pretrained(tiny_model).save(saved)
    assert teacher_kind(str(saved), teacher_config(str(saved))) == (
        "bi-encoder",
        "it has embtune_encoder.json",
    )
    with pytest.raises(UsageError, match="cannot tell what kind of teacher"):
        teacher_kind(str(tmp_path), SimpleNamespace(architectures=["GPT2LMHeadModel"]))
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    paths = {"train_data": data, "output": tmp_path / "y.jsonl", "cache_dir": tmp_path / "c"}
    with pytest.raises(UsageError, match="--max-length: only for a cross-encoder"):
        api.score(saved, max_length=128, **paths)
    with pytest.raises(UsageError, match=r"--query-max-len: 9999 is outside 1\.\.512"):
        api.score(saved, query_max_len=9999, **paths)


def test_every_option_of_the_command_is_a_parameter_with_its_default() -> None:
    subcommands = build_parser()._subparsers._group_actions[0].choices
    params = signatures.signature(api.score).parameters
    for action in subcommands["score"]._actions:
        if action.dest in ("help", "func"):
            continue
        assert action.dest in params, f"--{action.dest} of `embtune score` is missing"
        assert action.help, action.dest
        default = params[action.dest].default
        if default is signatures.Parameter.empty:
            assert action.required, action.dest
            continue
        cli = action.default
        cli = int(cli) if isinstance(cli, str) and cli.isdigit() else cli
        assert cli == default, action.dest
