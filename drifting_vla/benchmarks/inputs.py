"""What every benchmark case runs on: the composed Hydra config, a synthetic batch and the
objectives compared on one network."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from drifting_vla.configs import CONFIG_DIR
from drifting_vla.objectives.methods import Objective, build_objective
from drifting_vla.specs import ActionSpec


def compose_config(overrides: list[str]):
    """configs/config.yaml with `overrides`, as `scripts/train.py` would compose it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("config", overrides=["run_dir=/tmp/benchmark", *overrides])


def synthetic_batch(cfg, device: torch.device, batch_size: int | None = None) -> dict:
    """A batch in the dataset's format, with normalized actions in the network's layout (6D
    rotations), as the trainer feeds them; `training.batch_size` observations unless `batch_size`."""
    b = int(cfg.training.batch_size) if batch_size is None else batch_size
    t, a = int(cfg.data.horizon), ActionSpec.from_config(cfg.data.action_spec).network_dim
    v, size = len(cfg.data.cameras), int(cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.randint(0, 256, (b, v, 3, size, size), generator=g, dtype=torch.uint8).to(device),
        "proprio": torch.randn(b, int(cfg.data.proprio_dim), generator=g).to(device),
        "instruction": [f"task number {i % 5}" for i in range(b)],
        "task": [f"task-{i % 5}" for i in range(b)],
        "action_mask": torch.ones(b, t, dtype=torch.bool, device=device),
        "actions": torch.rand(b, t, a, generator=g).mul(2).sub(1).to(device),
    }


def objective_named(cfg, name: str) -> Objective:
    """The objective `name` with the config's training settings (G, temperatures, schedules), so
    every objective a case compares runs on the same network and the same settings."""
    return build_objective(OmegaConf.merge(cfg.training, {"objective": name}))
