"""Train a Drifting-VLA policy. With no arguments: the embedded default (Meta-World demos,
collected on first use; the dit_s model on the CPU), then closed-loop evaluation in simulation.

    python scripts/train.py
    python scripts/train.py training.max_steps=500 training.learning_rate=1e-3
    python scripts/train.py experiment=rlbench_18                  # GPU, inside drifting-vla:rlbench
    python scripts/train.py hydra.run.dir=runs/my_run training.resume=auto
    torchrun --nproc_per_node=8 scripts/train.py experiment=rlbench_18
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("MUJOCO_GL", "egl")

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from drifting_vla.evaluation import SimulationEvaluator
from drifting_vla.formats.validation import refuse_renamed_overrides
from drifting_vla.plugins import load_plugins
from drifting_vla.training.trainer import Trainer


def main() -> None:
    try:
        refuse_renamed_overrides(sys.argv[1:])
    except ValueError as err:
        raise SystemExit(f"drifting-train: {err}") from None
    train()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def train(cfg: DictConfig) -> None:
    load_plugins(cfg.plugins)
    if cfg.run_dir is None:
        with open_dict(cfg):
            cfg.run_dir = HydraConfig.get().runtime.output_dir
    Trainer(cfg, evaluator=SimulationEvaluator(cfg)).fit()


if __name__ == "__main__":
    main()
