"""Decoder LLM embedders (issue 15): last-token pooling under either padding, the EOS policy,
instruction formats, and LoRA training (plain, cached, cross-device, resumed) whose saved
folders sentence-transformers embeds exactly as embtune does.

The models are tiny Qwen2- and Llama-style decoders built in the test (tests/decoder_models.py).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from embtune.checkpoint import KILL_AT_STEP_ENV, list_checkpoints
from embtune.cli import main
from embtune.data.store import tokenizer_fingerprint
from embtune.errors import UsageError
from embtune.models.encoder import Encoder
from embtune.models.instruction_format import check_format, instruction_prefix
from embtune.models.parity import check_model
from embtune.models.special_tokens import append_eos, appends_eos
from tests.conftest import single_thread, subprocess_env
from tests.decoder_models import build_tokenizer
from tests.test_train_step import _free_port, write_topic_rows

TEXTS = ["question", "a much longer passage about a protein and a gene", "cell study result"]


def train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A short decoder run: last-token pooling, EOS appended, left padding."""
    return [
        "train", "--model", str(model), "--train-data", str(data), "-o", str(out),
        "--pooling", "last_token", "--append-eos-token", "--padding-side", "left",
        "--batch-size", "2", "--train-group-size", "3", "--max-steps", "4",
        "--logging-steps", "1", "--save-steps", "0", "--learning-rate", "1e-3", "--seed", "5",
        "--query-max-len", "16", "--passage-max-len", "16",
        "--cache-dir", str(out.parent / "cache"), *extra,
    ]  # fmt: skip


def run_in_process(argv: list[str]) -> int:
    with single_thread():
        return main(argv)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_topic_rows(tmp_path_factory.mktemp("rows") / "train.jsonl")


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_pooling_takes_the_last_real_token_whatever_the_padding(
    tiny_qwen2: Path, side: str
) -> None:
    encoder = Encoder.from_pretrained(
        tiny_qwen2, pooling="last_token", normalize=False, padding_side=side
    )
    batch = encoder.encode(TEXTS, max_len=32)
    for i, text in enumerate(TEXTS):
        ids = encoder.tokenize([text], 32)[0]
        with torch.inference_mode():
            hidden = encoder.model(input_ids=torch.tensor([ids])).last_hidden_state
        # Unpadded, the last real token is the last position: picked by hand.
        assert torch.allclose(batch[i], hidden[0, -1], atol=1e-5), (side, text)
    assert encoder.pad([[1], [1, 2, 3]])["attention_mask"][0].tolist() == (
        [1, 0, 0] if side == "right" else [0, 0, 1]
    )


