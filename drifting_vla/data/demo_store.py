"""Collect (and cache) a simulator's scripted-expert demonstrations: the one store behind the
Meta-World demos (`metaworld_demos.py`) and the ALOHA ones (`aloha_demos.py`).

    store = suite.ensure_demos(data_cfg)      # collects what is missing, returns the store folder

The layout is `metaworld_dataset.py`'s: one folder per hash of the collection settings, one atomic,
checksummed sub-folder per task, so `MetaWorldDataset` reads the store of every suite.

Deterministic for a config: episode k of a task starts from `reset(seed=train_seeds.start + k)`,
failed expert episodes are dropped (their seeds listed in `meta.json`), and kept episodes are
written in seed order whatever the number of workers. The store folder is named by a hash of
everything that changes its content, the suite's settings and the installed simulator versions
included, so a changed config or simulator never reads stale demos and an unchanged one is not
collected twice. A task whose demos were cut short (a killed collection) or damaged is collected
again; two processes never collect one store at the same time.

Collection runs the simulator through the suite's env class (`drifting_vla.envs`), the same wrapper
the closed-loop evaluation uses, so a policy sees in evaluation what it saw in the demos.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing as mp
import pathlib
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from tqdm import tqdm

from drifting_vla.data.metaworld_dataset import FORMAT_VERSION, read_collection, task_store_problem, write_task_store
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.envs import close_reused_env, reused_env
from drifting_vla.envs.base_env import BaseEnv
from drifting_vla.formats.files import FileLock, write_atomic


@dataclass(frozen=True)
class DemoSuite:
    """What one simulator's demo store needs of it; everything else (hash, lock, workers, atomic
    writes, dropped failures) is the same for every simulator. Every field is picklable by
    reference, so a spawned worker is handed the suite itself."""

    name: str
    """For messages: "the {name} demo store"."""
    default_root: str
    """Where stores go when the config's `root` is null."""
    simulator_packages: tuple[str, ...]
    """Packages whose version changes the demos (task definitions and experts; physics and
    rendering): an upgrade collects a new store instead of mixing demos of two simulators."""
    instructions: Mapping[str, str]
    """The instruction of every task the simulator builds (its keys are the valid task names)."""
    settings: Callable[[Mapping], dict]
    """The suite's own part of the collection config (cameras, expert, ...) read from a data config."""
    env: type[BaseEnv]
    """Built with `env.from_config(collection config, task)`."""
    run_episode: Callable[[BaseEnv, int], dict]
    """One expert episode from `reset(seed)`: the arrays of `metaworld_dataset.ARRAYS`, `success`,
    `seed`, and where the suite has routes `route` (planned) and `mode` (taken)."""

    def collection_config(self, cfg) -> dict:
        """The part of the data config and of the installation that determines the demos' content
        (what the hash covers). Its keys are those of stores already on users' disks: adding or
        renaming one moves every store."""
        return {
            "format_version": FORMAT_VERSION,
            "image_size": int(cfg["image_size"]),
            "max_episode_steps": int(cfg["max_episode_steps"]),
            "train_seeds": {"start": int(cfg["train_seeds"]["start"]), "count": int(cfg["train_seeds"]["count"])},
            **self.settings(cfg),
            "simulator": self.simulator_versions(),
        }

    def simulator_versions(self) -> dict[str, str]:
        versions = {}
        for package in self.simulator_packages:
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                raise ImportError(
                    f"{package} is not installed, and the {self.name} demo store is keyed by the simulator versions that "
                    "collect it: install the simulation extra (pip install -e '.[sim]', or pip install -r requirements/sim.txt)"
                ) from None
        return versions

    def store_dir(self, cfg) -> pathlib.Path:
        digest = hashlib.sha1(json.dumps(self.collection_config(cfg), sort_keys=True).encode()).hexdigest()[:12]
        return pathlib.Path(str(cfg.get("root") or self.default_root)).expanduser() / digest

    def ensure_demos(self, cfg, workers: int | None = None, progress: bool = True) -> pathlib.Path:
        """Collect the demos of every task in `cfg.tasks` not yet whole in the store (never collected,
        cut short, damaged); return the store folder. `workers` defaults to `cfg.collect_workers`.

        Collection holds the store's lock (`<store>/.lock`): a second process, a run started at the
        same moment, waits and then reads what the first collected instead of collecting it again."""
        tasks = [str(t) for t in cfg["tasks"]]
        for task in tasks:
            if task not in self.instructions:
                raise ValueError(f"unknown {self.name} task {task!r}; valid names: {sorted(self.instructions)}")
        out = self.store_dir(cfg)
        collection = self.collection_config(cfg)
        if _read_collection(out) == collection and not any(task_store_problem(out / t) for t in tasks):
            return out  # read-only from here on: other processes may be reading the store
        lock = FileLock(out / ".lock", f"the {self.name} demo store {out}", "Waiting for it, then reading what it collected.")
        lock.wait_and_acquire()
        try:
            _collect_missing(self, out, tasks, collection, cfg.get("collect_workers", 1) if workers is None else workers,
                             progress)
        finally:
            lock.release()
        return out


