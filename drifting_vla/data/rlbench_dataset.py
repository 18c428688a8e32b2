"""RLBench 18 tasks in PerAct's on-disk format (docs/data.md), read without RLBench.

    <root>/<task>/all_variations/episodes/episode<N>/
        low_dim_obs.pkl              rlbench.demo.Demo (read through `rlbench_pickle`)
        variation_descriptions.pkl   list[str]: phrasings of the instruction
        variation_number.pkl         int
        <camera>_rgb/<step>.png      uint8 RGB; <camera>_depth/<step>.png 24-bit packed depth

Items (`drifting_vla.specs`): the observation at step t and

    dense:      actions = poses at steps t+1 .. t+T                 [T, A]
    keyframes:  actions = the next T keyframes after t (PerAct)     [T, A]

each row `[x, y, z, qx, qy, qz, qw, gripper_open, ignore_collisions]` (A = 9, `RLBENCH_ACTION_SPEC`)
with a unit, qw >= 0 quaternion, padded with the last row and masked at the end of the episode;
an action spec without the last component gives A = 8. proprio = the pose and gripper state at
step t (8 floats). Dense items may carry an observation history (`n_obs_steps`: steps t-n+1 .. t,
images [n, V, 3, H, W] and proprio [n, 8]); keyframe items may not, since a keyframe policy
observes only on arriving at each keyframe, never at the steps in between.

The ignore_collisions target of the row reaching step j is the flag the demonstration recorded at
step j-1, PerAct's convention: the last one recorded while the arm moved towards that pose (the
observation at a keyframe may already carry the next motion's flag). Only PerAct's fork of RLBench
records the flag; episodes without it take `ignore_collisions` (the config's constant), and the
dataset says so in one warning.

PNG decoding is paid once: with `cache_dir` set, an episode's frames are decoded on first use into
one uint8 .npy (memory-mapped afterwards), shared by all workers and epochs, named by a digest of
the files it was decoded from (`frames_digest`), so one cache serves several data roots safely.
Beside it, `<name>.npy.sha256` holds the sha256 it was written with, checked once per process when
it is opened: a cache damaged at the same size is decoded again, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from drifting_vla.data.rlbench_pickle import CorruptEpisodeError, load_rlbench_pickle
from drifting_vla.data.sampler import sample_rng
from drifting_vla.data.transforms import (
    action_window,
    canonical_quaternion,
    check_n_obs_steps,
    first_non_finite,
    history_rows,
    resize_image,
    stack_history,
)
from drifting_vla.formats.files import file_sha256, holds_sha256, write_atomic
from drifting_vla.specs import RLBENCH_ACTION_SPEC, ActionSpec

log = logging.getLogger(__name__)

RLBENCH_TASKS = (
    "open_drawer",
    "slide_block_to_color_target",
    "sweep_to_dustpan_of_size",
    "meat_off_grill",
    "turn_tap",
    "put_item_in_drawer",
    "close_jar",
    "reach_and_drag",
    "stack_blocks",
    "light_bulb_in",
    "put_money_in_safe",
    "place_wine_at_rack_location",
    "put_groceries_in_cupboard",
    "place_shape_in_shape_sorter",
    "push_buttons",
    "insert_onto_square_peg",
    "stack_cups",
    "place_cups",
)
CAMERAS = ("front", "left_shoulder", "right_shoulder", "wrist", "overhead")
PROPRIO_DIM = 8
POSE_ACTION_SPEC = ActionSpec(RLBENCH_ACTION_SPEC.components[:-1])
"""`RLBENCH_ACTION_SPEC` without ignore_collisions: the layout of runs that act with the constant."""


def check_rlbench_tasks(tasks) -> None:
    unknown = [t for t in tasks if t not in RLBENCH_TASKS]
    if unknown:
        raise ValueError(f"unknown RLBench task(s) {unknown}; the 18 valid names: {list(RLBENCH_TASKS)}")


def episode_dirs(root: str | pathlib.Path, task: str) -> list[pathlib.Path]:
    """Episode folders of one task, in episode-number order."""
    base = pathlib.Path(root) / task / "all_variations" / "episodes"
    if not base.is_dir():
        raise FileNotFoundError(
            f"no RLBench episodes for {task!r} at {base}; download with "
            f"`python scripts/download_rlbench_data.py --tasks {task} --output <dir>` and point root at <dir>/<split>"
        )
    dirs = [p for p in base.iterdir() if re.fullmatch(r"episode\d+", p.name)]
    return sorted(dirs, key=lambda p: int(p.name[len("episode") :]))


@dataclass
class RLBenchEpisode:
    """One demonstration. Arrays have one row per step."""

    path: pathlib.Path
    instructions: list[str]
    variation: int
    gripper_pose: np.ndarray  # float32 [L, 7]  x, y, z, qx, qy, qz, qw (canonical quaternion)
    gripper_open: np.ndarray  # float32 [L]     1 open, 0 closed
    joint_positions: np.ndarray  # float32 [L, J]
    joint_velocities: np.ndarray  # float32 [L, J]
    ignore_collisions: np.ndarray | None = None  # float32 [L] 1 = collisions allowed; None: not recorded
    misc: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.gripper_open)

    def frame_path(self, camera: str, step: int, kind: str = "rgb") -> pathlib.Path:
        return self.path / f"{camera}_{kind}" / f"{step}.png"

    def rgb(self, camera: str, step: int) -> np.ndarray:
        """uint8 [H, W, 3]."""
        return _read_png(self.frame_path(camera, step), "RGB")

    def rgb_frames(self, camera: str) -> np.ndarray:
        """uint8 [L, H, W, 3]."""
        return np.stack([self.rgb(camera, t) for t in range(len(self))])

    def depth(self, camera: str, step: int) -> np.ndarray:
        """float32 [H, W] metres: 24-bit value packed in RGB, scaled between the camera's near/far."""
        packed = _read_png(self.frame_path(camera, step, "depth"), "RGB").astype(np.float64)
        v = (packed[..., 0] * 65536 + packed[..., 1] * 256 + packed[..., 2]) / (2**24 - 1)
        misc = self.misc[step]
        near, far = misc[f"{camera}_camera_near"], misc[f"{camera}_camera_far"]
        return (near + v * (far - near)).astype(np.float32)

    def keyframes(self) -> list[int]:
        return keyframe_indices(self.gripper_open, self.joint_velocities)

    def actions(self) -> np.ndarray:
        """float32 [L, 8]: the end-effector pose and gripper state at each step."""
        return np.concatenate([self.gripper_pose, self.gripper_open[:, None]], axis=1).astype(np.float32)


