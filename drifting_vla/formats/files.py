"""Files that survive a crash and a second process: what must have one writer takes a lock, and
what readers open later is written whole or not at all.

    lock = FileLock(run_dir / ".lock", "the run directory runs/x", "train into another directory").acquire()
    ...                                  # LockHeld, naming the holder and the remedy, if it is taken
    lock.release()
    write_atomic(run_dir / "summary.json", text)    # readers see the old file or the new, never half

    with JsonLinesAppender(run_dir / "metrics.jsonl") as lines:
        lines.append({"step": 1, "loss": 0.5})      # one whole line, on disk when append returns
    records = read_jsonl(run_dir / "metrics.jsonl", "Train the run again.")   # a last line cut short: left out

The lock holder writes who it is into the lock file (pid, host, command, start time) for the
message another process gets.

Why `flock`: the kernel drops the lock when its holder dies, SIGKILL and power loss included, so a
lock file left behind never blocks the process that follows; no pid has to be guessed dead. Two
details keep that true:
- A forked child (a DataLoader worker) shares its parent's lock and could hold it for seconds after
  the parent was killed; every child closes its copy right after the fork (`os.register_at_fork`).
- The file is deleted on release, while still locked. A process that opened it just before checks,
  once it holds a lock, that the path still names the file it locked, and otherwise starts over.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed over it: a process killed while
    writing leaves the previous file (or none), never a truncated one that every later reader
    trips over, and a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes: what checkpoints, exports and demo stores record of each
    file they write and check when it is read, since a file damaged at the same size (a bad
    sector, a flipped bit in a copy) passes every check of its size or shape."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_VERIFIED: set[tuple] = set()
"""(path, inode, size, mtime, sha256) of the files this process found to hold what was written."""


def holds_sha256(path: str | os.PathLike, digest: str) -> bool:
    """The file at `path` has the sha256 `digest`: hashed once per process while it stays the same
    file (a store or cache opened again by the same run is not read twice; a file written again
    has another inode or mtime and is hashed again)."""
    stat = os.stat(path)
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, digest)
    if key not in _VERIFIED:
        if file_sha256(path) != digest:
            return False
        _VERIFIED.add(key)
    return True


class JsonLinesAppender:
    """A JSON-lines file (metrics.jsonl, episodes.jsonl) that grows one record at a time while
    others may read it, and that its writer may not live to close. Each record is one `write` of
    a whole line, flushed to disk before `append` returns: a kill costs at most the line being
    written, and what was appended survives a power loss. Opening a file whose last line was cut
    short (by the previous writer's death) ends that line first, so the next record starts a line
    of its own."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                cut_short = f.read(1) != b"\n"
            if cut_short:
                with path.open("ab") as f:
                    f.write(b"\n")
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: Mapping) -> None:
        line = memoryview((json.dumps(record) + "\n").encode())
        while line:  # write() may take less than asked (a signal, a full pipe), never more
            line = line[os.write(self._fd, line):]
        os.fsync(self._fd)

    def close(self) -> None:
        """Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonLinesAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike, remedy: str) -> list:
    """Every record of a JSON-lines file that `JsonLinesAppender` wrote. Its last line, when not
    JSON and without a newline, was cut short by a writer that died mid-line: it is left out with
    a warning naming the file and line. Any other line that is not JSON means the file was damaged
    after it was written: ValueError naming the file and line, and `remedy` (what to do)."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if last and not line:
            break  # the empty rest after the final newline
        try:
            records.append(json.loads(line))
        except ValueError as error:
            if last:
                log.warning("%s line %d was cut short (its writer stopped mid-line) and is left out: %.80r", path, number, line)
                break
            raise ValueError(f"{path} line {number} is not JSON ({error}): the file is damaged. {remedy}") from None
    return records


class LockHeld(RuntimeError):
    """Another live process holds the lock."""


class FileLock:
    def __init__(self, path: str | os.PathLike, what: str, remedy: str) -> None:
        """`what` is locked (for messages: "the run directory runs/x"); `remedy` tells the second
        process what to do instead."""
        self.path, self.what, self.remedy = Path(path), what, remedy
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        """Take the lock now or raise `LockHeld` naming its holder."""
        return self._take(fcntl.LOCK_EX | fcntl.LOCK_NB)

    def wait_and_acquire(self) -> FileLock:
        """Take the lock, first waiting (and saying for whom) while another process holds it."""
        try:
            return self.acquire()
        except LockHeld as held:
            print(f"waiting: {held}", file=sys.stderr, flush=True)
        return self._take(fcntl.LOCK_EX)

    def release(self) -> None:
        """Give the lock back (idempotent); the lock file goes with it."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        _HELD.discard(self)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _take(self, flags: int) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeld(f"{self.what} is in use by {holder}. {self.remedy}") from None
            if _names(self.path, fd):
                break
            os.close(fd)  # released and deleted between our open and our lock: take the new file
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_whoami()).encode())
        self._fd = fd
        _HELD.add(self)
        return self


_HELD: set[FileLock] = set()


def _forget_in_child() -> None:
    """After a fork, in the child: close the inherited locks, so that only the parent holds them."""
    for lock in _HELD:
        os.close(lock._fd)
        lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _names(path: Path, fd: int) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _whoami() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _read_holder(fd: int) -> str:
    """The holder as it described itself, for the message."""
    try:
        holder = json.loads(os.pread(fd, 65536, 0))
        return f"process {holder['pid']} on {holder['host']} since {holder['since']} ({holder['command']})"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"
