"""What several test files share: tiny configs, policies and checkpoints, fixture datasets, a
server in a thread and the scripts as a user runs them (the fixtures proper are in conftest.py)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import tests.fake_envs  # noqa: F401  the test simulators
from drifting_vla.data.lerobot_dataset import LeRobotDataset
from drifting_vla.data.metaworld_dataset import write_task_store
from drifting_vla.data.normalization import Normalizer, compute_stats
from drifting_vla.envs.metaworld_env import instruction_for
from drifting_vla.formats.validation import training_config
from drifting_vla.inference.card import export_description
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.models.drifting_vla import build_model
from drifting_vla.objectives.methods import build_objective
from drifting_vla.serving.server import PolicyServer, ServerConfig
from drifting_vla.specs import ActionSpec
from drifting_vla.training.checkpoint import gather_training_state, save_checkpoint
from drifting_vla.training.ema import EMA

TASK = "reach-v3"


def tiny_cfg(horizon: int = 4, objective: str = "drifting"):
    model = OmegaConf.load("drifting_vla/configs/model/tiny.yaml")
    data = OmegaConf.load("drifting_vla/configs/data/metaworld.yaml")
    data.image_size = 32
    data.horizon = horizon
    data.tasks = [TASK]
    data.instructions = [instruction_for(TASK)]
    data.max_episode_steps = 10
    return OmegaConf.create({"model": model, "data": data, "training": {"objective": objective}})


def tiny_normalizer(cfg) -> Normalizer:
    rng = np.random.default_rng(0)
    stats = compute_stats(
        {
            "actions": rng.uniform([-0.2, 0.0, 0.5, -1.0], [0.2, 0.4, 0.9, 1.0], size=(64, 4)),
            "proprio": rng.uniform(-0.5, 0.5, size=(64, 4)),
        }
    )
    return Normalizer.from_stats(stats, ActionSpec.from_config(cfg.data.action_spec), proprio_dim=4)


def tiny_policy(horizon: int = 4, objective: str = "drifting", **kwargs) -> DriftingPolicy:
    torch.manual_seed(0)
    cfg = tiny_cfg(horizon, objective)
    return DriftingPolicy(build_model(cfg), tiny_normalizer(cfg), build_objective(training_config(cfg.training)), **kwargs)


def observation_batch(batch: int = 2, size: int = 32) -> dict:
    rng = np.random.default_rng(1)
    return {
        "images": torch.from_numpy(rng.integers(0, 256, size=(batch, 2, 3, size, size), dtype=np.uint8)),
        "proprio": torch.from_numpy(rng.uniform(-0.5, 0.5, size=(batch, 4)).astype(np.float32)),
        "instruction": [instruction_for(TASK)] * batch,
    }


def write_checkpoint(run_dir: Path, cfg, normalizer: Normalizer | None = None):
    """A step-10 checkpoint of a fresh model under `run_dir/checkpoints`, its EMA weights offset so
    a test sees which weights were loaded: (path, model, ema, normalizer). The normalizer defaults
    to `tiny_normalizer(cfg)`."""
    torch.manual_seed(0)
    model = build_model(cfg)
    ema = EMA(model, max_decay=0.9)
    for name in ema.shadow:  # EMA weights that differ from the raw ones, to see which are loaded
        ema.shadow[name] = ema.shadow[name] + 0.01 if ema.shadow[name].is_floating_point() else ema.shadow[name]
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    normalizer = normalizer or tiny_normalizer(cfg)
    path = save_checkpoint(
        run_dir / "checkpoints",
        step=10,
        state=gather_training_state(model, ema, optimizer),
        **export_description(OmegaConf.to_container(cfg, resolve=True), build_objective(training_config(cfg.training)),
                             str(run_dir / "checkpoints" / "step_00000010")),
        scheduler=scheduler,
        config=OmegaConf.to_container(cfg, resolve=True),
        normalization=normalizer.to_dict(),
    )
    return path, model, ema, normalizer


class CountingGenerator:
    """Stands in for predict_action_chunk: chunk c of a call holds c*100 + env*10 + step."""

    def __init__(self, horizon: int):
        self.horizon, self.calls, self.batch_sizes = horizon, 0, []

    def __call__(self, obs, generator=None):
        batch = len(obs["instruction"])
        self.batch_sizes.append(batch)
        env = torch.as_tensor(obs["proprio"])[:, 0].reshape(batch, 1, 1)
        step = torch.arange(self.horizon, dtype=torch.float32).reshape(1, -1, 1)
        chunk = self.calls * 100 + env * 10 + step
        self.calls += 1
        return chunk.expand(batch, self.horizon, 4).numpy().copy()


def env_batch(env_ids) -> dict:
    return {
        "images": torch.zeros(len(env_ids), 2, 3, 32, 32, dtype=torch.uint8),
        "proprio": torch.tensor([[float(e), 0, 0, 0] for e in env_ids]),
        "instruction": [instruction_for(TASK)] * len(env_ids),
    }


def run_simulate_eval(run_dir, *overrides, env=None):
    """The CLI as a user runs it; Hydra's own run directory goes to `run_dir`, not the checkout."""
    script = ROOT / "scripts" / "simulate_eval.py"
    return subprocess.run(
        [sys.executable, str(script), *overrides, f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_v30"


VIDEOS = ["observation.images.front", "observation.images.wrist"]  # AV1, 96x96 and 64x80


IMAGE = "observation.images.overhead"  # PNG in the parquet, 32x32


def fixture_dataset(root: Path = FIXTURE / "dataset", **kwargs) -> LeRobotDataset:
    return LeRobotDataset(root, **{"cameras": [*VIDEOS, IMAGE], "horizon": 4, "image_size": 32, **kwargs})


class Running:
    """A PolicyServer on a free loopback port, in a thread of this process."""

    def __init__(self, policy, **config) -> None:
        self.server = PolicyServer(policy, ServerConfig(port=0, **config))
        ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(lambda s: ready.set())), daemon=True)
        self.thread.start()
        assert ready.wait(30), "the server did not start"
        self.url = f"ws://127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


