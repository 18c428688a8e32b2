"""What an evaluation reports: one record per episode (episodes.jsonl, written as each episode
ends), the summary with Wilson intervals (summary.json), and the refusal to report a rate when
episodes are missing."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from drifting_vla.formats.files import read_jsonl

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
    stage: int | None = None  # the furthest stage of a staged reward reached (ALOHA: 0-4)
    stage_names: list[str] | None = None  # what stages 1, 2, ... mean

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


def stages_reached(records: list[EpisodeRecord]) -> dict[str, float]:
    """{stage name: share of `records` whose episode reached at least that stage}, in stage order
    (an episode that ended before its first step counts as stage 0)."""
    names = next(r.stage_names for r in records if r.stage_names)
    return {name: sum((r.stage or 0) >= k for r in records) / len(records) for k, name in enumerate(names, start=1)}


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
            **self._stages(),
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

    def _stages(self) -> dict:
        """Per task, the share of episodes that reached at least each stage of the task's staged
        reward: where a policy that rarely succeeds gets stuck. Empty when no env labelled stages."""
        staged = {t: rs for t, rs in self.per_task().items() if any(r.stage_names for r in rs)}
        if not staged:
            return {}
        return {"stages": {t: stages_reached(rs) for t, rs in staged.items()}}

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
        for task, reached in summary.get("stages", {}).items():
            lines.append(f"stages reached ({task}): " + ", ".join(f"{name} {share:.0%}" for name, share in reached.items()))
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
