"""The parity check (issue 15): `embtune check-model`, and the same settings comparison at the
start of `train` and `eval`, against a model's own sentence-transformers configuration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embtune import api
from embtune.cli import main
from embtune.errors import UsageError
from embtune.models.encoder import Encoder
from embtune.models.parity import check_model
from tests.conftest import single_thread
from tests.test_train_integration import _tiny_beir


def copy_with(model: Path, folder: Path, **files: object) -> Path:
    """A copy of ``model`` with some of its JSON files replaced (``name=content``)."""
    shutil.copytree(model, folder)
    for name, content in files.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
    return folder


def test_minilm_embeds_as_its_own_configuration(
    minilm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-model", str(minilm)]) == 0
    out = capsys.readouterr().out
    assert "settings: the same as the model's own" in out
    assert "embeddings agree with sentence-transformers" in out
    report = check_model(Encoder.from_pretrained(minilm), str(minilm))
    assert report.ok and report.max_abs_difference is not None
    assert report.max_abs_difference < 1e-5


def test_another_pooling_is_listed_and_fails_the_check(
    minilm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_file = tmp_path / "parity.json"
    assert main(["check-model", str(minilm), "--pooling", "cls", "--json", str(report_file)]) == 2
    out = capsys.readouterr().out
    assert "pooling: embtune cls, the model's own mean" in out
    assert "embeddings differ with sentence-transformers" in out
    saved = json.loads(report_file.read_text())
    assert saved["ok"] is False
    assert [d["setting"] for d in saved["differences"]] == ["pooling"]


def test_a_dropped_instruction_and_unknown_modules_are_refused_by_train(
    minilm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = json.loads((minilm / "modules.json").read_text())
    dense = {"idx": 9, "name": "9", "path": "9_Dense", "type": "sentence_transformers.models.Dense"}
    model = copy_with(
        minilm,
        tmp_path / "model",
        config_sentence_transformers={"prompts": {"query": "query: ", "document": ""}},
        modules=[*modules, dense],
    )
    data = _tiny_beir(tmp_path / "beir")
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--train-data", str(data), "-o", str(out),
            "--query-instruction", "", "--batch-size", "2", "--train-group-size", "2",
            "--max-steps", "1", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    with single_thread():
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert "query instruction: embtune '', the model's own 'query: '" in err
    assert "sentence_transformers.models.Dense" in err
    assert "--allow-settings-mismatch" in err
    assert not out.exists()  # refused before anything was written


def test_allow_settings_mismatch_trains_and_an_added_instruction_is_not_refused(
    minilm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _tiny_beir(tmp_path / "beir")
    base = ["train", "--model", str(minilm), "--train-data", str(data), "--batch-size", "2",
            "--train-group-size", "2", "--max-steps", "1", "--save-steps", "0",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    with single_thread():
        assert main([*base, "-o", str(tmp_path / "a"), "--pooling", "cls"]) == 2
        assert main([*base, "-o", str(tmp_path / "b"), "--pooling", "cls",
                     "--allow-settings-mismatch"]) == 0  # fmt: skip
        assert main([*base, "-o", str(tmp_path / "c"), "--query-instruction", "query: "]) == 0
    assert "pooling: embtune cls" in capsys.readouterr().err


def test_eval_refuses_another_pooling_unless_allowed(minilm: Path, tmp_path: Path) -> None:
    data = _tiny_beir(tmp_path / "beir")
    with pytest.raises(UsageError, match="pooling: embtune cls, the model's own mean"):
        api.evaluate(minilm, data, "train", pooling="cls", show_progress=False)
    metrics = api.evaluate(
        minilm, data, "train", pooling="cls", allow_settings_mismatch=True, show_progress=False
    )
    assert 0 <= metrics["ndcg@10"] <= 1


def test_a_model_without_a_sentence_transformers_config_has_nothing_to_compare(
    tiny_qwen2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-model", str(tiny_qwen2), "--pooling", "last_token"]) == 0
    assert "nothing to compare" in capsys.readouterr().out
