"""Locks a killed holder never leaves taken, and writes a killed writer never leaves half done."""

import os
import signal
from pathlib import Path

import pytest

import drifting_vla.formats.files as files
from drifting_vla.evaluation.results import read_episodes
from drifting_vla.formats.files import (
    FileLock,
    JsonLinesAppender,
    LockHeld,
    read_jsonl,
    write_atomic,
)
from tests.helpers import hold_the_lock

ROOT = Path(__file__).resolve().parents[1]





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


def test_each_json_line_is_appended_whole_and_on_disk_when_append_returns(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "episodes.jsonl"
    appender = JsonLinesAppender(path)
    appender.append({"seed": 0, "success": True})
    assert path.read_bytes() == b'{"seed": 0, "success": true}\n' and len(synced) == 1  # before any close
    appender.append({"seed": 1, "error": "x" * 100_000})  # longer than any buffer
    appender.close()
    assert [r["seed"] for r in read_jsonl(path, "")] == [0, 1] and len(synced) == 2


def test_an_evaluation_killed_mid_line_leaves_the_episodes_before_it_readable(tmp_path, caplog):
    with JsonLinesAppender(tmp_path / "episodes.jsonl") as appender:
        appender.append({"task": "reach-v3", "seed": 0, "success": True})
        appender.append({"task": "reach-v3", "seed": 1, "success": False})
    with (tmp_path / "episodes.jsonl").open("ab") as f:
        f.write(b'{"task": "reach-v3", "se')  # the kill
    assert [r["seed"] for r in read_episodes(tmp_path)] == [0, 1]
    assert f"{tmp_path / 'episodes.jsonl'} line 3 was cut short" in caplog.text


def test_a_damaged_line_before_the_last_is_an_error_naming_the_file_and_line(tmp_path):
    (tmp_path / "episodes.jsonl").write_text('{"seed": 0}\n{"seed": \x00\x00}\n{"seed": 2}\n')
    with pytest.raises(ValueError, match=r"episodes.jsonl line 2 is not JSON .*damaged. Run the evaluation again"):
        read_episodes(tmp_path)
    (tmp_path / "episodes.jsonl").write_text('{"seed": 0}\n{"seed": 1\n')  # a last line ended, yet not whole
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_episodes(tmp_path)
