"""embtune: fine-tune text-embedding models with contrastive learning over hard negatives.

The Python API is :mod:`embtune.api` (``embtune.train``, ``embtune.evaluate``, ... are the same
functions) and :class:`embtune.TrainConfig`; they are loaded on first use, so ``import
embtune`` (and ``embtune --help``) stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = (
    "evaluate", "evaluate_reranking", "inspect", "merge", "mine", "plan", "score", "train",
)  # fmt: skip
__all__ = ["TrainConfig", "__version__", *_API]


def __getattr__(name: str) -> object:
    if name in _API:
        return getattr(importlib.import_module("embtune.api"), name)
    if name == "TrainConfig":
        return importlib.import_module("embtune.config").TrainConfig
    raise AttributeError(f"module 'embtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