ROOT = Path(__file__).resolve().parents[1]


def overrides_for(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=tiny_cpu", "data=rlbench", f"data.root={root}", "data.tasks=[close_jar]",
        "data.cameras=[front,wrist]", "data.image_size=16", "data.cache_dir=null", "data.horizon=4",
        "data.keyframes=false", "data.num_workers=0", f"run_dir={run_dir}", "training.wandb.mode=disabled",
        "training.num_threads=1", *extra,
    ]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "drifting_vla" / "configs"), version_base=None):
        return compose("config", overrides=overrides)


def tiny_bpe_file(path: pathlib.Path) -> pathlib.Path:
    """A CLIP-format BPE merges file with a handful of merges (byte symbols cover any text)."""
    merges = ["o p", "e n</w>", "op en</w>", "t h", "th e</w>", "d r", "dr a", "dra w", "e r</w>"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *merges]) + "\n")
    return path


def free_port() -> int:
    """A loopback port nobody listens on, for a test's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "run", tiny_cfg())


HOLD_THE_LOCK = """
import os, sys, time
from drifting_vla.formats.files import FileLock
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


def metaworld_store(root: Path, size: int = 16) -> Path:
    """Two tasks of 3 episodes of 7 steps; frame t of episode k is uniform gray 20 + 10 t + 50 k."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    collection = {"cameras": ["corner", "topview"], "image_size": size, "max_episode_steps": 50, "train_seeds": {"start": 0, "count": 3}}
    (root / "collection.json").write_text(json.dumps(collection))
    for task in ("reach-v3", "push-v3"):
        episodes = [
            {
                "images": np.broadcast_to((20 + 10 * np.arange(7) + 50 * k).astype(np.uint8)[:, None, None, None, None],
                                          (7, 2, 3, size, size)).copy(),
                "proprio": rng.normal(size=(7, 4)).astype(np.float32), "state": rng.normal(size=(7, 39)).astype(np.float32),
                "actions": rng.uniform(-1, 1, (7, 4)).astype(np.float32), "seed": k,
            }
            for k in range(3)
        ]
        write_task_store(root / task, episodes, {"instruction": f"do {task}"})
    return root


INSTRUCTION = tiny_cfg().data.instructions[0]


def served_policy(**kwargs):
    """The tiny policy with what the server reads from a checkpoint-loaded one."""
    policy = tiny_policy(**kwargs)
    policy.cfg = OmegaConf.to_container(tiny_cfg(), resolve=True)
    policy.checkpoint = "tiny"
    return policy


def observation(size: int = 32, level: int = 7, channels_last: bool = False) -> dict:
    rng = np.random.default_rng(level)
    images = rng.integers(0, 256, size=(2, 3, size, size), dtype=np.uint8)
    return {
        "images": images.transpose(0, 2, 3, 1).copy() if channels_last else images,
        "proprio": np.array([0.1, -0.2, 0.3, 0.0], dtype=np.float32),
        "instruction": INSTRUCTION,
    }


class SlowPolicy:
    """Wraps a policy: each forward pass sleeps, records its batch size, and fails on proprio[0] == 99."""

    def __init__(self, policy, seconds: float = 0.0) -> None:
        self.policy, self.seconds, self.batch_sizes = policy, seconds, []
        self.cfg, self.checkpoint, self.action_spec, self.horizon = policy.cfg, "slow", policy.action_spec, policy.horizon
        self.n_obs_steps = policy.n_obs_steps
        self.objective, self.nfe, self.sampler, self.method = policy.objective, policy.nfe, policy.sampler, policy.method

    def predict_action_chunk(self, obs, generator=None):
        self.batch_sizes.append(len(obs["instruction"]))
        if (torch.as_tensor(obs["proprio"])[:, 0] == 99).any():
            raise RuntimeError("the model broke")
        time.sleep(self.seconds)
        return self.policy.predict_action_chunk(obs, generator=generator)
