"""What every reader of a user's text file checks first (training data, YAML configs).

Free of heavy imports and of the data package, so config.py (below data/ in the layout) can use
it too.
"""

from __future__ import annotations


def foreign_encoding(raw: bytes) -> str | None:
    """'UTF-16' or 'UTF-32' when ``raw`` starts with that encoding's byte-order mark, else None.

    Windows tools save "Unicode" text as UTF-16; named, the fix is obvious to the user.
    """
    if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    return None