def load_rlbench_episode(episode_dir: str | pathlib.Path) -> RLBenchEpisode:
    """Read one episode folder's pickles (images stay on disk until asked for)."""
    episode_dir = pathlib.Path(episode_dir)
    demo = load_rlbench_pickle(episode_dir / "low_dim_obs.pkl")
    observations = getattr(demo, "_observations", None)
    if not observations:
        raise CorruptEpisodeError(f"{episode_dir / 'low_dim_obs.pkl'} holds no observations")
    descriptions_file = episode_dir / "variation_descriptions.pkl"
    descriptions = load_rlbench_pickle(descriptions_file)
    if isinstance(descriptions, str):
        descriptions = [descriptions]
    if not isinstance(descriptions, list | tuple):
        raise CorruptEpisodeError(f"{descriptions_file} holds a {type(descriptions).__name__}, not a list of instructions")
    variation_file = episode_dir / "variation_number.pkl"
    variation = load_rlbench_pickle(variation_file) if variation_file.exists() else 0
    if not isinstance(variation, int | np.integer):
        raise CorruptEpisodeError(f"{variation_file} holds a {type(variation).__name__}, not the variation number")
    try:
        pose = np.stack([np.asarray(o.gripper_pose, dtype=np.float32) for o in observations])
        gripper_open = np.array([float(o.gripper_open) for o in observations], dtype=np.float32)
        joints = np.stack([np.asarray(getattr(o, "joint_positions", ()), dtype=np.float32) for o in observations])
        velocities = np.stack([np.asarray(getattr(o, "joint_velocities", ()), dtype=np.float32) for o in observations])
        flags = [getattr(o, "ignore_collisions", None) for o in observations]
        ignore_collisions = None if any(f is None for f in flags) else np.array(
            [np.asarray(f, dtype=np.float32).item() for f in flags], dtype=np.float32
        )
    except (AttributeError, TypeError, ValueError) as e:
        raise CorruptEpisodeError(f"{episode_dir / 'low_dim_obs.pkl'}: bad observation fields ({e})") from e
    for name, values in (("gripper_pose", pose), ("gripper_open", gripper_open), ("joint_velocities", velocities)):
        step = first_non_finite(values)
        if step is not None:
            raise CorruptEpisodeError(
                f"{episode_dir / 'low_dim_obs.pkl'}: observation {step} has a non-finite {name} ({values[step].tolist()})"
            )
    pose[:, 3:] = canonical_quaternion(pose[:, 3:])
    return RLBenchEpisode(
        path=episode_dir,
        instructions=[str(d) for d in descriptions],
        variation=int(variation),
        gripper_pose=pose,
        gripper_open=gripper_open,
        joint_positions=joints,
        joint_velocities=velocities,
        ignore_collisions=ignore_collisions,
        misc=[dict(getattr(o, "misc", None) or {}) for o in observations],
    )


