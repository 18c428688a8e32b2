"""The schema of `training.*`: a wrong type or an unknown key is an error naming the key.

Hydra's struct mode already refuses unknown keys given on the command line; merging into these
dataclasses also catches wrong types (`training.max_steps=abc`) and keys mistyped in YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class DriftingConfig:
    temperatures: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.2])
    affinity_floor: float = 1e-6
    grouping: str = "chunk"
    extra_positives: int = 0
    queue_size: int = 256


@dataclass
class FlowMatchingConfig:
    time_distribution: str = "beta"
    beta_alpha: float = 1.5


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 100
    prediction_type: str = "epsilon"
    clip_sample: bool = True


@dataclass
class AugmentationConfig:
    random_shift: int | None = None


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
    execution: str = "chunk"
    execute_steps: int = 8
    ensemble_decay: float = 0.01
    nfe: int | None = None
    sampler: str | None = None


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
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    log_every: int = 50
    val_every: int = 500
    val_batches: int = 4
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume: str | None = None
    feature_cache: bool = False
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


CHOICES = {
    "objective": ("drifting", "regression", "flow_matching", "diffusion"),
    "drifting.grouping": ("chunk", "timestep", "dimension"),
    "flow_matching.time_distribution": ("uniform", "beta"),
    "diffusion.prediction_type": ("epsilon", "sample"),
    "precision": ("auto", "bf16", "fp32"),
    "nan_policy": ("stop", "skip"),
    "distributed.strategy": ("ddp", "fsdp"),
    "distributed.backend": ("auto", "nccl", "gloo"),
    "eval.execution": ("chunk", "ensemble"),
    "wandb.mode": ("online", "offline", "disabled"),
}


def training_config(training) -> DictConfig:
    """`training.*` merged over the schema's defaults (so a checkpoint written before a key existed
    still builds its objective), with `drifting.per_timestep` of earlier versions read as
    `drifting.grouping`. Raises ValueError naming an unknown, mistyped or out-of-range key."""
    training = OmegaConf.create(OmegaConf.to_container(training, resolve=True) if OmegaConf.is_config(training) else training)
    legacy = OmegaConf.select(training, "drifting.per_timestep")
    if legacy is not None:
        del training.drifting["per_timestep"]
        training.drifting.grouping = "timestep" if legacy else "chunk"
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainingConfig), training)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ValueError(f"config key training.{key}: {err.msg if hasattr(err, 'msg') else err}") from None
    _check_values(merged)
    return merged


def validate_training_config(training) -> None:
    """Raise ValueError naming the `training.<key>` that is unknown, mistyped or out of range."""
    training_config(training)


def _check_values(training) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(training, key)
        if value not in allowed:
            raise ValueError(f"config key training.{key}={value!r}; choose from {allowed}")
    for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every"):
        if int(training[key]) < 1:
            raise ValueError(f"config key training.{key} must be >= 1, got {training[key]}")
    shift = training.augmentation.random_shift
    if shift is not None and int(shift) < 0:
        raise ValueError(f"config key training.augmentation.random_shift must be >= 0 or null, got {shift}")
    if training.eval.nfe is not None and int(training.eval.nfe) < 1:
        raise ValueError(f"config key training.eval.nfe must be >= 1 or null, got {training.eval.nfe}")
