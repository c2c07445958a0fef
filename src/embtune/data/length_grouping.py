"""Length-aware batching (``--group-by-length``): batches of similar lengths, in random order.

A batch is padded to its longest text, so mixing a 20-token text with a 256-token one computes
236 tokens of padding. Here an epoch's shuffled rows are cut into pools of ``POOL_BATCHES``
batches; inside a pool rows are sorted by the length of their group (longest passage, then
query), cut into batches, and the batches of the whole epoch are shuffled. Randomness across
batches stays (which rows meet in a pool, and the order of batches, change every epoch), while
the padding inside a batch mostly disappears. The trade-off: a batch's in-batch negatives are
texts of similar length, as in Hugging Face Trainer's ``group_by_length``.

The last, smaller batch of an epoch stays last, so the number of steps per epoch and the
batch sizes do not change with this option.
"""

from __future__ import annotations

import numpy as np

POOL_BATCHES = 50


def length_grouped_batches(
    order: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    seed: int,
    epoch: int,
    pool_batches: int = POOL_BATCHES,
) -> list[np.ndarray]:
    """Row indices of each step of an epoch, grouped by length.

    ``order`` is the epoch's shuffled row order, ``lengths`` a sort key per row (indexed by row
    id; larger = longer). Returns the same rows in batches of ``batch_size`` (the last one may be
    smaller and is last).
    """
    full = (len(order) // batch_size) * batch_size
    pool = batch_size * pool_batches
    batches: list[np.ndarray] = []
    for start in range(0, full, pool):
        rows = order[start : min(start + pool, full)]
        # A stable sort keeps the shuffled order among equal lengths.
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
        batches.extend(rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    rng = np.random.default_rng([seed, epoch, 0x1E46])
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if full < len(order):
        batches.append(order[full:])
    return batches
