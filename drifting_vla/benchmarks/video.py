"""The trajectory video (`eval/trajectory_video`) against the simulation of the episode it shows.

An evaluation worker steps its env, renders the video frame, and at the end of the episode draws
and encodes the trajectory video, all in sequence; so the figure that matters is the video's
share of the episode's simulation time. One scripted-expert Meta-World episode per task, at the
data config's default settings (two 64x64 observation cameras, 256x256 video frames):

    simulation        env.step (physics + observation renders) + the video frame, per step
    trajectory frame  the episode's plots drawn once, the path added frame by frame, composed
    ... + H.264       the same, encoded to mp4 (what the worker writes), per frame

Times are CPU seconds (this process's threads, MuJoCo's renderer included, plus the ffmpeg child
that encodes), not wall time: on a shared 2-core machine wall time mostly measures the other jobs.
New-chunk marks every 8 steps, as the quickstart's chunk queue (8 of 16) draws them.
"""

from __future__ import annotations

import pathlib
import resource
import statistics
import tempfile
import time

import numpy as np
from omegaconf import OmegaConf

from drifting_vla.benchmarks.timing import Row
from drifting_vla.configs import CONFIG_DIR
from drifting_vla.envs.metaworld_env import MetaWorldEnv
from drifting_vla.logging.trajectory_video import trajectory_frames, write_trajectory_video

CONFIG = CONFIG_DIR / "data" / "metaworld.yaml"
TASKS = ("drawer-open-v3", "window-open-v3")
SEED = 100000
CHUNK_STEPS = 8


def run(args) -> list[Row]:
    data = OmegaConf.load(CONFIG)
    return [row for task in TASKS for row in _rows_for(task, data)]


def _rows_for(task: str, data) -> list[Row]:
    env = MetaWorldEnv.from_config(data, task)
    try:
        frames, positions, simulation, success = _expert_episode(env)
    finally:
        env.close()
    steps = len(frames) - 1
    record = {"task": task, "seed": SEED, "success": success, "steps": steps}
    replans = list(range(0, steps, CHUNK_STEPS))
    drawn = _median_cpu_seconds(lambda: sum(1 for _ in trajectory_frames(frames, positions, replans, record)))
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "trajectory.mp4"
        written = _median_cpu_seconds(lambda: write_trajectory_video(path, frames, positions, replans, record))
    base = f"{task} ({steps} steps): simulation per step"
    return [
        Row("video", base, simulation / steps, extra={"episode_cpu_s": round(simulation, 2)}),
        Row("video", f"{task}: trajectory frame (plots + compose)", drawn / len(frames), baseline=base,
            extra={"share_of_simulation": f"{100 * drawn / simulation:.0f}%"}),
        Row("video", f"{task}: trajectory frame + H.264", written / len(frames), baseline=base,
            extra={"episode_cpu_s": round(written, 2), "share_of_simulation": f"{100 * written / simulation:.0f}%"}),
    ]


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (ffmpeg)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _median_cpu_seconds(fn, repeats: int = 3) -> float:
    """Median CPU time of `repeats` calls of a whole-episode function (the first call also loads fonts)."""
    samples = []
    for _ in range(repeats):
        started = _cpu_seconds()
        fn()
        samples.append(_cpu_seconds() - started)
    return statistics.median(samples)


def _expert_episode(env: MetaWorldEnv) -> tuple[list[np.ndarray], np.ndarray, float, bool]:
    """(video frames, end-effector positions [L, 3], CPU seconds spent simulating, success)."""
    obs = env.reset(SEED)
    frames, positions = [env.render()], [obs["proprio"][env.end_effector]]
    simulation, success = 0.0, False
    for _ in range(env.max_episode_steps):
        action = env.expert_action()
        started = _cpu_seconds()
        result = env.step(action)
        frames.append(env.render())
        simulation += _cpu_seconds() - started
        positions.append(result.observation["proprio"][env.end_effector])
        if result.done:
            success = result.success
            break
    return frames, np.stack(positions), simulation, success
