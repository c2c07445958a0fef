"""Memory sizes as users write them ("20GiB", "512MiB", "1.5G") and the budget a plan uses."""

from __future__ import annotations

import re

from embtune.errors import UsageError

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float, option: str = "--memory-budget") -> int:
    """Bytes of a size such as ``20GiB``, ``512MiB``, ``1.5G`` or a plain byte count.

    Units are binary (GB and GiB both mean 2**30): memory is sold and reported that way.
    """
    if isinstance(text, bool):
        raise UsageError(f"{option}: expected a size such as 20GiB, got {text!r}")
    if isinstance(text, int | float):
        number, unit = float(text), ""
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise UsageError(f"{option}: expected a size such as 20GiB or 512MiB, got {text!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"{option}: must be more than 0, got {text!r}")
    return size


def budget_from_free(free_bytes: int, headroom: float) -> int:
    """The budget when none is given: the free memory less ``headroom`` (a fraction) of it,
    for the allocator's fragmentation and whatever else starts while training runs."""
    return int(free_bytes * (1.0 - headroom))