def keyframe_indices(gripper_open: np.ndarray, joint_velocities: np.ndarray, stopping_delta: float = 0.1) -> list[int]:
    """PerAct's keyframe heuristic: step i > 0 is a keyframe when the gripper changes state, at the
    last step, or when the arm has stopped (velocities near zero, gripper steady, at most once per
    4 steps, not the second-to-last step); of two adjacent final keyframes the first is dropped.
    Negative indices wrap as in PerAct's reference code."""
    n = len(gripper_open)
    keyframes, stopped_buffer, prev_open = [], 0, gripper_open[0]
    for i in range(n):
        steady = i < n - 2 and gripper_open[i] == gripper_open[i + 1] == gripper_open[i - 1] and gripper_open[i - 2] == gripper_open[i - 1]
        stopped = stopped_buffer <= 0 and bool(np.allclose(joint_velocities[i], 0, atol=stopping_delta)) and i != n - 2 and steady
        stopped_buffer = 4 if stopped else stopped_buffer - 1
        if i != 0 and (gripper_open[i] != prev_open or i == n - 1 or stopped):
            keyframes.append(i)
        prev_open = gripper_open[i]
    if len(keyframes) > 1 and keyframes[-1] - 1 == keyframes[-2]:
        keyframes.pop(-2)
    return keyframes


