"""Checkpoints that survive a crash mid-write, and resume to bit-identical training on CPU.

Layout, one directory per optimizer step:

    checkpoints/
      step_00001000/
        model.safetensors     the model's weights, except frozen pretrained ones (below)
        ema.safetensors       the EMA shadow weights (what is evaluated and exported)
        trainer_state.pt      optimizer, scheduler, RNG states, step, sampler position, extra
        config.yaml           the resolved config of the run
        normalization.json    the action/proprio normalization statistics
        pretrained_weights.json   only with frozen pretrained encoders: what they are, not a copy
        complete              written last: {"step", "format_version",
                                             "files": {name: {"bytes", "sha256"}}}
      .partial-step_00002000-<pid>/   a write in progress (or a crash); never read

A checkpoint is written into a hidden temporary directory beside the final one and renamed into
place with `os.replace`, which is atomic on POSIX file systems: a reader sees either no
`step_00002000` or a whole one. The `complete` marker records the sha256 of every file, and every
load checks it: sizes alone miss a file damaged at the same size (a bad disk sector, a flipped
bit in a copy), and such a file would otherwise load as weights nobody trained. Checkpoints from
before the hashes (markers of sizes only) are still read, checked by size, with a warning.

`trainer_state.pt` holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: a checkpoint from somewhere else cannot run code.

Frozen pretrained encoders (DINOv2-L + CLIP-L text: 427M parameters, 1.7 GB in fp32) never change
and can be fetched again by hub id and revision, so they are referenced, not stored:
`pretrained_weights.json` maps each one's state-dict prefix to its config section, source, the
commit it was loaded at and a sha256 of its tensors. Loading builds the model with those encoders
loaded from their source, loads everything stored strictly, and refuses encoder weights whose hash
differs. Trained encoders (the CNN, task embeddings) and random-init ones (`model.pretrained=false`)
have no source and are stored as before.

Every file holds FULL (unsharded) state, whatever the training strategy: under FSDP,
`gather_training_state` all-gathers it on every rank and rank 0 writes it; loading puts a full
state into a plain, DDP or FSDP-sharded model alike. A checkpoint written by an 8-GPU FSDP run
loads into a CPU policy, and the other way round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from drifting_vla.files import file_sha256
from drifting_vla.training.distributed import full_tensor
from drifting_vla.training.ema import EMA

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
NORMALIZATION_FILE = "normalization.json"
REFERENCES_FILE = "pretrained_weights.json"
COMPLETE_MARKER = "complete"
STEERING_FILES = (MODEL_FILE, EMA_FILE, TRAINER_STATE_FILE, CONFIG_FILE, NORMALIZATION_FILE, REFERENCES_FILE, "config.json")
"""The files whose presence or content changes what loads (config.json: an export's config): one
present but not recorded in the marker was added after the write, and is refused."""
FORMAT_VERSION = 2
"""Of the `complete` marker (of checkpoints and exports): 1 recorded sizes only, 2 adds each file's
sha256. A reader refuses versions above its own rather than misread files a newer drifting-vla wrote."""
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoint_dir_name(step: int) -> str:
    """`step_00001000` for step 1000: zero-padded so names sort like steps."""
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------------
# RNG states


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a training step draws from: python, numpy, torch, cuda.

    numpy's key array is stored as a torch tensor so the result loads with `weights_only=True`.
    """
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what `capture_rng_state` captured; the next draws repeat the captured run's draws."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {
                "key": numpy_state["key"].numpy().astype(np.uint32),
                "pos": numpy_state["pos"],
            },
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        _restore_cuda_rng_state(state["cuda"])


