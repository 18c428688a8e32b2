"""The embedded Meta-World demonstrations: on-disk store and dataset.

On-disk format (one folder per collection config, one sub-folder per task):

    <root>/<config hash>/
        collection.json              the collection config the hash was made from
        <task>/
            images.npy   uint8   [N, V, 3, H, W]   all steps of all episodes, back to back
            proprio.npy  float32 [N, 4]            hand xyz + gripper opening
            state.npy    float32 [N, 39]           Meta-World's full state (privileged baseline)
            actions.npy  float32 [N, 4]            expert action taken at that step
            episode_ends.npy int64 [E]             exclusive end row of each episode
            seeds.npy    int64   [E]               reset seed of each kept episode
            meta.json                              written last: marks the task complete

Why plain `.npy`: images are stored uint8 and uncompressed, so `np.load(mmap_mode="r")` gives O(1)
random access with no decoding; loader workers share the OS page cache instead of each holding a
copy; nothing beyond numpy is needed to read it (any language with an .npy reader can). The
default set (5 tasks, 2 cameras at 64x64) is a few hundred MB. PNG/MP4 would be smaller but cost
a decode per sample; zarr/HDF5 would add a dependency for no gain at this size.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from torch.utils.data import Dataset

from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.data.transforms import (
    action_window,
    check_n_obs_steps,
    history_rows,
    split_episodes,
    stack_history,
)

ARRAYS = ("images", "proprio", "state", "actions")
FORMAT_VERSION = 1


def write_task_store(task_dir: pathlib.Path, episodes: list[dict], meta: dict) -> None:
    """Write the kept episodes of one task atomically (a temp folder renamed into place)."""
    task_dir = pathlib.Path(task_dir)
    if not episodes:
        raise ValueError(f"no successful episodes to write for {task_dir.name}: {meta}")
    tmp = task_dir.with_name(task_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for key in ARRAYS:
        np.save(tmp / f"{key}.npy", np.concatenate([ep[key] for ep in episodes]))
    np.save(tmp / "episode_ends.npy", np.cumsum([len(ep["actions"]) for ep in episodes]).astype(np.int64))
    np.save(tmp / "seeds.npy", np.array([ep["seed"] for ep in episodes], dtype=np.int64))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(task_dir)


def task_store_complete(task_dir: pathlib.Path) -> bool:
    return (pathlib.Path(task_dir) / "meta.json").is_file()


def read_task_meta(task_dir: pathlib.Path) -> tuple[dict, np.ndarray]:
    """meta.json and the episode ends of one complete task folder."""
    task_dir = pathlib.Path(task_dir)
    if not task_store_complete(task_dir):
        collected = sorted(p.name for p in task_dir.parent.iterdir() if task_store_complete(p)) if task_dir.parent.is_dir() else []
        raise FileNotFoundError(
            f"no complete demos for task {task_dir.name!r} in {task_dir}; run scripts/collect_demos.py "
            f"(collected tasks: {collected})"
        )
    return json.loads((task_dir / "meta.json").read_text()), _load(task_dir / "episode_ends.npy")


def open_task_arrays(task_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """The step arrays of one task folder, memory-mapped (`ARRAYS`)."""
    return {key: _load(pathlib.Path(task_dir) / f"{key}.npy", mmap_mode="r") for key in ARRAYS}


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
        val_every: int = 0,
        n_obs_steps: int = 1,
    ) -> None:
        """`split` "train" / "val" holds out every `val_every`-th episode of each task for
        validation (episodes, not steps: steps of one episode are near-duplicates); "all" keeps all."""
        split_episodes(0, split, val_every)  # a bad split fails before anything is read
        self.store_dir = pathlib.Path(store_dir)
        self.tasks = list(tasks)
        self.horizon = int(horizon)
        self.n_obs_steps = check_n_obs_steps(n_obs_steps)
        self.privileged_state = privileged_state
        if not self.tasks:
            raise ValueError("MetaWorldDataset: the task list is empty")
        collection = json.loads((self.store_dir / "collection.json").read_text())
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
            self.instructions[task] = meta["instruction"]
            self._ends.append(ends)
            starts = np.concatenate([[0], ends[:-1]])
            for episode in split_episodes(len(ends), split, val_every):
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
            f"cannot read {path} ({type(e).__name__}: {e}); delete {path.parent} and run "
            "scripts/collect_demos.py again"
        ) from e
