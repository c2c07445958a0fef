"""The bad-input corpus: every malformed file is refused precisely, and nothing is written.

tests/bad_inputs/ holds malformed FlagEmbedding jsonl (flag/), BEIR files (beir/, each replacing
one file of beir/_valid/) and YAML configs (yaml/); EXPECTED.tsv says which error line each one
must produce. Each case must exit 2 with one `file:line: field 'x': reason` line per problem
(line and field wherever the file has them), no traceback, and leave no output behind.
A property-based test then mutates valid files at random and checks that reading them never
raises anything but the user-facing error.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embtune.cli import build_parser, main
from embtune.config import resolve_config
from embtune.data.formats import load_training_data
from embtune.data.groups import build_rows
from embtune.errors import UsageError

CORPUS = Path(__file__).parent / "bad_inputs"
BEIR_TARGETS = {"corpus": "corpus.jsonl", "queries": "queries.jsonl", "qrels": "qrels/train.tsv"}
NOT_CASES = {"EXPECTED.tsv", "README.md"}
GOOD_ROW = {"query": "what is a cell", "pos": ["A cell is the basic unit of life."]}


def _expected() -> dict[str, str]:
    rows = {}
    for line in (CORPUS / "EXPECTED.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            case, message = line.split("\t", 1)
            rows[case] = message
    return rows


EXPECTED = _expected()
CASES = sorted(EXPECTED)


def _prepare(case: str, tmp_path: Path) -> tuple[Path, Path]:
    """(the malformed file where the command reads it, the data path to pass)."""
    source = CORPUS / case
    kind = case.split("/")[0]
    if kind == "beir":
        folder = tmp_path / "beir"
        shutil.copytree(CORPUS / "beir" / "_valid", folder)
        target = folder / BEIR_TARGETS[source.name.split(".")[0]]
        shutil.copyfile(source, target)
        return target, folder
    if kind == "yaml":
        good = tmp_path / "good.jsonl"
        good.write_text(json.dumps(GOOD_ROW) + "\n", encoding="utf-8")
        return source, good
    return source, source


def _check_error_lines(err: str, command: str, expected: str) -> None:
    prefix = f"embtune {command}: error: "
    lines = err.splitlines()
    assert "Traceback" not in err
    assert lines and all(line.startswith(prefix) for line in lines), err[:3000]
    assert any(line.removeprefix(prefix).startswith(expected) for line in lines), (expected, lines)
    # Values from the file are quoted shortened: a 128 KB id must not become a 128 KB message.
    assert all(len(line) < 500 for line in lines)


def test_the_corpus_covers_every_format_and_each_file_has_an_expectation() -> None:
    files = {
        p.relative_to(CORPUS).as_posix()
        for p in CORPUS.rglob("*")
        if p.is_file() and "_valid" not in p.parts and p.name not in NOT_CASES
    }
    assert files == set(EXPECTED)
    assert len(files) >= 30
    assert {case.split("/")[0] for case in files} == {"flag", "beir", "yaml"}
    assert {c.split("/")[1].split(".")[0] for c in files if c.startswith("beir/")} == set(
        BEIR_TARGETS
    )
    # The valid BEIR folder really is valid: each case breaks exactly one thing.
    load_training_data([CORPUS / "beir" / "_valid"])


@pytest.mark.parametrize("case", CASES)
def test_train_refuses_bad_input_with_file_line_and_field(
    case: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, data = _prepare(case, tmp_path)
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model), "--train-data", str(data), "-o", str(out)]
    if case.startswith("yaml/"):
        argv += ["--config", str(path)]
    assert main(argv) == 2
    _check_error_lines(capsys.readouterr().err, "train", EXPECTED[case].format(path=path))
    assert not out.exists(), "nothing may be written when the input is bad"


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("yaml/")])
def test_mine_and_eval_refuse_the_same_input_without_writing(
    case: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, data = _prepare(case, tmp_path)
    expected = EXPECTED[case].format(path=path)
    mined = tmp_path / "mined.jsonl"
    assert main(["mine", "--model", str(tiny_model), "--data", str(data), "-o", str(mined)]) == 2
    _check_error_lines(capsys.readouterr().err, "mine", expected)
    assert not mined.exists()
    if case.startswith("beir/"):
        metrics = tmp_path / "metrics.json"
        argv = ["eval", "--model", str(tiny_model), "--data", str(data), "--split", "train"]
        assert main([*argv, "--json", str(metrics)]) == 2
        _check_error_lines(capsys.readouterr().err, "eval", expected)
        assert not metrics.exists()


# --- random byte mutations never produce a traceback --------------------------------------------

VALID_FLAG = (
    "\n".join(
        json.dumps(row)
        for row in (
            {**GOOD_ROW, "neg": ["Cells is a band.", "A cell phone."], "neg_scores": [0.2, 0.1]},
            {"query": "who wrote hamlet", "pos": ["Shakespeare."], "pos_scores": [1], "neg": []},
            {"query": "rain", "pos": ["Water falls."], "prompt": "Represent: ", "type": "x"},
        )
    )
    + "\n"
).encode()
VALID_YAML = (
    b"train_group_size: 4\nbatch_size: 8\ntemperature: 0.05\npooling: mean\n"
    b"query_instruction: 'q: '\nnormalize: true\nlearning_rate: 1.0e-5\n"
    b"train_data: [a.jsonl, b.jsonl]\nper_device_train_batch_size: 8\nwarmup_ratio: 0.1\n"
)
# Bytes that tend to matter to the parsers, mixed with arbitrary ones.
TOKENS = [
    b'"', b"{", b"}", b"[", b"]", b",", b":", b"\n", b"\r\n", b"\t", b" ", b"\\", b"\\u",
    b"\\ud800", b"NaN", b"-Infinity", b"1e999", b"null", b"true", b"-1", b"0", b"\x00",
    b"\xff", b"\xe9", b"\xef\xbb\xbf", b"\xff\xfe", b"- ", b"? ", b"&a ", b"*a",
    b"!!python/object ", b"---\n", b"#",
]  # fmt: skip
chunks = st.one_of(st.binary(min_size=1, max_size=4), st.sampled_from(TOKENS))
edits = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete", "truncate"]),
        st.integers(min_value=0, max_value=1 << 16),
        chunks,
    ),
    min_size=1,
    max_size=6,
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the checkout; a failure prints its example
    suppress_health_check=[HealthCheck.too_slow],
)


def mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Apply byte edits (replace / insert / delete at a position, or truncate there)."""
    buf = bytearray(data)
    for op, position, chunk in ops:
        at = position % (len(buf) + 1)
        if op == "replace":
            buf[at : at + len(chunk)] = chunk
        elif op == "insert":
            buf[at:at] = chunk
        elif op == "delete":
            del buf[at : at + len(chunk)]
        else:
            del buf[at:]
    return bytes(buf)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _read_or_refuse(paths: list[Path], tokenizer) -> None:
    """Read training data: a UsageError naming a file is fine, anything else is a bug.

    The same holds with skip_bad_rows, which must agree with the default on accepted input.
    """
    skipping = _read_skipping(paths)
    try:
        data = load_training_data(paths)
    except UsageError as exc:
        assert all(line.startswith(tuple(map(str, paths))) for line in exc.lines()), exc.lines()
        return
    assert skipping is not None and not skipping.rejected
    assert [r.source for r in skipping.records] == [r.source for r in data.records]
    # Accepted input must also survive what follows reading: building rows and tokenizing.
    texts = build_rows(data.records, "", "", list(data.corpus.values()))
    tokenizer(list(texts.queries.texts) + list(texts.passages.texts), truncation=True)


