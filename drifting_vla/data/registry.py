"""One registry of dataset builders, keyed by the data config's `name`.

    prepare_dataset(cfg.data)                  # collect / fetch what is missing (rank 0 only)
    dataset = build_dataset(cfg.data)          # a torch Dataset of sample dicts (specs.py)
    loader = DataLoader(dataset, collate_fn=collate_samples, ...)

A new task suite registers one builder here (and, if its data is made on first use, a preparer);
the trainer never changes. Under torchrun rank 0 prepares while the other ranks wait at a barrier,
so no two processes write the same files; the builders then only read.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from torch.utils.data import Dataset

from drifting_vla.data.skip_corrupt import SkipCorruptSamples

DATASETS: dict[str, Callable[..., Dataset]] = {}
PREPARERS: dict[str, Callable] = {}


def register_dataset(name: str, prepare: Callable | None = None):
    """Register a builder `fn(cfg, split)`; `prepare(cfg)`, if given, makes the data on first use."""

    def wrap(fn):
        DATASETS[name] = fn
        if prepare is not None:
            PREPARERS[name] = prepare
        return fn

    return wrap


def prepare_dataset(cfg) -> None:
    """Make what the dataset reads if it is missing (Meta-World: collect the demos). Call it in
    one process only; `build_dataset` elsewhere then finds the data ready."""
    prepare = PREPARERS.get(str(cfg["name"]))
    if prepare is not None:
        prepare(cfg)


def _collect_metaworld_demos(cfg) -> None:
    from drifting_vla.data.metaworld_demos import ensure_metaworld_demos

    ensure_metaworld_demos(cfg)


def build_dataset(cfg, split: str = "train") -> Dataset:
    """With `data.skip_corrupt=true` a sample whose files turn out damaged while training is
    replaced by a readable one, the same in every run (`skip_corrupt.SkipCorruptSamples`)."""
    name = str(cfg["name"])
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}")
    dataset = DATASETS[name](cfg, split)
    return SkipCorruptSamples(dataset) if cfg.get("skip_corrupt", False) else dataset


@register_dataset("metaworld", prepare=_collect_metaworld_demos)
def build_metaworld(cfg, split: str = "train") -> Dataset:
    """Collects the demos first if the cache lacks them (minutes, once). The val split is every
    `data.val_every`-th demo episode of each task, held out of train."""
    from drifting_vla.data.metaworld_dataset import MetaWorldDataset
    from drifting_vla.data.metaworld_demos import ensure_metaworld_demos

    if split not in ("train", "val"):
        raise ValueError(f"Meta-World demos have a train and a val split, got {split!r}")
    store = ensure_metaworld_demos(cfg)
    return MetaWorldDataset(
        store,
        tasks=list(cfg["tasks"]),
        cameras=list(cfg["cameras"]),
        horizon=int(cfg["horizon"]),
        privileged_state=bool(cfg.get("privileged_state", False)),
        split=split,
        val_every=int(cfg.get("val_every", 10)),
        n_obs_steps=int(cfg.get("n_obs_steps", 1)),
    )


def _collect_aloha_demos(cfg) -> None:
    from drifting_vla.data.aloha_demos import ensure_aloha_demos

    ensure_aloha_demos(cfg)


@register_dataset("aloha", prepare=_collect_aloha_demos)
def build_aloha(cfg, split: str = "train") -> Dataset:
    """The scripted ALOHA demos (collected on first use; `aloha_demos.py`), read from a store in
    the Meta-World layout: the top camera, 14 joint positions, 14 joint targets."""
    from drifting_vla.data.aloha_demos import ensure_aloha_demos
    from drifting_vla.data.metaworld_dataset import MetaWorldDataset

    if split not in ("train", "val"):
        raise ValueError(f"ALOHA demos have a train and a val split, got {split!r}")
    return MetaWorldDataset(
        ensure_aloha_demos(cfg),
        tasks=list(cfg["tasks"]),
        cameras=list(cfg["cameras"]),
        horizon=int(cfg["horizon"]),
        split=split,
        val_every=int(cfg.get("val_every", 10)),
        n_obs_steps=int(cfg.get("n_obs_steps", 1)),
    )


@register_dataset("rlbench")
def build_rlbench(cfg, split: str = "train") -> Dataset:
    from drifting_vla.data.rlbench_dataset import RLBenchDataset
    from drifting_vla.specs import ActionSpec

    root = pathlib.Path(str(cfg["root"])).expanduser() / split
    cache_dir = cfg.get("cache_dir")
    return RLBenchDataset(
        root,
        tasks=list(cfg["tasks"]),
        cameras=list(cfg["cameras"]),
        horizon=int(cfg["horizon"]),
        keyframes=bool(cfg.get("keyframes", False)),
        image_size=cfg.get("image_size"),
        cache_dir=pathlib.Path(str(cache_dir)).expanduser() / split if cache_dir else None,
        skip_corrupt=bool(cfg.get("skip_corrupt", False)),
        random_instruction=split == "train",
        max_episodes_per_task=cfg.get("max_episodes_per_task"),
        action_spec=ActionSpec.from_config(cfg["action_spec"]),
        ignore_collisions=bool(cfg.get("ignore_collisions", False)),
        n_obs_steps=int(cfg.get("n_obs_steps", 1)),
    )


@register_dataset("lerobot")
def build_lerobot(cfg, split: str = "train") -> Dataset:
    """A LeRobot v3.0 dataset from `data.root`, or `data.repo_id` (+ `data.revision`) from the
    hub. The val split is every `data.val_every`-th episode, held out of train."""
    from drifting_vla.data.lerobot_dataset import LeRobotDataset, resolve_root
    from drifting_vla.specs import ActionSpec

    if split not in ("train", "val"):
        raise ValueError(f"LeRobot datasets have a train and a val split here, got {split!r}")
    return LeRobotDataset(
        resolve_root(cfg.get("root"), cfg.get("repo_id"), cfg.get("revision")),
        cameras=[str(c) for c in cfg["cameras"]],
        horizon=int(cfg["horizon"]),
        image_size=int(cfg["image_size"]),
        state_key=str(cfg["state_key"]),
        action_key=str(cfg["action_key"]),
        split=split,
        val_every=int(cfg["val_every"]),
        action_dim=ActionSpec.from_config(cfg["action_spec"]).dim,
        proprio_dim=int(cfg["proprio_dim"]),
        n_obs_steps=int(cfg.get("n_obs_steps", 1)),
        skip_corrupt=bool(cfg.get("skip_corrupt", False)),
    )
