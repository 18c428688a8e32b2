"""Closed-loop evaluation: seeded episodes in simulator worker processes, one batched policy.

    summary = evaluate(policy, cfg.data, tasks=["drawer-open-v3"], seeds=range(100000, 100050),
                       num_workers=2, output_dir="runs/x/eval")
    print(summary.format_table()); summary.to_dict()["success_rate"]

    main process                                  worker processes (spawn, ONE env each)
    ------------                                  ---------------------------------------
    episode queue: (task, seed) for every task x seed
    obs of all live envs --stack--> policy.select_action (one generator call for all envs that replan)
    action b  ------------------------------------------->  worker b: env.step(action), render frame
    obs b     <-------------------------------------------  observation, done, success (or an error)

The policy runs once per control step on the batch of all live envs, so the network cost is shared
and the simulators step in parallel. A worker builds its env from plain strings (the env import
path and the data config), so nothing unpicklable crosses the process boundary; it switches envs
when the next episode is of another task (one env alive per process: several MuJoCo GL contexts
in one process have corrupted frames). A simulator exception, an env's own `info["error"]` (RLBench: an unreachable
pose) or a dead or hung worker ends THAT episode as a failure with the error in its record; the worker is restarted and the evaluation goes on.
So does a policy's refusal (`PolicyRefusal`, drifting_vla/safety.py: proprio out of range, non-finite actions): no
non-finite action reaches a simulator; the refused envs' episodes end with the error in their record, the others go on.

Outputs under `output_dir` (an earlier evaluation's outputs there are deleted first, never mixed in):

    episodes.jsonl         one JSON object per finished episode: task, seed, success, steps, seconds, error,
                           video, trajectory_video; appended whole and flushed to disk as each episode
                           ends, so a killed evaluation leaves what it ran (`read_episodes` reads it)
    summary.json           `EvalSummary.to_dict()`: rates, intervals, errors per task, timings
    videos/<task>_seed<seed>.mp4              the first `videos_per_task` episodes of each task (H.264)
    videos/<task>_seed<seed>_trajectory.mp4   the same episodes: camera beside the end-effector path,
                                              chunk boundaries marked (`logging/trajectory_video.py`)

The frames of an episode with a video stay in its worker (they never cross the pipe). When the
episode ends, the main process, which alone knows the episode's record and the steps at which the
policy drew a new chunk, asks that worker for the trajectory video:

    main                                        worker
    step ------------------------------------>  env.step, render frame, record proprio[env.end_effector]
    obs, done  <------------------------------  (done: camera video written)
    ("trajectory", path, record, new-chunk steps) -->  draw and encode the trajectory video
    ("written", path)  <----------------------

Success rates come with a 95% Wilson score interval (sound for rates near 0 or 1 and few episodes).
A task whose every episode ended in an error has no success rate, and neither has an evaluation
that ran fewer episodes than it queued: `evaluate` raises `EvaluationError` (after writing both
files) rather than report 0.00. Unknown tasks, an unregistered simulator and fewer than one worker
are refused before any worker starts.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from drifting_vla.envs import NO_SIMULATOR, checked_env_import_path, env_class, simulation_config
from drifting_vla.formats.files import FileLock, JsonLinesAppender, read_jsonl, write_atomic
from drifting_vla.safety import PolicyRefusal

VIDEO_FPS = 30


# ----------------------------------------------------------------------------------------------
# Records and the summary


EPISODES_FILE = "episodes.jsonl"


def read_episodes(output_dir: str | os.PathLike) -> list[dict]:
    """The records of `<output_dir>/episodes.jsonl` (`EpisodeRecord.to_dict()`), of a finished
    evaluation or of one killed mid-write (its last line, cut short, is left out with a warning)."""
    return read_jsonl(Path(output_dir) / EPISODES_FILE, "Run the evaluation again to write it anew.")


@dataclass
class EpisodeRecord:
    task: str
    seed: int
    success: bool
    steps: int
    seconds: float
    error: str | None = None
    video: str | None = None
    mode: str | None = None  # the way the episode took, from envs that label it (the wall tasks)
    trajectory_video: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a success rate; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class EvalSummary:
    """Every episode's record plus timings; rates are computed from the records."""

    records: list[EpisodeRecord]
    seconds: float = 0.0
    policy_seconds: float = 0.0  # time inside policy.select_action
    policy_calls: int = 0  # batched select_action calls
    protocol: str = ""
    videos: list[str] = field(default_factory=list)
    trajectory_videos: list[str] = field(default_factory=list)

    @property
    def episodes(self) -> int:
        return len(self.records)

    @property
    def success_rate(self) -> float:
        return sum(r.success for r in self.records) / max(1, len(self.records))

    def per_task(self) -> dict[str, list[EpisodeRecord]]:
        tasks: dict[str, list[EpisodeRecord]] = {}
        for record in self.records:
            tasks.setdefault(record.task, []).append(record)
        return tasks

    def to_dict(self) -> dict:
        per_task = self.per_task()
        steps = sum(r.steps for r in self.records)
        return {
            "success_rate": self.success_rate,
            "ci95": list(wilson_interval(sum(r.success for r in self.records), self.episodes)),
            "episodes": self.episodes,
            "per_task": {t: sum(r.success for r in rs) / len(rs) for t, rs in per_task.items()},
            "per_task_ci95": {t: list(wilson_interval(sum(r.success for r in rs), len(rs))) for t, rs in per_task.items()},
            "per_task_episodes": {t: len(rs) for t, rs in per_task.items()},
            "errors": sum(r.error is not None for r in self.records),
            "per_task_errors": {t: sum(r.error is not None for r in rs) for t, rs in per_task.items()},
            "protocol": self.protocol,
            "seconds": self.seconds,
            "episodes_per_second": self.episodes / self.seconds if self.seconds else 0.0,
            "env_steps": steps,
            "env_steps_per_second": steps / self.seconds if self.seconds else 0.0,
            "policy_ms_per_call": 1000 * self.policy_seconds / max(1, self.policy_calls),
            "videos": list(self.videos),
            **self._modes(),
            "trajectory_videos": list(self.trajectory_videos),
        }

    def _modes(self) -> dict:
        """Share and success of each mode (route), overall and per task: whether a policy commits
        to one mode per episode or averages them (then the share of `none` grows). Empty when no
        env labelled its episodes."""
        if all(r.mode is None for r in self.records):
            return {}

        def table(records: list[EpisodeRecord]) -> dict:
            by_mode: dict[str, list[bool]] = {}
            for r in records:
                by_mode.setdefault(str(r.mode), []).append(r.success)
            return {
                m: {"share": len(wins) / len(records), "episodes": len(wins), "success": sum(wins) / len(wins)}
                for m, wins in sorted(by_mode.items())
            }

        return {"modes": table(self.records), "per_task_modes": {t: table(rs) for t, rs in self.per_task().items()}}

    def format_table(self) -> str:
        """Per-task success with its 95% interval, then the mean over all episodes."""
        summary = self.to_dict()
        lines = [f"{'task':<32} {'success':>8} {'95% CI':>15} {'episodes':>9} {'errors':>7}"]
        for task, records in self.per_task().items():
            lo, hi = summary["per_task_ci95"][task]
            errors = sum(r.error is not None for r in records)
            rate = summary["per_task"][task]
            lines.append(f"{task:<32} {rate:>8.3f} {f'[{lo:.2f}, {hi:.2f}]':>15} {len(records):>9} {errors:>7}")
        lo, hi = summary["ci95"]
        lines.append(
            f"{'overall':<32} {self.success_rate:>8.3f} {f'[{lo:.2f}, {hi:.2f}]':>15} "
            f"{self.episodes:>9} {summary['errors']:>7}"
        )
        modes = summary.get("modes")
        if modes:
            lines.append(
                "modes: "
                + ", ".join(f"{m} {row['share']:.0%} (success {row['success']:.2f})" for m, row in modes.items())
            )
        if self.protocol:
            lines.append(f"protocol: {self.protocol}")
        return "\n".join(lines)

    def failed_tasks(self) -> list[str]:
        """Tasks whose every episode ended in an error (a rate of 0 there would measure nothing)."""
        return [t for t, rs in self.per_task().items() if all(r.error is not None for r in rs)]


