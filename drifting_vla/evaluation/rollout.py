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
                           video, trajectory_video, and the env's labels (mode: the way taken; stage,
                           stage_names: how far a staged reward got, ALOHA); appended whole and flushed to disk as each episode
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
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from drifting_vla.envs import NO_SIMULATOR, checked_env_import_path, simulation_config
from drifting_vla.envs.seeds import evaluation_seeds
from drifting_vla.evaluation.results import (
    EPISODES_FILE,
    EpisodeRecord,
    EvalSummary,
    check_evaluated,
)
from drifting_vla.evaluation.workers import EpisodeSlot, Worker, WorkerError, send_step
from drifting_vla.formats.files import FileLock, JsonLinesAppender, write_atomic
from drifting_vla.safety import PolicyRefusal

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
        slots = [EpisodeSlot(Worker(context, import_path, data, step_timeout_s)) for _ in range(min(num_workers, total))]
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
            record = EpisodeRecord(slot.task, slot.seed, success, slot.steps, elapsed, error, video, **slot.labels)
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
                slot.steps, slot.started, slot.labels, slot.replans = 0, time.perf_counter(), {}, []
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
                    send_step(slots[i], action)
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
                    _, slot.obs, done, success, error, slot.labels = reply
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
