"""Metrics, panels and videos to the run directory, mirrored to WandB.

Everything is written locally first, so a user without WandB sees the same numbers and pictures:

    <run_dir>/metrics.jsonl                       one JSON object per log call: {"step": ..., key: value}
    <run_dir>/panels/<panel>/<step:08d>.png       every panel image
    <run_dir>/videos/<name>_<step:08d>.mp4        rollout videos
    <run_dir>/eval/.../videos/*_trajectory.mp4    `eval/trajectory_video`: written by the evaluation, logged as they are
    <run_dir>/wandb/                              WandB's own files (offline runs sync with `wandb sync`)

`training.wandb.mode`: `online` (needs WANDB_API_KEY in the environment; without it the run falls back
to `offline` and says so once), `offline` (no account needed), `disabled` (local files only).

Only rank 0 logs. `create_run_logger(..., rank=r)` returns a `NullRunLogger` on the other ranks: the
trainer calls the same methods everywhere and the other ranks write nothing.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import imageio.v2 as imageio
import numpy as np

from drifting_vla.formats.files import JsonLinesAppender
from drifting_vla.logging.visualizations import MetricHistory

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _check_mode(mode: str) -> None:
    if mode not in WANDB_MODES:
        raise ValueError(f"training.wandb.mode must be one of {WANDB_MODES}, got {mode!r}")


def resolve_wandb_mode(mode: str) -> str:
    """The mode to run in: `online` becomes `offline` (with one warning) when no API key is set."""
    _check_mode(mode)
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        log.warning(
            "training.wandb.mode=online but WANDB_API_KEY is not set: logging offline to the run "
            "directory instead (upload later with `wandb sync <run_dir>/wandb/offline-run-*`)"
        )
        return "offline"
    return mode


def _json_number(value: Any) -> float | int | None:
    """A metric as a JSON number; NaN and Inf become null (strict JSON has no such numbers)."""
    number = value.item() if hasattr(value, "item") else value
    if isinstance(number, bool | int):
        return int(number)
    number = float(number)
    return number if math.isfinite(number) else None


def _file_name(name: str) -> str:
    """A metric-style name (`sim/reach-v3`) as a file name (`sim_reach-v3`)."""
    return _UNSAFE_FILE_CHARS.sub("_", name).strip("_") or "unnamed"


class RunLogger:
    """Writes metrics, panels and videos of one run to `run_dir` and mirrors them to WandB."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        mode: str = "offline",
        project: str = "drifting-vla",
        run_name: str | None = None,
        config: Mapping | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = resolve_wandb_mode(mode)
        self.history = MetricHistory()
        self._metrics_file = JsonLinesAppender(self.run_dir / "metrics.jsonl")
        self._wandb_run = None
        if self.mode != "disabled":
            import wandb

            self._wandb = wandb
            self._wandb_run = wandb.init(
                project=project,
                name=run_name,
                dir=str(self.run_dir),
                mode=self.mode,
                config=dict(config or {}),
            )

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Append `{"step": step, **metrics}` to metrics.jsonl (a whole line, on disk) and to WandB."""
        numbers = {key: _json_number(value) for key, value in metrics.items()}
        self._metrics_file.append({"step": int(step), **numbers})
        self.history.record(step, {k: v for k, v in numbers.items() if v is not None})
        if self._wandb_run is not None:
            self._wandb_run.log(dict(numbers), step=int(step))

    def log_panel(self, name: str, image: np.ndarray, step: int) -> Path:
        """Save an RGB panel `[H, W, 3]` uint8 as `panels/<name>/<step:08d>.png` and log it."""
        path = self.run_dir / "panels" / _file_name(name) / f"{int(step):08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        imageio.imwrite(path, image)
        if self._wandb_run is not None:
            self._wandb_run.log({f"panels/{name}": self._wandb.Image(str(path))}, step=int(step))
        return path

    def log_video(self, name: str, frames: np.ndarray, step: int, fps: int = 20) -> Path:
        """Encode frames `[T, H, W, 3]` uint8 to `videos/<name>_<step:08d>.mp4` (H.264) and log it."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"video {name!r} must be uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}"
            )
        path = self.run_dir / "videos" / f"{_file_name(name)}_{int(step):08d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        # H.264 in yuv420p needs even sides; macro_block_size=2 pads odd ones instead of resizing.
        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=2)
        if self._wandb_run is not None:
            video = self._wandb.Video(str(path), format="mp4")
            self._wandb_run.log({f"videos/{name}": video}, step=int(step))
        return path

    def log_video_files(self, key: str, paths: list[str | Path], step: int) -> None:
        """Log mp4 files that are already on disk (an evaluation's trajectory videos) under `key`,
        all in one WandB entry; locally they stay where they were written."""
        if self._wandb_run is not None and paths:
            videos = [self._wandb.Video(str(path), format="mp4") for path in paths]
            self._wandb_run.log({key: videos}, step=int(step))

    def close(self) -> None:
        """Flush and close metrics.jsonl and finish the WandB run (idempotent)."""
        self._metrics_file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class NullRunLogger:
    """The logger of ranks other than 0: the same methods, and nothing is written anywhere."""

    def __init__(self) -> None:
        self.history = MetricHistory()

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Rank != 0: metrics are logged by rank 0."""

    def log_panel(self, name: str, image: np.ndarray, step: int) -> None:
        """Rank != 0: panels are logged by rank 0."""

    def log_video(self, name: str, frames: np.ndarray, step: int, fps: int = 20) -> None:
        """Rank != 0: videos are logged by rank 0."""

    def log_video_files(self, key: str, paths: list[str | Path], step: int) -> None:
        """Rank != 0: videos are logged by rank 0."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> NullRunLogger:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def create_run_logger(
    run_dir: str | os.PathLike,
    *,
    rank: int,
    mode: str = "offline",
    project: str = "drifting-vla",
    run_name: str | None = None,
    config: Mapping | None = None,
) -> RunLogger | NullRunLogger:
    """A `RunLogger` on rank 0, a `NullRunLogger` elsewhere (the mode is checked on every rank)."""
    if rank != 0:
        _check_mode(mode)
        return NullRunLogger()
    return RunLogger(run_dir, mode=mode, project=project, run_name=run_name, config=config)
