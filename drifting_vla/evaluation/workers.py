"""Simulator worker processes: one env each, built from plain strings in a spawned process, stepped
over a pipe; a crash or a hang ends that episode, not the evaluation (the protocol is drawn in
rollout.py)."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from drifting_vla.envs import env_class

VIDEO_FPS = 30
EPISODE_LABELS = ("mode", "stage", "stage_names")
"""Keys of an env step's `info` that describe the episode so far and go into its record: the way
it took (the wall tasks, the two-route ALOHA variant) and the furthest stage of a staged reward (ALOHA)."""


class WorkerError(RuntimeError):
    """A worker died, hung or could not be reached; the episode it ran is a failure."""


class _Recording:
    """One episode's camera frames and end-effector positions, kept by its worker until the next reset."""

    def __init__(self, video: str, end_effector: slice | None) -> None:
        self.video, self.end_effector = video, end_effector
        self.frames: list[np.ndarray] = []
        self.positions: list[np.ndarray] = []

    def add(self, env, obs: dict) -> None:
        self.frames.append(env.render())
        if self.end_effector is not None:
            self.positions.append(np.asarray(obs["proprio"], dtype=np.float64)[self.end_effector])

    def write_trajectory_video(self, path: str, record: dict, replan_steps: list[int]) -> str | None:
        """The trajectory video at `path`; None when the env's proprio has no end-effector position."""
        if self.end_effector is None:
            return None
        # imported here: matplotlib loads only in workers that draw a video
        from drifting_vla.logging.trajectory_video import write_trajectory_video

        write_trajectory_video(path, self.frames, np.stack(self.positions), replan_steps, record, labels=("mode",))
        return path


def _worker_main(conn, import_path: str, data_cfg: dict) -> None:
    """Serve reset/step/trajectory requests for one env at a time until told to close."""
    env, task, recording = None, None, None
    while True:
        message = conn.recv()
        if message[0] == "close":
            break
        try:
            if message[0] == "reset":
                _, next_task, seed, video = message
                recording = None
                if next_task != task:
                    if env is not None:
                        env.close()
                    env, task = None, None  # a failed build must not leave the old env in use
                    env, task = env_class(import_path).from_config(data_cfg, next_task), next_task
                obs = env.reset(int(seed))
                if video:
                    recording = _Recording(video, env.end_effector)
                    recording.add(env, obs)
                conn.send(("obs", obs, False, False, None, {}))
            elif message[0] == "step":
                result = env.step(message[1])
                if recording is not None:
                    recording.add(env, result.observation)
                    if result.done:
                        write_video(recording.video, recording.frames)
                labels = {key: result.info[key] for key in EPISODE_LABELS if key in result.info}
                conn.send(("obs", result.observation, result.done, result.success, result.info.get("error"), labels))
            else:
                _, path, record, replan_steps = message
                if recording is None:
                    raise RuntimeError("this worker holds no recorded episode (it was restarted or never recorded one)")
                conn.send(("written", recording.write_trajectory_video(path, record, replan_steps)))
        except Exception as error:  # the simulator's failure ends the episode, not the worker loop
            last = traceback.extract_tb(error.__traceback__)[-1]
            conn.send(("error", f"{type(error).__name__}: {error} ({last.filename}:{last.lineno})"))
    if env is not None:
        env.close()


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = VIDEO_FPS) -> None:
    """Frames uint8 [H, W, 3] -> an H.264 MP4 (imageio-ffmpeg)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=2)


class Worker:
    """One simulator process and its pipe; `restart` replaces a dead or broken one."""

    def __init__(self, context, import_path: str, data_cfg: dict, timeout_s: float) -> None:
        self._context, self._args, self.timeout_s = context, (import_path, data_cfg), timeout_s
        self._start()

    def _start(self) -> None:
        self.conn, child = self._context.Pipe()
        self.process = self._context.Process(target=_worker_main, args=(child, *self._args), daemon=True)
        self.process.start()
        child.close()

    def send(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError) as error:
            raise WorkerError(f"worker pid {self.process.pid} is gone ({type(error).__name__})") from error

    def recv(self) -> tuple:
        try:
            if not self.conn.poll(self.timeout_s):
                raise WorkerError(f"worker pid {self.process.pid} sent nothing for {self.timeout_s:.0f} s")
            return self.conn.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError) as error:
            self.process.join(timeout=1)
            raise WorkerError(
                f"worker pid {self.process.pid} died (exit code {self.process.exitcode})"
            ) from error

    def restart(self) -> None:
        self.stop(graceful=False)
        self._start()

    def stop(self, graceful: bool = True) -> None:
        if graceful and self.process.is_alive():
            try:
                self.conn.send(("close",))
            except (BrokenPipeError, ConnectionResetError, EOFError):
                pass
            self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


@dataclass
class EpisodeSlot:
    """What one worker is doing: its episode, the latest observation, the step count."""

    worker: Worker
    task: str = ""
    seed: int = 0
    video: str | None = None
    obs: dict | None = None
    steps: int = 0
    started: float = 0.0
    labels: dict = field(default_factory=dict)  # the env's latest EPISODE_LABELS
    replans: list[int] = field(default_factory=list)  # control steps at which the policy drew a new chunk

def send_step(slot: EpisodeSlot, action: np.ndarray) -> None:
    """Send the action; a dead worker is noticed at the following `recv`."""
    try:
        slot.worker.send(("step", np.asarray(action, dtype=np.float32)))
    except WorkerError:
        pass