class RLBenchDataset(Dataset):
    """Samples from the PerAct-format episodes of `tasks` under `root` (one split's folder)."""

    def __init__(
        self,
        root: str | pathlib.Path,
        tasks: list[str],
        cameras: list[str],
        horizon: int,
        keyframes: bool = False,
        image_size: int | None = None,
        cache_dir: str | pathlib.Path | None = None,
        skip_corrupt: bool = False,
        random_instruction: bool = True,
        max_episodes_per_task: int | None = None,
        action_spec: ActionSpec = RLBENCH_ACTION_SPEC,
        ignore_collisions: bool = False,
        n_obs_steps: int = 1,
    ) -> None:
        """`action_spec`: `RLBENCH_ACTION_SPEC` (the flag is a target) or `POSE_ACTION_SPEC` (it is
        not); `ignore_collisions`: the target of episodes whose demonstration lacks the flag;
        `n_obs_steps`: observations per item (> 1 needs dense targets, `keyframes=False`)."""
        self.n_obs_steps = check_n_obs_steps(n_obs_steps)
        if keyframes and self.n_obs_steps > 1:
            raise ValueError(
                f"data.n_obs_steps={n_obs_steps} with data.keyframes=true: a keyframe policy observes only on arriving "
                "at each keyframe, so the dense steps before t are not what it sees at inference; use "
                "data.keyframes=false for an observation history, or data.n_obs_steps=1"
            )
        self.root = pathlib.Path(root).expanduser()
        self.tasks = list(tasks)
        check_rlbench_tasks(self.tasks)
        if not self.tasks:
            raise ValueError("RLBenchDataset: the task list is empty")
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown or not cameras:
            raise ValueError(f"unknown RLBench camera(s) {unknown or cameras}; valid: {list(CAMERAS)}")
        if action_spec not in (RLBENCH_ACTION_SPEC, POSE_ACTION_SPEC):
            raise ValueError(
                f"RLBench demos give the action spec {RLBENCH_ACTION_SPEC.to_config()} or the same without "
                f"ignore_collisions; data.action_spec is {action_spec.to_config()}"
            )
        self.learns_ignore_collisions = action_spec == RLBENCH_ACTION_SPEC
        self.ignore_collisions = float(ignore_collisions)
        self.cameras = list(cameras)
        self.horizon = int(horizon)
        self.keyframes = keyframes
        self.image_size = image_size
        self.cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir else None
        self.random_instruction = random_instruction
        self.episodes: list[RLBenchEpisode] = []
        self.episode_tasks: list[str] = []
        self.skipped: list[str] = []
        for task in self.tasks:
            for ep_dir in episode_dirs(self.root, task)[:max_episodes_per_task]:
                try:
                    episode = load_rlbench_episode(ep_dir)
                    self._check_frames(episode)
                except CorruptEpisodeError as e:
                    if not skip_corrupt:
                        raise CorruptEpisodeError(f"{e} (set data.skip_corrupt=true to skip such episodes)") from e
                    self.skipped.append(str(e))
                    continue
                self.episodes.append(episode)
                self.episode_tasks.append(task)
        if self.skipped:
            log.warning("RLBenchDataset skipped %d corrupt episode(s); first: %s", len(self.skipped), self.skipped[0])
        unrecorded = sum(ep.ignore_collisions is None for ep in self.episodes)
        if self.learns_ignore_collisions and unrecorded:
            log.warning(
                "%d of %d RLBench episodes do not record ignore_collisions (only PerAct's fork of RLBench does); "
                "their target is data.ignore_collisions=%s. Drop the ignore_collisions component from "
                "data.action_spec to act with that constant instead of learning it",
                unrecorded, len(self.episodes), bool(self.ignore_collisions),
            )
        self._index = np.array(
            [(e, t) for e, ep in enumerate(self.episodes) for t in self._sample_steps(ep)], dtype=np.int64
        ).reshape(-1, 2)
        if len(self._index) == 0:
            raise ValueError(f"RLBenchDataset at {self.root} has no samples for tasks {self.tasks}")
        self._targets = [self._episode_targets(ep) for ep in self.episodes]
        self._frames: dict[int, np.ndarray] = {}  # decoded-frame memmaps, opened per process

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_frames": {}}

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        e, t = (int(v) for v in self._index[i])
        episode = self.episodes[e]
        rows, first = self._targets[e]
        chunk, mask = action_window(rows, first[t], self.horizon)
        instructions = self._instructions(e)
        pick = int(sample_rng(i).integers(len(instructions))) if self.random_instruction else 0
        frames = history_rows(t, 0, self.n_obs_steps)
        return {
            "images": torch.from_numpy(stack_history([self._images(e, int(s)) for s in frames])),
            "proprio": torch.from_numpy(stack_history([episode.actions()[s] for s in frames])),
            "instruction": instructions[pick],
            "actions": torch.from_numpy(chunk),
            "action_mask": torch.from_numpy(mask),
            "task": self.episode_tasks[e],
        }

    def all_instructions(self) -> list[str]:
        """Every phrasing an item can carry, sorted (the vocabulary of learned task embeddings)."""
        return sorted({text for e in range(len(self.episodes)) for text in self._instructions(e)})

    def _instructions(self, e: int) -> list[str]:
        return self.episodes[e].instructions or [self.episode_tasks[e].replace("_", " ")]

    def all_actions(self) -> np.ndarray:
        """Every target row the dataset can return, float32 [N, A] (for normalization statistics)."""
        return np.concatenate([rows for rows, _ in self._targets])

    def all_proprio(self) -> np.ndarray:
        return np.concatenate([ep.actions() for ep in self.episodes])

    def episode_ids(self) -> np.ndarray:
        """The episode of every sample, int64 [N] (neighbour positives can leave it out)."""
        return self._index[:, 0].copy()

    def _sample_steps(self, episode: RLBenchEpisode) -> range:
        last = episode.keyframes()[-1] if self.keyframes else len(episode) - 1
        return range(0, last)

    def _episode_targets(self, episode: RLBenchEpisode) -> tuple[np.ndarray, np.ndarray]:
        """(rows [K, A], first [L]): step t's chunk is rows[first[t] : first[t] + T]."""
        poses = self._action_rows(episode)
        steps = np.arange(len(episode))
        if not self.keyframes:
            return poses[1:], steps.copy()
        keys = np.array(episode.keyframes())
        return poses[keys], np.searchsorted(keys, steps, side="right")

    def _action_rows(self, episode: RLBenchEpisode) -> np.ndarray:
        """float32 [L, A]: row j is the action that reaches step j; its flag is step j-1's."""
        poses = episode.actions()
        if not self.learns_ignore_collisions:
            return poses
        flags = episode.ignore_collisions
        if flags is None:
            flags = np.full(len(episode), self.ignore_collisions, dtype=np.float32)
        reaching = np.concatenate([flags[:1], flags[:-1]])  # row 0 reaches nothing: never a target
        return np.concatenate([poses, reaching[:, None]], axis=1)

    def _check_frames(self, episode: RLBenchEpisode) -> None:
        for cam in self.cameras:
            folder = episode.path / f"{cam}_rgb"
            if not folder.is_dir():
                present = sorted(p.name[: -len("_rgb")] for p in episode.path.glob("*_rgb"))
                raise CorruptEpisodeError(f"camera {cam!r} missing: no folder {folder} (cameras present: {present})")
            last = episode.frame_path(cam, len(episode) - 1)
            if not last.is_file():
                raise CorruptEpisodeError(f"missing image {last} ({len(episode)} steps in low_dim_obs.pkl)")

    def _images(self, e: int, t: int) -> np.ndarray:
        """uint8 [V, 3, H, W] for step t of episode e."""
        if self.cache_dir is None:
            return np.stack([self._decode(self.episodes[e], cam, t) for cam in self.cameras])
        if e not in self._frames:
            self._frames[e] = self._cached(e)
        return np.array(self._frames[e][t])

    def _decode(self, episode: RLBenchEpisode, camera: str, t: int) -> np.ndarray:
        frame = episode.rgb(camera, t)
        if self.image_size:
            frame = resize_image(frame, self.image_size)
        return frame.transpose(2, 0, 1)

    def _cached(self, e: int) -> np.ndarray:
        """All frames of episode e, uint8 [L, V, 3, H, W], decoded once into `cache_dir`.

        The file's name holds a digest of what it was decoded from (`frames_digest`): the source
        folder and its files, the cameras, the size. Another `data.root`, or an episode whose
        files changed, maps to another file, never to frames decoded from different images. On
        open the file's sha256 and shape are checked; a file that does not match is decoded again."""
        episode = self.episodes[e]
        digest = frames_digest(episode, self.cameras, self.image_size)
        path = self.cache_dir / self.episode_tasks[e] / f"{episode.path.name}_{'-'.join(self.cameras)}_{self.image_size or 'orig'}_{digest}.npy"
        size = (self.image_size,) * 2 if self.image_size else ()
        expected = (len(episode), len(self.cameras), 3, *size)
        frames = _open_cache(path, expected) if path.is_file() else None
        if frames is None:
            frames = np.stack([[self._decode(episode, cam, t) for cam in self.cameras] for t in range(len(episode))])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, frames)
            # The hash first: a reader between the two renames finds the old file, which fails it
            # and is decoded again. Workers racing on one episode decode the same bytes.
            write_atomic(_digest_file(path), file_sha256(tmp))
            tmp.replace(path)  # atomic: workers racing on one episode all end with a whole file
            frames = np.load(path, mmap_mode="r")
        return frames


