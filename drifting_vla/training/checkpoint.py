"""Training checkpoints: the saved policy of each step (formats/export.py) beside what resumes the
run to bit-identical training on CPU.

    checkpoints/step_00001000/
      config.json, model.safetensors, normalization.json, pretrained_weights.json, README.md
                                   the export of the EMA policy: `from_pretrained` loads the step
      training_model.safetensors   the raw (non-EMA) weights, frozen pretrained encoders left out
      training_state.pt            optimizer, scheduler, RNG states, step, sampler position, extra
      complete                     the marker over all of them (formats/checkpoint.py)

The EMA shadow is not stored twice: it is the export's weights, read back by name on resume.
`training_state.pt` holds only tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: a checkpoint from somewhere else cannot run code.

Every file holds FULL (unsharded) state, whatever the training strategy: under FSDP,
`gather_training_state` all-gathers it on every rank and rank 0 writes it.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from drifting_vla.formats.checkpoint import marker_problem, write_step_directory
from drifting_vla.formats.export import (
    MODEL_FILE,
    read_export_config,
    read_normalization,
    write_policy_files,
)
from drifting_vla.formats.weights import (
    DamagedCheckpointError,
    load_weights,
    pretrained_sources,
    read_references,
    read_saved_file,
    read_weights,
    split_referenced,
)
from drifting_vla.training.ema import EMA

log = logging.getLogger(__name__)

TRAINING_MODEL_FILE = "training_model.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
TRAINING_STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "sampler", "extra")

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


def save_checkpoint(
    checkpoints_dir: str | os.PathLike,
    *,
    step: int,
    state: TrainingState,
    objective: Mapping,
    card: Callable[[dict], str],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: Mapping,
    normalization: Mapping,
    sampler_state: Mapping | None = None,
    extra: Mapping | None = None,
) -> Path:
    """Write `checkpoints_dir/step_XXXXXXXX/` atomically and return its path.

    `state` comes from `gather_training_state` (on every rank); `objective` (name, nfe, sampler,
    method) and `card` (the model card, given the frozen encoders referenced) are the export's
    (inference/card.py composes them); `config` the resolved config as plain data
    (`OmegaConf.to_container(cfg, resolve=True)`), `normalization` JSON-able stats, `sampler_state`
    where the data sampler stands (epoch, index), `extra` any other plain data the trainer needs
    back. The RNG states are captured here, so call this at the point the resumed run should
    continue from. Call it on rank 0 only.
    """
    config = dict(config)
    trainer_state = {
        "step": step,
        "optimizer": state.optimizer,
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "sampler": dict(sampler_state or {}),
        "extra": dict(extra or {}),
    }
    policy_weights = {**state.model, **state.ema}  # the EMA shadow laid over the raw weights
    stored, references = split_referenced(policy_weights, state.referenced)
    raw, _ = split_referenced(state.model, state.referenced)

    def write(target: Path) -> None:
        write_policy_files(target, cfg=config, objective=objective, weights=stored, references=references,
                           normalization=normalization, card=card(references))
        save_file({k: v.contiguous() for k, v in raw.items()}, str(target / TRAINING_MODEL_FILE), metadata={"step": str(step)})
        torch.save(trainer_state, target / TRAINING_STATE_FILE)

    return write_step_directory(Path(checkpoints_dir), step, write)


# --------------------------------------------------------------------------------------------
# Resuming


def _load_trainer_state(file: Path) -> dict:
    """torch's own message for a refused file advises `weights_only=False`, which would run code
    from the file: it is replaced by what the refusal means."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError("not a file of tensors and plain values, the only thing read from a checkpoint") from None


@dataclass
class ResumeState:
    """What a checkpoint gives back beyond the objects it restores in place."""

    path: Path
    step: int
    sampler_state: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    normalization: dict = field(default_factory=dict)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> ResumeState:
    """Restore model, EMA, optimizer, scheduler and every RNG from the checkpoint step at `path`.

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
    saved = read_export_config(path)
    normalization = read_normalization(path)
    policy_weights = read_weights(path / MODEL_FILE)
    references = read_references(path)
    state = read_saved_file(path / TRAINING_STATE_FILE, _load_trainer_state)
    absent = [key for key in TRAINING_STATE_KEYS if key not in state]
    if absent:
        raise DamagedCheckpointError(
            f"{path / TRAINING_STATE_FILE} lacks {absent}: it was written by another drifting-vla version. Resume "
            "with the version that wrote it, or start a fresh run (the weights still evaluate)."
        )
    shadow_names = set(ema.state_dict())
    load_weights(model, path / TRAINING_MODEL_FILE, references)
    ema.load_state_dict({name: tensor for name, tensor in policy_weights.items() if name in shadow_names})
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return ResumeState(
        path=path,
        step=int(state["step"]),
        sampler_state=state["sampler"],
        extra=state["extra"],
        config=saved["config"],
        normalization=normalization,
    )