def _restore_cuda_rng_state(cuda_states: list[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        log.warning(
            "the checkpoint has CUDA RNG states but no GPU is visible; they are not restored"
        )
        return
    if len(cuda_states) != torch.cuda.device_count():
        log.warning(
            "the checkpoint has CUDA RNG states for %d devices but %d are visible; not restored, so "
            "GPU random draws will differ from the original run",
            len(cuda_states),
            torch.cuda.device_count(),
        )
        return
    torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------------------------
# Writing


def _json_default(value: Any) -> Any:
    """Tensors and arrays in the normalization stats become nested lists."""
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"normalization stats hold a {type(value).__name__}, which is not JSON data")


def _fsync_path(path: Path) -> None:
    """Flush a file or directory to disk, so a power loss cannot reorder the rename before the data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(
    target: Path,
    *,
    step: int,
    state: TrainingState,
    trainer_state: dict[str, Any],
    config: Mapping,
    normalization: Mapping,
) -> None:
    """Every checkpoint file except the marker, into the (temporary) directory `target`."""
    stored, references = split_referenced(state.model, state.referenced)
    for name, tensors in ((MODEL_FILE, stored), (EMA_FILE, state.ema)):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / name), metadata={"step": str(step)})
    write_references(target, references)
    torch.save(trainer_state, target / TRAINER_STATE_FILE)
    (target / CONFIG_FILE).write_text(yaml.safe_dump(dict(config), sort_keys=False))
    (target / NORMALIZATION_FILE).write_text(
        json.dumps(dict(normalization), indent=2, default=_json_default)
    )


def write_complete_marker(directory: Path, names: list[str], **fields) -> None:
    """The `complete` marker of `directory`, written last: `fields` (a checkpoint's step) and, for
    each file of `names`, its size and sha256, which every load checks (`marker_problem`). The
    files are flushed to disk first, so a power loss cannot leave a marker for data never written."""
    files = {}
    for name in sorted(names):
        _fsync_path(directory / name)
        files[name] = {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
    marker = {**fields, "format_version": FORMAT_VERSION, "files": files}
    (directory / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
    _fsync_path(directory / COMPLETE_MARKER)


def seal_checkpoint(path: str | os.PathLike) -> None:
    """Record the files of the checkpoint or export at `path` as they are now, as if written so:
    after editing one on purpose (config.yaml or config.json by hand), which loading would
    otherwise refuse as damaged, or after adding a file that steers loading (`STEERING_FILES`)."""
    path = Path(path)
    marker = json.loads((path / COMPLETE_MARKER).read_text())
    fields = {k: v for k, v in marker.items() if k not in ("format_version", "files")}
    added = [name for name in STEERING_FILES if name not in marker["files"] and (path / name).is_file()]
    write_complete_marker(path, [*marker["files"], *added], **fields)


def remove_stale_partials(checkpoints_dir: str | os.PathLike) -> None:
    """Temporary directories left by a run that died while writing a checkpoint (a full disk
    among the causes: they hold the space). Call it only as the run's one writer."""
    for stale in Path(checkpoints_dir).glob(".partial-*"):
        log.warning("removing a partial checkpoint left by an interrupted write: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    checkpoints_dir: str | os.PathLike,
    *,
    step: int,
    state: TrainingState,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: Mapping,
    normalization: Mapping,
    sampler_state: Mapping | None = None,
    extra: Mapping | None = None,
) -> Path:
    """Write `checkpoints_dir/step_XXXXXXXX/` atomically and return its path.

    `state` comes from `gather_training_state` (on every rank), `config` the resolved config as plain data
    (`OmegaConf.to_container(cfg, resolve=True)`), `normalization` JSON-able stats (tensors and
    arrays are converted), `sampler_state` where the data sampler stands (epoch, index), `extra`
    any other plain data the trainer needs back. The RNG states are captured here, so call this at
    the point the resumed run should continue from. Call it on rank 0 only.
    """
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(checkpoints_dir)
    final = checkpoints_dir / checkpoint_dir_name(step)
    partial_dir = checkpoints_dir / f".partial-{final.name}-{os.getpid()}"
    partial_dir.mkdir()
    trainer_state = {
        "step": step,
        "optimizer": state.optimizer,
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "sampler": dict(sampler_state or {}),
        "extra": dict(extra or {}),
    }
    try:
        _write_files(
            partial_dir,
            step=step,
            state=state,
            trainer_state=trainer_state,
            config=config,
            normalization=normalization,
        )
        write_complete_marker(partial_dir, [p.name for p in partial_dir.iterdir()], step=step)
    except OSError as error:  # a full disk: give the space back, so the run can resume here
        written = sum(f.stat().st_size for f in partial_dir.iterdir() if f.is_file())
        shutil.rmtree(partial_dir, ignore_errors=True)
        raise OSError(
            error.errno, f"cannot write checkpoint step {step} into {checkpoints_dir} ({error.strerror or error}) after "
            f"{written / 2**20:.0f} MiB; the partial write was deleted. Free space there (training.keep_checkpoints "
            "keeps fewer) and resume"
        ) from error
    _replace_directory(partial_dir, final)
    _fsync_path(checkpoints_dir)
    return final


def _replace_directory(source: Path, final: Path) -> None:
    """Rename `source` to `final`; an existing `final` (the same step saved again) is swapped out."""
    if not final.exists():
        os.replace(source, final)
        return
    retired = final.with_name(f".partial-retired-{final.name}-{os.getpid()}")
    os.replace(final, retired)
    os.replace(source, final)
    shutil.rmtree(retired)


# --------------------------------------------------------------------------------------------
# Finding and pruning


class _NotWhole(Exception):
    """Why a checkpoint or export directory cannot be read (the message of `marker_problem`)."""


def _recorded_files(path: Path) -> dict[str, dict]:
    """{name: {"bytes", and "sha256" from format 2 on}} of the marker, after checking that the
    write finished and every file is there at its size; raises `_NotWhole`."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        raise _NotWhole(f"no '{COMPLETE_MARKER}' marker (the write did not finish)")
    try:
        content = json.loads(marker.read_text())
        version, files = int(content.get("format_version", 1)), content["files"]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise _NotWhole(f"unreadable '{COMPLETE_MARKER}' marker ({type(error).__name__}: {error})") from None
    if version > FORMAT_VERSION:
        raise _NotWhole(
            f"written by a newer drifting-vla (marker format {version}; this one reads up to "
            f"{FORMAT_VERSION}): upgrade drifting-vla to read it"
        )
    records = {name: record if isinstance(record, dict) else {"bytes": record} for name, record in files.items()}
    added = [name for name in STEERING_FILES if name not in records and (path / name).exists()]
    if added:
        raise _NotWhole(
            f"{added} {'is' if len(added) == 1 else 'are'} not recorded in the '{COMPLETE_MARKER}' marker: added after "
            "the directory was written, and would change what loads. Delete it, or, if you put it there on purpose, "
            "record it (drifting_vla.training.checkpoint.seal_checkpoint)"
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
    unhashed = [name for name, record in records.items() if "sha256" not in record]
    if unhashed:
        log.warning("%s predates checkpoint hashes: %s checked by size only", path, unhashed)
    for name, record in records.items():
        if "sha256" in record and file_sha256(path / name) != record["sha256"]:
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
    """A checkpoint directory as given (refused with the reason when it is not whole), or the newest
    whole one under a checkpoints or run directory."""
    path = Path(path).expanduser()
    if (path / MODEL_FILE).is_file() or (path / COMPLETE_MARKER).is_file() or (_STEP_DIR.match(path.name) and path.is_dir()):
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


# --------------------------------------------------------------------------------------------
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class TrainingState:
    """Full (unsharded) state dicts of the model, its EMA and the optimizer (keyed by parameter
    names, so they load into any wrapping of the same model), and the sources of the model's
    frozen pretrained encoders (`pretrained_sources`), which the checkpoint references instead of
    storing."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict
    referenced: dict[str, dict] = field(default_factory=dict)


def gather_training_state(model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Collective under FSDP (every rank must call it); a plain copy to CPU otherwise."""
    return TrainingState(
        model=get_model_state_dict(model, options=FULL_STATE),
        ema=ema.state_dict(),
        optimizer=get_optimizer_state_dict(model, optimizer, options=FULL_STATE),
        referenced=pretrained_sources(model),
    )


# --------------------------------------------------------------------------------------------
# Frozen pretrained weights: referenced by source and content hash


def pretrained_sources(model: nn.Module) -> dict[str, dict]:
    """{state-dict prefix: weights_source} of every module that loaded pretrained weights from a
    source it can name (`models.frozen.FrozenModule.load_source`)."""
    return {
        name: dict(module.weights_source)
        for name, module in model.named_modules()
        if getattr(module, "weights_source", None) is not None
    }


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: equal exactly when the weights
    are (a file format or a load path cannot change it; a cast to another dtype does)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _under(prefix: str, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors below `prefix`, named relative to it (so an encoder's hash does not depend on
    where it sits in the model)."""
    return {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}


def split_referenced(
    weights: Mapping[str, torch.Tensor], sources: Mapping[str, dict]
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(the weights to store, {prefix: source + sha256, parameter count, bytes}) for a full state
    dict whose modules at `sources`' prefixes are referenced instead of stored."""
    stored, references = dict(weights), {}
    for prefix, source in sources.items():
        tensors = _under(prefix, weights)
        for name in tensors:
            del stored[f"{prefix}.{name}"]
        references[prefix] = {
            **source,
            "sha256": weights_sha256(tensors),
            "parameters": sum(t.numel() for t in tensors.values()),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        }
    return stored, references


def write_references(directory: Path, references: Mapping[str, dict]) -> None:
    """`pretrained_weights.json`, only when something is referenced (a directory without it stores
    every weight, as checkpoints did before references existed)."""
    if references:
        (directory / REFERENCES_FILE).write_text(json.dumps(dict(references), indent=2))


def read_references(directory: str | os.PathLike) -> dict[str, dict]:
    """What `write_references` wrote, {} when the directory stores every weight."""
    file = Path(directory) / REFERENCES_FILE
    return read_saved_file(file, lambda f: json.loads(f.read_text())) if file.is_file() else {}


def pin_referenced_revisions(cfg: dict, references: Mapping[str, dict]) -> dict:
    """A copy of the resolved config that rebuilds the referenced encoders from their sources, at
    the recorded commits (`model.pretrained=true`), and every other weight at random for a strict
    load (`model.pretrained=false` when nothing is referenced)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["model"]["pretrained"] = bool(references)
    for reference in references.values():
        section = cfg["model"][reference["config_key"].removeprefix("model.")]
        if reference.get("revision"):
            section["revision"] = reference["revision"]
    return cfg


def verify_referenced(model: nn.Module, references: Mapping[str, dict], where: Path) -> None:
    """Refuse referenced encoders whose weights are not the ones the checkpoint was written with
    (collective under FSDP: every rank calls it)."""
    weights = model.state_dict()
    for prefix, reference in references.items():
        actual = weights_sha256({k: full_tensor(v) for k, v in _under(prefix, weights).items()})
        if actual != reference["sha256"]:
            key = reference["config_key"]
            revision = reference.get("revision")
            at = f" at revision {revision}" if revision else ""
            raise ValueError(
                f"the frozen encoder {prefix} ({key}: {reference['source']}{at}) has weights with sha256 "
                f"{actual}, but {where / REFERENCES_FILE} expects {reference['sha256']}: they are not the "
                f"weights this policy was trained with. Point {key}.name_or_path (and {key}.revision) at a "
                f"copy of {reference['source']}{at}, or use a checkpoint that stores the encoder."
            )


# Loading


TRAINER_STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "sampler", "extra")


class DamagedCheckpointError(ValueError):
    """A checkpoint or export file that cannot be parsed. In a checkpoint whose hashes passed, that
    means another version wrote it."""


def _load_trainer_state(file: Path) -> dict:
    """torch's own message for a refused file advises `weights_only=False`, which would run code
    from the file: it is replaced by what the refusal means."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError("not a file of tensors and plain values, the only thing read from a checkpoint") from None


def read_saved_file(file: Path, reader):
    """`reader(file)`, any failure to parse it named with the file and what to do."""
    try:
        return reader(file)
    except Exception as error:
        reason = (str(error).splitlines() or [""])[0]
        raise DamagedCheckpointError(
            f"cannot read {file} ({type(error).__name__}: {reason}): another drifting-vla or torch version wrote "
            "it, or it is damaged. Read it with the version that wrote it, copy it again, or use another checkpoint."
        ) from error


@dataclass
class ResumeState:
    """What a checkpoint gives back beyond the objects it restores in place."""

    path: Path
    step: int
    sampler_state: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    normalization: dict = field(default_factory=dict)


TIME_EMBEDDER_PREFIX = "dit.t_embedder."
"""Weights added with the time-conditioned DiT. Checkpoints written before it lack them; the
embedder's output layer starts at zero, so leaving it as built reproduces the old network exactly."""


def predates_time_embedder(missing: list[str]) -> bool:
    return bool(missing) and all(key.startswith(TIME_EMBEDDER_PREFIX) for key in missing)


def load_weights(model: nn.Module, file: Path, references: Mapping[str, dict] | None = None) -> None:
    """Strictly load a full-state safetensors file into a plain, DDP-wrapped or FSDP-sharded
    model; a mismatch is an error naming the keys. Weights under the prefixes of `references`
    (`read_references`) are not in the file: the model already holds them, and their hash must
    match. A checkpoint written before the DiT had a time embedder loads with that embedder left at
    its zero-output initialization (same actions)."""
    references = references or {}
    verify_referenced(model, references, file.parent)
    weights = read_saved_file(file, lambda f: load_file(str(f)))
    expected = {k for k in model.state_dict() if not any(k.startswith(p + ".") for p in references)}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    partial = StateDictOptions(full_state_dict=True, strict=False)
    if predates_time_embedder(missing) and not unexpected:
        log.warning("%s predates the time-conditioned DiT: %s stays at its zero-output initialization, "
                    "which reproduces the network it was trained as", file, TIME_EMBEDDER_PREFIX + "*")
        set_model_state_dict(model, weights, options=partial)
        return
    if missing or unexpected:
        raise KeyError(
            f"{file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}. Was it "
            "written with the same model config? (For pretrained encoders, model.vision.arch and "
            "model.language.arch must describe the checkpoint's architecture.)"
        )
    set_model_state_dict(model, weights, options=partial if references else StateDictOptions(full_state_dict=True))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> ResumeState:
    """Restore model, EMA, optimizer, scheduler and every RNG from the checkpoint at `path`.

    Build the objects exactly as for a fresh run first (same config), then call this. The model's
    weights are loaded strictly: a checkpoint from another architecture is an error, not a silent
    partial load.
    """
    path = Path(path)
    problem = marker_problem(path)
    if problem is not None:
        raise FileNotFoundError(
            f"cannot resume from {path}: {problem}. Use find_latest_valid_checkpoint() to pick a "
            "whole one, or start a fresh run."
        )
    # Every file is read before anything is restored: one that cannot be read leaves the model,
    # optimizer and RNGs as they were.
    ema_weights = read_saved_file(path / EMA_FILE, lambda f: load_file(str(f)))
    state = read_saved_file(path / TRAINER_STATE_FILE, _load_trainer_state)
    config = read_saved_file(path / CONFIG_FILE, lambda f: yaml.safe_load(f.read_text()) or {})
    normalization = read_saved_file(path / NORMALIZATION_FILE, lambda f: json.loads(f.read_text()))
    absent = [key for key in TRAINER_STATE_KEYS if key not in state]
    if absent:
        raise DamagedCheckpointError(
            f"{path / TRAINER_STATE_FILE} lacks {absent}: it was written by another drifting-vla version. Resume "
            "with the version that wrote it, or start a fresh run (the weights still evaluate)."
        )
    if predates_time_embedder(sorted(set(ema.state_dict()) - set(ema_weights))):
        raise ValueError(
            f"cannot resume from {path}: it was written before the DiT gained its time embedder, so its "
            "optimizer and EMA state do not cover the new weights. Evaluate it as it is "
            "(scripts/simulate_eval.py loads it), or start a fresh run."
        )
    load_weights(model, path / MODEL_FILE, read_references(path))
    ema.load_state_dict(ema_weights)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return ResumeState(
        path=path,
        step=int(state["step"]),
        sampler_state=state["sampler"],
        extra=state["extra"],
        config=config,
        normalization=normalization,
    )

