"""The last n observations of each env, as a policy trained with `data.n_obs_steps` = n sees them.

A dataset gives the sample of step t the observations t-n+1 .. t, oldest first, repeating the
episode's first observation before its start (`data.transforms.history_rows`). In closed loop the
same window is rebuilt online, one `push` per control step:

    control step       0         1         2         3
    observed           o0        o1        o2        o3
    window (n = 2)     o0 o0     o0 o1     o1 o2     o2 o3       reset() at each episode's start

Every control step is pushed, also those where a queued action is executed without calling the
network: the window is one of control steps, not of network calls. It lives with whoever sees every
control step: `DriftingPolicy.select_action` in process, and on the robot side of the policy server
`AsyncChunkExecutor` / `ChunkedPolicy`, which send the window with each request (the server sees a
robot only when it asks for a chunk, so it could not keep it).

Numpy only: the robot-side client imports it without torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np


class ObservationHistory:
    """Per env, the last `n_obs_steps` observations (maps holding at least images and proprio)."""

    def __init__(self, n_obs_steps: int) -> None:
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        self.n_obs_steps = int(n_obs_steps)
        self._windows: dict[int, deque] = {}

    def reset(self, env: int | None = None) -> None:
        """Forget the observations of every env, or of env `env` only (a new episode there)."""
        if env is None:
            self._windows.clear()
        else:
            self._windows.pop(env, None)

    def saved(self) -> dict[int, list]:
        """Every env's window as it stands, for `restore`."""
        return {env: list(window) for env, window in self._windows.items()}

    def restore(self, saved: dict[int, list]) -> None:
        """The windows as `saved` took them: a control step the policy refused to act on is
        not one the envs took, so it leaves no observation behind."""
        self._windows = {env: deque(window, maxlen=self.n_obs_steps) for env, window in saved.items()}

    def push(self, env: int, obs: Mapping) -> list[Mapping]:
        """Record env's observation of this control step (its arrays copied: a robot may reuse its
        buffers); returns the env's window, oldest first, `n_obs_steps` long."""
        obs = {key: _copy(value) for key, value in obs.items()}
        window = self._windows.get(env)
        if window is None:  # the episode's first observation stands in for the steps before it
            window = self._windows[env] = deque([obs] * self.n_obs_steps, maxlen=self.n_obs_steps)
        else:
            window.append(obs)
        return list(window)

    def push_batch(self, obs: Mapping, env_ids: Sequence[int]) -> dict:
        """A collated batch of this control step (images [B, V, 3, H, W], proprio [B, S],
        instruction list) -> the policy's input, row b from env `env_ids[b]`: with n = 1 the batch
        itself; else images [B, n, V, 3, H, W] and proprio [B, n, S], oldest step first."""
        if self.n_obs_steps == 1:
            return obs
        windows = [
            self.push(env, {"images": obs["images"][b], "proprio": obs["proprio"][b]}) for b, env in enumerate(env_ids)
        ]
        return {
            "images": np.stack([stacked(window, "images") for window in windows]),
            "proprio": np.stack([stacked(window, "proprio") for window in windows]).astype(np.float32),
            "instruction": list(obs["instruction"]),
        }


def stacked(window: list[Mapping], key: str) -> np.ndarray:
    """The window's `key` arrays stacked along a new first dim [n, ...]."""
    return np.stack([np.asarray(step[key]) for step in window])


def _copy(value):
    if isinstance(value, Mapping):
        return {key: _copy(v) for key, v in value.items()}
    if isinstance(value, str):
        return value
    return np.array(value)
