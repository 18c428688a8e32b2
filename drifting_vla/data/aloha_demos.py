"""Collect (and cache) the scripted ALOHA demonstrations, and export them to LeRobot v3.0.

    store = ensure_aloha_demos(data_cfg)          # collects what is missing, returns the store dir
    export_aloha_store(store, out, tasks, eval_seeds)   # LeRobot's ALOHA layout, fps 50

The store has the layout of the Meta-World one (`metaworld_dataset.py`: one folder per hash of the
collection settings, one atomic, checksummed sub-folder per task), so `MetaWorldDataset` reads it:

    images  uint8 [N, 1, 3, S, S]  the top camera      proprio float32 [N, 14]  joint positions
    state   float32 [N, nq]        every joint (arms, objects' free joints)
    actions float32 [N, 14]        the joint targets the expert sent at that step

Episode k of a task replays the expert from `reset(seed=train_seeds.start + k)`; a replay that never
reaches reward 4 is dropped (its seed listed in meta.json as failed). On the two-route variant
meta.json records the route each kept episode was planned along (`routes`) and took (`modes`).
The hash covers the settings, the expert's version and the installed gym-aloha, dm-control and
mujoco versions, so a changed simulator or plan never reads stale demos.
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
    open_task_arrays,
    read_collection,
    read_task_meta,
    task_store_problem,
    write_task_store,
)
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.formats.files import FileLock, write_atomic

DEFAULT_ROOT = "~/.cache/drifting_vla/aloha"
SIMULATOR_PACKAGES = ("gym-aloha", "dm-control", "mujoco")
FPS = 50
JOINT_NAMES = [f"{arm}_{joint}" for arm in ("left", "right")
               for joint in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")]
"""LeRobot's ALOHA order: per arm (left, then right) 6 joints and the normalised gripper."""


def collection_config(cfg) -> dict:
    """The part of the data config and of the installation that determines the demos' content."""
    from drifting_vla.envs.aloha_experts import EXPERT_VERSION

    return {
        "format_version": FORMAT_VERSION,
        "cameras": ["top"],
        "image_size": int(cfg["image_size"]),
        "render_mode": str(cfg.get("render_mode", "fast")),
        "max_episode_steps": int(cfg["max_episode_steps"]),
        "train_seeds": {"start": int(cfg["train_seeds"]["start"]), "count": int(cfg["train_seeds"]["count"])},
        "expert": str(cfg.get("expert", "scripted")),
        "expert_version": EXPERT_VERSION,
        "simulator": simulator_versions(),
    }


def simulator_versions() -> dict[str, str]:
    versions = {}
    for package in SIMULATOR_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(f"{package} is not installed, and the ALOHA demo store is keyed by the simulator versions "
                              "that collect it: install the simulation extra (pip install -r requirements/sim.txt)") from None
    return versions