class EvaluationError(RuntimeError):
    """Every episode of some task ended in an error; `.summary` holds the records all the same."""

    def __init__(self, message: str, summary: EvalSummary) -> None:
        super().__init__(message)
        self.summary = summary


def check_evaluated(summary: EvalSummary, expected: int, output_dir: Path | None = None) -> None:
    """Raise `EvaluationError` when fewer than the `expected` episodes ran, or every episode of a
    task errored, naming the likeliest cause: a success rate over nothing is not a 0."""
    if summary.episodes < expected:
        raise EvaluationError(
            f"{summary.episodes} of the {expected} queued episodes ran, so there is no success rate to report", summary
        )
    failed = summary.failed_tasks()
    if not failed:
        return
    first = next(r.error for r in summary.records if r.task == failed[0])
    where = f"; every episode's error is in {output_dir / EPISODES_FILE}" if output_dir is not None else ""
    raise EvaluationError(
        f"every episode of task(s) {failed} ended in an error, so there is no success rate to report "
        f"(first error: {first}){where}. If the workers died at start-up: evaluate() runs each simulator in "
        f"a spawned process, which re-imports the calling script; a script that calls evaluate() must do so "
        f"under `if __name__ == \"__main__\":`.",
        summary,
    )


# ----------------------------------------------------------------------------------------------
# Seeds


