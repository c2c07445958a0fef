"""Training options: defaults < YAML < flags, FlagEmbedding aliases, one-line errors, --help."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from embtune.cli import build_parser, main
from embtune.config import TrainConfig, flag, resolve_config
from embtune.errors import UsageError

REQUIRED = ["--model", "m", "--train-data", "train.jsonl", "-o", "out"]


def resolve(*argv: str) -> TrainConfig:
    return resolve_config(build_parser().parse_args(["train", *argv]))


def yaml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def usage_error(*argv: str) -> str:
    with pytest.raises(UsageError) as info:
        resolve(*argv)
    assert len(info.value.lines()) == 1 and "\n" not in str(info.value)
    return str(info.value)


# --- defaults and precedence -------------------------------------------------------------------


def test_defaults() -> None:
    config = resolve(*REQUIRED)
    assert config == TrainConfig(model="m", train_data=["train.jsonl"], output_dir="out")
    assert (config.train_group_size, config.negative_fill, config.in_batch_negatives) == (
        8,
        "corpus",
        True,
    )
    assert (config.temperature, config.batch_size, config.epochs, config.seed) == (0.02, 16, 1, 42)
    assert (config.pooling, config.normalize, config.query_instruction) == (None, True, None)
    assert (config.learning_rate, config.train_split, config.bf16, config.fp16) == (
        2e-5,
        "train",
        False,
        False,
    )


def test_flags_set_options() -> None:
    config = resolve(
        *REQUIRED,
        "--train-group-size", "4",
        "--negative-fill", "shrink",
        "--no-in-batch-negatives",
        "--no-normalize",
        "--pooling", "mean",
        "--temperature", "0.05",
    )  # fmt: skip
    assert (config.train_group_size, config.negative_fill, config.pooling) == (4, "shrink", "mean")
    assert (config.in_batch_negatives, config.normalize, config.temperature) == (False, False, 0.05)


def test_yaml_supplies_options_and_flags_override_it(tmp_path: Path) -> None:
    path = yaml_file(
        tmp_path,
        "model: from-yaml\n"
        "train_data: data.jsonl\n"
        "output_dir: yaml-out\n"
        "batch_size: 4\n"
        "temperature: 1\n"
        "in_batch_negatives: false\n"
        "negative_fill: repeat\n"
        "learning_rate: 3.0e-5\n",
    )
    config = resolve("--config", str(path), "--batch-size", "16", "--in-batch-negatives")
    assert config.model == "from-yaml"
    assert config.train_data == ["data.jsonl"]  # a single path is a list of one
    assert config.output_dir == "yaml-out"
    assert config.temperature == 1.0 and isinstance(config.temperature, float)
    assert (config.negative_fill, config.learning_rate) == ("repeat", 3e-5)
    # flags win, even when they spell out the default value
    assert (config.batch_size, config.in_batch_negatives) == (16, True)
    assert resolve("--config", str(path), "--model", "flag-model").model == "flag-model"


def test_flagembedding_alias_keys(tmp_path: Path) -> None:
    path = yaml_file(
        tmp_path,
        "model_name_or_path: BAAI/bge-small-en-v1.5\n"
        "train_data: [a.jsonl, b.jsonl]\n"
        "output_dir: out\n"
        "per_device_train_batch_size: 32\n"
        "num_train_epochs: 3\n"
        "sentence_pooling_method: mean\n"
        "query_instruction_for_retrieval: 'Represent this query: '\n"
        "normalize_embeddings: false\n",
    )
    config = resolve("--config", str(path))
    assert config.model == "BAAI/bge-small-en-v1.5"
    assert config.train_data == ["a.jsonl", "b.jsonl"]
    assert (config.batch_size, config.epochs, config.pooling) == (32, 3, "mean")
    assert (config.query_instruction, config.normalize) == ("Represent this query: ", False)


def test_yaml_floats_written_without_a_dot_are_floats(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-5 and 5E-2 as strings; users write exactly that.
    path = yaml_file(
        tmp_path,
        "learning_rate: 1e-5\ntemperature: 5E-2\nweight_decay: '0.1'\nwarmup_ratio: 0\n",
    )
    config = resolve("--config", str(path), *REQUIRED)
    assert (config.learning_rate, config.temperature) == (1e-5, 0.05)
    assert (config.weight_decay, config.warmup_ratio) == (0.1, 0.0)
    assert all(
        isinstance(getattr(config, name), float)
        for name in ("learning_rate", "temperature", "weight_decay", "warmup_ratio")
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("learning_rate: 1e-5x\n", "1: field 'learning_rate': expected float or auto, got str"),
        ("learning_rate: ''\n", "1: field 'learning_rate': expected float or auto, got str"),
        ("batch_size: 1e1\n", "1: field 'batch_size': expected int, got str"),
        ("model: 1.0e-5\n", "1: field 'model': expected str, got float"),
        ("learning_rate: 'nan'\n", "1: field 'learning_rate': must be a positive number, got nan"),
    ],
    ids=["not-a-number", "empty", "int-field", "number-for-a-str-field", "nan-text"],
)
def test_only_float_options_read_text_as_a_number(tmp_path: Path, text: str, expected: str) -> None:
    path = yaml_file(tmp_path, text)
    assert usage_error("--config", str(path), *REQUIRED) == f"{path}:{expected}"


@pytest.mark.parametrize(
    ("text", "first", "second"),
    [
        (
            "batch_size: 8\nseed: 1\nper_device_train_batch_size: 4\n",
            "batch_size",
            "per_device_train_batch_size",
        ),
        ("num_train_epochs: 2\nepochs: 3\n", "num_train_epochs", "epochs"),
        ("overwrite: true\noverwrite_output_dir: false\n", "overwrite", "overwrite_output_dir"),
    ],
    ids=["alias-after-name", "name-after-alias", "two-aliases"],
)
def test_two_keys_for_one_option_are_refused_at_the_second(
    tmp_path: Path, text: str, first: str, second: str
) -> None:
    path = yaml_file(tmp_path, text)
    line = text.count("\n")  # the second key is on the last line
    assert usage_error("--config", str(path), *REQUIRED) == (
        f"{path}:{line}: field '{second}': names the same option as '{first}' (line 1); keep one"
    )


def test_skip_bad_rows_is_off_unless_asked_for(tmp_path: Path) -> None:
    assert resolve(*REQUIRED).skip_bad_rows is False
    assert resolve(*REQUIRED, "--skip-bad-rows").skip_bad_rows is True
    path = yaml_file(tmp_path, "skip_bad_rows: true\n")
    assert resolve("--config", str(path), *REQUIRED).skip_bad_rows is True
    assert resolve("--config", str(path), *REQUIRED, "--no-skip-bad-rows").skip_bad_rows is False


def test_an_empty_yaml_file_changes_nothing(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "# nothing yet\n")
    assert resolve("--config", str(path), *REQUIRED).batch_size == 16


# --- YAML errors --------------------------------------------------------------------------------


def test_unknown_yaml_key_names_file_and_line(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "model: m\nbatch_size: 4\nlearning_rat: 1.0e-5\n")
    assert usage_error("--config", str(path)) == (
        f"{path}:3: unknown option 'learning_rat' (see `embtune train --help`)"
    )


def test_config_key_inside_yaml_is_unknown(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "config: other.yaml\n")
    assert usage_error("--config", str(path)).startswith(f"{path}:1: unknown option 'config'")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: m\nbatch_size: '4'\n", "2: field 'batch_size': expected int, got str"),
        ("model: m\n\nepochs: true\n", "3: field 'epochs': expected int, got bool"),
        ("temperature: high\n", "1: field 'temperature': expected float, got str"),
        ("normalize: 1\n", "1: field 'normalize': expected bool, got int"),
        (
            "per_device_train_batch_size: 2.5\n",
            "1: field 'per_device_train_batch_size': expected int, got float",
        ),
        ("pooling: max\n", "1: field 'pooling': 'max' is not one of cls, mean, last_token"),
    ],
    ids=[
        "int-as-str",
        "int-as-bool",
        "float-as-str",
        "bool-as-int",
        "alias",
        "choice",
    ],
)
def test_wrong_type_in_yaml_names_file_line_and_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = yaml_file(tmp_path, text)
    assert usage_error("--config", str(path), *REQUIRED) == f"{path}:{expected}"


def test_a_non_string_item_in_a_yaml_list_is_explained(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "train_data: [a.jsonl, 3]\n")
    message = usage_error("--config", str(path), *REQUIRED)
    assert message.startswith(f"{path}:1: field 'train_data': ")
    assert "expected list, got list" not in message, message  # says what is wrong with it


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "model: m\nbatch_size: [4\n")
    message = usage_error("--config", str(path))
    assert re.match(rf"{re.escape(str(path))}:\d+: malformed YAML: ", message), message


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "- model\n- m\n")
    assert usage_error("--config", str(path)) == f"{path}:1: expected a mapping of option: value"


def test_a_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert usage_error("--config", str(missing)) == f"--config: {missing} does not exist"


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--train-group-size", "0"], "--train-group-size must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--pad-to-multiple-of", "-1"], "--pad-to-multiple-of must not be negative, got -1"),
        (["--temperature", "0"], "--temperature must be a positive number, got 0.0"),
        (["--temperature", "-0.5"], "--temperature must be a positive number, got -0.5"),
        (["--temperature", "nan"], "--temperature must be a positive number, got nan"),
        (["--learning-rate", "0"], "--learning-rate must be a positive number, got 0.0"),
        (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1), got 1.0"),
        (["--max-steps", "-1"], "--max-steps must not be negative, got -1"),
        (["--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
        (["--seed", str(2**32)], f"--seed must be in [0, 2**32 - 1], got {2**32}"),
        (["--bf16", "--fp16"], "--bf16 and --fp16 exclude each other; pick one"),
        (
            ["--train-group-size", "1", "--no-in-batch-negatives"],
            "--train-group-size 1 with --no-in-batch-negatives leaves each query only its "
            "positive: the loss is always 0. Raise the group size or allow in-batch negatives",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else " ".join(x),
)
def test_validation_errors_are_one_line_naming_the_option(argv: list[str], expected: str) -> None:
    assert usage_error(*REQUIRED, *argv) == expected


# learning_rate is a float or the word auto.
FLOAT_OPTIONS = [f.name for f in fields(TrainConfig) if f.type in (float, "float", "float | str")]


def test_the_float_options_are_the_ones_checked_below() -> None:
    assert set(FLOAT_OPTIONS) == {
        "temperature", "learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm",
        "dev_fraction", "teacher_temperature", "auto_tolerance", "lora_alpha", "lora_dropout",
    }  # fmt: skip


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", FLOAT_OPTIONS)
def test_non_finite_float_options_are_refused_from_flags_and_yaml(
    tmp_path: Path, name: str, value: str
) -> None:
    message = usage_error(*REQUIRED, f"{flag(name)}={value}")  # = keeps -inf a value
    assert message.startswith(f"{flag(name)} must be ") and message.endswith(f"got {value}")
    # YAML spells them .nan / .inf / -.inf; the line is named, as for any bad value.
    path = yaml_file(
        tmp_path, f"model: m\n{name}: {value.replace('nan', '.nan').replace('inf', '.inf')}\n"
    )
    message = usage_error("--config", str(path), *REQUIRED)
    assert message.startswith(f"{path}:2: field '{name}': must be "), message
    assert message.endswith(f"got {value}")


def test_an_infinite_weight_decay_is_refused_by_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    path = yaml_file(
        tmp_path, f"model: m\ntrain_data: t.jsonl\noutput_dir: {out}\nweight_decay: .inf\n"
    )
    assert main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"embtune train: error: {path}:4: field 'weight_decay': must be a finite number >= 0, "
        "got inf"
    ]
    assert not out.exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_refused_before_the_output_folder_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: str
) -> None:
    out = tmp_path / "out"
    argv = ["train", "--model", "m", "--train-data", "t.jsonl", "-o", str(out), "--seed", seed]
    assert main(argv) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"embtune train: error: --seed must be in [0, 2**32 - 1], got {seed}"
    assert not out.exists()
    path = yaml_file(tmp_path, f"seed: {seed}\n")
    assert usage_error("--config", str(path), *REQUIRED) == (
        f"{path}:1: field 'seed': must be in [0, 2**32 - 1], got {seed}"
    )


def test_the_extreme_seeds_are_accepted() -> None:
    assert resolve(*REQUIRED, "--seed", "0").seed == 0
    assert resolve(*REQUIRED, "--seed", str(2**32 - 1)).seed == 2**32 - 1


@pytest.mark.parametrize("missing", ["--model", "--train-data", "-o"])
def test_required_options(missing: str) -> None:
    i = REQUIRED.index(missing)
    argv = REQUIRED[:i] + REQUIRED[i + 2 :]
    name = "--output-dir" if missing == "-o" else missing
    assert usage_error(*argv) == f"{name} is required"


def test_group_size_one_is_fine_with_in_batch_negatives() -> None:
    assert resolve(*REQUIRED, "--train-group-size", "1").train_group_size == 1


def test_cli_prints_a_validation_error_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *REQUIRED, "--temperature", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "embtune train: error: --temperature must be a positive number, got 0.0"
    ]
    assert "Traceback" not in captured.err


def test_cli_prints_a_yaml_error_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = yaml_file(tmp_path, "model: m\nwarmup_steps: 100\n")
    assert main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"embtune train: error: {path}:2: unknown option 'warmup_steps' "
        "(see `embtune train --help`)"
    ]


# --- --help -------------------------------------------------------------------------------------


def train_help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """Option flag -> its help text (whitespace collapsed), from the options section."""
    options = text.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    for chunk in re.split(r"\n(?=  -)", options):
        body = " ".join(chunk.split())
        for name in re.findall(r"(?:^|, )(--?[\w-]+)", body):
            entries[name] = body
    return entries


def test_help_lists_every_option_with_its_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = help_entries(train_help(capsys, monkeypatch))
    for f in fields(TrainConfig):
        body = entries[flag(f.name)]
        default = f.default if f.default is not MISSING else f.default_factory()
        if f.name in ("model", "train_data", "output_dir"):
            assert "(required)" in body
        elif f.name in ("pooling", "query_instruction", "passage_instruction", "cache_dir"):
            assert "default: " in body  # described in words
        elif f.name != "config":
            assert f"(default: {default!r})" in body, (f.name, body)
    assert "--no-in-batch-negatives" in entries and "-o" in entries


def test_help_says_required_only_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = help_entries(train_help(capsys, monkeypatch))
    for name in ("--model", "--train-data", "--output-dir"):
        assert entries[name].count("(required)") == 1, entries[name]


def test_a_plain_string_for_a_list_option_is_one_item() -> None:
    from embtune.config import TrainConfig

    config = TrainConfig(train_data="nli.jsonl", reference_data="beir/nq", matryoshka_dims=64)
    assert config.train_data == ["nli.jsonl"]
    assert config.reference_data == ["beir/nq"]
    assert config.matryoshka_dims == [64]
    assert TrainConfig(train_data=["a", "b"]).train_data == ["a", "b"]


def test_the_package_shows_its_public_api() -> None:
    import embtune
    from embtune import api

    assert {"train", "evaluate", "mine", "inspect", "TrainConfig"} <= set(dir(embtune))
    assert embtune.train is api.train
    assert embtune.TrainConfig.__name__ == "TrainConfig"
