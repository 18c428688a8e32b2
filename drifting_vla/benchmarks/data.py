"""Loader throughput: the embedded default with its configured workers (0: the memory-mapped
store is faster read in the training process than shipped from worker processes) against 2
workers; the same demos exported as a LeRobot v3.0 dataset (AV1 video, decoded per sample) in
the training process against `configs/data/lerobot.yaml`'s workers, with the headroom over what
training consumes; and RLBench PNG frames decoded every time against the decode-once cache
(128x128 fixture).

    python scripts/benchmark.py data

The Meta-World demos are collected first if the cache lacks them (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import torch
import yaml
from torch.utils.data import DataLoader, RandomSampler

from drifting_vla.benchmarks.timing import Row, time_call
from drifting_vla.configs import CONFIG_DIR
from drifting_vla.data.collate import collate_samples
from drifting_vla.data.fixtures import write_rlbench_fixture
from drifting_vla.data.lerobot_writer import export_metaworld_store
from drifting_vla.data.metaworld_demos import store_dir
from drifting_vla.data.registry import build_dataset
from drifting_vla.data.rlbench_dataset import RLBenchDataset

CONFIGS = CONFIG_DIR / "data"
CONFIG = CONFIGS / "metaworld.yaml"
BATCH = 64
TRAINING_CONSUMES = 170
"""Observations/s the drifting quickstart trains on (2 shared CPU cores): the loader needs 3x this."""


def run(args) -> list[Row]:
    os.environ.setdefault("MUJOCO_GL", "egl")
    cfg = yaml.safe_load(CONFIG.read_text())
    workers = int(cfg["num_workers"])
    other = 2 if workers == 0 else 0
    metaworld = build_dataset(cfg)
    rows = [
        _loader_row(f"metaworld loader, workers={other}", metaworld, other, None),
        _loader_row(f"metaworld loader, workers={workers} (config)", metaworld, workers, f"metaworld loader, workers={other}"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        lerobot_cfg = yaml.safe_load((CONFIGS / "lerobot.yaml").read_text())
        lerobot_cfg["root"] = export_metaworld_store(store_dir(cfg), pathlib.Path(tmp) / "lerobot", cfg["tasks"], cfg["eval_seeds"])
        lerobot = build_dataset(lerobot_cfg)
        lerobot_workers = int(lerobot_cfg["num_workers"])
        rows += [
            _loader_row("lerobot AV1 2x64px, workers=0", lerobot, 0, None),
            _loader_row(f"lerobot AV1 2x64px, workers={lerobot_workers} (config)", lerobot, lerobot_workers, "lerobot AV1 2x64px, workers=0"),
        ]
        root = write_rlbench_fixture(pathlib.Path(tmp) / "rl", episodes=2, steps=40, cameras=("front", "wrist"), image_size=128)
        plain = RLBenchDataset(root, ["close_jar"], ["front", "wrist"], horizon=1)
        cached = RLBenchDataset(root, ["close_jar"], ["front", "wrist"], horizon=1, cache_dir=pathlib.Path(tmp) / "cache")
        for i in range(len(cached)):  # the one-time decode is not what an epoch costs
            cached[i]
        rows += [
            _loader_row("rlbench 2x128px, decode PNG each time", plain, 0, None),
            _loader_row("rlbench 2x128px, decoded-once cache", cached, 0, "rlbench 2x128px, decode PNG each time"),
        ]
    return rows


def _loader_row(name: str, dataset, workers: int, baseline: str | None) -> Row:
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(
        dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, collate_fn=collate_samples,
        persistent_workers=workers > 0,
    )
    batches = iter(loader)
    seconds = time_call(lambda: next(batches), warmup=2 + 2 * workers, repeats=20, min_seconds=2.0)
    notes = {"samples/s": f"{BATCH / seconds:.0f}", "batch": BATCH, "x training": f"{BATCH / seconds / TRAINING_CONSUMES:.1f}"}
    return Row("data", name, seconds, baseline, notes)