def evaluation_seeds(data_cfg: Mapping, episodes: int | None = None, seeds: Mapping | None = None) -> list[int]:
    """The first `episodes` (default: all) of the seed range `seeds` ({start, count}: seeds start ..
    start + count - 1; default `data.eval_seeds`), refusing any seed of `data.train_seeds`: a policy
    is never scored on the episodes it was trained on. Errors name the keys that set the range:
    `seeds.start` / `seeds.count` (scripts/simulate_eval.py) when `seeds` is given, else `data.eval_seeds`."""
    if seeds is None and not data_cfg.get("eval_seeds"):
        raise KeyError("the data config has no eval_seeds: set data.eval_seeds={start: S, count: N} (the seeds S .. S+N-1, "
                       "apart from data.train_seeds), or evaluate a checkpoint on seeds of your choice with "
                       "scripts/simulate_eval.py seeds.start=S seeds.count=N")
    key = "seeds" if seeds is not None else "data.eval_seeds"
    chosen = seeds if seeds is not None else data_cfg["eval_seeds"]
    start, count = int(chosen["start"]), int(chosen["count"])
    episodes = count if episodes is None else int(episodes)
    if not 1 <= episodes <= count:
        more = "raise seeds.count" if seeds is not None else (
            "raise data.eval_seeds.count, or give scripts/simulate_eval.py a range of its own with seeds.start=S seeds.count=N")
        raise ValueError(f"episodes={episodes} per task, but {key}.count={count} gives {count} seeds; lower episodes or {more}")
    chosen_seeds = list(range(start, start + episodes))
    overlap = training_seeds_among(chosen_seeds, data_cfg)
    if overlap:
        train = data_cfg["train_seeds"]
        first, last = int(train["start"]), int(train["start"]) + int(train["count"]) - 1
        shown = ", ".join(map(str, overlap[:5])) + (f", ... ({len(overlap)} in all)" if len(overlap) > 5 else "")
        raise ValueError(
            f"evaluation seeds {shown} are training seeds (data.train_seeds: {first} .. {last}), and a policy is never "
            f"evaluated on the episodes it was trained on: move {key}.start to {last + 1} or above"
            + (f", or end the range below {first}" if first > 0 else "")
        )
    return chosen_seeds


