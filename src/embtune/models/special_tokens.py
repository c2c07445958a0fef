"""The special-token policy of a tokenizer: whether every text ends with the EOS token.

Decoder embedders pool the last token, and their recipes differ on what that token is:
Qwen3-Embedding and e5-mistral end every text with EOS, RepLLaMA appends it by hand
(Tevatron's ``append_eos_token``), FlagEmbedding's decoder recipe loads the tokenizer with
``add_eos_token=True`` (which Llama-family tokenizers honour and others ignore). A model
trained with one policy and used with another embeds differently, silently.

So the policy is written into the tokenizer itself, as a post-processor (the way
Qwen3-Embedding ships it): the saved tokenizer then appends EOS in transformers,
sentence-transformers and embtune alike, truncation keeps room for it (a text cut at the max
length still ends with EOS), and the token cache, keyed by the tokenizer's full definition,
changes with it.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from embtune.errors import UsageError

_PROBE = "probe"


def added_special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's own tokens (BOS, CLS, SEP, EOS)."""
    own = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE)["input_ids"]
    for start in range(len(full) - len(own) + 1):
        if full[start : start + len(own)] == own:
            return full[:start], full[start + len(own) :]
    raise UsageError("the tokenizer's special tokens could not be told from a text's own")


def appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when every tokenized text ends with the tokenizer's EOS token (RoBERTa's ``</s>``
    counts: it is its EOS)."""
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer(_PROBE)["input_ids"][-1:] == [eos]


def append_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make ``tokenizer`` end every text with EOS, in place (nothing when it already does).

    The tokens it already adds stay where they are (Llama's BOS before, BERT's SEP after);
    EOS goes last. Only fast tokenizers have a post-processor to write the policy into.
    """
    if appends_eos(tokenizer):
        return
    if tokenizer.eos_token_id is None:
        raise UsageError("--append-eos-token: the tokenizer has no EOS token")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError(
            "--append-eos-token needs a fast tokenizer (a tokenizer.json); this model has a "
            "slow one"
        )
    from tokenizers import processors

    before, after = added_special_ids(tokenizer)
    head = [tokenizer.convert_ids_to_tokens(i) for i in before]
    tail = [*(tokenizer.convert_ids_to_tokens(i) for i in after), tokenizer.eos_token]
    specials = dict.fromkeys([*head, *tail])
    template = processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, "$B:1", *(f"{t}:1" for t in tail)],
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in specials],
    )
    old = backend.post_processor
    # A ByteLevel post-processor only adjusts offsets, and a template would replace it: keep it
    # in front. Any other (a template, BERT's or RoBERTa's) is what ``before``/``after`` read.
    keep_old = old is not None and type(old).__name__ == "ByteLevel"
    backend.post_processor = processors.Sequence([old, template]) if keep_old else template
    if not appends_eos(tokenizer):
        raise UsageError("--append-eos-token: the tokenizer did not take the EOS policy")
