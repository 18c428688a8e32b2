"""One registry of dataset builders, keyed by the data config's `name`.

    prepare_dataset(cfg.data)                  # collect / fetch what is missing (rank 0 only)
    cfg.data.update(complete_data_config(cfg.data))   # keys the dataset's own files answer (data=lerobot)
    dataset = build_dataset(cfg.data)          # a torch Dataset of sample dicts (specs.py)
    loader = DataLoader(dataset, collate_fn=collate_samples, ...)

A new task suite registers one builder here (and, if its data is made on first use, a preparer;
if it has keys of its own, their schema), in one call;
the trainer never changes. Under torchrun rank 0 prepares while the other ranks wait at a barrier,
so no two processes write the same files; the builders then only read.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from drifting_vla.data.interface import DemoDataset
from drifting_vla.data.skip_corrupt import SkipCorruptSamples
from drifting_vla.formats.config import DATA_SCHEMAS, DataConfig
from drifting_vla.formats.settings import check_schema
from drifting_vla.formats.validation import with_data_defaults

DATASETS: dict[str, Callable[..., DemoDataset]] = {}
PREPARERS: dict[str, Callable] = {}
COMPLETERS: dict[str, Callable[..., dict]] = {}


def register_dataset(name: str, prepare: Callable | None = None, complete: Callable[..., dict] | None = None,
                     schema: type[DataConfig] | None = None):
    """Register a builder `fn(cfg, split)` returning a `DemoDataset`; `prepare(cfg)`, if given, makes
    the data on first use; `complete(cfg)`, if given, returns the data keys the dataset's own files
    answer (below); `schema`, a subclass of `DataConfig` declaring the dataset's own keys, checks
    `data.*` when a run starts (without one only the shared keys are checked). The built-in
    datasets' schemas are declared with the others in drifting_vla/formats/config.py."""
    check_schema(schema, DataConfig, f"register_dataset({name!r}, schema={schema!r})")

    def wrap(fn):
        DATASETS[name] = fn
        if prepare is not None:
            PREPARERS[name] = prepare
        if complete is not None:
            COMPLETERS[name] = complete
        if schema is not None:
            DATA_SCHEMAS[name] = schema
        return fn

    return wrap


def complete_data_config(cfg) -> dict:
    """{key: value} for the data config, from the dataset itself: a LeRobot dataset's cameras,
    state and action sizes and action layout, the keys left null read from meta/info.json and
    the ones given checked against it. The trainer merges them in before it builds the model, so
    the run's config.yaml (and every checkpoint) holds them. {} for datasets without a completer."""
    complete = COMPLETERS.get(str(cfg["name"]))
    return complete(cfg) if complete is not None else {}


def prepare_dataset(cfg) -> None:
    """Make what the dataset reads if it is missing (Meta-World: collect the demos). Call it in
    one process only; `build_dataset` elsewhere then finds the data ready."""
    prepare = PREPARERS.get(str(cfg["name"]))
    if prepare is not None:
        prepare(with_data_defaults(cfg))


def _collect_metaworld_demos(cfg) -> None:
    from drifting_vla.data.metaworld_demos import ensure_metaworld_demos

    ensure_metaworld_demos(cfg)


def build_dataset(cfg, split: str = "train") -> DemoDataset:
    """The builder reads `cfg` over the dataset's schema defaults (`with_data_defaults`). With
    `data.skip_corrupt=true` a sample whose files turn out damaged while training is replaced by a
    readable one, the same in every run (`skip_corrupt.SkipCorruptSamples`)."""
    name = str(cfg["name"])
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}")
    cfg = with_data_defaults(cfg)
    dataset = DATASETS[name](cfg, split)
    return SkipCorruptSamples(dataset) if cfg.get("skip_corrupt", False) else dataset


