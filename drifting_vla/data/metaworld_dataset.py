"""The embedded Meta-World demonstrations: on-disk store and dataset.

On-disk format (one folder per collection config, one sub-folder per task):

    <root>/<config hash>/
        collection.json              the collection config (settings, simulator versions) the hash was made from
        <task>/
            images.npy   uint8   [N, V, 3, H, W]   all steps of all episodes, back to back
            proprio.npy  float32 [N, 4]            hand xyz + gripper opening
            state.npy    float32 [N, 39]           Meta-World's full state (privileged baseline)
            actions.npy  float32 [N, 4]            expert action taken at that step
            episode_ends.npy int64 [E]             exclusive end row of each episode
            seeds.npy    int64   [E]               reset seed of each kept episode
            meta.json                              instruction, counts, sha256 of each array file
        .<task>.partial-<pid>/       a write in progress (or killed); never read

A task folder appears whole or not at all (written aside, then renamed), and is checked whenever
it is opened (`task_store_problem`): a store that is cut short, damaged (at the same size too: each
array file's sha256) or of another layout is collected again by the next run rather than tripped
over by every later one.

Why plain `.npy`: images are stored uint8 and uncompressed, so `np.load(mmap_mode="r")` gives O(1)
random access with no decoding; loader workers share the OS page cache instead of each holding a
copy; nothing beyond numpy is needed to read it (any language with an .npy reader can). The
default set (5 tasks, 2 cameras at 64x64) is a few hundred MB. PNG/MP4 would be smaller but cost
a decode per sample; zarr/HDF5 would add a dependency for no gain at this size.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import torch
from torch.utils.data import Dataset

from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.data.transforms import (
    action_window,
    check_n_obs_steps,
    first_non_finite,
    history_rows,
    split_episodes,
    stack_history,
)
from drifting_vla.formats.files import file_sha256, holds_sha256

ARRAYS = ("images", "proprio", "state", "actions")
STORED = (*ARRAYS, "episode_ends", "seeds")
"""Every array file of a task folder. meta.json records the sha256 of each, and opening a store
checks them all: a flipped bit is a wrong pixel or a wrong training target that no shape check
sees. images.npy is most of the bytes: hashing the default store (5 tasks, 0.49 GB) takes 0.29 s
on this project's 2-core machine (50-65 ms per task), small next to a run's start."""
FORMAT_VERSION = 1



def write_task_store(task_dir: pathlib.Path, episodes: list[dict], meta: dict) -> None:
    """Write the kept episodes of one task atomically: into a folder of this process, renamed into
    place (replacing a damaged store of the task), so a killed writer leaves only a hidden
    `.<task>.partial-<pid>` folder that no reader opens. Two processes must not collect one store
    at once: `demo_store.ensure_demos` holds its lock."""
    task_dir = pathlib.Path(task_dir)
    if not episodes:
        raise ValueError(f"no successful episodes to write for {task_dir.name}: {meta}")
    tmp = task_dir.with_name(f".{task_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = {key: np.concatenate([ep[key] for ep in episodes]) for key in ARRAYS}
    arrays["episode_ends"] = np.cumsum([len(ep["actions"]) for ep in episodes]).astype(np.int64)
    arrays["seeds"] = np.array([ep["seed"] for ep in episodes], dtype=np.int64)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
    meta = {**meta, "sha256": {name: file_sha256(tmp / f"{name}.npy") for name in STORED}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if task_dir.exists():
        retired = task_dir.with_name(f".{task_dir.name}.retired-{os.getpid()}")
        task_dir.rename(retired)
        tmp.rename(task_dir)
        shutil.rmtree(retired)
    else:
        tmp.rename(task_dir)


NOT_COLLECTED = "not collected"


def task_store_problem(task_dir: pathlib.Path) -> str | None:
    """Why the store of one task cannot be read (not collected, cut short, damaged, written by
    another version), or None when it is whole: every array file has the sha256 it was written with."""
    task_dir = pathlib.Path(task_dir)
    meta_file = task_dir / "meta.json"
    if not meta_file.is_file():
        return NOT_COLLECTED
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:
        return f"{meta_file} is unreadable ({e})"
    if not isinstance(meta, dict) or "instruction" not in meta:
        return f"{meta_file} lacks the task's instruction (another version wrote it)"
    try:
        arrays = {name: _load(task_dir / f"{name}.npy", mmap_mode="r") for name in STORED}
    except CorruptEpisodeError as e:
        return str(e)
    ends = arrays["episode_ends"]
    rows = {name: len(arrays[name]) for name in ARRAYS}
    if not len(ends) or set(rows.values()) != {int(ends[-1])} or len(arrays["seeds"]) != len(ends):
        return (f"the arrays in {task_dir} disagree on their lengths (rows {rows}; episode_ends: {len(ends)} episodes, "
                f"{int(ends[-1]) if len(ends) else 0} rows; seeds: {len(arrays['seeds'])})")
    digests = meta.get("sha256") or {}
    unhashed = [name for name in STORED if name not in digests]
    if unhashed:
        return f"{meta_file} records no sha256 of {unhashed} (an earlier version wrote it)"
    for name in STORED:
        if not holds_sha256(task_dir / f"{name}.npy", digests[name]):  # once per process: a run opens the store 5 times
            return (f"{task_dir / name}.npy does not hold what was written: its sha256 differs from meta.json's "
                    "(damaged on disk or in a copy)")
    return None


def read_task_meta(task_dir: pathlib.Path) -> tuple[dict, np.ndarray]:
    """meta.json and the episode ends of one whole task folder."""
    task_dir = pathlib.Path(task_dir)
    problem = task_store_problem(task_dir)
    if problem is not None:
        parent = task_dir.parent
        collected = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")) if parent.is_dir() else []
        error = FileNotFoundError if problem == NOT_COLLECTED else CorruptEpisodeError
        raise error(
            f"no whole demos for task {task_dir.name!r} in {task_dir}: {problem}. Run scripts/collect_demos.py with "
            f"the same settings (or train, which collects them): it collects what is missing or damaged (tasks in "
            f"the store: {collected}); or delete {parent} to collect every task again"
        )
    return json.loads((task_dir / "meta.json").read_text()), _load(task_dir / "episode_ends.npy")


def check_task_values(task_dir: pathlib.Path, ends: np.ndarray, keys) -> None:
    """Raise CorruptEpisodeError naming the array, the episode (and its seed) and the step of the
    first non-finite value of `keys` in one task folder."""
    for key in keys:
        values = _load(pathlib.Path(task_dir) / f"{key}.npy", mmap_mode="r")
        row = first_non_finite(values)
        if row is None:
            continue
        episode = int(np.searchsorted(ends, row, side="right"))
        start = int(ends[episode - 1]) if episode else 0
        seed = int(_load(pathlib.Path(task_dir) / "seeds.npy")[episode])
        raise CorruptEpisodeError(
            f"{pathlib.Path(task_dir) / f'{key}.npy'}: episode {episode} (seed {seed}) has a non-finite {key} at step "
            f"{row - start} ({values[row].tolist()}); delete {task_dir} and run scripts/collect_demos.py again"
        )


def open_task_arrays(task_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """The step arrays of one task folder, memory-mapped (`ARRAYS`)."""
    return {key: _load(pathlib.Path(task_dir) / f"{key}.npy", mmap_mode="r") for key in ARRAYS}


def read_collection(store_dir: pathlib.Path) -> dict:
    """collection.json of a store: the settings its demos were collected with."""
    path = pathlib.Path(store_dir) / "collection.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptEpisodeError(
            f"cannot read {path} ({type(e).__name__}: {e}); run scripts/collect_demos.py with the same settings "
            "(or train), which writes it again"
        ) from e


class MetaWorldDataset(Dataset):
    """Items are sample dicts (`drifting_vla.specs`): for step t of an episode, the observation at t
    (with `n_obs_steps` = n > 1, the observations t-n+1 .. t) and the expert actions t .. t+T-1,
    padded with the last action past the episode's end.

        step:     t-1 t   t+1 ... t+T-1
        images    o_t-1 o_t                 (n = 2; o_t alone for n = 1; o_0 repeats before the start)
        actions       a_t a_t+1 ... a_t+T-1   (mask False where past the end)
    """

    def __init__(
        self,
        store_dir: str | pathlib.Path,
        tasks: list[str],
        cameras: list[str],
        horizon: int,
        privileged_state: bool = False,
        split: str = "all",
        holdout_every: int = 0,
        n_obs_steps: int = 1,
    ) -> None:
        """`split` "train" / "val" holds out every `holdout_every`-th episode of each task for
        validation (episodes, not steps: steps of one episode are near-duplicates); "all" keeps all."""
        split_episodes(0, split, holdout_every)  # a bad split fails before anything is read
        self.store_dir = pathlib.Path(store_dir)
        self.tasks = list(tasks)
        self.horizon = int(horizon)
        self.n_obs_steps = check_n_obs_steps(n_obs_steps)
        self.privileged_state = privileged_state
        if not self.tasks:
            raise ValueError("MetaWorldDataset: the task list is empty")
        collection = read_collection(self.store_dir)
        stored_cameras = list(collection["cameras"])
        missing = [c for c in cameras if c not in stored_cameras]
        if missing or not cameras:
            raise ValueError(
                f"camera(s) {missing or cameras} not in the collected demos at {self.store_dir} "
                f"(collected: {stored_cameras}); recollect with these cameras or choose among them"
            )
        self.cameras = list(cameras)
        self._camera_index = [stored_cameras.index(c) for c in cameras]
        self.instructions, self._ends, self._index, self._episodes = {}, [], [], []
        for task_id, task in enumerate(self.tasks):
            meta, ends = read_task_meta(self.store_dir / task)
            check_task_values(self.store_dir / task, ends, ("actions", "proprio", "state") if privileged_state else ("actions", "proprio"))
            self.instructions[task] = meta["instruction"]
            self._ends.append(ends)
            starts = np.concatenate([[0], ends[:-1]])
            for episode in split_episodes(len(ends), split, holdout_every):
                start, end = starts[episode], ends[episode]
                self._episodes.append((task_id, int(start), int(end)))
                rows = np.arange(start, end)
                self._index.append(np.stack([np.full_like(rows, task_id), rows, np.full_like(rows, start), np.full_like(rows, end)], 1))
        self._index = np.concatenate(self._index) if self._index else np.zeros((0, 4), dtype=np.int64)
        if len(self._index) == 0:
            raise ValueError(f"MetaWorldDataset at {self.store_dir} has no samples for tasks {self.tasks}")
        self._arrays: list[dict] | None = None  # memmaps, opened lazily in each worker process

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        task_id, row, start, end = (int(v) for v in self._index[i])
        arrays = self._open()[task_id]
        chunk, mask = action_window(arrays["actions"][row:end], 0, self.horizon)
        frames = history_rows(row, start, self.n_obs_steps)
        item = {
            "images": torch.from_numpy(stack_history([np.ascontiguousarray(arrays["images"][r, self._camera_index]) for r in frames])),
            "proprio": torch.from_numpy(stack_history([np.array(arrays["proprio"][r]) for r in frames])),
            "instruction": self.instructions[self.tasks[task_id]],
            "actions": torch.from_numpy(chunk),
            "action_mask": torch.from_numpy(mask),
            "task": self.tasks[task_id],
        }
        if self.privileged_state:
            item["state"] = torch.from_numpy(np.array(arrays["state"][row]))
        return item

    def all_instructions(self) -> list[str]:
        """Every instruction an item can carry, sorted (the vocabulary of learned task embeddings)."""
        return sorted(set(self.instructions.values()))

    def all_actions(self) -> np.ndarray:
        """Every action of this split's episodes, float32 [N, 4] (for normalization statistics:
        the val episodes of a train split stay unseen)."""
        return self._split_rows("actions")

    def all_proprio(self) -> np.ndarray:
        return self._split_rows("proprio")

    def _split_rows(self, key: str) -> np.ndarray:
        arrays = self._open()
        return np.concatenate([arrays[task_id][key][start:end] for task_id, start, end in self._episodes])

    def episode_ids(self) -> np.ndarray:
        """The episode of every sample, int64 [N], numbered within this split (neighbour
        positives can then leave an observation's own demonstration out)."""
        # index columns: task, row, episode start, episode end; (task, start) names an episode
        return np.unique(self._index[:, [0, 2]], axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)

    def episodes(self, task: str) -> int:
        return len(self._ends[self.tasks.index(task)])

    def __getstate__(self) -> dict:
        # A pickled memmap would copy the whole array into every worker: reopen there instead.
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> list[dict]:
        if self._arrays is None:
            self._arrays = [open_task_arrays(self.store_dir / task) for task in self.tasks]
        return self._arrays


def _load(path: pathlib.Path, mmap_mode: str | None = None) -> np.ndarray:
    try:
        return np.load(path, mmap_mode=mmap_mode)
    except (OSError, ValueError, EOFError) as e:
        raise CorruptEpisodeError(
            f"cannot read {path} ({type(e).__name__}: {e}); run scripts/collect_demos.py with the same settings "
            "(or train), which collects damaged tasks again"
        ) from e