def store_dir(cfg) -> pathlib.Path:
    digest = hashlib.sha1(json.dumps(collection_config(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return pathlib.Path(str(cfg.get("root") or DEFAULT_ROOT)).expanduser() / digest


def ensure_aloha_demos(cfg, workers: int | None = None, progress: bool = True) -> pathlib.Path:
    """Collect the demos of every task in `cfg.tasks` not yet whole in the store; return the store
    folder. Holds the store's lock while collecting, so a second process waits and then reads."""
    from drifting_vla.envs.aloha_env import check_task

    tasks = [str(t) for t in cfg["tasks"]]
    for task in tasks:
        check_task(task)
    out = store_dir(cfg)
    collection = collection_config(cfg)
    if _read_collection(out) == collection and not any(task_store_problem(out / t) for t in tasks):
        return out
    lock = FileLock(out / ".lock", f"the ALOHA demo store {out}", "Waiting for it, then reading what it collected.")
    lock.wait_and_acquire()
    try:
        _collect_missing(out, tasks, collection, workers if workers is not None else cfg.get("collect_workers", 1), progress)
    finally:
        lock.release()
    return out


def _collect_missing(out: pathlib.Path, tasks: list[str], collection: dict, workers: int, progress: bool) -> None:
    from drifting_vla.envs.aloha_env import INSTRUCTIONS

    for stale in [*out.glob(".*.partial-*"), *out.glob(".*.retired-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    if _read_collection(out) != collection:
        write_atomic(out / "collection.json", json.dumps(collection, indent=2))
    todo = [task for task in tasks if task_store_problem(out / task) is not None]
    if not todo:
        return
    start = int(collection["train_seeds"]["start"])
    jobs = [(task, seed, collection) for task in todo for seed in range(start, start + int(collection["train_seeds"]["count"]))]
    started = time.perf_counter()
    results: dict[str, list[dict]] = {t: [] for t in todo}
    bar = tqdm(total=len(jobs), desc="collecting ALOHA demos", unit="ep", disable=not progress)
    with mp.get_context("spawn").Pool(max(1, int(workers))) as pool:
        for episode in pool.imap(_collect_one, jobs):
            results[episode["task"]].append(episode)
            bar.update(1)
            bar.set_postfix(task=episode["task"], success=episode["success"])
    bar.close()
    for task in todo:
        kept = [ep for ep in results[task] if ep["success"]]
        meta = {
            "task": task,
            "instruction": INSTRUCTIONS[task],
            "episodes_attempted": len(results[task]),
            "episodes_kept": len(kept),
            "episodes_failed": len(results[task]) - len(kept),
            "failed_seeds": [ep["seed"] for ep in results[task] if not ep["success"]],
            "steps": int(sum(len(ep["actions"]) for ep in kept)),
            "routes": [ep["route"] for ep in kept] if collection["expert"] == "routes" else None,
            "modes": [ep["mode"] for ep in kept] if collection["expert"] == "routes" else None,
            "collect_seconds": round(time.perf_counter() - started, 1),
            **collection,
        }
        write_task_store(out / task, kept, meta)
        if progress:
            print(f"{task}: kept {meta['episodes_kept']}/{meta['episodes_attempted']} expert episodes "
                  f"({meta['episodes_failed']} failed), {meta['steps']} steps")
    if progress:
        print(f"collected {len(todo)} task(s) in {time.perf_counter() - started:.0f} s -> {out}")


def _read_collection(out: pathlib.Path) -> dict | None:
    try:
        return read_collection(out)
    except CorruptEpisodeError:
        return None


_ENV = None


def _collect_one(job: tuple) -> dict:
    """Worker: one expert episode (plan, then replay); one env per process, rebuilt per task."""
    global _ENV
    from drifting_vla.envs.aloha_env import AlohaEnv, run_expert_episode

    task, seed, collection = job
    if _ENV is None or _ENV.task != task:
        if _ENV is not None:
            _ENV.close()
        _ENV = AlohaEnv(task, image_size=collection["image_size"], render_mode=collection["render_mode"],
                        max_episode_steps=collection["max_episode_steps"], expert=collection["expert"])
    episode = run_expert_episode(_ENV, seed)
    episode["task"] = task
    return episode


def export_aloha_store(store: str | pathlib.Path, output: str | pathlib.Path, tasks: list[str], eval_seeds: dict,
                       vcodec: str = "libsvtav1") -> pathlib.Path:
    """The demos of `tasks` as a LeRobot v3.0 dataset with LeRobot's ALOHA feature names:
    `observation.images.top` (video), `observation.state` (14), `action` (14), fps 50, and
    `observation.environment_state` (every joint). meta/drifting_vla.json names this simulator,
    so `data=lerobot data.root=<output> data.cameras=[observation.images.top]` evaluates in it."""
    from drifting_vla.data.lerobot_writer import LeRobotWriter

    store = pathlib.Path(store)
    collection = read_collection(store)
    size = int(collection["image_size"])
    task_names, nq = {}, None
    writer = None
    for task in tasks:
        meta, ends = read_task_meta(store / task)
        arrays = open_task_arrays(store / task)
        if writer is None:
            nq = int(arrays["state"].shape[1])
            writer = LeRobotWriter(output, fps=FPS, cameras={"observation.images.top": (size, size)},
                                   state_names=JOINT_NAMES, action_names=JOINT_NAMES, vcodec=vcodec, robot_type="aloha",
                                   extra_features={"observation.environment_state": [f"qpos_{i}" for i in range(nq)]})
        task_names[meta["instruction"]] = task
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            writer.add_episode(
                meta["instruction"],
                {"observation.images.top": arrays["images"][start:end, 0].transpose(0, 2, 3, 1)},
                {"observation.state": arrays["proprio"][start:end], "action": arrays["actions"][start:end],
                 "observation.environment_state": arrays["state"][start:end]},
            )
    if writer is None:
        raise ValueError("export_aloha_store: no tasks given")
    simulator = {
        "name": "aloha", "tasks": list(tasks), "cameras": {"observation.images.top": "top"},
        "image_size": size, "render_mode": collection["render_mode"], "expert": collection["expert"],
        "max_episode_steps": int(collection["max_episode_steps"]),
        "train_seeds": dict(collection["train_seeds"]), "eval_seeds": {k: int(v) for k, v in dict(eval_seeds).items()},
    }
    return writer.finalize({"task_names": task_names, "simulator": simulator})
