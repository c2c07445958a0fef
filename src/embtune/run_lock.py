"""One run per output folder: a lock held for the run's life.

Two runs writing one folder mix their checkpoints and logs (one checkpoint held another run's
weights under this run's trainer state, and a resume accepted it). The lock is an exclusive
``flock`` on ``OUTPUT/.embtune.lock``: the kernel releases it when the process ends, however it
ends, so a crashed or killed run never leaves a lock that blocks the next one. The file says who
holds it (process, host, start time, command) for the message a second run gets, and is emptied
on release, so a holder that died without releasing is recognisable (its text remains) and its
lock is taken over with a note.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from embtune.run_files import LOCK_FILE


class FolderBusy(Exception):
    """Another live process holds the folder's lock; ``holder`` describes it."""

    def __init__(self, folder: Path, holder: str) -> None:
        self.folder = folder
        self.holder = holder
        super().__init__(f"{folder} is in use by another embtune run ({holder})")


def _describe(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')}, since {started}"


class RunLock:
    """The lock of one output folder; :meth:`acquire` it, :meth:`release` it at the end."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True once :meth:`acquire` succeeded (and until :meth:`release`)."""
        return self._fd is not None

    def acquire(self) -> str | None:
        """Take the lock; FolderBusy when another live process holds it. Returns a note when
        the lock of a run that ended without releasing it was taken over."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise FolderBusy(self.path.parent, _describe(holder) if holder else "unknown") from None
        previous = self._read(fd)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        self._fd = fd
        if previous:
            return (
                "took over the lock of a run that ended without releasing it "
                f"({_describe(previous)})"
            )
        return None

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            raw = os.pread(fd, 65536, 0)
            info = json.loads(raw) if raw.strip() else None
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    @staticmethod
    def holder(folder: Path) -> str | None:
        """Who holds ``folder``'s lock, when a live process does; None otherwise. Takes and
        drops the lock at once, so it answers without keeping anything."""
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            info = RunLock._read(fd)
            return _describe(info) if info else "unknown"
        finally:
            os.close(fd)  # closing drops a shared lock taken here
        return None

    def release(self) -> None:
        """Empty the holder text and release the lock (the file stays: removing it could let
        two runs lock two different files of the same name)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # a full disk must not hide the run's own outcome; the flock still goes
        os.close(self._fd)
        self._fd = None
