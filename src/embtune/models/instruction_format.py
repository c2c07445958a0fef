"""FlagEmbedding's instruction formats (``query_instruction_format``), as text prefixes.

FlagEmbedding builds a query as ``format.format(instruction, query)``: ``"{}{}"`` (its
default) puts the instruction straight before the query, bge-en-icl and
bge-multilingual-gemma2 use ``"<instruct>{}\\n<query>{}"``, Qwen3-Embedding
``"Instruct: {}\\nQuery:{}"``. embtune keeps an instruction as the text put before every
query, which is what sentence-transformers saves as the model's ``query`` prompt. A format
whose text ends with the query is exactly such a prefix, so it is resolved to one here, once,
and training, evaluation and the saved model all use that prefix.
"""

from __future__ import annotations

from embtune.errors import UsageError

DEFAULT_FORMAT = "{}{}"


def check_format(instruction_format: str, option: str) -> None:
    """Refuse a format that is not ``<text>{}<text>{}``: two ``{}``, the second last."""
    if instruction_format.count("{}") != 2 or not instruction_format.endswith("{}"):
        raise UsageError(
            f"{option}: {instruction_format!r} must hold two {{}} (the instruction, then the "
            "text) with the text's last, as in '<instruct>{}\\n<query>{}'"
        )
    probe = instruction_format.replace("{}", "")
    if "{" in probe or "}" in probe:
        raise UsageError(f"{option}: {instruction_format!r} has braces other than the two {{}}")


def instruction_prefix(instruction_format: str, instruction: str | None) -> str | None:
    """The text put before each query (or passage) for ``instruction`` in ``instruction_format``.

    ``None`` stays ``None`` (the model's own prompt is kept) and an empty instruction gives no
    prefix, as FlagEmbedding formats only when an instruction is given.
    """
    if not instruction:
        return instruction
    return instruction_format[: -len("{}")].replace("{}", instruction, 1)
