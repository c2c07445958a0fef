"""Atomic file writes: readers see the old file or the whole new one, never half of it.

Every file embtune writes that a later run trusts (token and embedding caches, mined data,
metrics, checkpoint state, the training log after a resume) goes through here, so a kill or a
full disk never leaves a truncated file that looks valid.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp_path)``, flush it to disk, then rename it over ``path``.

    The temporary file sits in the same folder (same file system, so the rename is atomic); on
    any error it is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o644)  # mkstemp makes files private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: str | Path, data: object, indent: int = 2) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
