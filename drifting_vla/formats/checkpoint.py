"""Directories that survive a crash mid-write: checkpoint steps and policy exports alike.

    checkpoints/
      step_00001000/          a whole saved policy (formats/export.py) beside the training state
      .partial-step_00002000-<pid>/   a write in progress (or a crash); never read

A directory is written into a hidden temporary directory beside the final one and renamed into
place with `os.replace`, which is atomic on POSIX file systems: a reader sees either no
`step_00002000` or a whole one. The `complete` marker, written last, records the size and sha256
of every file, and every load checks it: sizes alone miss a file damaged at the same size (a bad
disk sector, a flipped bit in a copy), and such a file would otherwise load as weights nobody
trained. A file that is not in the marker is not part of the directory (`marker_problem` refuses a
directory holding one that steers loading).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from drifting_vla.formats.files import file_sha256

log = logging.getLogger(__name__)

COMPLETE_MARKER = "complete"
FORMAT_VERSION = 3
"""3: a checkpoint step directory holds the export of its EMA policy beside the training state, and
one reader serves both. Directories of earlier (pre-release) versions are refused, naming the version."""

STEERING_FILES = ("config.json", "model.safetensors", "normalization.json", "pretrained_weights.json",
                  "training_model.safetensors", "training_state.pt")
"""The files of a saved policy (formats/export.py) and of a step's training state
(training/checkpoint.py) whose presence or content changes what loads: one present but not
recorded in the marker was added after the write, and is refused (tests/test_checkpoint.py checks
the names against the modules that write them)."""

_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoint_dir_name(step: int) -> str:
    """`step_00001000` for step 1000: zero-padded so names sort like steps."""
    return f"step_{step:08d}"


def is_step_dir(path: Path) -> bool:
    """A `step_XXXXXXXX` directory: a training checkpoint, as opposed to a bare export."""
    return bool(_STEP_DIR.match(path.name))


def step_of(path: str | os.PathLike) -> int:
    """The step a checkpoint directory's marker records."""
    return int(json.loads((Path(path) / COMPLETE_MARKER).read_text())["step"])


