"""Forgetting: reference sets watched during training, interpolation with the base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from embtune.config import TrainConfig
from embtune.errors import UsageError
from embtune.selection import Candidate, choose
from embtune.training.reference_sets import load_reference_sets
from embtune.training.run import LOG_FILE, train
from tests.conftest import single_thread
from tests.test_eval_cli import write_beir
from tests.test_train_step import write_topic_rows


def _config(tiny_model: Path, tmp_path: Path, **options: object) -> TrainConfig:
    data = write_topic_rows(tmp_path / "train.jsonl")
    values: dict = dict(
        model=str(tiny_model), train_data=[str(data)], output_dir=str(tmp_path / "run"),
        batch_size=4, train_group_size=2, max_steps=4, eval_steps=2, logging_steps=1,
        save_steps=0, learning_rate=1e-3, passage_max_len=32, query_max_len=16,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    values.update(options)
    return TrainConfig(**values)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]


def test_reference_sets_are_evaluated_before_training_and_at_each_dev_evaluation(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    general = write_beir(tmp_path / "general")
    config = _config(tiny_model, tmp_path, reference_data=[str(general)])
    with single_thread():
        train(config, show_progress=False)
    evaluations = [r for r in _log(tmp_path / "run") if "reference/general/ndcg@10" in r]
    assert [r["step"] for r in evaluations] == [0, 2, 4]
    assert all(
        {"reference/general/mrr@10", "reference/general/recall@100"} <= set(r) for r in evaluations
    )
    base = evaluations[0]["reference/general/ndcg@10"]
    last = evaluations[-1]["reference/general/ndcg@10"]
    out = capsys.readouterr().out + capsys.readouterr().err
    assert "base model: reference general nDCG@10" in out
    assert f"reference general nDCG@10 {last:.4f} ({last - base:+.4f} against the base)" in out


def test_two_reference_folders_of_one_name_are_told_apart(tmp_path: Path) -> None:
    first = write_beir(tmp_path / "a" / "general")
    second = write_beir(tmp_path / "b" / "general")
    sets = load_reference_sets([str(first), str(second)], "test")
    assert [s.name for s in sets] == ["general", "general-2"]


def test_a_bad_reference_folder_is_refused_before_anything_is_written(
    tiny_model: Path, tmp_path: Path
) -> None:
    general = write_beir(tmp_path / "general")
    (general / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tmissing\t1\n")
    config = _config(tiny_model, tmp_path, reference_data=[str(general)])
    with pytest.raises(UsageError, match=r"test\.tsv:2"):
        train(config, show_progress=False)
    assert not (tmp_path / "run").exists()


def test_the_rule_keeps_dev_within_tolerance_then_takes_the_best_reference() -> None:
    candidates = [
        Candidate(0.25, 0.60, 0.90),
        Candidate(0.5, 0.698, 0.88),
        Candidate(0.75, 0.70, 0.86),
        Candidate(1.0, 0.701, 0.84),
    ]
    choice = choose(candidates, 0.005, "factor")
    assert choice.chosen.value == 0.5  # 0.25 is out of tolerance, 0.5 forgets least of the rest
    assert "factor 0.5" in choice.reason
    without_reference = [Candidate(c.value, c.dev) for c in candidates]
    assert choose(without_reference, 0.005).chosen.value == 0.5  # the closest to the base
    assert choose(without_reference, 0.0).chosen.value == 1.0
    with pytest.raises(ValueError):
        choose([Candidate(1.0, None)], 0.005)


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("factor", ["0", "1"])
def test_interpolation_at_0_is_the_base_and_at_1_the_fine_tuned_model_bit_for_bit(
    tiny_model: Path, tmp_path: Path, factor: str
) -> None:
    config = _config(tiny_model, tmp_path, interpolate_base=factor, eval_steps=0)
    with single_thread():
        result = train(config, show_progress=False)
    mixed = _weights(tmp_path / "run" / "interpolated")
    expected = _weights(tiny_model if factor == "0" else tmp_path / "run")
    assert result.interpolation is not None and result.interpolation.factor == float(factor)
    assert mixed.keys() == expected.keys()
    assert all(mixed[k].equal(expected[k]) for k in expected)


def test_interpolate_auto_scores_each_factor_and_saves_the_choice(
    tiny_model: Path, tmp_path: Path
) -> None:
    general = write_beir(tmp_path / "general")
    config = _config(
        tiny_model, tmp_path, reference_data=[str(general)], dev_fraction=0.25,
        interpolate_base="auto", interpolate_factors=[0.0, 0.5, 1.0], save_best=True,
    )  # fmt: skip
    with single_thread():
        result = train(config, show_progress=False)
    out = tmp_path / "run"
    saved = json.loads((out / "interpolation.json").read_text())
    assert [s["factor"] for s in saved["scores"]] == [0.0, 0.5, 1.0]
    # 0 and 1 are the logged step-0 and best-step evaluations; only 0.5 was measured.
    assert [s["source"].split()[0] for s in saved["scores"]] == ["logged", "evaluated", "logged"]
    assert saved["factor"] == result.interpolation.factor
    assert all("general" in s["reference"] and s["dev"] is not None for s in saved["scores"])
    assert (out / "interpolated" / "model.safetensors").is_file()
    assert (out / "interpolation.png").is_file()
    assert f"**{saved['factor']:g}**" in (out / "interpolation.md").read_text()


def test_interpolate_auto_needs_a_dev_set(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tiny_model, tmp_path, interpolate_base="auto")
    with pytest.raises(UsageError, match="--interpolate-base auto chooses the factor on dev"):
        train(config, show_progress=False)


@pytest.mark.parametrize(
    ("value", "message"),
    [("2", "must be auto or a number in [0, 1]"), ("best", "must be auto or a number")],
)
def test_a_bad_interpolation_factor_is_refused(
    tiny_model: Path, tmp_path: Path, value: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _config(tiny_model, tmp_path, interpolate_base=value).validate()


@pytest.mark.parametrize(
    ("option", "value"), [("reference_data", ["somewhere"]), ("interpolate_base", "0.5")]
)
def test_a_cross_encoder_refuses_reference_sets_and_interpolation_for_now(
    tiny_model: Path, tmp_path: Path, option: str, value: object
) -> None:
    from embtune.kinds import model_kind

    config = _config(tiny_model, tmp_path, model_kind="cross-encoder", **{option: value})
    flag = "--" + option.replace("_", "-")
    with pytest.raises(UsageError, match=f"{flag}: for bi-encoders only so far"):
        model_kind("cross-encoder").check_options(config)


def test_a_full_disk_while_saving_the_interpolated_model_stops_naming_the_offline_merge(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import embtune.training.interpolation as interpolation
    from embtune.errors import TrainingStopped

    def full_disk(folder: Path, write: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(interpolation, "save_atomically", full_disk)
    config = _config(tiny_model, tmp_path, interpolate_base="0.5", eval_steps=0)
    with single_thread(), pytest.raises(TrainingStopped, match="embtune merge --base") as info:
        train(config, show_progress=False)
    assert "--alpha 0.5" in str(info.value)
    assert (tmp_path / "run" / "model.safetensors").is_file()  # the fine-tuned model is kept
    assert not (tmp_path / "run" / "interpolated").exists()
