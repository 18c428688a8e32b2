"""Executing action chunks on the robot side: keep acting while the next chunk is computed.

The clock is the control step: one `act` call per control tick. A chunk predicted from the
observation of step s holds the actions of steps s, s+1, ..., s+T-1. The next chunk is requested
when `refill_at` actions remain; what happened to control time while it was computed decides
which of its actions are still due (latency compensation):

    control step        0  1  2  3  4  5  6  7  8  9 10 11
    chunk A (obs @ 0)   a0 a1 a2 a3 a4 a5 a6 a7                 T = 8, refill_at = 4
    request B at step 4 with obs @ 4            ^ 4 actions of A remain
    B arrives during step 6: its first 2 actions were due at steps 4 and 5, so they are dropped
    chunk B (obs @ 4)               b0 b1 b2 b3 b4 b5 b6 b7
    executed            a0 a1 a2 a3 a4 a5 b2 b3 b4 b5 b6 b7 ...
                                          ^ switch to B at the first step after it arrives

- `ChunkQueue`: that bookkeeping alone, no threads, no network (tested step by step).
- `AsyncChunkExecutor`: a robot loop's executor; requests run in a background thread, so `act`
  returns at once unless no action at all is left (the first chunk, or inference slower than
  `refill_at` control steps): then it waits, and counts the step as starved.
- `ChunkedPolicy`: the same queue driven synchronously for many simulated envs (the simulator
  waits for inference, so no action goes stale): what `scripts/simulate_eval.py remote=...` runs.
  With `refill_at = T - k` it executes k actions per chunk, like `DriftingPolicy`'s chunk queue.

Both see every control step, so for a policy with an observation history (`n_obs_steps`, the
server's `metadata["n_obs_steps"]`) they keep the window of the last n observations
(inference/history.py) and send it with each request, as a list of n steps' images and proprio
[n, S]: the server answers requests from any number of robots statelessly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

# Relative: shared with the robot-side package drifting_vla_client (clients/python), same layout.
from ..inference.history import ObservationHistory, stacked
from ..safety import (
    NonFiniteActions,
    PolicyRefusal,
    ProprioOutOfRange,
    check_finite_chunk,
)
from ..specs import default_execute_steps
from .client import ServerBusy

# predict(one observation, seed or None) -> chunk [T, A]: PolicyClient.predict, or a local policy.
Predict = Callable[[Mapping, "int | None"], np.ndarray]
BUSY_RETRY_S = 0.005  # a starved executor asks a busy server again after this pause


class ChunkQueue:
    """The current chunk and the control step it started at; pops the action due now."""

    def __init__(self, refill_at: int) -> None:
        if refill_at < 0:
            raise ValueError(f"refill_at must be >= 0, got {refill_at}")
        self.refill_at = refill_at
        self.step = 0  # control steps taken so far
        self._chunk: np.ndarray | None = None
        self._start = 0  # the control step of self._chunk[0]

    def remaining(self) -> int:
        """Actions of the current chunk still due (none when it is used up or absent)."""
        if self._chunk is None:
            return 0
        return max(0, self._start + len(self._chunk) - self.step)

    def needs_chunk(self) -> bool:
        return self.remaining() <= self.refill_at

    def install(self, chunk: np.ndarray, obs_step: int) -> int:
        """Replace the current chunk by `chunk` [T, A], predicted from the observation of control
        step `obs_step`; returns how many of its actions are already stale (dropped)."""
        if obs_step > self.step:
            raise ValueError(f"a chunk from step {obs_step} cannot be installed at step {self.step}")
        self._chunk, self._start = check_finite_chunk(chunk, "the chunk's predict"), obs_step
        return min(len(chunk), self.step - obs_step)

    def pop(self) -> np.ndarray:
        """The action of the current control step; advances the step."""
        if not self.remaining():
            raise RuntimeError(f"no action left for control step {self.step}; install a chunk first")
        action = self._chunk[self.step - self._start]
        self.step += 1
        return action


class AsyncChunkExecutor:
    """One robot, one `act(obs)` per control tick; the next chunk is computed in the background.

        client = PolicyClient(url)
        executor = AsyncChunkExecutor(client.predict, horizon=16, refill_at=6,
                                      n_obs_steps=client.metadata["n_obs_steps"])
        while running:                          # at the robot's control rate
            robot.apply(executor.act(robot.observation()))
    """

    def __init__(
        self, predict: Predict, horizon: int, refill_at: int | None = None, seed: int | None = None, n_obs_steps: int = 1
    ) -> None:
        refill_at = horizon // 2 if refill_at is None else refill_at
        if not 0 <= refill_at < horizon:
            raise ValueError(f"refill_at must be in [0, horizon={horizon}), got {refill_at}")
        self.predict, self.horizon, self.refill_at, self.seed = predict, horizon, refill_at, seed
        self.history = ObservationHistory(n_obs_steps)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-request")
        self.reset()

    def reset(self) -> None:
        """A new episode: forget the current chunk (an in-flight request is discarded) and the
        observation history."""
        self.history.reset()
        self.queue = ChunkQueue(self.refill_at)
        self._request: tuple[Future, int] | None = None
        self.chunks = 0  # chunks installed
        self.dropped = 0  # actions dropped because their time passed during inference
        self.starved_steps = 0  # control steps that had to wait for a chunk

    def act(self, obs: Mapping) -> np.ndarray:
        """The action for this control step, given its observation."""
        obs = request_observation(self.history, 0, obs)
        self._collect(block=False)
        if self._request is None and self.queue.needs_chunk():
            self._send(obs)
        if not self.queue.remaining():
            self.starved_steps += 1
            while not self.queue.remaining():
                if self._request is None:  # the last chunk came too late to cover this step
                    self._send(obs)
                self._collect(block=True)
        return self.queue.pop()

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    def _send(self, obs: Mapping) -> None:
        seed = None if self.seed is None else self.seed + self.chunks
        self._request = (self._thread.submit(self.predict, _snapshot(obs), seed), self.queue.step)

    def _collect(self, block: bool) -> None:
        """Install the in-flight chunk if it has arrived (or, with `block`, once it arrives)."""
        if self._request is None or not (block or self._request[0].done()):
            return
        future, obs_step = self._request
        self._request = None
        try:
            chunk = future.result()
        except ServerBusy:  # nothing was queued: the next act() (or the wait loop) asks again
            if block:
                time.sleep(BUSY_RETRY_S)
            return
        self.dropped += self.queue.install(chunk, obs_step)
        self.chunks += 1


def request_observation(history: ObservationHistory, env: int, obs: Mapping) -> Mapping:
    """Record env's observation of this control step; what a request for it carries: the
    observation itself, or with n > 1 steps the window's images (a list, oldest first), its proprio
    [n, S] and the current instruction."""
    if history.n_obs_steps == 1:
        return obs
    window = history.push(env, obs)
    return {"images": [step["images"] for step in window], "proprio": stacked(window, "proprio").astype(np.float32),
            "instruction": obs["instruction"]}


def _refusal_kind(refusal: PolicyRefusal) -> type[PolicyRefusal]:
    """The safety class of a refusal (a client's error class may be a subclass of it)."""
    return next(kind for kind in (ProprioOutOfRange, NonFiniteActions, PolicyRefusal) if isinstance(refusal, kind))


def _snapshot(obs: Mapping) -> dict:
    """A copy of the observation's arrays: the robot may refill its buffers while the request
    is still being encoded in the background."""
    copy = {}
    for key, value in obs.items():
        if isinstance(value, Mapping):
            value = _snapshot(value)
        elif isinstance(value, np.ndarray):
            value = value.copy()
        copy[key] = value
    return copy


class ChunkedPolicy:
    """`evaluate()`'s policy interface (reset / select_action) over any `predict`, one chunk
    queue per env, chunks requested synchronously: execute_steps actions per chunk.

    With `seed`, the noise of chunk c of the e-th episode on env slot i is seeded from
    (seed, i, e, c): two evaluations with the same seed, in-process or through a server, execute
    the same actions.
    """

    def __init__(
        self, predict: Predict, horizon: int, execute_steps: int | None = None, seed: int | None = None, n_obs_steps: int = 1
    ) -> None:
        execute_steps = default_execute_steps(horizon) if execute_steps is None else execute_steps
        if not 1 <= execute_steps <= horizon:
            raise ValueError(f"execute_steps must be in [1, horizon={horizon}], got {execute_steps}")
        self.predict, self.horizon, self.execute_steps, self.seed = predict, horizon, execute_steps, seed
        self.history = ObservationHistory(n_obs_steps)
        self._queues: dict[int, ChunkQueue] = {}
        self._episodes: dict[int, int] = {}  # episodes started per env slot
        self._chunks: dict[int, int] = {}  # chunks requested in the current episode, per env slot
        self.replanned: list[int] = []  # envs that got a new chunk in the latest select_action (videos mark them)

    def reset(self, env_index: int | None = None) -> None:
        for env in list(self._queues) if env_index is None else [env_index]:
            self._queues.pop(env, None)
            self._episodes[env] = self._episodes.get(env, 0) + 1
            self._chunks[env] = 0
        self.history.reset(env_index)

    def select_action(self, obs: Mapping, env_ids: Sequence[int] | None = None) -> np.ndarray:
        """obs: a batch (images [B, V, 3, H, W], proprio [B, S], instruction list) -> [B, A].
        A chunk refused for some rows (`PolicyRefusal`: proprio out of range, non-finite actions)
        raises one PolicyRefusal naming them all before any env takes the step, so the caller can
        end those episodes and ask again for the others."""
        env_ids = list(range(len(obs["instruction"]))) if env_ids is None else list(env_ids)
        before = self.history.saved()
        chunks, refusals = {}, []
        for b, env in enumerate(env_ids):
            row = {"images": np.asarray(obs["images"][b]), "proprio": np.asarray(obs["proprio"][b]),
                   "instruction": obs["instruction"][b]}
            row = request_observation(self.history, env, row)
            if self._queues.setdefault(env, ChunkQueue(self.horizon - self.execute_steps)).needs_chunk():
                try:
                    chunks[b] = check_finite_chunk(self.predict(row, self._next_seed(env)), "the chunk's predict", b)
                except PolicyRefusal as refusal:
                    refusals.append((b, refusal))
        if refusals:
            self.history.restore(before)
            message = "; ".join(f"row {b}: {refusal}" for b, refusal in refusals)
            raise _refusal_kind(refusals[0][1])(message, [b for b, _ in refusals])
        actions, self.replanned = [], []
        for b, env in enumerate(env_ids):
            queue = self._queues[env]
            if b in chunks:
                self.replanned.append(env)
                queue.install(chunks[b], queue.step)
            actions.append(queue.pop())
        return np.stack(actions).astype(np.float32)

    @property
    def execution_label(self) -> str:
        return f"chunk {self.execute_steps}/{self.horizon}"

    def describe(self) -> str:
        return f"chunk queue (execute {self.execute_steps} of {self.horizon}), seed {self.seed}"

    def _next_seed(self, env: int) -> int | None:
        chunk = self._chunks.get(env, 0)
        self._chunks[env] = chunk + 1
        if self.seed is None:
            return None
        key = (env, self._episodes.get(env, 0), chunk)
        return int(np.random.SeedSequence(self.seed, spawn_key=key).generate_state(1, np.uint64)[0] >> 1)
