"""`embtune merge`: interpolation is exact at its ends, mixes are weighted means of the weights,
mismatched models and bad options are refused in one line, and the output is written whole."""

from __future__ import annotations

import errno
import inspect as signatures
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from embtune import api
from embtune.cli import build_parser, main
from embtune.errors import UsageError
from embtune.merging import (
    MergeMismatch,
    interpolate_state_dicts,
    mix_state_dicts,
    read_weights,
)
from embtune.models.encoder import SETTINGS_FILE, Encoder
from tests.conftest import single_thread, subprocess_env

TEXTS = ["what is a cell", "A cell is the basic unit of life.", "Volcanoes erupt."]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> SimpleNamespace:
    """A base bi-encoder and a "fine-tuned" one (the base with perturbed weights and its own
    query instruction), saved as embtune saves bi-encoders."""
    folder = tmp_path_factory.mktemp("merge-models")
    encoder = Encoder.from_pretrained(tiny_model)
    encoder.save(folder / "base")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in encoder.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    encoder.settings.query_instruction = "query: "
    encoder.save(folder / "tuned")
    return SimpleNamespace(base=folder / "base", tuned=folder / "tuned", root=folder)


@pytest.fixture(scope="module")
def others(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Models that cannot be merged with `models`: a wider BERT, a RoBERTa, a BERT whose
    config names another architecture, and folders with no weights or a broken config."""
    folder = tmp_path_factory.mktemp("merge-others")
    torch.manual_seed(0)
    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    BertModel(BertConfig(vocab_size=30522, hidden_size=48, **small)).save_pretrained(
        folder / "wide"
    )
    RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, **small)).save_pretrained(
        folder / "roberta"
    )
    (folder / "no-weights").mkdir()  # a model folder without its weights
    shutil.copy(folder / "wide" / "config.json", folder / "no-weights")
    (folder / "bad-config").mkdir()
    (folder / "bad-config" / "config.json").write_text("{not json")
    return SimpleNamespace(**{p.name.replace("-", "_"): p for p in folder.iterdir()})


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def run_merge(*argv: str | Path) -> int:
    with single_thread():
        return main(["merge", *map(str, argv)])


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """The one line `embtune merge` prints for a usage error (after checking it exits 2)."""
    capsys.readouterr()
    assert run_merge(*argv) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("embtune merge: error: ")
    return line.removeprefix("embtune merge: error: ")


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key].view(torch.uint8), tensor.view(torch.uint8)), key


# --- the command -----------------------------------------------------------------------------


def test_interpolation_at_0_is_the_base_and_at_1_the_model_bit_for_bit(
    models: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for alpha, expected in (("0", models.base), ("1", models.tuned)):
        out = tmp_path / f"alpha-{alpha}"
        assert (
            run_merge("--base", models.base, "--model", models.tuned, "--alpha", alpha, "-o", out)
            == 0
        )
        assert_bitwise_equal(weights_of(out), weights_of(expected))
        # The fine-tuned model's files (its settings: its query instruction) in both cases.
        assert (out / SETTINGS_FILE).read_bytes() == (models.tuned / SETTINGS_FILE).read_bytes()
        record = json.loads((out / "merge.json").read_text())
        assert record["formula"] == "(1 - alpha) * base + alpha * model"
        assert record["alpha"] == float(alpha)
        assert [m["model"] for m in record["models"]] == [str(models.base), str(models.tuned)]
        assert [m["weight"] for m in record["models"]] == [1 - float(alpha), float(alpha)]
    report = capsys.readouterr().out
    assert "39 mixed" in report and f"output   {tmp_path / 'alpha-1'}" in report


def test_halfway_is_the_mean_and_loads_in_sentence_transformers_and_embtune(
    models: SimpleNamespace, tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "half"
    assert (
        run_merge("--base", models.base, "--model", models.tuned, "--alpha", "0.5", "-o", out) == 0
    )
    merged, base, tuned = weights_of(out), weights_of(models.base), weights_of(models.tuned)
    assert list(merged) == list(base)
    for key, tensor in merged.items():
        assert tensor.dtype == torch.float32
        assert torch.allclose(tensor, (base[key] + tuned[key]) / 2, rtol=0, atol=1e-7), key
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in models.tuned.iterdir()), "merge.json"]
    )
    with single_thread():
        # The same encoder with the merged weights put in by hand is the reference.
        reference = Encoder.from_pretrained(models.tuned)
        reference.model.load_state_dict(merged, strict=True)
        loaded = Encoder.from_pretrained(out)
        assert loaded.settings.query_instruction == "query: "
        assert torch.equal(loaded.encode_queries(TEXTS), reference.encode_queries(TEXTS))
        assert torch.equal(loaded.encode_passages(TEXTS), reference.encode_passages(TEXTS))
        st = SentenceTransformer(str(out), device="cpu")
        st_queries = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
        st_passages = st.encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(st_queries, reference.encode_queries(TEXTS), atol=1e-5)
    assert torch.allclose(st_passages, reference.encode_passages(TEXTS), atol=1e-5)


def test_a_weighted_average_normalises_the_weights(models: SimpleNamespace, tmp_path: Path) -> None:
    with single_thread():
        result = api.merge([models.base, models.tuned], tmp_path / "mix", weights=["1", "3"])
    merged, base, tuned = (weights_of(f) for f in (tmp_path / "mix", models.base, models.tuned))
    for key, tensor in merged.items():
        assert torch.allclose(tensor, 0.25 * base[key] + 0.75 * tuned[key], rtol=0, atol=1e-7)
    assert [(role, weight) for role, _, weight in result.models] == [
        ("model 1", 0.25),
        ("model 2", 0.75),
    ]
    assert (result.mixed, result.copied, result.alpha) == (39, 0, None)
    record = json.loads((tmp_path / "mix" / "merge.json").read_text())
    assert record["weights_given"] == [1.0, 3.0]
    assert [m["weight"] for m in record["models"]] == [0.25, 0.75]
    # The files come from the first --model (here the base: no query instruction).
    assert (tmp_path / "mix" / SETTINGS_FILE).read_bytes() == (
        models.base / SETTINGS_FILE
    ).read_bytes()


def test_models_of_other_shapes_are_refused_naming_the_first_tensor(
    models: SimpleNamespace, others: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    base, wide = weights_of(models.base), weights_of(others.wide)
    key = next(k for k in base if k in wide and base[k].shape != wide[k].shape)
    message = cli_error(
        capsys, "--base", models.base, "--model", others.wide, "--alpha", "0.5", "-o", "unused"
    )
    shapes = f"shape {list(base[key].shape)} in {models.base}, {list(wide[key].shape)} in "
    assert message == f"tensor {key!r}: {shapes}{others.wide}"
    assert not Path("unused").exists()


def test_models_of_another_architecture_are_refused(
    models: SimpleNamespace,
    others: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    message = cli_error(
        capsys, "--model", models.base, others.roberta, "--weights", "1", "1", "-o", tmp_path / "o"
    )
    assert (
        message == f"config.json: model_type 'bert' in {models.base}, 'roberta' in {others.roberta}"
    )
    masked = tmp_path / "masked"
    shutil.copytree(models.tuned, masked)
    config = json.loads((masked / "config.json").read_text())
    (masked / "config.json").write_text(
        json.dumps({**config, "architectures": ["BertForMaskedLM"]})
    )
    message = cli_error(
        capsys, "--base", models.base, "--model", masked, "--alpha", "1", "-o", tmp_path / "o"
    )
    assert message == (
        f"config.json: architectures ['BertModel'] in {models.base}, "
        f"['BertForMaskedLM'] in {masked}"
    )
    assert not (tmp_path / "o").exists()


BAD_OPTIONS: dict[str, tuple[Callable[[SimpleNamespace, SimpleNamespace], list], str]] = {
    "alpha above 1": (
        lambda m, o: ["--base", m.base, "--model", m.tuned, "--alpha", "1.5"],
        "--alpha: must be in [0, 1], got 1.5",
    ),
    "alpha NaN": (
        lambda m, o: ["--base", m.base, "--model", m.tuned, "--alpha", "nan"],
        "--alpha: expected a finite number, got 'nan'",
    ),
    "alpha not a number": (
        lambda m, o: ["--base", m.base, "--model", m.tuned, "--alpha", "half"],
        "--alpha: expected a number, got 'half'",
    ),
    "alpha missing": (lambda m, o: ["--base", m.base, "--model", m.tuned], "--alpha: required"),
    "alpha without base": (
        lambda m, o: ["--model", m.base, m.tuned, "--alpha", "0.5"],
        "--alpha: needs --base",
    ),
    "base with two models": (
        lambda m, o: ["--base", m.base, "--model", m.tuned, m.tuned, "--alpha", "0.5"],
        "--base: interpolates one --model, got 2",
    ),
    "weights with base": (
        lambda m, o: ["--base", m.base, "--model", m.tuned, "--weights", "1"],
        "--weights: not with --base",
    ),
    "one model to mix": (lambda m, o: ["--model", m.tuned, "--weights", "1"], "--model: give two"),
    "no weights": (lambda m, o: ["--model", m.base, m.tuned], "--weights: required"),
    "weight count": (
        lambda m, o: ["--model", m.base, m.tuned, "--weights", "1", "2", "3"],
        "--weights: 3 weights for 2 models",
    ),
    "negative weight": (
        lambda m, o: ["--model", m.base, m.tuned, "--weights", "-1", "2"],
        "--weights: must be >= 0, got -1, 2",
    ),
    "all weights 0": (
        lambda m, o: ["--model", m.base, m.tuned, "--weights", "0", "0"],
        "--weights: all are 0",
    ),
    "weight NaN": (
        lambda m, o: ["--model", m.base, m.tuned, "--weights", "nan", "1"],
        "--weights: expected a finite number, got 'nan'",
    ),
    "missing folder": (
        lambda m, o: ["--base", m.root / "missing", "--model", m.tuned, "--alpha", "0.5"],
        "--base: folder {m.root}/missing does not exist",
    ),
    "a file as model": (
        lambda m, o: ["--base", m.base / "config.json", "--model", m.tuned, "--alpha", "0.5"],
        "--base: {m.base}/config.json is a file, not a model folder",
    ),
    "folder with no weights": (
        lambda m, o: ["--model", o.wide, o.no_weights, "--weights", "1", "1"],
        "--model: {o.no_weights} has no weights (model.safetensors,",
    ),
    "malformed config.json": (
        lambda m, o: ["--base", o.bad_config, "--model", m.tuned, "--alpha", "0.5"],
        "--base: {o.bad_config}/config.json is not readable JSON: ",
    ),
    "offline hub name": (
        lambda m, o: ["--base", "no-such-owner/no-such-model", "--model", m.tuned, "--alpha", "1"],
        "--base: no-such-owner/no-such-model is not a folder here and cannot be had from the "
        "Hugging Face hub: ",
    ),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_exit_2_with_one_line(
    case: str,
    models: SimpleNamespace,
    others: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv, expected = BAD_OPTIONS[case]
    message = cli_error(capsys, *argv(models, others), "-o", tmp_path / "out")
    assert message.startswith(expected.format(m=models, o=others)), message
    assert not (tmp_path / "out").exists()


def test_the_output_is_replaced_only_with_overwrite_and_never_an_input(
    models: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier file")
    argv = ["--base", models.base, "--model", models.tuned, "--alpha", "1"]
    message = cli_error(capsys, *argv, "-o", out)
    assert message.startswith(f"--output: {out} exists and is not empty; ")
    assert run_merge(*argv, "-o", out, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    (tmp_path / "file").write_text("")
    assert cli_error(capsys, *argv, "-o", tmp_path / "file").startswith("--output: ")
    before = sorted(p.name for p in models.tuned.iterdir())
    for target, option in ((models.tuned, "--model"), (models.root, "--base")):
        message = cli_error(capsys, *argv, "-o", target, "--overwrite")
        assert message.startswith(f"--output: {target} is or holds the {option} model "), message
    assert sorted(p.name for p in models.tuned.iterdir()) == before


def test_a_failed_write_leaves_the_old_output_and_no_partial_folder(
    models: SimpleNamespace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import safetensors.torch

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("kept")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    argv = ["--base", models.base, "--model", models.tuned, "--alpha", "0.5", "-o", out]
    assert run_merge(*argv, "--overwrite") == 3
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"embtune merge: stopped: could not write {out}: the disk is full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .out.tmp left
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_a_run_folder_gives_its_model_files_only_even_to_an_output_inside_it(
    models: SimpleNamespace, tmp_path: Path
) -> None:
    run = tmp_path / "run"  # what `embtune train` leaves: the model, and the run around it
    shutil.copytree(models.tuned, run)
    for name in ("train_log.jsonl", "train_config.yaml", ".embtune.lock", "pytorch_model.bin"):
        (run / name).write_text("not part of the merged model")
    for name in ("checkpoint-2", "best", "onnx"):
        (run / name).mkdir()
        (run / name / "model.safetensors").write_text("stale weights")
    out = run / "merged"
    assert run_merge("--base", models.base, "--model", run, "--alpha", "1", "-o", out) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(p.name for p in models.tuned.iterdir()), "merge.json"]
    )
    assert_bitwise_equal(weights_of(out), weights_of(models.tuned))
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())


def test_sharded_and_pytorch_bin_weights_are_read(models: SimpleNamespace, tmp_path: Path) -> None:
    tuned = weights_of(models.tuned)
    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    torch.save(tuned, as_bin / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(tuned)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        save_file({k: tuned[k] for k in part}, sharded / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder in (as_bin, sharded):
        got = read_weights(folder)
        assert sorted(got) == sorted(tuned)
        assert all(torch.equal(got[k], tuned[k]) for k in tuned)
    (sharded / "b.safetensors").unlink()
    with pytest.raises(UsageError, match=r"names shard b\.safetensors, which is missing"):
        read_weights(sharded)


def test_the_command_in_a_subprocess(models: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--model", models.base, models.tuned, "--weights", "0", "2", "-o", out]
    run = subprocess.run(
        [sys.executable, "-m", "embtune", "merge", *map(str, argv)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"model 2  1         {models.tuned}" in run.stdout
    assert_bitwise_equal(weights_of(out), weights_of(models.tuned))


def test_registering_the_command_and_importing_the_api_load_no_torch() -> None:
    # `embtune --help` must stay instant: the command and api.merge import torch when they run.
    code = (
        "import sys, embtune.api; from embtune.cli import build_parser; build_parser(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_every_option_of_the_command_is_a_parameter_with_its_default() -> None:
    subcommands = build_parser()._subparsers._group_actions[0].choices
    params = signatures.signature(api.merge).parameters
    for action in subcommands["merge"]._actions:
        if action.dest in ("help", "func"):
            continue
        assert action.dest in params, f"--{action.dest} of `embtune merge` is missing"
        assert action.help, action.dest
        default = params[action.dest].default
        if default is signatures.Parameter.empty:
            assert action.required, action.dest
        else:
            assert action.default == default, action.dest


# --- mix_state_dicts -------------------------------------------------------------------------


def special_values(dtype: torch.dtype) -> torch.Tensor:
    # -0.0 (1 x -0.0 + 0 x 0.0 is +0.0), inf (0 x inf is nan) and nan: only a copy keeps them.
    return torch.tensor([-0.0, float("inf"), float("nan"), 1.1, -3.3], dtype=dtype)


def test_one_hot_weights_copy_the_model_exactly() -> None:
    states = [
        {
            "a": special_values(torch.float32) * scale,
            "half": special_values(torch.float16) * scale,
            "bf16": special_values(torch.bfloat16) * scale,
            "t": (torch.randn(3, 4) * scale).t(),  # not contiguous
            "ids": torch.arange(4),
        }
        for scale in (1, 2, 3)
    ]
    for hot in range(3):
        weights = [float(i == hot) for i in range(3)]
        mixed = mix_state_dicts(states, weights, ["A", "B", "C"])
        assert list(mixed) == list(states[hot])
        for key, tensor in states[hot].items():
            got = mixed[key]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
            same_bits = got.contiguous().view(torch.uint8) == tensor.contiguous().view(torch.uint8)
            assert same_bits.all(), key
            assert got.data_ptr() != tensor.data_ptr(), key  # a copy, not the model's tensor


def test_interpolation_mixes_half_precision_in_higher_precision() -> None:
    import numpy as np

    base = {"w": torch.randn(1000, dtype=torch.float16)}
    tuned = {"w": torch.randn(1000, dtype=torch.float16)}
    mixed = interpolate_state_dicts(base, tuned, 0.3)["w"]
    assert torch.equal(interpolate_state_dicts(base, tuned, np.float64(0.3))["w"], mixed)
    want = (0.7 * base["w"].double() + 0.3 * tuned["w"].double()).half()
    assert mixed.dtype == torch.float16 and torch.equal(mixed, want)
    assert torch.equal(interpolate_state_dicts(base, tuned, 0)["w"], base["w"])
    assert torch.equal(interpolate_state_dicts(base, tuned, 1)["w"], tuned["w"])


def test_integer_buffers_are_copied_when_equal_and_refused_when_not() -> None:
    a = {"w": torch.ones(2), "position_ids": torch.arange(4)}
    b = {"w": torch.zeros(2), "position_ids": torch.arange(4)}
    mixed = mix_state_dicts([a, b], [0.5, 0.5], ["A", "B"])
    assert torch.equal(mixed["w"], torch.full((2,), 0.5))
    assert torch.equal(mixed["position_ids"], torch.arange(4))
    b["position_ids"] = torch.arange(4).flip(0)
    with pytest.raises(MergeMismatch, match=r"^tensor 'position_ids' \(int64\): values differ "):
        mix_state_dicts([a, b], [0.5, 0.5], ["A", "B"])


def test_the_first_mismatch_is_named() -> None:
    a = {"x": torch.zeros(3, 4), "classifier.weight": torch.zeros(2), "y": torch.zeros(1)}
    b = {"x": torch.zeros(3, 5), "y": torch.zeros(2), "extra": torch.zeros(1)}
    with pytest.raises(MergeMismatch, match=r"^tensor 'x': shape \[3, 4\] in A, \[3, 5\] in B$"):
        mix_state_dicts([a, b], [0.5, 0.5], ["A", "B"])
    b["x"] = torch.zeros(3, 4)
    with pytest.raises(
        MergeMismatch, match=r"^model B has no tensor 'classifier.weight' that model A has$"
    ):
        mix_state_dicts([a, b], [0.5, 0.5], ["A", "B"])
    b["classifier.weight"], b["y"] = torch.zeros(2), torch.zeros(1, dtype=torch.float16)
    with pytest.raises(MergeMismatch, match=r"^tensor 'y': dtype float32 in A, float16 in B$"):
        mix_state_dicts([a, b], [0.5, 0.5], ["A", "B"])
    b["y"] = torch.zeros(1)
    with pytest.raises(MergeMismatch, match=r"^model A has no tensor 'extra' that model B has$"):
        mix_state_dicts([a, b], [1.0, 0.0], ["A", "B"])  # checked even when nothing is mixed


@pytest.mark.parametrize(
    "weights",
    [[0.5, 0.6], [1.5, -0.5], [float("nan"), 1.0], [1.0], [True, False]],
    ids=["sum", "negative", "nan", "count", "bool"],
)
def test_weights_must_be_one_per_model_and_normalised(weights: list[float]) -> None:
    states = [{"w": torch.zeros(1)}, {"w": torch.ones(1)}]
    with pytest.raises(ValueError):
        mix_state_dicts(states, weights, ["A", "B"])


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan")])
def test_interpolation_refuses_alpha_outside_0_1(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must be a number in"):
        interpolate_state_dicts({"w": torch.zeros(1)}, {"w": torch.ones(1)}, alpha)
