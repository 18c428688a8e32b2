"""Locks a killed holder never leaves taken, and writes a killed writer never leaves half done."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from drifting_vla.files import FileLock, LockHeld, write_atomic

ROOT = Path(__file__).resolve().parents[1]

HOLD_THE_LOCK = """
import os, sys, time
from drifting_vla.files import FileLock
FileLock(os.path.join(sys.argv[1], ".lock"), "the run directory", "").acquire()
child = os.fork() if sys.argv[2] == "fork" else 0
if child == 0 and sys.argv[2] == "fork":
    time.sleep(60)  # a loader worker that outlives its killed trainer
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def hold_the_lock(run_dir: Path, fork: bool) -> tuple[subprocess.Popen, int]:
    """A process that holds the run directory (and, with `fork`, has a forked child); returns it and the child's pid."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run_dir), "fork" if fork else "no"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return holder, int(holder.stdout.readline())


def test_a_killed_runs_forked_children_do_not_keep_its_directory(tmp_path):
    holder, child = hold_the_lock(tmp_path, fork=True)
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with FileLock(tmp_path / ".lock", "the run directory", ""):
            os.kill(child, 0)  # the child still lives, and holds nothing
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_second_holder_is_refused_naming_the_first_and_the_remedy(tmp_path):
    with FileLock(tmp_path / ".lock", "the thing", "Do something else."):
        with pytest.raises(LockHeld, match=rf"the thing is in use by process {os.getpid()} on .* Do something else."):
            FileLock(tmp_path / ".lock", "the thing", "Do something else.").acquire()
    assert not (tmp_path / ".lock").exists()
    FileLock(tmp_path / ".lock", "the thing", "").acquire().release()


def test_a_write_killed_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_atomic(path, '{"success_rate": 0.5}')

    def killed_midway(self, text):
        with open(self, "w") as f:
            f.write(text[:5])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(Path, "write_text", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, '{"success_rate": 0.75}')
    assert path.read_text() == '{"success_rate": 0.5}'