def training_seeds_among(seeds: Sequence[int], data_cfg: Mapping) -> list[int]:
    """The seeds of `seeds` that `data.train_seeds` ({start, count}) holds; [] without it."""
    train = data_cfg.get("train_seeds")
    if not train:
        return []
    first, count = int(train["start"]), int(train["count"])
    return [s for s in seeds if first <= s < first + count]


# ----------------------------------------------------------------------------------------------
# Worker processes


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
                conn.send(("obs", obs, False, False, None, None))
            elif message[0] == "step":
                result = env.step(message[1])
                if recording is not None:
                    recording.add(env, result.observation)
                    if result.done:
                        write_video(recording.video, recording.frames)
                conn.send(
                    ("obs", result.observation, result.done, result.success, result.info.get("error"), result.info.get("mode"))
                )
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


class _Worker:
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
class _Slot:
    """What one worker is doing: its episode, the latest observation, the step count."""

    worker: _Worker
    task: str = ""
    seed: int = 0
    video: str | None = None
    obs: dict | None = None
    steps: int = 0
    started: float = 0.0
    mode: str | None = None
    replans: list[int] = field(default_factory=list)  # control steps at which the policy drew a new chunk


# ----------------------------------------------------------------------------------------------
# The evaluation loop


def protocol_label(data_cfg, method: str, execution: str) -> str:
    """What the numbers mean: the simulator and its control mode, the sampling method (objective,
    sampler, NFE) and the execution mode, e.g. 'metaworld | drifting nfe=1 | chunk 4/16'."""
    name = str((simulation_config(data_cfg) or data_cfg)["name"])
    if name == "rlbench":
        keyframes = bool(data_cfg.get("keyframes", True))
        control = data_cfg.get("control") or ("planner" if keyframes else "ik")
        target = "next-keyframe" if control == "planner" else "dense"
        name = f"rlbench/{target}/{control}"
    return f"{name} | {method} | {execution}"


