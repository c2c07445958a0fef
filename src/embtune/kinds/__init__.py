"""Model kinds: what a batch holds, how it is padded and scored, evaluated and saved.

Adding one (a decoder-only LLM embedder) is one module with a class like
:class:`~embtune.kinds.bi_encoder.BiEncoder` or :class:`~embtune.kinds.cross_encoder.
CrossEncoderKind` plus its line in :data:`MODEL_KINDS`;
the training loop, the step strategies and the objectives stay as they are
(docs/architecture.md, "Adding a model kind").
"""

from __future__ import annotations

from embtune.kinds.base import ModelKind
from embtune.kinds.bi_encoder import BiEncoder
from embtune.kinds.cross_encoder import CrossEncoderKind

MODEL_KINDS: dict[str, type[ModelKind]] = {
    BiEncoder.name: BiEncoder,
    CrossEncoderKind.name: CrossEncoderKind,
}
DEFAULT_KIND = BiEncoder.name


def model_kind(name: str = DEFAULT_KIND) -> ModelKind:
    """The model kind registered as ``name``."""
    try:
        return MODEL_KINDS[name]()
    except KeyError:
        raise ValueError(f"unknown model kind {name!r}; known: {', '.join(MODEL_KINDS)}") from None
