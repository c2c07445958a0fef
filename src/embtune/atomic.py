"""Atomic file writes: readers see the old file or the whole new one, never half of it.

Every file embtune writes that a later run trusts (token and embedding caches, mined data,
metrics, checkpoint state, the training log after a resume) goes through here, so a kill or a
full disk never leaves a truncated file that looks valid.

The temporary file is ``.NAME.<pid>@<host>.<random>.tmp`` beside ``NAME``. A writer killed with
SIGKILL cannot remove its own, so the next write of ``NAME`` removes those whose process is gone
(only for this host: on a shared file system another machine's pid means nothing here).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from embtune.file_modes import file_mode

# The host as it appears in temporary names: letters, digits and dashes, so names parse back.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:24] or "host"


def temp_prefix(path: Path, pid: int | None = None) -> str:
    """The start of the temporary names of ``path`` written by process ``pid`` (default: this)."""
    return f".{path.name}.{os.getpid() if pid is None else pid}@{_HOST}."


def _writer_is_gone(pid: int) -> bool:
    """True when no process ``pid`` exists on this host (one we may not signal still exists)."""
    if pid <= 0 or pid == os.getpid() or os.name != "posix":
        return False  # kill(0, ...) would signal our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: another user's live process
        return False
    return False


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Remove the temporary files of ``path`` left by writers of this host that were killed."""
    path = Path(path)
    pattern = re.compile(
        rf"^\.{re.escape(path.name)}\.(\d+)@{re.escape(_HOST)}\.[A-Za-z0-9_]+\.tmp$"
    )
    removed: list[Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and _writer_is_gone(int(match.group(1))):
            try:
                os.unlink(entry.path)
            except OSError:  # removed by another writer meanwhile, or not ours to remove
                continue
            removed.append(Path(entry.path))
    return removed


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp_path)``, flush it to disk, then rename it over ``path``.

    The temporary file sits in the same folder (same file system, so the rename is atomic); on
    any error (a full disk included) it is removed, ``path`` is left untouched and the error is
    raised. Temporary files of ``path`` left by killed writers are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(file_mode())  # mkstemp makes files private; the umask decides instead
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: str | Path, data: object, indent: int = 2) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