# --------------------------------------------------------------------------------------------
# Writing


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk, so a power loss cannot reorder the rename before the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_complete_marker(directory: Path, names: list[str], **fields) -> None:
    """The `complete` marker of `directory`, written last: `fields` (a checkpoint's step) and, for
    each file of `names`, its size and sha256, which every load checks (`marker_problem`). The
    files are flushed to disk first, so a power loss cannot leave a marker for data never written."""
    files = {}
    for name in sorted(names):
        fsync_path(directory / name)
        files[name] = {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
    marker = {**fields, "format_version": FORMAT_VERSION, "files": files}
    (directory / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
    fsync_path(directory / COMPLETE_MARKER)


def seal_checkpoint(path: str | os.PathLike) -> None:
    """Record the files of the checkpoint or export at `path` as they are now, as if written so:
    after editing one on purpose (config.json by hand), which loading would otherwise refuse as
    damaged, or after adding a file that steers loading (`STEERING_FILES`)."""
    path = Path(path)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    fields = {k: v for k, v in marker.items() if k not in ("format_version", "files")}
    added = [name for name in STEERING_FILES if name not in marker["files"] and (path / name).is_file()]
    write_complete_marker(path, [*marker["files"], *added], **fields)


def remove_stale_partials(checkpoints_dir: str | os.PathLike) -> None:
    """Temporary directories left by a run that died while writing a checkpoint (a full disk among
    the causes: they hold the space). Call it only as the run's one writer."""
    for stale in Path(checkpoints_dir).glob(".partial-*"):
        log.warning("removing a partial checkpoint left by an interrupted write: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def write_step_directory(checkpoints_dir: Path, step: int, write_files: Callable[[Path], None]) -> Path:
    """`checkpoints_dir/step_XXXXXXXX/`, written atomically: `write_files(target)` fills a hidden
    temporary directory, the marker seals every file in it, and one rename puts it in place (the
    same step saved again is swapped out whole)."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(checkpoints_dir)
    final = checkpoints_dir / checkpoint_dir_name(step)
    partial = checkpoints_dir / f".partial-{final.name}-{os.getpid()}"
    partial.mkdir()
    try:
        write_files(partial)
        write_complete_marker(partial, [p.name for p in partial.iterdir()], step=step)
    except OSError as error:  # a full disk: give the space back, so the run can resume here
        written = sum(f.stat().st_size for f in partial.iterdir() if f.is_file())
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(
            error.errno, f"cannot write checkpoint step {step} into {checkpoints_dir} ({error.strerror or error}) after "
            f"{written / 2**20:.0f} MiB; the partial write was deleted. Free space there (training.keep_checkpoints "
            "keeps fewer) and resume"
        ) from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        retired = final.with_name(f".partial-retired-{final.name}-{os.getpid()}")
        os.replace(final, retired)
        os.replace(partial, final)
        shutil.rmtree(retired)
    else:
        os.replace(partial, final)
    fsync_path(checkpoints_dir)
    return final


# --------------------------------------------------------------------------------------------
# Checking, finding and pruning


class _NotWhole(Exception):
    """Why a checkpoint or export directory cannot be read (the message of `marker_problem`)."""


def _recorded_files(path: Path) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of the marker, after checking that the write finished, the
    format is this version's and every file is there at its size; raises `_NotWhole`."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise _NotWhole(f"no '{COMPLETE_MARKER}' marker (the write did not finish)")
    try:
        content = json.loads(marker.read_text())
        version = content.get("format_version")
    except (ValueError, AttributeError) as error:
        raise _NotWhole(f"unreadable '{COMPLETE_MARKER}' marker ({type(error).__name__}: {error})") from None
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        remedy = "upgrade drifting-vla to read it" if newer else "save it again with the version that wrote it"
        raise _NotWhole(f"marker format_version {version!r}, this drifting-vla reads {FORMAT_VERSION}: {remedy}")
    try:
        records = {name: {"bytes": int(r["bytes"]), "sha256": str(r["sha256"])} for name, r in content["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise _NotWhole(f"unreadable '{COMPLETE_MARKER}' marker ({type(error).__name__}: {error})") from None
    added = [name for name in STEERING_FILES if name not in records and (path / name).exists()]
    if added:
        raise _NotWhole(
            f"{added} {'is' if len(added) == 1 else 'are'} not recorded in the '{COMPLETE_MARKER}' marker: added after "
            "the directory was written, and would change what loads. Delete it, or, if you put it there on purpose, "
            "record it (drifting_vla.formats.checkpoint.seal_checkpoint)"
        )
    for name, record in records.items():
        file = path / name
        if not file.is_file():
            raise _NotWhole(f"'{name}' is missing")
        if file.stat().st_size != record["bytes"]:
            raise _NotWhole(f"'{name}' has {file.stat().st_size} bytes, the marker says {record['bytes']}")
    return records


def marker_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint or export directory at `path` cannot be read, or None when it is whole:
    the write finished and every file has the sha256 it was written with."""
    path = Path(path)
    try:
        records = _recorded_files(path)
    except _NotWhole as problem:
        return str(problem)
    for name, record in records.items():
        if file_sha256(path / name) != record["sha256"]:
            return (
                f"'{name}' does not hold what was written: its sha256 differs from the marker's (at the "
                f"same size, {record['bytes']} bytes), so it was damaged on disk or in a copy"
            )
    return None


def _write_finished(path: Path) -> bool:
    """The marker is there and every file has its size: enough to prune by, which reads no file."""
    try:
        _recorded_files(path)
    except _NotWhole:
        return False
    return True


def _step_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every `step_*` directory, newest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def find_latest_valid_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest whole checkpoint under `checkpoints_dir` (for `training.resume=auto`), or None.

    Incomplete or damaged ones are skipped with a warning that names them and says why; they are
    left for a person to inspect or delete.
    """
    for _, path in _step_dirs(Path(checkpoints_dir)):
        problem = marker_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s; an older whole checkpoint is used instead", path, problem)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory as given, or the newest whole one under a checkpoints or run directory."""
    path = Path(path).expanduser()
    if is_step_dir(path) or (path / COMPLETE_MARKER).is_file():
        problem = marker_problem(path)
        if problem is not None:
            raise FileNotFoundError(
                f"checkpoint {path} is not whole: {problem}. Copy it again from where it came from, or give "
                f"{path.parent} to use the newest whole checkpoint there"
            )
        return path
    for candidate in (path, path / "checkpoints"):
        found = find_latest_valid_checkpoint(candidate)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"no whole checkpoint at {path}: give a step_XXXXXXXX directory, its checkpoints/ folder or "
        "the run directory holding checkpoints/"
    )


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete whole checkpoints older than the newest `keep_last`; returns what was deleted.

    Damaged directories are left for a person to inspect (`find_latest_valid_checkpoint` names them).
    Whole means the write finished (`_write_finished`): hashing every kept checkpoint at every save
    would read gigabytes to decide what to delete; the content is checked where it is loaded.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the checkpoint to resume from), got {keep_last}")
    whole = [path for _, path in _step_dirs(Path(checkpoints_dir)) if _write_finished(path)]
    deleted = whole[keep_last:]
    for path in deleted:
        shutil.rmtree(path)
    return deleted
