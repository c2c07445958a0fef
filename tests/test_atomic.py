"""embtune.atomic: whole files or none, stale temporary files of killed writers, a full disk."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from embtune import atomic
from embtune.atomic import atomic_write, temp_prefix, write_json_atomically
from embtune.file_modes import current_umask
from tests.conftest import umask


@contextlib.contextmanager
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder where no file can be created: a mode-555 folder, or for root (who writes there
    anyway) sysfs, which refuses root although os.access says yes. Skips when neither is."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not _can_create_in(folder):
            yield folder
        elif Path("/sys").is_dir() and not _can_create_in(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.skip("no folder here refuses to be written (root on a writable sysfs)")
    finally:
        folder.chmod(0o755)


def _can_create_in(folder: Path) -> bool:
    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def json_writer_on_a_full_disk(path: str | Path, data: object, indent: int = 2) -> None:
    """write_json_atomically on a disk that fills halfway through the file."""

    def write(tmp: Path) -> None:
        tmp.write_text('{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    atomic_write(path, write)


# --- atomic_write ----------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    seen: list[str] = []

    def write(tmp: Path) -> None:
        seen.append(tmp.name)
        tmp.write_text("new")

    atomic_write(target, write)
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    # Named so that a later write can tell whose it was: .NAME.<pid>@<host>.<random>.tmp
    assert seen[0].startswith(temp_prefix(target)) and seen[0].endswith(".tmp")
    assert temp_prefix(target).startswith(f".out.json.{os.getpid()}@")


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_a_written_file_gets_the_mode_the_umask_gives(tmp_path: Path, mask: int, mode: int) -> None:
    # mkstemp's temporary file is 0600; the result must be as shareable as the user's files.
    with umask(mask):
        assert current_umask() == mask
        write_json_atomically(tmp_path / "summary.json", {"steps": 5})
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == mode


def test_stale_temporary_files_of_dead_writers_are_removed_by_the_next_write(
    tmp_path: Path,
) -> None:
    target = tmp_path / "mined.jsonl"
    dead = dead_pid()
    stale = tmp_path / f"{temp_prefix(target, dead)}k3x_9q.tmp"
    live_parent = tmp_path / f"{temp_prefix(target, os.getppid())}abc123.tmp"  # still running
    mine = tmp_path / f"{temp_prefix(target)}inflight.tmp"  # this process: another thread's
    other_target = tmp_path / f"{temp_prefix(tmp_path / 'other.jsonl', dead)}abc.tmp"
    other_host = tmp_path / f".mined.jsonl.{dead}@some-other-host.abc.tmp"  # shared disk
    not_ours = tmp_path / ".mined.jsonl.abc123.tmp"  # no pid: nothing to go by
    for path in (stale, live_parent, mine, other_target, other_host, not_ours):
        path.write_text("half")
    atomic_write(target, lambda tmp: tmp.write_text("rows\n"))
    assert target.read_text() == "rows\n"
    assert not stale.exists()
    assert all(p.exists() for p in (live_parent, mine, other_target, other_host, not_ours))


def test_a_sigkilled_writer_leaves_a_temporary_file_the_next_write_removes(
    tmp_path: Path,
) -> None:
    target = tmp_path / "mined.jsonl"
    target.write_text("old\n")
    code = (
        "import os, signal, sys\n"
        "from embtune.atomic import atomic_write\n"
        "def write(tmp):\n"
        "    tmp.write_text('half of the ro')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and left[0].startswith(".mined.jsonl.") and left[0].endswith(".tmp")
    assert target.read_text() == "old\n"  # the kill cost nothing but the temporary file
    atomic_write(target, lambda tmp: tmp.write_text("new\n"))
    assert [p.name for p in tmp_path.iterdir()] == ["mined.jsonl"]
    assert target.read_text() == "new\n"


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_removes_the_temporary_file_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(tmp: Path) -> None:
        tmp.write_text("partial")
        if where == "write":
            full()

    if where == "fsync":  # delayed allocation: the disk fills when the data is flushed
        monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError) as raised:
        atomic_write(target, write)
    assert raised.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert target.read_text() == "old"


def test_the_stale_file_check_never_signals_a_process_group_or_this_process() -> None:
    assert not atomic._writer_is_gone(0)
    assert not atomic._writer_is_gone(-1)
    assert not atomic._writer_is_gone(os.getpid())
    assert atomic._writer_is_gone(dead_pid())