@pytest.mark.parametrize("style", ["qwen2", "llama"])
def test_append_eos_ends_every_text_with_eos_even_cut_and_survives_saving(
    style: str, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer(style)
    before = tokenizer("question answer")["input_ids"]
    plain_key = tokenizer_fingerprint(tokenizer)
    assert not appends_eos(tokenizer)
    append_eos(tokenizer)
    append_eos(tokenizer)  # a second time changes nothing
    eos = tokenizer.eos_token_id
    ids = tokenizer("question answer")["input_ids"]
    assert ids == [*before, eos]  # Llama's BOS stays first
    cut = tokenizer(" ".join(["question"] * 50), truncation=True, max_length=8)["input_ids"]
    assert len(cut) == 8 and cut[-1] == eos and cut.count(eos) == 1
    assert tokenizer_fingerprint(tokenizer) != plain_key  # the token cache is keyed by it
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("question answer")["input_ids"] == ids


def test_instruction_formats_resolve_to_the_prefix_before_the_text() -> None:
    fmt = "<instruct>{}\n<query>{}"
    prefix = instruction_prefix(fmt, "Given a question, find the answer")
    assert prefix == "<instruct>Given a question, find the answer\n<query>"
    assert prefix + "q" == fmt.format("Given a question, find the answer", "q")
    assert instruction_prefix("Instruct: {}\nQuery:{}", "x") == "Instruct: x\nQuery:"
    assert instruction_prefix(fmt, None) is None and instruction_prefix(fmt, "") == ""
    assert instruction_prefix("{}{}", "a {} b") == "a {} b"
    for bad in ("{}", "{}{}{}", "{} {}!", "{x}{}{}"):
        with pytest.raises(UsageError, match="--query-instruction-format"):
            check_format(bad, "--query-instruction-format")


def test_row_prompts_and_the_saved_query_prompt_follow_the_format(
    tiny_qwen2: Path, rows: Path, tmp_path: Path
) -> None:
    prompted = tmp_path / "prompted.jsonl"
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    lines[0]["prompt"] = "Find the answer"
    prompted.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "run"
    fmt = "<instruct>{}\n<query>{}"
    argv = train_argv(tiny_qwen2, prompted, out, "--max-steps", "1", "--query-instruction",
                      "Retrieve", "--query-instruction-format", fmt)  # fmt: skip
    assert run_in_process(argv) == 0
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"]["query"] == "<instruct>Retrieve\n<query>"
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["row_prompts"]["used"] and summary["row_prompts"]["rows_with_prompt"] == 1
    from embtune.config import TrainConfig
    from embtune.data.formats import load_training_data
    from embtune.kinds.bi_encoder import BiEncoder

    config = TrainConfig(model=str(tiny_qwen2), train_data=[str(prompted)], output_dir="x",
                         query_instruction="Retrieve", query_instruction_format=fmt)  # fmt: skip
    kind = BiEncoder()
    data = load_training_data(config.train_data)
    texts = kind.prepare_texts(kind.load(config), data, config, False)
    queries = texts.texts.queries.texts
    assert queries[0] == "<instruct>Find the answer\n<query>question 0 about topic 0"
    assert queries[1] == "<instruct>Retrieve\n<query>question 1 about topic 1"


@pytest.mark.parametrize(
    ("rule", "instruction", "first", "used"),
    [
        # FlagEmbedding's rule: a row's prompt counts only when an instruction is set.
        ("flagembedding", "", "question 0 about topic 0", False),
        ("flagembedding", "Retrieve: ", "Find: question 0 about topic 0", True),
        ("always", "", "Find: question 0 about topic 0", True),
        ("never", "Retrieve: ", "Retrieve: question 0 about topic 0", False),
    ],
)
def test_row_prompts_follow_the_chosen_rule_and_say_what_they_did(
    rows: Path, tmp_path: Path, rule: str, instruction: str, first: str, used: bool
) -> None:
    from embtune.data.formats import load_training_data
    from embtune.data.pipeline import row_prompt_line, row_prompt_summary, training_texts

    prompted = tmp_path / "prompted.jsonl"
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    lines[0]["prompt"] = "Find: "
    prompted.write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = load_training_data([str(prompted)])
    queries = training_texts(data, instruction, "", row_prompts=rule).queries.texts
    assert queries[0] == first
    assert queries[1] == instruction + "question 1 about topic 1"
    summary = row_prompt_summary(data.records, rule, instruction)
    assert summary == {"rule": rule, "rows_with_prompt": 1, "distinct_prompts": 1,
                       "used": used, "saved_query_prompt": instruction}  # fmt: skip
    line = row_prompt_line(summary)
    assert line.startswith("1 rows carry their own prompt (1 distinct): ")
    assert ("not used" in line) == (not used)
    assert row_prompt_summary(load_training_data([str(rows)]).records, rule, "") is None


def _sentence_transformers_agrees(folder: Path) -> None:
    from sentence_transformers import SentenceTransformer

    ours = Encoder.from_pretrained(folder)
    theirs = SentenceTransformer(str(folder), device="cpu")
    assert theirs.tokenizer.padding_side == ours.tokenizer.padding_side
    got = torch.as_tensor(theirs.encode(TEXTS, prompt_name="query"))
    assert torch.allclose(got, ours.encode_queries(TEXTS), atol=1e-5)
    got = torch.as_tensor(theirs.encode(TEXTS))
    assert torch.allclose(got, ours.encode_passages(TEXTS), atol=1e-5)
    # The parity check passes on a saved folder by construction.
    report = check_model(ours, str(folder))
    assert report.ok and not report.differences, report.lines()


@pytest.mark.parametrize(
    ("style", "extra"),
    [
        ("qwen2", ()),
        ("llama", ()),
        ("qwen2", ("--use-lora", "--lora-rank", "4", "--lora-alpha", "8")),
        ("llama", ("--use-lora", "--lora-rank", "4", "--cache-chunk-size", "2")),
        ("qwen2", ("--use-lora", "--lora-rank", "4", "--gradient-checkpointing", "--bf16")),
    ],
    ids=["qwen2-full", "llama-full", "qwen2-lora", "llama-lora-cached", "qwen2-lora-gc-bf16"],
)
def test_a_decoder_trains_and_sentence_transformers_embeds_the_saved_folder_alike(
    request: pytest.FixtureRequest, style: str, extra: tuple[str, ...], rows: Path, tmp_path: Path
) -> None:
    model = request.getfixturevalue(f"tiny_{style}")
    out = tmp_path / "run"
    assert run_in_process(train_argv(model, rows, out, *extra)) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    lora = "--use-lora" in extra
    assert (out / "adapter_model.safetensors").is_file() == lora
    assert (out / "model.safetensors").is_file() != lora
    assert json.loads((out / "embtune_encoder.json").read_text())["append_eos_token"]
    _sentence_transformers_agrees(out)
    base = Encoder.from_pretrained(model, pooling="last_token")
    tuned = Encoder.from_pretrained(out)
    assert not torch.allclose(base.encode(TEXTS, 16), tuned.encode(TEXTS, 16)), "nothing trained"


def test_lora_saves_the_adapter_and_the_merged_model_that_embed_alike(
    tiny_qwen2: Path, rows: Path, tmp_path: Path
) -> None:
    from transformers import AutoModel

    out = tmp_path / "run"
    argv = train_argv(tiny_qwen2, rows, out, "--use-lora", "--lora-rank", "4",
                      "--save-merged-lora-model")  # fmt: skip
    assert run_in_process(argv) == 0
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_qwen2.resolve())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merged = out / "merged_model"
    assert (merged / "model.safetensors").is_file()
    card = (out / "README.md").read_text()  # an adapter: FlagEmbedding is pointed to the merge
    assert "base_model_relation" not in card  # the base is a local folder, not a Hub repository
    assert "FlagLLMModel(" in card and repr(str(merged)) in card and "- lora" in card
    assert not (merged / "adapter_config.json").exists()
    _sentence_transformers_agrees(merged)
    a, b = Encoder.from_pretrained(out), Encoder.from_pretrained(merged)
    assert torch.allclose(a.encode_queries(TEXTS), b.encode_queries(TEXTS), atol=1e-5)
    # transformers loads both folders as they are (the adapter through its peft integration).
    ids = a.pad(a.tokenize(TEXTS, 16))
    hidden = [AutoModel.from_pretrained(f)(**ids).last_hidden_state for f in (out, merged)]
    assert torch.allclose(hidden[0], hidden[1], atol=1e-5)