def evaluate(
    policy,
    data_cfg: Mapping,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    episodes: int | None = None,
    num_workers: int = 2,
    output_dir: str | Path | None = None,
    video_dir: str | Path | None = None,
    videos_per_task: int = 2,
    max_episode_steps: int | None = None,
    step_timeout_s: float = 300.0,
    progress: bool = True,
    protocol: str = "",
    record: Mapping | None = None,
) -> EvalSummary:
    """Run every task on every seed with `policy` (a `DriftingPolicy` or anything with
    `reset(env_index)` and `select_action(obs, env_ids)`; a policy that also has `replanned`, the
    env ids that drew a new chunk in its latest call, gets those steps marked in the trajectory videos).

    tasks: default `data.tasks`. seeds: the same seed list for every task; default the first
    `episodes` of `data.eval_seeds`. output_dir: where episodes.jsonl goes (None: not written).
    video_dir: default `<output_dir>/videos`. max_episode_steps overrides the data config's.
    `protocol` labels the results (e.g. RLBench "keyframe-planner" vs "dense-ik"); `record`
    (JSON-able) goes into summary.json beside them, e.g. the checkpoint that was evaluated.
    Raises ValueError before any worker starts for an unregistered simulator, unknown tasks or
    fewer than one worker; `EvaluationError` when fewer episodes ran than were queued, or every
    episode of a task ended in an error (a crashed worker, an env that cannot be built, a script
    without a `__main__` guard), after writing the outputs.
    """
    from tqdm import tqdm

    data = simulation_config(_plain(data_cfg))
    if data is None:
        raise ValueError(f"data.name={data_cfg['name']!r}: {NO_SIMULATOR}")
    if max_episode_steps is not None:
        data["max_episode_steps"] = int(max_episode_steps)
    tasks = tasks if tasks is not None else data["tasks"]
    import_path = checked_env_import_path(data, tasks)
    tasks = list(tasks)
    seeds = list(seeds) if seeds is not None else evaluation_seeds(data, episodes)
    if not tasks or not seeds:
        raise ValueError(f"nothing to evaluate: tasks={tasks}, seeds={seeds}")
    if int(num_workers) < 1:
        raise ValueError(f"num_workers={num_workers}: an evaluation needs at least one simulator worker")
    output_dir = Path(output_dir) if output_dir is not None else None
    if video_dir is None and output_dir is not None:
        video_dir = output_dir / "videos"
    queue = deque()
    for task in tasks:
        for k, seed in enumerate(seeds):
            video = None
            if video_dir is not None and k < videos_per_task:
                video = str(Path(video_dir) / f"{task}_seed{seed}.mp4")
            queue.append((task, int(seed), video))
    total = len(queue)

    # One evaluation per output folder at a time: a second one would delete the first's
    # episodes.jsonl and leave its summary.json beside the other's episodes.
    with _output_lock(output_dir):
        jsonl = None
        if output_dir is not None:
            _clear_previous_outputs(output_dir, None if video_dir is None else Path(video_dir))
            jsonl = JsonLinesAppender(output_dir / EPISODES_FILE)
        os.environ.setdefault("MUJOCO_GL", "egl")  # inherited by the spawned workers
        context = mp.get_context("spawn")
        summary = EvalSummary(records=[], protocol=protocol)
        started = time.perf_counter()
        slots = [_Slot(_Worker(context, import_path, data, step_timeout_s)) for _ in range(min(num_workers, total))]
        bar = tqdm(total=total, unit="ep", desc="evaluate", disable=not progress, dynamic_ncols=True)

        def trajectory_video(index: int, record: EpisodeRecord) -> str | None:
            """Ask the worker that holds the episode's frames for its trajectory video; a failure to
            draw it is reported and leaves the episode as it was."""
            slot = slots[index]
            path = str(Path(slot.video).with_name(f"{Path(slot.video).stem}_trajectory.mp4"))
            try:
                slot.worker.send(("trajectory", path, record.to_dict(), list(slot.replans)))
                reply = slot.worker.recv()
            except WorkerError as error:
                slot.worker.restart()
                reply = ("error", str(error))
            if reply[0] == "error":
                tqdm.write(f"no trajectory video for {slot.task} seed {slot.seed}: {reply[1]}")
                return None
            return reply[1]

        def finish(index: int, success: bool, error: str | None = None) -> None:
            slot = slots[index]
            video = slot.video if slot.video and Path(slot.video).is_file() else None
            elapsed = time.perf_counter() - slot.started
            record = EpisodeRecord(slot.task, slot.seed, success, slot.steps, elapsed, error, video, slot.mode)
            if video:
                record.trajectory_video = trajectory_video(index, record)
            summary.records.append(record)
            if video:
                summary.videos.append(video)
            if record.trajectory_video:
                summary.trajectory_videos.append(record.trajectory_video)
            if jsonl is not None:
                jsonl.append(record.to_dict())
            if error is not None:
                tqdm.write(f"episode {slot.task} seed {slot.seed} failed with an error: {error}")
            slot.obs = None
            bar.update(1)
            bar.set_postfix(success=f"{summary.success_rate:.2f}")

        def start(index: int) -> None:
            """Reset slot `index` onto the next queued episode, until one starts or the queue is empty."""
            slot = slots[index]
            while queue and slot.obs is None:
                slot.task, slot.seed, slot.video = queue.popleft()
                slot.steps, slot.started, slot.mode, slot.replans = 0, time.perf_counter(), None, []
                policy.reset(index)
                try:
                    slot.worker.send(("reset", slot.task, slot.seed, slot.video))
                    reply = slot.worker.recv()
                except WorkerError as error:
                    slot.worker.restart()
                    finish(index, False, str(error))
                    continue
                if reply[0] == "error":
                    slot.worker.restart()
                    finish(index, False, reply[1])
                    continue
                slot.obs = reply[1]

        try:
            for index in range(len(slots)):
                start(index)
            while True:
                live = [i for i, slot in enumerate(slots) if slot.obs is not None]
                if not live:
                    break
                obs = batch_observations([slots[i].obs for i in live])
                t0 = time.perf_counter()
                try:
                    actions = policy.select_action(obs, env_ids=live)
                except PolicyRefusal as refusal:  # those envs' episodes end in an error; the others ask again
                    refused = [live[r] for r in refusal.rows if 0 <= r < len(live)]
                    if not refused:
                        raise
                    for i in refused:
                        finish(i, False, f"{type(refusal).__name__}: {refusal}")
                        start(i)
                    continue
                summary.policy_seconds += time.perf_counter() - t0
                summary.policy_calls += 1
                for i in getattr(policy, "replanned", ()):
                    slots[i].replans.append(slots[i].steps)
                for i, action in zip(live, actions, strict=True):
                    _send_step(slots[i], action)
                for i in live:
                    slot = slots[i]
                    try:
                        reply = slot.worker.recv()
                    except WorkerError as error:
                        slot.worker.restart()
                        finish(i, False, str(error))
                        start(i)
                        continue
                    if reply[0] == "error":
                        slot.worker.restart()
                        finish(i, False, reply[1])
                        start(i)
                        continue
                    slot.steps += 1
                    _, slot.obs, done, success, error, slot.mode = reply
                    if done or slot.steps >= int(data["max_episode_steps"]):
                        finish(i, bool(success), error)
                        start(i)
        finally:
            bar.close()
            for slot in slots:
                slot.worker.stop()
            if jsonl is not None:
                jsonl.close()
        summary.seconds = time.perf_counter() - started
        if output_dir is not None:
            write_atomic(output_dir / "summary.json", json.dumps({**summary.to_dict(), **(record or {})}, indent=2))
        check_evaluated(summary, total, output_dir)
        return summary


