"""The Python API as a notebook user meets it: compose a config, build the pieces, no Hydra app."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from drifting_vla.data.fixtures import write_rlbench_fixture
from drifting_vla.data.registry import build_dataset
from drifting_vla.models import build_model
from drifting_vla.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "drifting_vla" / "configs"


def notebook_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def rlbench_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rlbench")
    write_rlbench_fixture(root / "train", episodes=2, steps=12, seed=0)
    return root


def data_overrides(root: Path) -> list[str]:
    return ["experiment=tiny_cpu", "data=rlbench", f"data.root={root}", "data.tasks=[close_jar]",
            "data.cameras=[front,wrist]", "data.image_size=16", "data.cache_dir=null", "data.horizon=4",
            "data.keyframes=false", "data.num_workers=0", "training.wandb.mode=disabled", "training.num_threads=1"]


def test_build_model_from_a_composed_config_needs_no_hydra_app():
    cfg = notebook_config("experiment=tiny_cpu", "model.language.instructions=[close the jar]")
    model = build_model(cfg)
    assert model.action_spec.dim == 4


def test_task_embeddings_without_instructions_say_what_to_pass_and_build_once_given(rlbench_root):
    cfg = notebook_config(*data_overrides(rlbench_root))
    with pytest.raises(ValueError, match=r"build_dataset\(cfg.data\).all_instructions\(\)"):
        build_model(cfg)
    with open_dict(cfg):
        cfg.data.instructions = build_dataset(cfg.data).all_instructions()
    assert build_model(cfg).language_encoder.vocabulary


def test_trainer_from_a_composed_config_asks_for_a_run_dir_then_trains(rlbench_root, tmp_path):
    with pytest.raises(ValueError, match="no run_dir: set it"):
        Trainer(notebook_config(*data_overrides(rlbench_root)))
    trainer = Trainer(notebook_config(*data_overrides(rlbench_root), f"run_dir={tmp_path}", "training.max_steps=2",
                                      "training.val_every=0"))
    trainer.fit()
    assert (tmp_path / "checkpoints" / "step_00000002" / "complete").exists()


def test_the_configs_compose_from_the_package():
    from hydra import initialize_config_module

    with initialize_config_module("drifting_vla.configs", version_base=None):
        cfg = compose("config", overrides=["model=tiny", "data=rlbench"])
    assert cfg.model.name == "tiny" and cfg.data.name == "rlbench" and cfg.run_dir is None


@pytest.mark.slow
def test_a_wheel_ships_every_config(tmp_path):
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    shipped = {str(p.relative_to(root)) for p in (root / "drifting_vla" / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names, shipped - names
