"""Length-aware batching keeps every row once, keeps randomness and cuts padding."""

from __future__ import annotations

import numpy as np

from embtune.data.length_grouping import length_grouped_batches


def padding(batches: list[np.ndarray], lengths: np.ndarray) -> int:
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


def test_every_row_once_same_batch_sizes_and_the_short_batch_last() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=1003)
    order = rng.permutation(1003)
    batches = length_grouped_batches(order, lengths, 16, seed=1, epoch=0, pool_batches=8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1003))
    assert [len(b) for b in batches] == [16] * 62 + [11]
    assert batches[-1].tolist() == order[992:].tolist()


def test_padding_drops_and_order_stays_random() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=1024)
    order = rng.permutation(1024)
    grouped = length_grouped_batches(order, lengths, 16, seed=1, epoch=0)
    plain = [order[i : i + 16] for i in range(0, 1024, 16)]
    assert padding(grouped, lengths) < padding(plain, lengths) / 4
    # Batch order is shuffled: not sorted by length, and another epoch orders differently.
    longest = [int(lengths[b].max()) for b in grouped]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    other = length_grouped_batches(order, lengths, 16, seed=1, epoch=1)
    assert [b.tolist() for b in other] != [b.tolist() for b in grouped]
    again = length_grouped_batches(order, lengths, 16, seed=1, epoch=0)
    assert [b.tolist() for b in again] == [b.tolist() for b in grouped]