def _clear_previous_outputs(output_dir: Path, video_dir: Path | None) -> None:
    """Delete what an earlier evaluation into the same folder wrote (its episodes, summary and
    videos), so the folder never shows its videos beside this evaluation's summary. Only those
    files: a trainer's eval/ folder holds the step_* evaluations beside its final one."""
    for name in (EPISODES_FILE, "summary.json"):
        (output_dir / name).unlink(missing_ok=True)
    if video_dir is not None and video_dir.is_dir():
        for video in video_dir.glob("*_seed*.mp4"):
            video.unlink()


def _output_lock(output_dir: Path | None):
    """The lock of an evaluation's output folder (taken when entered), or nothing without one."""
    if output_dir is None:
        return contextlib.nullcontext()
    output_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(output_dir / ".lock", f"the evaluation output {output_dir}",
                    "Wait for that evaluation to end, or evaluate into another folder (output=... with scripts/simulate_eval.py).")


def _send_step(slot: _Slot, action: np.ndarray) -> None:
    """Send the action; a dead worker is noticed at the following `recv`."""
    try:
        slot.worker.send(("step", np.asarray(action, dtype=np.float32)))
    except WorkerError:
        pass


def batch_observations(observations: list[dict]) -> dict:
    """Stack per-env observations into the collated batch format the policy reads."""
    return {
        "images": np.stack([o["images"] for o in observations]),
        "proprio": np.stack([o["proprio"] for o in observations]).astype(np.float32),
        "instruction": [o["instruction"] for o in observations],
    }


def _plain(node):
    """A config (dict or OmegaConf) as plain dicts and lists, picklable for the workers."""
    if isinstance(node, Mapping) or hasattr(node, "keys"):
        return {str(k): _plain(node[k]) for k in node.keys()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    if hasattr(node, "__iter__") and not isinstance(node, (str, bytes)):
        return [_plain(v) for v in node]
    return node