@register_dataset("metaworld", prepare=_collect_metaworld_demos)
def build_metaworld(cfg, split: str = "train") -> DemoDataset:
    """Collects the demos first if the cache lacks them (minutes, once). The val split is every
    `data.holdout_every`-th demo episode of each task, held out of train."""
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
        privileged_state=bool(cfg["privileged_state"]),
        split=split,
        holdout_every=int(cfg["holdout_every"]),
        n_obs_steps=int(cfg["n_obs_steps"]),
    )


def _collect_aloha_demos(cfg) -> None:
    from drifting_vla.data.aloha_demos import ensure_aloha_demos

    ensure_aloha_demos(cfg)


@register_dataset("aloha", prepare=_collect_aloha_demos)
def build_aloha(cfg, split: str = "train") -> DemoDataset:
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
        holdout_every=int(cfg["holdout_every"]),
        n_obs_steps=int(cfg["n_obs_steps"]),
    )


@register_dataset("rlbench")
def build_rlbench(cfg, split: str = "train") -> DemoDataset:
    from drifting_vla.data.rlbench_dataset import RLBenchDataset
    from drifting_vla.specs import ActionSpec

    root = pathlib.Path(str(cfg["root"])).expanduser() / split
    cache_dir = cfg["cache_dir"]
    return RLBenchDataset(
        root,
        tasks=list(cfg["tasks"]),
        cameras=list(cfg["cameras"]),
        horizon=int(cfg["horizon"]),
        keyframes=bool(cfg["keyframes"]),
        image_size=cfg["image_size"],
        cache_dir=pathlib.Path(str(cache_dir)).expanduser() / split if cache_dir else None,
        skip_corrupt=bool(cfg["skip_corrupt"]),
        random_instruction=split == "train",
        max_episodes_per_task=cfg["max_episodes_per_task"],
        action_spec=ActionSpec.from_config(cfg["action_spec"]),
        ignore_collisions=bool(cfg["ignore_collisions"]),
        n_obs_steps=int(cfg["n_obs_steps"]),
    )


def _complete_lerobot(cfg) -> dict:
    """data.cameras, data.proprio_dim, data.action_spec of a LeRobot dataset (lerobot_features.py)."""
    from drifting_vla.data.lerobot_dataset import (
        EXPORT_META,
        read_export_meta,
        read_info,
        resolve_root,
    )
    from drifting_vla.data.lerobot_features import data_keys

    root = resolve_root(cfg.get("root"), cfg.get("repo_id"), cfg.get("revision"))
    return data_keys(cfg, read_info(root)["features"], root / "meta" / "info.json", read_export_meta(root), root / EXPORT_META)


@register_dataset("lerobot", complete=_complete_lerobot)
def build_lerobot(cfg, split: str = "train") -> DemoDataset:
    """A LeRobot v3.0 dataset from `data.root`, or `data.repo_id` (+ `data.revision`) from the
    hub. The val split is every `data.holdout_every`-th episode, held out of train. Null cameras,
    proprio_dim or action_spec (a config `complete_data_config` has not filled) are not checked."""
    from drifting_vla.data.lerobot_dataset import LeRobotDataset, resolve_root
    from drifting_vla.specs import ActionSpec

    if split not in ("train", "val"):
        raise ValueError(f"LeRobot datasets have a train and a val split here, got {split!r}")
    cameras, spec, proprio_dim = cfg.get("cameras"), cfg.get("action_spec"), cfg.get("proprio_dim")
    return LeRobotDataset(
        resolve_root(cfg["root"], cfg["repo_id"], cfg["revision"]),
        cameras=None if cameras is None else [str(c) for c in cameras],
        horizon=int(cfg["horizon"]),
        image_size=int(cfg["image_size"]),
        state_key=str(cfg["state_key"]),
        action_key=str(cfg["action_key"]),
        split=split,
        holdout_every=int(cfg["holdout_every"]),
        action_dim=None if spec is None else ActionSpec.from_config(spec).dim,
        proprio_dim=None if proprio_dim is None else int(proprio_dim),
        n_obs_steps=int(cfg["n_obs_steps"]),
        skip_corrupt=bool(cfg["skip_corrupt"]),
    )
