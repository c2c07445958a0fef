"""embtune.api: the command line's jobs from Python, with its option names, defaults and errors."""

from __future__ import annotations

import argparse
import inspect as signatures
import json
import subprocess
import sys
from pathlib import Path

import pytest

from embtune import api
from embtune.api.options import output_file
from embtune.cli import build_parser, main
from embtune.config import TrainConfig
from embtune.errors import UsageError
from tests.conftest import single_thread
from tests.test_atomic import read_only_folder
from tests.test_eval_cli import DOCS, write_beir
from tests.test_inspect import ROWS, write_rows

TEXTS = [text for _, text in DOCS.values()]
TRAIN_ROWS = [
    {"query": "what is a cell", "pos": [TEXTS[0]], "neg": [TEXTS[2], TEXTS[3]]},
    {"query": "what makes energy in a cell", "pos": [TEXTS[1]], "neg": [TEXTS[4]]},
    {"query": "how do plants make sugar", "pos": [TEXTS[4]], "neg": [TEXTS[0], TEXTS[5]]},
    {"query": "why do volcanoes erupt", "pos": [TEXTS[2]], "neg": [TEXTS[3]]},
]


@pytest.fixture
def beir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "beir")


def cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The one line the command prints for a usage error (after checking it exits 2)."""
    assert main(argv) == 2
    [line] = capsys.readouterr().err.splitlines()
    return line.split(": error: ", 1)[1]


def test_importing_the_api_loads_neither_torch_nor_transformers() -> None:
    code = "import sys, embtune.api; print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False False", result.stderr


@pytest.mark.parametrize(
    ("command", "functions"),
    [
        ("eval", ("evaluate", "evaluate_reranking")),  # eval --reranker: evaluate_reranking
        ("mine", ("mine",)),
        ("inspect", ("inspect",)),
    ],
)
def test_every_option_of_the_command_is_a_parameter_with_its_default(
    command: str, functions: tuple[str, ...]
) -> None:
    subcommands = build_parser()._subparsers._group_actions[0].choices
    signatures_of = [signatures.signature(getattr(api, f)).parameters for f in functions]
    for action in subcommands[command]._actions:
        if action.dest in ("help", "func"):
            continue
        found = [params[action.dest] for params in signatures_of if action.dest in params]
        if action.dest == "no_progress":  # the Python spelling is the positive one
            assert all(params["show_progress"].default is True for params in signatures_of)
            continue
        assert found, f"--{action.dest} of `embtune {command}` is missing"
        assert all(_same_default(action, param.default) for param in found), action.dest


def _same_default(action: argparse.Action, default: object) -> bool:
    """The option's default is the parameter's; a positional parameter is a required option,
    or (eval's --model, --reranker) one whose absence calls the command's other function."""
    if default is signatures.Parameter.empty:
        return action.required or action.default is None
    cli = action.default
    # The command line passes numbers as text to check them itself; Python takes numbers.
    cli = int(cli) if isinstance(cli, str) and cli.isdigit() else cli
    cli = tuple(cli) if isinstance(cli, list) else cli
    return cli == (tuple(default) if isinstance(default, list) else default)


def test_train_from_keywords_then_evaluate(tiny_model: Path, beir: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "train.jsonl", TRAIN_ROWS)
    with single_thread():
        result = api.train(
            model=tiny_model,
            train_data=data,  # one path or a list, str or Path
            output_dir=tmp_path / "out",
            train_group_size=2,
            batch_size=2,
            max_steps=2,
            logging_steps=1,
            cache_dir=tmp_path / "cache",
            show_progress=False,
        )
        assert result.steps == 2 and result.output_dir == tmp_path / "out"
        assert result.budget is not None and result.budget.negatives_used_per_step == 1
        report = tmp_path / "eval.json"
        metrics = api.evaluate(result.output_dir, beir, k=[1, 3], json=report, device="cpu")
    assert set(metrics) == {f"{m}@{k}" for m in ("ndcg", "mrr", "recall", "map") for k in (1, 3)}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert (metrics.queries, metrics.corpus_size, metrics.split) == (3, 6, "test")
    assert metrics.summary().startswith(f"model {result.output_dir} | data {beir} (test)")
    assert "nDCG" in metrics.table()
    record = json.loads(report.read_text())
    assert {k: record[k] for k in metrics} == dict(metrics) and record["queries"] == 3


def test_train_takes_a_config_and_options_override_it(tiny_model: Path, tmp_path: Path) -> None:
    data = write_rows(tmp_path / "train.jsonl", TRAIN_ROWS)
    config = TrainConfig(
        model=str(tiny_model),
        train_data=[str(data)],
        output_dir=str(tmp_path / "out"),
        train_group_size=2,
        batch_size=4,
        max_steps=5,
        cache_dir=str(tmp_path / "cache"),
    )
    with single_thread():
        result = api.train(config, max_steps=1, show_progress=False)
    assert result.steps == 1
    assert config.max_steps == 5  # the caller's config is left as it was


def test_train_options_from_a_yaml_file(tiny_model: Path, tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("train_group_size: 0\n")
    with pytest.raises(UsageError, match=rf"^{run}:1: field 'train_group_size': must be at least"):
        api.train(run, model=tiny_model, train_data="x.jsonl", output_dir=tmp_path / "out")


def test_bad_train_options_raise_the_commands_message(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    need = {"model": tiny_model, "train_data": tmp_path / "x.jsonl", "output_dir": tmp_path / "o"}
    argv = ["train", "--model", str(tiny_model), "--train-data", str(tmp_path / "x.jsonl")]
    argv += ["-o", str(tmp_path / "o"), "--batch-size", "0"]
    with pytest.raises(UsageError) as raised:
        api.train(**need, batch_size=0)
    assert str(raised.value) == cli_error(capsys, argv) == "--batch-size must be at least 1, got 0"
    with pytest.raises(UsageError, match="--model is required"):
        api.train(train_data="x.jsonl", output_dir=tmp_path / "o")
    with pytest.raises(UsageError, match="unknown option 'train_group'; did you mean"):
        api.train(**need, train_group=4)
    with pytest.raises(UsageError, match="--batch-size: expected int, got '8'"):
        api.train(**need, batch_size="8")
    assert not (tmp_path / "o").exists()


def test_evaluate_and_mine_skip_bad_rows_when_asked(
    tiny_model: Path, beir: Path, tmp_path: Path
) -> None:
    with (beir / "queries.jsonl").open("a") as f:
        f.write('{"_id": "q9", "text": ""}\n')
    with (beir / "qrels" / "test.tsv").open("a") as f:
        f.write("q9\td1\t1\n")
    with pytest.raises(UsageError, match="queries.jsonl"):
        api.evaluate(tiny_model, beir, device="cpu", show_progress=False)
    with single_thread():
        metrics = api.evaluate(tiny_model, beir, device="cpu", skip_bad_rows=True)
        assert (metrics.rejected_rows, metrics.rejected_report, metrics.queries) == (1, None, 3)
        out = tmp_path / "mined.jsonl"
        result = api.mine(tiny_model, beir, out, split="test", range=(1, 4), skip_bad_rows=True)
    assert result.rejected_report == tmp_path / "mined.rejected_rows.jsonl"
    assert len(result.rows) == 3 and len(result.rejected) == 2  # the query and its judgement
    assert "bad input rows left out" in result.text


def test_bad_evaluate_options_raise_the_commands_message(
    tiny_model: Path, beir: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["eval", "--model", str(tiny_model), "--data", str(beir)]
    for kwargs, argv in (
        ({"batch_size": 0}, ["--batch-size", "0"]),
        ({"limit_queries": -1}, ["--limit-queries", "-1"]),
        ({"device": "nonsense"}, ["--device", "nonsense"]),
        ({"k": [0]}, ["--k", "0"]),
    ):
        with pytest.raises(UsageError) as raised:
            api.evaluate(tiny_model, beir, **kwargs)
        assert str(raised.value) == cli_error(capsys, [*base, *argv])
    with pytest.raises(UsageError, match="--pooling: 'max' is not one of cls, mean, last_token"):
        api.evaluate(tiny_model, beir, pooling="max")


def test_mine_writes_the_file_and_returns_the_report(
    tiny_model: Path, beir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "mined.jsonl"
    with single_thread():
        result = api.mine(tiny_model, beir, out, split="test", range=(1, 4), negatives=2)
    assert result.output == out and result.report.queries == 3
    assert result.report.rank_range == (1, 4) and result.report.negatives_wanted == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(result.rows) == 3
    assert all(len(r["neg"]) <= 2 and not set(r["neg"]) & set(r["pos"]) for r in rows)
    assert "removed as positives" in result.text and str(out) in result.text
    assert "mining 3 queries against 6 passages" in capsys.readouterr().out


def test_bad_mine_options_are_refused_before_the_model_loads(
    tmp_path: Path, beir: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no-model"  # never loaded: the checks come first
    out = tmp_path / "mined.jsonl"
    base = ["mine", "--model", str(missing), "--data", str(beir), "-o", str(out)]
    for kwargs, argv in (
        ({"negatives": 0}, ["--negatives", "0"]),
        ({"range": "100:10"}, ["--range", "100:10"]),
        ({"margin": 0.1, "relative_margin": 0.1}, ["--margin", "0.1", "--relative-margin", "0.1"]),
        ({"seed": -1}, ["--seed", "-1"]),
    ):
        with pytest.raises(UsageError) as raised:
            api.mine(missing, beir, out, **kwargs)
        assert str(raised.value) == cli_error(capsys, [*base, *argv])
    with pytest.raises(UsageError, match=r"^--range: end 10 is before start 100$"):
        api.mine(missing, beir, out, range=(100, 10))
    with pytest.raises(UsageError, match="--output: folder"):
        api.mine(missing, beir, tmp_path / "nope" / "x.jsonl")
    assert not out.exists()
    out.write_text("old\n")
    with pytest.raises(UsageError, match=r"exists; pass --overwrite to replace it$"):
        api.mine(missing, beir, out)
    with pytest.raises(UsageError, match=r"is one of the input files"):
        api.mine(missing, beir, beir / "queries.jsonl", overwrite=True)
    assert out.read_text() == "old\n"


def test_inspect_returns_audit_budget_and_the_commands_report(
    tmp_path: Path, minilm: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    cache = tmp_path / "cache"
    options = {"model": str(minilm), "train_group_size": 4, "batch_size": 2, "max_steps": 1}
    result = api.inspect(data, cache_dir=cache, show_progress=False, **options)
    assert result.audit.rows == 4 and result.audit.duplicate_queries == 1
    assert result.audit.passage_lengths is not None and result.tokenizer == str(minilm)
    assert result.budget.negatives_used_per_step == 3 and result.budget.epochs == 0.5
    assert result.findings() == [*result.audit.findings(), *result.to_json()["findings"]]
    argv = ["inspect", "--train-data", str(data), "--cache-dir", str(cache), "--no-progress"]
    argv += ["--model", str(minilm), "--train-group-size", "4", "--batch-size", "2"]
    assert main([*argv, "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(result.text + "\n")


def test_bad_inspect_options_raise_the_commands_message(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    base = ["inspect", "--train-data", str(data)]
    for kwargs, argv in (
        ({"nproc": 0}, ["--nproc", "0"]),
        ({"train_group_size": 0}, ["--train-group-size", "0"]),
        ({"negative_fill": "borrow"}, ["--negative-fill", "borrow"]),
        ({"train_group_size": 1, "in_batch_negatives": False},
         ["--train-group-size", "1", "--no-in-batch-negatives"]),
    ):  # fmt: skip
        with pytest.raises(UsageError) as raised:
            api.inspect(data, **kwargs)
        assert str(raised.value) == cli_error(capsys, [*base, *argv])
    with pytest.raises(UsageError, match="--batch-size: expected a whole number, got 2.5"):
        api.inspect(data, batch_size=2.5)


# --- output files: checked before any work ---------------------------------------------------


def test_an_output_file_in_a_folder_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    with read_only_folder(tmp_path) as folder:
        with pytest.raises(UsageError) as raised:
            output_file(folder / "out.jsonl", "--output")
        assert str(raised.value) == f"--output: cannot write to folder {folder}: permission denied"
        # Folders the writer would make: the nearest existing one above must be writable.
        with pytest.raises(UsageError, match=f"^--json: cannot write to folder {folder}: "):
            output_file(folder / "results" / "deeper" / "r.json", "--json", make_folders=True)
    assert output_file(tmp_path / "a" / "b" / "r.json", "--json", make_folders=True)
    assert not (tmp_path / "a").exists()  # checked, not made
    assert list(tmp_path.iterdir()) == [tmp_path / "read-only"]  # the check leaves no file


def test_an_output_file_under_a_file_or_in_a_missing_folder_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with pytest.raises(UsageError, match=rf"^--json: {plain} is not a folder$"):
        output_file(plain / "r.json", "--json", make_folders=True)
    with pytest.raises(UsageError, match=rf"^--output: folder {tmp_path / 'no'} does not exist$"):
        output_file(tmp_path / "no" / "x.jsonl", "--output")
    with pytest.raises(UsageError, match=rf"^--output: {tmp_path} is a folder; give a file name$"):
        output_file(tmp_path, "--output")


def test_root_is_checked_by_creating_a_file_not_by_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embtune.api.options as options

    def refused(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(options.os, "geteuid", lambda: 0)
    monkeypatch.setattr(options.os, "access", lambda *args: True)  # what access() tells root
    assert output_file(tmp_path / "ok.json", "--json") == tmp_path / "ok.json"
    assert list(tmp_path.iterdir()) == []  # the probe file is removed
    monkeypatch.setattr(options.tempfile, "mkstemp", refused)
    with pytest.raises(UsageError) as raised:
        output_file(tmp_path / "r.json", "--json")
    assert str(raised.value) == f"--json: cannot write to folder {tmp_path}: read-only file system"
    # Anyone else: access() answers.
    monkeypatch.setattr(options.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(options.os, "access", lambda *args: False)
    with pytest.raises(UsageError, match="permission denied$"):
        output_file(tmp_path / "r.json", "--json")
