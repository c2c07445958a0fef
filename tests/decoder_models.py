"""Tiny decoder LLMs built in the tests (no download): Qwen2- and Llama-style configs of two
layers with random weights, and byte-level BPE tokenizers trained on a few hundred words.

The tokenizers copy their families' special-token habits, which is what the tests are about:
Qwen2's adds nothing to a text and has no pad token (pad is set to EOS); Llama's puts BOS
before every text and adds no EOS.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "question answer topic document passage query retrieval model embedding vector token "
    "cell protein gene disease study result method patient data analysis effect level "
    "increase decrease risk treatment trial group control sample evidence claim support"
).split()


def _corpus() -> list[str]:
    return [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 12)) for i in range(200)]


def build_tokenizer(style: str):
    """A fast tokenizer in the style of ``qwen2`` or ``llama`` (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] if style == "qwen2" else ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    if style == "qwen2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_decoder(folder: Path, style: str) -> Path:
    """A two-layer ``qwen2`` or ``llama`` model with random weights and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

    torch.manual_seed(0)
    tokenizer = build_tokenizer(style)
    shape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if style == "qwen2":
        model = Qwen2Model(Qwen2Config(**shape))
    else:
        model = LlamaModel(LlamaConfig(**shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
