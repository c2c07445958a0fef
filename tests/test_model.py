"""Pooling on hand-made tensors; Encoder load/encode/save and what other libraries read back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from embtune.choices import POOLING_MODES
from embtune.errors import UsageError
from embtune.models.encoder import SETTINGS_FILE, Encoder, EncoderSettings, pool, saved_settings

QUERIES = ["what is a cell?", "why do dogs bark at night"]
PASSAGES = [
    "A cell is the basic unit of life.",
    "Dogs bark to communicate, out of boredom, or when they hear something.",
    "Short.",
]

# hidden[b, t] = [10 b + t, -(10 b + t)]: every token of every text is recognisable.
HIDDEN = torch.tensor([[[10.0 * b + t, -(10.0 * b + t)] for t in range(3)] for b in range(2)])
RIGHT = torch.tensor([[1, 1, 0], [1, 1, 1]])
LEFT = torch.tensor([[0, 1, 1], [1, 1, 1]])


# --- pool ---------------------------------------------------------------------------------------


def test_cls_pooling_takes_the_first_token() -> None:
    assert pool(HIDDEN, RIGHT, "cls").tolist() == [[0.0, -0.0], [10.0, -10.0]]


def test_mean_pooling_averages_real_tokens_only() -> None:
    assert pool(HIDDEN, RIGHT, "mean").tolist() == [[0.5, -0.5], [11.0, -11.0]]
    assert pool(HIDDEN, LEFT, "mean").tolist() == [[1.5, -1.5], [11.0, -11.0]]


def test_last_token_pooling_with_right_padding() -> None:
    assert pool(HIDDEN, RIGHT, "last_token").tolist() == [[1.0, -1.0], [12.0, -12.0]]


def test_last_token_pooling_with_left_padding() -> None:
    assert pool(HIDDEN, LEFT, "last_token").tolist() == [[2.0, -2.0], [12.0, -12.0]]


def test_unknown_pooling_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown pooling 'max'"):
        pool(HIDDEN, RIGHT, "max")


# --- Encoder ------------------------------------------------------------------------------------


def test_default_pooling_is_cls_without_a_sentence_transformers_config(tiny_model: Path) -> None:
    assert saved_settings(str(tiny_model)) == EncoderSettings()
    assert Encoder.from_pretrained(tiny_model).settings.pooling == "cls"


def test_default_pooling_follows_minilms_sentence_transformers_config(minilm: Path) -> None:
    settings = saved_settings(str(minilm))
    assert (settings.pooling, settings.normalize) == ("mean", True)


@pytest.mark.parametrize("pooling", POOLING_MODES)
def test_encoder_embeds_with_each_pooling(tiny_model: Path, pooling: str) -> None:
    enc = Encoder.from_pretrained(tiny_model, pooling=pooling)
    assert enc.settings.pooling == pooling
    q = enc.encode_queries(QUERIES)
    p = enc.encode_passages(PASSAGES)
    assert q.shape == (2, 32) and p.shape == (3, 32) and q.dtype == torch.float32
    assert torch.allclose(q.norm(dim=1), torch.ones(2), atol=1e-5)
    # Batching (sorted by length, padded) does not change a text's embedding.
    alone = torch.cat([enc.encode_passages([t]) for t in PASSAGES])
    assert (alone - p).abs().max() < 1e-5


def test_poolings_give_different_embeddings(tiny_model: Path) -> None:
    cls = Encoder.from_pretrained(tiny_model, pooling="cls").encode_passages(PASSAGES)
    mean = Encoder.from_pretrained(tiny_model, pooling="mean").encode_passages(PASSAGES)
    assert (cls - mean).abs().max() > 1e-3


def test_instructions_are_prepended(tiny_model: Path) -> None:
    enc = Encoder.from_pretrained(tiny_model, query_instruction="query: ")
    plain = Encoder.from_pretrained(tiny_model)
    assert (
        enc.encode_queries(QUERIES) - plain.encode(["query: " + q for q in QUERIES], 64)
    ).abs().max() < 1e-6
    assert (enc.encode_queries(QUERIES) - plain.encode_queries(QUERIES)).abs().max() > 1e-4


def test_a_missing_model_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--model: folder .* does not exist"):
        Encoder.from_pretrained(tmp_path / "no-such-model")


def test_a_max_len_beyond_the_position_limit_is_a_usage_error(tiny_model: Path) -> None:
    with pytest.raises(UsageError, match=r"--query-max-len: 1000 is outside 1\.\.512"):
        Encoder.from_pretrained(tiny_model, query_max_len=1000)


# --- save and load elsewhere --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return lambda path: SentenceTransformer(str(path), device="cpu")


@pytest.mark.parametrize("pooling", POOLING_MODES)
def test_saved_model_gives_the_same_embeddings_in_sentence_transformers(
    tiny_model: Path, tmp_path: Path, sentence_transformer, pooling: str
) -> None:
    enc = Encoder.from_pretrained(
        tiny_model, pooling=pooling, query_instruction="query: ", passage_instruction="passage: "
    )
    enc.save(tmp_path / "saved")
    st = sentence_transformer(tmp_path / "saved")
    st_q = torch.from_numpy(st.encode(QUERIES, prompt_name="query"))
    st_p = torch.from_numpy(st.encode(PASSAGES, prompt_name="document"))
    assert (st_q - enc.encode_queries(QUERIES)).abs().max() < 1e-5
    assert (st_p - enc.encode_passages(PASSAGES)).abs().max() < 1e-5
    # and the instructions matter: without the prompt the embeddings differ
    assert (torch.from_numpy(st.encode(QUERIES)) - st_q).abs().max() > 1e-4


def test_saved_unnormalized_model_matches_too(
    tiny_model: Path, tmp_path: Path, sentence_transformer
) -> None:
    enc = Encoder.from_pretrained(tiny_model, pooling="mean", normalize=False)
    enc.save(tmp_path / "saved")
    assert not (tmp_path / "saved" / "2_Normalize").exists()
    st = sentence_transformer(tmp_path / "saved")
    mine = enc.encode_passages(PASSAGES)
    assert (torch.from_numpy(st.encode(PASSAGES)) - mine).abs().max() < 1e-5
    assert (mine.norm(dim=1) - 1).abs().max() > 1e-3


def test_saved_model_loads_with_automodel(tiny_model: Path, tmp_path: Path) -> None:
    enc = Encoder.from_pretrained(tiny_model)
    enc.save(tmp_path / "saved")
    model = AutoModel.from_pretrained(tmp_path / "saved")
    for name, tensor in enc.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_saved_settings_read_back(tiny_model: Path, tmp_path: Path) -> None:
    enc = Encoder.from_pretrained(
        tiny_model,
        pooling="last_token",
        normalize=False,
        query_instruction="Q: ",
        passage_instruction="P: ",
        query_max_len=32,
        passage_max_len=128,
    )
    enc.save(tmp_path / "saved")
    expected = EncoderSettings("last_token", False, "Q: ", "P: ", 32, 128)
    assert saved_settings(str(tmp_path / "saved")) == expected
    assert Encoder.from_pretrained(tmp_path / "saved").settings == expected


def test_settings_come_from_the_sentence_transformers_files_alone(
    tiny_model: Path, tmp_path: Path
) -> None:
    enc = Encoder.from_pretrained(
        tiny_model, pooling="last_token", query_instruction="Q: ", passage_instruction="P: "
    )
    enc.save(tmp_path / "saved")
    (tmp_path / "saved" / SETTINGS_FILE).unlink()
    settings = saved_settings(str(tmp_path / "saved"))
    assert (settings.pooling, settings.normalize) == ("last_token", True)
    assert (settings.query_instruction, settings.passage_instruction) == ("Q: ", "P: ")


def test_bf16_encoding_is_close_to_fp32_and_kept_apart_in_the_cache_key(tiny_model) -> None:
    from embtune.eval.retrieval import corpus_cache_key

    texts = ["a short text", "a somewhat longer text about proteins and cells", "x"]
    full = Encoder.from_pretrained(tiny_model, pooling="mean")
    half = Encoder.from_pretrained(tiny_model, pooling="mean", encode_precision="bf16")
    a, b = full.encode(texts, 32), half.encode(texts, 32)
    assert a.dtype == b.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(a, b)
    assert cosine.min().item() > 0.99
    assert not torch.equal(a, b)  # bf16 did run
    assert corpus_cache_key(full, texts) != corpus_cache_key(half, texts)


def test_an_unknown_encode_precision_is_refused(tiny_model) -> None:
    with pytest.raises(UsageError, match="encode precision 'fp8'"):
        Encoder.from_pretrained(tiny_model, encode_precision="fp8")


@pytest.mark.parametrize(("bf16", "precision"), [(True, "bf16"), (False, "fp32")])
def test_the_bi_encoder_kind_evaluates_in_the_precision_it_trains_in(
    tiny_model, bf16: bool, precision: str
) -> None:
    from embtune.config import TrainConfig
    from embtune.kinds.bi_encoder import BiEncoder

    config = TrainConfig(model=str(tiny_model), train_data=["unused.jsonl"], bf16=bf16)
    assert BiEncoder().load(config).encode_precision == precision