def _collect_missing(suite: DemoSuite, out: pathlib.Path, tasks: list[str], collection: dict, workers: int,
                     progress: bool) -> None:
    """Under the store's lock: collect the tasks that are still not whole (whoever held the lock
    before may have collected them), and clear what killed writers left."""
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
    start, count = int(collection["train_seeds"]["start"]), int(collection["train_seeds"]["count"])
    jobs = [(suite, task, seed, collection) for task in todo for seed in range(start, start + count)]
    started = time.perf_counter()
    results = _run_jobs(jobs, workers, count, f"collecting {suite.name} demos", progress)
    for task in todo:
        meta = _task_meta(suite, task, results[task], collection, started)
        write_task_store(out / task, [ep for ep in results[task] if ep["success"]], meta)
        if progress:
            print(f"{task}: kept {meta['episodes_kept']}/{meta['episodes_attempted']} expert episodes "
                  f"({meta['episodes_failed']} failed), {meta['steps']} steps")
    if progress:
        print(f"collected {len(todo)} task(s) in {time.perf_counter() - started:.0f} s -> {out}")


def _run_jobs(jobs: list[tuple], workers: int, per_task: int, desc: str, progress: bool) -> dict[str, list[dict]]:
    """{task: its episodes in seed order}."""
    results: dict[str, list[dict]] = {job[1]: [] for job in jobs}
    with tqdm(total=len(jobs), desc=desc, unit="ep", disable=not progress) as bar:
        for episode in _episodes(jobs, max(1, int(workers)), per_task):
            results[episode["task"]].append(episode)
            bar.update(1)
            bar.set_postfix(task=episode["task"], success=episode["success"])
    return results


def _episodes(jobs: list[tuple], workers: int, per_task: int) -> Iterator[dict]:
    """The jobs' episodes in job order. One worker runs in this process (no start-up cost); more
    are spawned processes, each with one GL context and one env at a time."""
    if workers == 1:
        try:
            yield from map(_collect_one, jobs)
        finally:
            close_reused_env()
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_collect_one, jobs, chunksize=max(1, per_task // (4 * workers)))


def _task_meta(suite: DemoSuite, task: str, episodes: list[dict], collection: dict, started: float) -> dict:
    """meta.json of one task: what was kept and dropped, and on suites with routes the route each
    kept episode was planned along and the one it took, in episode order (so a store's share of
    each way, and whether the labeller agrees with the plan, are read without replaying it)."""
    kept = [ep for ep in episodes if ep["success"]]
    return {
        "task": task,
        "instruction": suite.instructions[task],
        "episodes_attempted": len(episodes),
        "episodes_kept": len(kept),
        "episodes_failed": len(episodes) - len(kept),
        "failed_seeds": [ep["seed"] for ep in episodes if not ep["success"]],
        "steps": int(sum(len(ep["actions"]) for ep in kept)),
        "routes": _per_episode(kept, "route"),
        "modes": _per_episode(kept, "mode"),
        "collect_seconds": round(time.perf_counter() - started, 1),
        **collection,
    }


def _per_episode(episodes: list[dict], key: str) -> list | None:
    values = [ep.get(key) for ep in episodes]
    return values if any(v is not None for v in values) else None


def _read_collection(out: pathlib.Path) -> dict | None:
    """collection.json, or None when it is absent or unreadable (it is written again)."""
    try:
        return read_collection(out)
    except CorruptEpisodeError:
        return None


def _collect_one(job: tuple) -> dict:
    """Worker: one expert episode, in the env this process keeps for the task."""
    suite, task, seed, collection = job
    episode = suite.run_episode(reused_env(suite.env, collection, task), seed)
    episode["task"] = task
    return episode
