"""Collect (and cache) the Meta-World expert demonstrations.

    store = ensure_metaworld_demos(data_cfg)      # collects what is missing, returns the store dir

Deterministic for a config: episode k of a task starts from `reset(seed=train_seeds.start + k)`,
failed expert episodes are dropped (and counted in `meta.json`), and kept episodes are written in
seed order whatever the number of workers. The store folder is named by a hash of everything that
changes its content, the installed metaworld and mujoco versions included, so a changed config or
simulator never reads stale demos and an unchanged one is not collected twice. A task whose demos
were cut short (a killed collection) or damaged is collected again; two processes never collect
one store at the same time.

Collection runs the simulator through `drifting_vla.envs.metaworld_env.MetaWorldEnv`, the same
wrapper the closed-loop evaluation uses (imported lazily: reading demos needs no simulator).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing as mp
import pathlib
import shutil
import time

from tqdm import tqdm

from drifting_vla.data.metaworld_dataset import (
    FORMAT_VERSION,
    read_collection,
    task_store_problem,
    write_task_store,
)
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.envs.metaworld_routes import EXPERT_VERSION as ROUTE_EXPERT_VERSION
from drifting_vla.formats.config import MetaWorldDataConfig
from drifting_vla.formats.files import FileLock, write_atomic

DEFAULT_ROOT = MetaWorldDataConfig.root
SIMULATOR_PACKAGES = ("metaworld", "mujoco")
"""Packages whose version changes the demos (task definitions and scripted experts; physics and
rendering): an upgrade collects a new store instead of mixing demos of two simulators."""


def collection_config(cfg) -> dict:
    """The part of the data config and of the installation that determines the demos' content
    (what the hash covers)."""
    collection = {
        "format_version": FORMAT_VERSION,
        "cameras": [str(c) for c in cfg["cameras"]],
        "image_size": int(cfg["image_size"]),
        "max_episode_steps": int(cfg["max_episode_steps"]),
        "train_seeds": {"start": int(cfg["train_seeds"]["start"]), "count": int(cfg["train_seeds"]["count"])},
        "expert": str(cfg.get("expert", "stock")),
        "observe_goal": bool(cfg.get("observe_goal", False)),
        "simulator": simulator_versions(),
    }
    if collection["expert"] != "stock":
        collection["expert_version"] = ROUTE_EXPERT_VERSION
    return collection


def simulator_versions() -> dict[str, str]:
    """{package: installed version} of `SIMULATOR_PACKAGES`."""
    versions = {}
    for package in SIMULATOR_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                f"{package} is not installed, and the Meta-World demo store is keyed by the simulator versions that "
                "collect it: install the simulation extra (pip install -e '.[sim]')"
            ) from None
    return versions


def store_dir(cfg) -> pathlib.Path:
    collection = collection_config(cfg)
    digest = hashlib.sha1(json.dumps(collection, sort_keys=True).encode()).hexdigest()[:12]
    root = pathlib.Path(str(cfg.get("root") or DEFAULT_ROOT)).expanduser()
    return root / digest


def ensure_metaworld_demos(cfg, workers: int | None = None, progress: bool = True) -> pathlib.Path:
    """Collect the demos of every task in `cfg.tasks` not yet whole in the store (never collected,
    cut short, damaged); return the store folder. `workers` defaults to `cfg.collect_workers`.

    Collection holds the store's lock (`<store>/.lock`): a second process, a run started at the
    same moment, waits and then reads what the first collected instead of collecting it again."""
    from drifting_vla.envs.metaworld_env import check_task

    tasks = [str(t) for t in cfg["tasks"]]
    for task in tasks:
        check_task(task)
    out = store_dir(cfg)
    collection = collection_config(cfg)
    if _read_collection(out) == collection and not any(task_store_problem(out / t) for t in tasks):
        return out  # read-only from here on: other processes may be reading the store
    lock = FileLock(out / ".lock", f"the Meta-World demo store {out}", "Waiting for it, then reading what it collected.")
    lock.wait_and_acquire()
    try:
        _collect_missing(out, tasks, collection, workers if workers is not None else cfg.get("collect_workers", 1), progress)
    finally:
        lock.release()
    return out


def _collect_missing(out: pathlib.Path, tasks: list[str], collection: dict, workers: int, progress: bool) -> None:
    """Under the store's lock: collect the tasks that are still not whole (whoever held the lock
    before may have collected them), and clear what killed writers left."""
    from drifting_vla.envs.metaworld_env import instruction_for, seed_range

    for stale in [*out.glob(".*.partial-*"), *out.glob(".*.retired-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    if _read_collection(out) != collection:
        write_atomic(out / "collection.json", json.dumps(collection, indent=2))
    problems = {task: task_store_problem(out / task) for task in tasks}
    todo = [task for task, problem in problems.items() if problem is not None]
    for task in todo:
        if (out / task).exists():
            print(f"{task}: the demos in {out / task} cannot be used ({problems[task]}); collecting them again")
    if not todo:
        return
    seeds = seed_range(collection["train_seeds"])
    jobs = [(task, seed, collection) for task in todo for seed in seeds]
    workers = max(1, int(workers))
    start = time.perf_counter()
    results: dict[str, list[dict]] = {t: [] for t in todo}
    bar = tqdm(total=len(jobs), desc="collecting Meta-World demos", unit="ep", disable=not progress)
    if workers == 1:
        for job in jobs:
            _keep(results, _collect_one(job), bar)
        _close_env()
    else:
        # spawn: one fresh process (one GL context, one env at a time) per worker.
        with mp.get_context("spawn").Pool(workers) as pool:
            for ep in pool.imap(_collect_one, jobs, chunksize=max(1, len(seeds) // (4 * workers))):
                _keep(results, ep, bar)
    bar.close()
    for task in todo:
        kept = [ep for ep in results[task] if ep["success"]]
        meta = {
            "task": task,
            "instruction": instruction_for(task),
            "episodes_attempted": len(results[task]),
            "episodes_kept": len(kept),
            "episodes_failed": len(results[task]) - len(kept),
            "failed_seeds": [ep["seed"] for ep in results[task] if not ep["success"]],
            "steps": int(sum(len(ep["actions"]) for ep in kept)),
            "modes": _mode_counts(kept),
            **collection,
        }
        write_task_store(out / task, kept, meta)
        if progress:
            print(
                f"{task}: kept {meta['episodes_kept']}/{meta['episodes_attempted']} expert episodes "
                f"({meta['episodes_failed']} failed), {meta['steps']} steps"
            )
    if progress:
        print(f"collected {len(todo)} task(s) in {time.perf_counter() - start:.0f} s -> {out}")


def _read_collection(out: pathlib.Path) -> dict | None:
    """collection.json, or None when it is absent or unreadable (it is written again)."""
    try:
        return read_collection(out)
    except CorruptEpisodeError:
        return None


def _mode_counts(episodes: list[dict]) -> dict[str, int] | None:
    """How many kept episodes went each way past the wall (None on tasks without a wall)."""
    modes = [ep.get("mode") for ep in episodes if ep.get("mode") is not None]
    return {m: modes.count(m) for m in sorted(set(modes))} or None


def _keep(results: dict, episode: dict, bar: tqdm) -> None:
    results[episode["task"]].append(episode)
    bar.update(1)
    bar.set_postfix(task=episode["task"], success=episode["success"])


_ENV = None


def _close_env() -> None:
    global _ENV
    if _ENV is not None:
        _ENV.close()
        _ENV = None


def _collect_one(job: tuple) -> dict:
    """Worker: one expert episode. Keeps one env per process and rebuilds it when the task changes."""
    global _ENV
    from drifting_vla.envs.metaworld_env import MetaWorldEnv, run_expert_episode

    task, seed, collection = job
    if _ENV is None or _ENV.task != task:
        _close_env()
        _ENV = MetaWorldEnv(
            task,
            cameras=collection["cameras"],
            image_size=collection["image_size"],
            max_episode_steps=collection["max_episode_steps"],
            expert=collection.get("expert", "stock"),
            observe_goal=collection.get("observe_goal", False),
        )
    episode = run_expert_episode(_ENV, seed)
    episode["task"] = task
    return episode