def _digest_file(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _open_cache(path: pathlib.Path, expected: tuple[int, ...]) -> np.ndarray | None:
    """The decoded frames at `path`, or None (with a warning) when the file is damaged or from
    another layout: a cache is rebuilt from the episode, never trusted over it."""
    if not _digest_file(path).is_file():
        log.warning("decoded-frame cache %s has no %s beside it (an earlier version wrote it); decoding the episode again",
                    path, _digest_file(path).name)
        return None
    try:
        if not holds_sha256(path, _digest_file(path).read_text().strip()):
            log.warning("decoded-frame cache %s does not hold what was written (its sha256 differs from %s); "
                        "decoding the episode again", path, _digest_file(path).name)
            return None
        frames = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:
        log.warning("decoded-frame cache %s is unreadable (%s: %s); decoding the episode again", path, type(error).__name__, error)
        return None
    if frames.dtype != np.uint8 or frames.shape[: len(expected)] != expected:
        log.warning("decoded-frame cache %s holds %s %s, not uint8 %s...; decoding the episode again",
                    path, frames.dtype, frames.shape, expected)
        return None
    return frames



def frames_digest(episode: RLBenchEpisode, cameras: list[str], image_size: int | None) -> str:
    """What an episode's decoded frames are made from: its resolved folder, the name, size and
    modification time of low_dim_obs.pkl and of every frame of `cameras`, and the size decoded to
    (16 hex digits of a sha256). A stat per file, no read: cheap next to decoding them."""
    folder = episode.path.resolve()
    files = [folder / "low_dim_obs.pkl", *(p for cam in cameras for p in sorted((folder / f"{cam}_rgb").iterdir()))]
    stats = []
    for path in files:
        stat = path.stat()
        stats.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    source = {"folder": str(folder), "cameras": list(cameras), "image_size": image_size, "files": stats}
    return hashlib.sha256(json.dumps(source).encode()).hexdigest()[:16]


def _read_png(path: pathlib.Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode))
    except FileNotFoundError:
        raise CorruptEpisodeError(f"missing image {path}; {FRAME_REMEDY}") from None
    except Exception as e:
        raise CorruptEpisodeError(f"cannot decode image {path}: {type(e).__name__}: {e}; {FRAME_REMEDY}") from e


FRAME_REMEDY = (
    "download its task again (scripts/download_rlbench_data.py), or set data.skip_corrupt=true to train "
    "without the samples that need it"
)
