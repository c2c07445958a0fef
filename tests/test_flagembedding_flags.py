"""FlagEmbedding launch lines move over (issue 18): its underscored spellings and `True` /
`False` booleans become embtune's flags; options without effect are accepted with a note;
unsupported ones are refused together, each with its reason."""

from __future__ import annotations

import argparse

import pytest

from embtune.config import TrainConfig, add_arguments, resolve_config
from embtune.errors import UsageError
from embtune.flagembedding_flags import translate

LINE = """--model_name_or_path BAAI/bge-base-en-v1.5 --train_data a.jsonl b.jsonl
--output_dir out --num_train_epochs 2 --per_device_train_batch_size 4 --learning_rate 1e-5
--train_group_size 4 --query_max_len 32 --passage_max_len 128 --temperature 0.05
--sentence_pooling_method cls --normalize_embeddings False --negatives_cross_device
--query_instruction_for_retrieval Represent: --query_instruction_format {}{} --bf16 True
--warmup_ratio 0.1 --logging_steps 5 --save_steps 100 --dataloader_drop_last True
--kd_loss_type kl_div --use_flash_attn True --overwrite_output_dir""".split()


def config_of(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve_config(parser.parse_args(argv))


def test_a_flagembedding_launch_line_means_the_same_in_embtune() -> None:
    argv, notes = translate(LINE)
    config = config_of(argv)
    assert config.model == "BAAI/bge-base-en-v1.5"
    assert config.train_data == ["a.jsonl", "b.jsonl"]
    assert (config.epochs, config.batch_size, config.learning_rate) == (2, 4, 1e-5)
    assert (config.train_group_size, config.query_max_len, config.passage_max_len) == (4, 32, 128)
    assert (config.pooling, config.normalize, config.temperature) == ("cls", False, 0.05)
    assert config.negatives_cross_device and config.bf16 and config.overwrite_output_dir
    assert config.query_instruction == "Represent:"
    assert config.attn_implementation == "flash_attention_2"
    assert notes == [f"--dataloader_drop_last: accepted, no effect: {notes[0].split(': ', 2)[2]}"]


def test_unsupported_options_are_refused_all_at_once_with_reasons() -> None:
    with pytest.raises(UsageError) as caught:
        translate([*LINE, "--deepspeed", "ds.json", "--gradient_accumulation_steps", "2",
                   "--no_such_option", "1"])  # fmt: skip
    lines = caught.value.lines()
    assert len(lines) == 3
    assert lines[0].startswith("--deepspeed: not supported: ") and "--fsdp" in lines[0]
    assert lines[1].startswith("--gradient_accumulation_steps: not supported: ")
    assert lines[2] == "--no_such_option: not an embtune or FlagEmbedding option"


def test_embtune_spellings_pass_unchanged_and_bad_booleans_are_refused() -> None:
    own = ["--model", "m", "--train-data", "x", "-o", "o", "--pooling", "last_token"]
    assert translate(own) == (own, [])
    with pytest.raises(UsageError, match="--normalize_embeddings: expected True or False"):
        translate(["--normalize_embeddings", "maybe"])