def test_from_peft_goes_on_training_the_given_adapter(
    tiny_qwen2: Path, rows: Path, tmp_path: Path
) -> None:
    from embtune.config import TrainConfig
    from embtune.kinds.bi_encoder import BiEncoder

    first = tmp_path / "first"
    assert (
        run_in_process(train_argv(tiny_qwen2, rows, first, "--use-lora", "--lora-rank", "4")) == 0
    )
    config = TrainConfig(model=str(tiny_qwen2), train_data=[str(rows)], output_dir="x",
                         from_peft=str(first))  # fmt: skip
    encoder = BiEncoder().load(config)
    saved = load_file(first / "adapter_model.safetensors")
    trained = {n: p for n, p in encoder.model.named_parameters() if p.requires_grad}
    assert len(trained) == len(saved)
    for name, value in saved.items():
        live = next(
            p
            for n, p in trained.items()
            if n.replace(".default", "").endswith(name.removeprefix("base_model.model."))
        )
        assert torch.equal(live.detach(), value)
    second = tmp_path / "second"
    assert run_in_process(train_argv(tiny_qwen2, rows, second, "--from-peft", str(first))) == 0
    assert (second / "adapter_model.safetensors").is_file()


def test_a_killed_lora_run_resumes_to_the_same_adapter(
    tiny_llama: Path, rows: Path, tmp_path: Path
) -> None:
    extra = ("--use-lora", "--lora-rank", "4", "--save-steps", "2", "--max-steps", "6")
    reference = tmp_path / "reference"
    assert run_in_process(train_argv(tiny_llama, rows, reference, *extra)) == 0
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-m", "embtune", *train_argv(tiny_llama, rows, out, *extra)],
        env=subprocess_env(**{KILL_AT_STEP_ENV: "5"}), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode < 0, killed.stderr[-3000:]
    checkpoint = list_checkpoints(out)[-1]
    # The checkpoint holds the adapter and the optimizer state, not the base weights.
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
    assert run_in_process(train_argv(tiny_llama, rows, out, *extra, "--resume")) == 0
    ours, theirs = (load_file(f / "adapter_model.safetensors") for f in (out, reference))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (reference / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if "loss" in r] == pytest.approx(
        [r["loss"] for r in ref if "loss" in r], abs=1e-6
    )


def test_torchrun_trains_lora_with_cross_device_negatives(tiny_qwen2: Path, tmp_path: Path) -> None:
    data = write_topic_rows(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    argv = train_argv(tiny_qwen2, data, out, "--use-lora", "--lora-rank", "4",
                      "--negatives-cross-device", "--max-steps", "2")  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), "-m", "embtune", *argv]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(r["candidates_per_query"] == 12 for r in log if "loss" in r)  # 2 x 2 x 3
    assert (out / "adapter_model.safetensors").is_file()
    assert "LoRA: trainable" in done.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--use-lora", "--lora-rank", "0"), "--lora-rank"),
        (("--use-lora", "--lora-dropout", "1"), "--lora-dropout"),
        (("--save-merged-lora-model",), "only applies with --use-lora"),
        (("--target-modules", "q_proj"), "only applies with --use-lora"),
        (("--use-lora", "--model-kind", "cross-encoder"), "--use-lora trains bi-encoders"),
        (("--use-lora", "--interpolate-base", "auto"), "--interpolate-base"),
        (("--use-lora", "--target-modules", "no_such_module"), "--target-modules no_such_module"),
        (("--query-instruction-format", "{}"), "--query-instruction-format"),
        (("--padding-side", "middle"), "--padding-side"),
    ],
)
def test_bad_decoder_options_are_one_line_errors(
    tiny_qwen2: Path,
    rows: Path,
    tmp_path: Path,
    extra: tuple[str, ...],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) if "middle" in extra else _no_exit():
        assert run_in_process(train_argv(tiny_qwen2, rows, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (out / "adapter_model.safetensors").exists()


@contextlib.contextmanager
def _no_exit() -> Iterator[None]:
    yield
