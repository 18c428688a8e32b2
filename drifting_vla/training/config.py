"""The schema of `training.*`: a wrong type or an unknown key is an error naming the key.

Hydra's struct mode already refuses unknown keys given on the command line; merging into these
dataclasses also catches wrong types (`training.max_steps=abc`) and keys mistyped in YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class DriftingConfig:
    temperatures: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.2])
    affinity_floor: float = 1e-6
    per_timestep: bool = False
    extra_positives: int = 0
    queue_size: int = 256


@dataclass
class DistributedConfig:
    strategy: str = "ddp"
    backend: str = "auto"


@dataclass
class EvalConfig:
    every: int = 0
    at_end: bool = True
    episodes: int = 25
    workers: int = 2
    videos_per_task: int = 1
    execution: str = "ensemble"
    execute_steps: int = 8
    ensemble_decay: float = 0.1


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "drifting-vla"
    name: str | None = None
    visualizations: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainingConfig:
    objective: str = "drifting"
    max_steps: int = 3000
    batch_size: int = 32
    num_samples: int = 8
    grad_accum_steps: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"
    compile: bool = False
    num_threads: int | None = None
    nan_policy: str = "stop"
    drifting: DriftingConfig = field(default_factory=DriftingConfig)
    log_every: int = 50
    val_every: int = 500
    val_batches: int = 4
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume: str | None = None
    feature_cache: bool = False
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES = {
    "precision": ("auto", "bf16", "fp32"),
    "nan_policy": ("stop", "skip"),
    "distributed.strategy": ("ddp", "fsdp"),
    "distributed.backend": ("auto", "nccl", "gloo"),
    "eval.execution": ("chunk", "ensemble"),
    "wandb.mode": ("online", "offline", "disabled"),
}


def validate_training_config(training) -> None:
    """Raise ValueError naming the `training.<key>` that is unknown, mistyped or out of range."""
    try:
        OmegaConf.merge(OmegaConf.structured(TrainingConfig), training)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ValueError(f"config key training.{key}: {err.msg if hasattr(err, 'msg') else err}") from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(training, key)
        if value not in allowed:
            raise ValueError(f"config key training.{key}={value!r}; choose from {allowed}")
    for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every"):
        if int(training[key]) < 1:
            raise ValueError(f"config key training.{key} must be >= 1, got {training[key]}")