def _read_skipping(paths: list[Path]):
    """load_training_data(skip_bad_rows=True), or None when it refuses (naming a file)."""
    try:
        data = load_training_data(paths, skip_bad_rows=True)
    except UsageError as exc:
        assert all(line.startswith(tuple(map(str, paths))) for line in exc.lines()), exc.lines()
        return None
    assert all(p.file.startswith(tuple(map(str, paths))) for p in data.rejected)
    return data


@FUZZ
@given(ops=edits)
def test_mutated_flagembedding_jsonl_never_gives_a_traceback(
    ops: list, fuzz_dir: Path, tokenizer
) -> None:
    path = fuzz_dir / "train.jsonl"
    path.write_bytes(mutate(VALID_FLAG, ops))
    _read_or_refuse([path], tokenizer)


@FUZZ
@given(ops=edits, target=st.sampled_from(sorted(BEIR_TARGETS.values())))
def test_mutated_beir_files_never_give_a_traceback(
    ops: list, target: str, fuzz_dir: Path, tokenizer
) -> None:
    folder = fuzz_dir / "beir"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(CORPUS / "beir" / "_valid", folder)
    path = folder / target
    path.write_bytes(mutate(path.read_bytes(), ops))
    _read_or_refuse([folder], tokenizer)


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """The CLI's parser, built once: building it was most of each example's time."""
    return build_parser()


@FUZZ
@given(ops=edits)
def test_mutated_yaml_config_never_gives_a_traceback(ops: list, fuzz_dir: Path) -> None:
    path = fuzz_dir / "run.yaml"
    path.write_bytes(mutate(VALID_YAML, ops))
    argv = ["train", "--config", str(path), "--model", "m", "--train-data", "t", "-o", "o"]
    try:
        resolve_config(_parser().parse_args(argv))
    except UsageError as exc:
        (line,) = exc.lines()  # one line, naming the file or the option
        assert line.startswith((str(path), "--")), line


def test_dev_null_as_data_is_refused_in_one_line_without_writing(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # /dev/null (and a pipe, /dev/fd/N) once went to the folder listing: NotADirectoryError.
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model), "--train-data", "/dev/null", "-o", str(out)]
    assert main(argv) == 2
    _check_error_lines(capsys.readouterr().err, "train", "/dev/null: no training rows found")
    assert not out.exists()
    mined = tmp_path / "mined.jsonl"
    assert main(["mine", "--model", str(tiny_model), "--data", "/dev/null", "-o", str(mined)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not mined.exists()
    assert main(["eval", "--model", str(tiny_model), "--data", "/dev/null"]) == 2
    _check_error_lines(
        capsys.readouterr().err, "eval", "/dev/null: is not a folder (BEIR layout expected)"
    )
