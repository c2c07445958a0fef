"""`embtune demo` end to end on a tiny subset, and the dataset lookup / download code offline."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from embtune.cli import main
from embtune.demo import demo_precision, download_beir, find_scifact
from embtune.errors import UsageError
from tests.conftest import SCIFACT


def test_demo_runs_end_to_end_on_a_tiny_subset(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    import embtune.models.encoder

    passage_calls: list[int] = []
    original = embtune.models.encoder.Encoder.encode_passages

    def counting(self, passages, *args, **kwargs):
        passage_calls.append(len(passages))
        return original(self, passages, *args, **kwargs)

    monkeypatch.setattr(embtune.models.encoder.Encoder, "encode_passages", counting)
    out = tmp_path / "demo"
    args = ["demo", "--model", str(tiny_model), "--data", str(SCIFACT), "--limit", "24"]
    assert main([*args, "-o", str(out)]) == 0

    payload = json.loads((out / "demo.json").read_text())
    assert payload["dataset"] == "SciFact"  # BEIR's scifact folder, under MTEB's name
    for side in ("before", "after"):
        assert set(payload[side]) >= {"ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100"}
        assert all(0.0 <= v <= 1.0 for v in payload[side].values())
    assert payload["wall_seconds"] > 0
    assert payload["train_queries"] + payload["dev_queries"] == 24
    # The corpus is encoded by the base model for mining (reused for the "before"
    # evaluation), by the fine-tuned model and, unless its weights are the fine-tuned ones
    # (factor 1), by the interpolated model for "after".
    corpus_size = payload["corpus"]
    mixed = payload["interpolation"]["factor"] != 1
    assert passage_calls.count(corpus_size) == 2 + mixed
    assert (out / "curves.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| ndcg@10 |" in report and "total wall time" in report
    # The trade-off: dev, test and the reference set for base, fine-tuned and interpolated.
    models = payload["models"]
    assert list(models) == ["base", "fine_tuned", "interpolated"]
    assert all(set(m["reference"]) == {"debian-packages"} for m in models.values())
    assert models["interpolated"]["test"] == payload["after"]["ndcg@10"]
    assert models["fine_tuned"]["test"] == payload["fine_tuned"]["ndcg@10"]
    assert payload["interpolation"]["factor"] in (0.5, 0.75, 1.0)
    assert "| interpolated, factor" in report and "debian-packages nDCG@10" in report
    assert (out / "model" / "interpolated" / "model.safetensors").is_file()

    dev = json.loads((out / "dev_split.json").read_text())
    dev_ids = {row["query_id"] for row in dev["rows"]}
    trained = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert dev_ids and not dev_ids & {row["query_id"] for row in trained}
    assert (out / "model" / "best" / "model.safetensors").is_file()


def test_demo_refuses_a_non_empty_output_folder(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x").write_text("old")
    code = main(["demo", "--model", str(tiny_model), "--limit", "5", "-o", str(tmp_path)])
    assert code == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--interpolate-base", "1.5"], "--interpolate-base must be auto, off or a number"),
        (["--learning-rate", "-1"], "--learning-rate must be a positive number or auto"),
        (["--reference-data", "nowhere"], "--reference-data: nowhere is not a BEIR folder"),
        (["--dev-evals", "-1"], "--dev-evals must be 0 or more, got -1"),
    ],
)
def test_demo_refuses_bad_options_in_one_line(
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: list[str],
    message: str,
) -> None:
    code = main(["demo", "--model", str(tiny_model), "-o", str(tmp_path / "d"), *option])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "d").exists()


def test_demo_without_a_reference_set_says_so_and_interpolation_can_be_off(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    # SciFact under another folder name: any BEIR folder is named after its folder.
    data = tmp_path / "claims"
    data.symlink_to(SCIFACT, target_is_directory=True)
    args = ["demo", "--model", str(tiny_model), "--data", str(data), "--limit", "12"]
    assert (
        main([*args, "--reference-data", "none", "--interpolate-base", "off", "-o", str(out)]) == 0
    )
    said = capsys.readouterr().out
    assert "no reference set (--reference-data DIR): forgetting not measured" in said
    payload = json.loads((out / "demo.json").read_text())
    assert list(payload["models"]) == ["base", "fine_tuned"] and payload["interpolation"] is None
    assert payload["after"] == payload["fine_tuned"]
    assert payload["dataset"] == "claims" and payload["data"] == str(data)
    assert f"embtune demo: data claims, {data}" in said and "base model on claims test" in said
    assert "\nclaims test, before and after fine-tuning:\n" in said
    report = (out / "report.md").read_text()
    assert f"data claims (`{data}`)" in report
    assert "## Retrieval on the claims test split" in report
    assert "SciFact" not in said + report


def test_demo_precision_and_dev_evaluations_are_options(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    # 40 queries: 36 train, 3 steps of 16 (the dev evaluation falls after step 2).
    args = ["demo", "--model", str(tiny_model), "--data", str(SCIFACT), "--limit", "40"]
    options = ["--reference-data", "none", "--precision", "fp32", "--dev-evals", "1"]
    assert main([*args, *options, "-o", str(out)]) == 0
    said = "embtune demo: training and evaluation in fp32 (given by --precision); mining in fp32"
    assert said in capsys.readouterr().out
    payload = json.loads((out / "demo.json").read_text())
    assert payload["recipe"]["precision"] == "fp32" and payload["recipe"]["dev_evals"] == 1
    assert payload["precision_reason"] == "given by --precision"
    # One dev evaluation between the one before training (step 0) and the one at the end.
    log = (out / "model" / "train_log.jsonl").read_text().splitlines()
    dev_steps = [row["step"] for row in map(json.loads, log) if "dev_ndcg@10" in row]
    assert len(dev_steps) == 3 and dev_steps[0] == 0 < dev_steps[1] < dev_steps[2], dev_steps


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: str
) -> None:
    import embtune.hardware_plan.measure

    monkeypatch.setattr(embtune.hardware_plan.measure, "native_bf16", lambda device: native)
    precision, why = demo_precision("auto")
    assert precision == expected and "native" in why
    assert demo_precision("fp32") == ("fp32", "given by --precision")
    assert demo_precision("bf16") == ("bf16", "given by --precision")
    with pytest.raises(UsageError, match="unknown value 'fp16'"):
        demo_precision("fp16")


def _beir_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("scifact/corpus.jsonl", '{"_id": "d1", "title": "t", "text": "x"}\n')
        zf.writestr("scifact/queries.jsonl", '{"_id": "q1", "text": "y"}\n')
        zf.writestr("scifact/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return path


def test_download_unpacks_a_beir_archive(tmp_path: Path) -> None:
    archive = _beir_zip(tmp_path / "scifact.zip")
    folder = download_beir("scifact", tmp_path / "datasets", url=archive.as_uri())
    assert folder == tmp_path / "datasets" / "scifact"
    assert (folder / "qrels" / "test.tsv").is_file()
    assert [p.name for p in (tmp_path / "datasets").iterdir()] == ["scifact"]


def test_download_rejects_an_archive_that_is_not_beir(tmp_path: Path) -> None:
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    with pytest.raises(UsageError, match="not a BEIR archive"):
        download_beir("scifact", tmp_path / "datasets", url=archive.as_uri())
    assert not (tmp_path / "datasets" / "scifact").exists()


def test_lookup_order_explicit_then_environment_then_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_scifact(SCIFACT) == SCIFACT
    with pytest.raises(UsageError, match="--data"):
        find_scifact(tmp_path)
    monkeypatch.setenv("EMBTUNE_SCIFACT", str(SCIFACT))
    assert find_scifact() == SCIFACT
    # Nothing anywhere: the archive is downloaded into the cache.
    monkeypatch.delenv("EMBTUNE_SCIFACT")
    monkeypatch.setenv("EMBTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("embtune.demo.CHECKOUT_SCIFACT", tmp_path / "no-checkout")
    archive = _beir_zip(tmp_path / "scifact.zip")
    found = find_scifact(download_url=archive.as_uri())
    assert found == tmp_path / "cache" / "datasets" / "scifact"
