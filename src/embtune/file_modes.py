"""File modes of what embtune writes: the user's umask decides, as for any file they create.

A folder shared with a group (umask 0o027, or 0o002 in a shared project folder) must get
model files its members can read. Two writers embtune relies on make files private instead:
safetensors writes ``model.safetensors`` with mode 0600 (through a private temporary file,
whatever the umask), and :func:`tempfile.mkstemp` creates 0600 files. So every folder embtune
saves is passed through :func:`follow_umask` before it is renamed into place, and atomic file
writes take :func:`file_mode`: files come out ``0o666 & ~umask`` (0644 under umask 0o022,
0640 under 0o027), folders ``0o777 & ~umask``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_STATUS = "/proc/self/status"


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    # Linux reports it; setting and restoring it instead would give files that another thread
    # (TensorBoard's writer) creates in between a umask of 0.
    try:
        with open(_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(executable: bool = False) -> int:
    """The mode a new file gets under the umask (0o666 & ~umask; 0o777 for executables)."""
    return (0o777 if executable else 0o666) & ~current_umask()


def folder_mode() -> int:
    """The mode a new folder gets under the umask (0o777 & ~umask)."""
    return 0o777 & ~current_umask()


def follow_umask(root: Path) -> None:
    """Give ``root`` and every file and folder below it the umask's mode.

    Only for a tree embtune has just written (a temporary save folder): what is in it is
    ours. Links are left alone (a chmod would change their target); a folder keeps its
    set-group-ID bit, which makes files in a group folder belong to the group.
    """
    files, folders = file_mode(), folder_mode()
    runnable = file_mode(executable=True)
    for top, dirs, names in os.walk(root):
        _chmod_folder(Path(top), folders)
        for name in names:
            path = Path(top, name)
            if path.is_symlink():
                continue
            executable = path.stat().st_mode & 0o111
            path.chmod(runnable if executable else files)
        dirs[:] = [d for d in dirs if not Path(top, d).is_symlink()]


def _chmod_folder(folder: Path, mode: int) -> None:
    kept = folder.stat().st_mode & stat.S_ISGID
    folder.chmod(mode | kept)
