"""Small array transforms shared by the dataset classes (numpy in, numpy out)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def action_window(actions: np.ndarray, start: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """The `horizon` rows of `actions` [L, A] from `start`, padded past the end with the last row.

    Returns (chunk float32 [T, A], mask bool [T]); mask is False on padded rows.

        episode rows:  a0 a1 a2 a3 a4            (L = 5), start = 3, horizon = 4
        chunk:         a3 a4 a4 a4
        mask:          1  1  0  0
    """
    end = min(start + horizon, len(actions))
    chunk = np.empty((horizon, actions.shape[1]), dtype=np.float32)
    chunk[: end - start] = actions[start:end]
    chunk[end - start :] = actions[end - 1]
    mask = np.zeros(horizon, dtype=bool)
    mask[: end - start] = True
    return chunk, mask


def check_n_obs_steps(n: int) -> int:
    """`data.n_obs_steps` as an int, refused below 1 with the key named."""
    if int(n) < 1:
        raise ValueError(f"data.n_obs_steps must be >= 1 (1: the current observation alone), got {n}")
    return int(n)


def history_rows(row: int, start: int, n: int) -> np.ndarray:
    """The rows of the last `n` observations up to `row`, oldest first, in an episode whose first
    row is `start`; steps before the episode's start repeat its first row (as a policy's history
    does right after `reset()`).

        episode rows 10 11 12 13 ..., n = 3:   row 10 -> 10 10 10,  row 11 -> 10 10 11,  row 13 -> 11 12 13
    """
    return np.maximum(np.arange(row - n + 1, row + 1), start)


def stack_history(frames: list[np.ndarray]) -> np.ndarray:
    """One observation's per-step arrays, oldest first -> [n, ...]; a single step stays as it is,
    so the layout without history (n = 1) is the one it always was (specs.py)."""
    return frames[0] if len(frames) == 1 else np.stack(frames)


def split_episodes(count: int, split: str, holdout_every: int) -> list[int]:
    """The episodes (0 .. count-1) of a split: "val" is every `holdout_every`-th episode, "train" the
    others, "all" every one. Whole episodes, not steps: steps of one episode are near-duplicates.

        holdout_every = 3:   episode  0 1 2 3 4 5 6
                             split    t t v t t v t
    """
    if split not in ("all", "train", "val") or (split != "all" and holdout_every < 2):
        raise ValueError(f"split must be all, or train/val with holdout_every >= 2; got {split!r}, holdout_every={holdout_every}")
    return [k for k in range(count) if split == "all" or (k % holdout_every == holdout_every - 1) == (split == "val")]


def first_non_finite(values: np.ndarray) -> int | None:
    """The first row of `values` [N, ...] holding a NaN or an infinity, or None.

    Datasets check what they read with it and name the episode and field: one NaN in the data
    becomes the normalization statistics' mean, min and max, and then every step's loss, which
    reads like a learning-rate problem far from its cause."""
    values = np.asarray(values)
    if len(values) == 0:
        return None
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def canonical_quaternion(quat: np.ndarray) -> np.ndarray:
    """Unit length and qw >= 0 for `[..., 4]` quaternions `[qx, qy, qz, qw]` (q and -q are the
    same rotation; one sign makes the target unique)."""
    quat = np.asarray(quat, dtype=np.float64)
    quat = quat / np.maximum(np.linalg.norm(quat, axis=-1, keepdims=True), 1e-12)
    quat = np.where(quat[..., 3:4] < 0, -quat, quat)
    return quat.astype(np.float32)


def resize_image(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3] (PIL bilinear): how frames of another size are
    brought to `data.image_size`, by the datasets and by the policy server alike."""
    if frame.shape[:2] == (size, size):
        return frame
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR))
