"""`eval/trajectory_video`: a rollout's camera frames beside the end-effector path so far.

One frame per control step (the reset frame, then one after each step), laid out as

    +-------------------------------------------------------------------------+
    | drawer-open-v3  seed 100000  SUCCESS in 91 steps  mode: left             |  title (once)
    +------------------+-----------------------------+------------------------+
    |                  |  XY (top view)              |  3D                    |
    |  camera frame t  |  path 0..t, o = new chunk,  |  the same path         |
    |                  |  start, end, point t        |                        |
    |                  +-----------------------------+------------------------+
    |                  |  timeline: | at every new chunk, cursor at step t    |
    +------------------+------------------------------------------------------+

so a user sees where the policy sent the hand, where it replanned (the chunk boundaries: the
steps whose action came from a freshly generated chunk) and how the episode ended.

Cheap enough for every evaluated episode that gets a video (the cost per frame and per episode is
in docs/evaluation.md; `python scripts/benchmark.py video` measures it): the video is drawn when the
episode has ended, so the whole path is known. Matplotlib (Agg canvas, no pyplot) draws the axes
with their limits, labels, legend, the timeline's chunk ticks and the title ONCE per episode, and
every position is projected to its pixel in both plots once. Per frame, PIL adds one path segment
to that picture and draws the few markers that move; per-frame matplotlib drawing, even blitted,
cost ten times more.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import imageio.v2 as imageio
import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter
from mpl_toolkits.mplot3d import proj3d
from PIL import Image, ImageDraw

from drifting_vla.logging.themes import THEME, PanelTheme

TRAJECTORY_VIDEO_KEY = "eval/trajectory_video"
"""The WandB key the trainer and scripts/simulate_eval.py log an evaluation's trajectory videos under."""
PLOT_HEIGHT_PX = 256
"""The plots are as tall as the camera frame and at least this tall (RLBench's video frame is its
128 px observation): the fonts and the layout below are sized for it."""
TITLE_HEIGHT_PX = 24
LAYOUT = {"top": (0.1, 0.4, 0.36, 0.51), "space": (0.5, 0.32, 0.48, 0.62), "timeline": (0.03, 0.2, 0.94, 0.07)}
"""Axes rectangles (left, bottom, width, height; figure fractions): fixed, because matplotlib's
constrained layout alone took longer than drawing every frame of an episode."""
SUCCESS_COLOR = "#009E73"
FAILURE_COLOR = "#D55E00"


def episode_title(record: Mapping, labels: Sequence[str] = ()) -> str:
    """'drawer-open-v3   seed 100000   SUCCESS in 91 steps', then `label: value` for each key of
    `labels` the episode record has (e.g. a route label `mode`), then the error if there was one."""
    outcome = f"SUCCESS in {record['steps']} steps" if record["success"] else f"FAILURE after {record['steps']} steps"
    parts = [str(record["task"]), f"seed {record['seed']}", outcome]
    parts += [f"{key}: {record[key]}" for key in labels if record.get(key) is not None]
    if record.get("error"):
        parts.append(f"error: {record['error']}")
    return "   ".join(parts)


def compose_frame(camera: np.ndarray, plots: np.ndarray, title: np.ndarray) -> np.ndarray:
    """`title` [h, W, 3] above `camera` [Hc, Wc, 3] beside `plots` [Hp, Wp, 3], W = Wc + Wp.

    The shorter of camera and plots is centred vertically on white; a side of odd length gets one
    white row or column more (H.264 in yuv420p needs even sides)."""
    height = max(camera.shape[0], plots.shape[0])
    width = camera.shape[1] + plots.shape[1]
    if title.shape[1] != width:
        raise ValueError(f"the title strip is {title.shape[1]} px wide, camera + plots are {width}")
    frame = np.full((title.shape[0] + height + (title.shape[0] + height) % 2, width + width % 2, 3), 255, np.uint8)
    frame[: title.shape[0], :width] = title
    for image, left in ((camera, 0), (plots, camera.shape[1])):
        top = title.shape[0] + (height - image.shape[0]) // 2
        frame[top : top + image.shape[0], left : left + image.shape[1]] = image
    return frame


class _PathPlots:
    """The XY and 3D plots and the timeline of one episode.

    Matplotlib draws what does not move (axes, ticks, labels, legend, the timeline's chunk ticks)
    once; every position is projected to its pixel in both plots once; `frames()` then draws the
    path into that picture step by step with PIL (one segment per step, a few markers per frame)."""

    def __init__(self, positions: np.ndarray, replans: np.ndarray, height_px: int, theme: PanelTheme) -> None:
        self.replans, self.theme = set(replans.tolist()), theme
        self.steps = len(positions) - 1
        rc = {**theme.rc_params(), "font.size": 7, "axes.titlesize": 8, "axes.labelsize": 7,
              "xtick.labelsize": 6, "ytick.labelsize": 6, "legend.fontsize": 6}
        with mpl.rc_context(rc):
            figure = Figure(figsize=(2 * height_px / theme.dpi, height_px / theme.dpi), dpi=theme.dpi)
            FigureCanvasAgg(figure)
            top = figure.add_axes(LAYOUT["top"])
            space = figure.add_axes(LAYOUT["space"], projection="3d")
            timeline = figure.add_axes(LAYOUT["timeline"])
            self._draw_static(figure, top, space, timeline, positions, replans)
            figure.canvas.draw()
        self.background = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3])
        height = figure.canvas.get_width_height()[1]

        def pixels(axes, xy: np.ndarray) -> np.ndarray:  # data -> (column, row) from the top left
            display = axes.transData.transform(xy)
            return np.stack([display[:, 0], height - display[:, 1]], axis=1)

        projected = proj3d.proj_transform(*positions.T, space.M)[:2]  # as Line3D.draw projects
        self.views = (pixels(top, positions[:, :2]), pixels(space, np.stack(projected, axis=1)))
        steps = np.arange(self.steps + 1, dtype=np.float64)
        self.cursor = pixels(timeline, np.stack([steps, np.zeros_like(steps)], axis=1))[:, 0]
        (_, self.cursor_bottom), (_, self.cursor_top) = pixels(timeline, np.array([[0.0, 0.0], [0.0, 1.0]]))
        self.cursor_width = max(2.0, float(np.diff(self.cursor[:2])[0]) if self.steps else 2.0)

    def _draw_static(self, figure, top, space, timeline, positions, replans) -> None:
        theme, (low, high) = self.theme, _limits(positions)
        top.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]), title="top view (XY)")
        top.set_xlabel("x", labelpad=0)
        top.set_ylabel("y", labelpad=1)
        top.set_aspect("equal", adjustable="box")
        for axis in (top.xaxis, top.yaxis):
            axis.set_major_locator(MaxNLocator(4))
        for label, style in _legend_styles(theme).items():
            top.plot([], [], ls="none", label=label, **style)  # legend entries for what PIL draws
        figure.legend(loc="lower center", ncols=4, handlelength=1, borderpad=0.2, columnspacing=1.5, frameon=False)
        space.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]), zlim=(low[2], high[2]))
        space.set_box_aspect((1, 1, 1), zoom=1.1)
        space.set_title("3D", y=0.95)
        for axis, name in zip((space.xaxis, space.yaxis, space.zaxis), "xyz", strict=True):
            axis.set_major_locator(MaxNLocator(3))  # a few grid lines for depth; no numbers (the XY plot has them)
            axis.set_major_formatter(NullFormatter())
            axis.set_label_text(name)
            axis.labelpad = -12
        timeline.set(xlim=(-0.5, max(self.steps, 1) + 0.5), ylim=(0, 1), yticks=[])
        timeline.vlines(replans, 0, 1, color=theme.drift, lw=1)
        timeline.set_xlabel("control step (| = new chunk)", labelpad=1)
        timeline.grid(False)

    def frames(self) -> Iterator[np.ndarray]:
        """The plots at steps 0, 1, ..., each [H, 2H, 3] uint8: the path up to t, the chunk starts
        on it, start and end, and the current point."""
        theme, path = self.theme, self.background.copy()
        pen = ImageDraw.Draw(path)
        for t in range(self.steps + 1):
            for view in self.views:
                if t:
                    pen.line([tuple(view[t - 1]), tuple(view[t])], fill=theme.generated, width=2)
                if t - 1 in self.replans:  # after the segments that meet there, so the dot stays on top
                    _disc(pen, view[t - 1], 2.5, theme.drift)
            frame = path.copy()
            marks = ImageDraw.Draw(frame)
            for view in self.views:
                _disc(marks, view[0], 4, "white", outline=theme.neutral)
                _cross(marks, view[-1], 4, theme.neutral)
                _disc(marks, view[t], 4, theme.expert, outline="black")
            left = self.cursor[t] - self.cursor_width / 2
            marks.rectangle([left, self.cursor_top, left + self.cursor_width, self.cursor_bottom], fill=theme.expert)
            yield np.asarray(frame)


def _legend_styles(theme: PanelTheme) -> dict[str, dict]:
    """Matplotlib marker styles that look like the markers `_PathPlots.frames` draws."""
    return {
        "start": {"marker": "o", "ms": 6, "mfc": "white", "mec": theme.neutral, "mew": 1.5},
        "end": {"marker": "x", "ms": 6, "mec": theme.neutral, "mew": 2},
        "new chunk": {"marker": "o", "ms": 3, "color": theme.drift},
        "now": {"marker": "o", "ms": 6, "color": theme.expert, "mec": "black", "mew": 0.8},
    }


def _disc(pen: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, fill: str, outline: str | None = None) -> None:
    x, y = centre
    pen.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill, outline=outline, width=1 if outline else 0)


def _cross(pen: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, fill: str) -> None:
    x, y = centre
    pen.line([x - radius, y - radius, x + radius, y + radius], fill=fill, width=2)
    pen.line([x - radius, y + radius, x + radius, y - radius], fill=fill, width=2)


def _limits(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) [3]: a cube around the whole path, centred on it, 10% padding. One span for all
    axes keeps true proportions: a path that only moves up and down looks like one, not like noise."""
    low, high = positions.min(0), positions.max(0)
    span = max(float((high - low).max()), 1e-3) * 1.2
    return (low + high) / 2 - span / 2, (low + high) / 2 + span / 2


def _title_strip(text: str, success: bool, width_px: int, theme: PanelTheme) -> np.ndarray:
    figure = Figure(figsize=(width_px / theme.dpi, TITLE_HEIGHT_PX / theme.dpi), dpi=theme.dpi)
    FigureCanvasAgg(figure)
    figure.text(0.01, 0.5, text, va="center", ha="left", fontsize=9, fontweight="bold",
                color=SUCCESS_COLOR if success else FAILURE_COLOR)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def trajectory_frames(
    frames: Sequence[np.ndarray],
    positions: np.ndarray,
    replan_steps: Sequence[int],
    record: Mapping,
    labels: Sequence[str] = (),
    theme: PanelTheme = THEME,
) -> Iterator[np.ndarray]:
    """The video's frames, one per camera frame.

    frames: camera frames uint8 [H, W, 3], one per observation (reset, then after each step).
    positions: end-effector xyz [len(frames), 3] of the same observations.
    replan_steps: control steps whose action came from a newly generated chunk.
    record: the episode record (task, seed, success, steps, error, and any `labels` keys).
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape != (len(frames), 3):
        raise ValueError(f"positions must be [{len(frames)}, 3] (one per frame), got {positions.shape}")
    replans = np.asarray([s for s in replan_steps if 0 <= s < len(frames)], dtype=np.int64)
    plots = _PathPlots(positions, replans, max(PLOT_HEIGHT_PX, frames[0].shape[0]), theme)
    width = frames[0].shape[1] + plots.background.width
    title = _title_strip(episode_title(record, labels), bool(record["success"]), width, theme)
    for camera, plot in zip(frames, plots.frames(), strict=True):
        yield compose_frame(camera, plot, title)


def write_trajectory_video(path: str | Path, frames, positions, replan_steps, record, labels=(), fps: int = 30) -> Path:
    """`trajectory_frames(...)` encoded as H.264 at `path`, each composed frame handed to the
    encoder as it is drawn (an episode's composed frames are never all in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # ultrafast: a third of the encoding time of x264's default preset; the files (mostly static
    # frames) stay small, 2-3 KB a frame
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=2, ffmpeg_params=["-preset", "ultrafast"]) as writer:
        for frame in trajectory_frames(frames, positions, replan_steps, record, labels):
            writer.append_data(frame)
    return path


def frame_strip(path: str | Path, count: int = 4) -> np.ndarray:
    """`count` evenly spaced frames of the video at `path` (first and last included), stacked top
    to bottom: one picture of a whole episode, for docs and reports. uint8 [count * H, W, 3]."""
    frames = imageio.mimread(path, memtest=False)
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return np.concatenate([frames[i][..., :3] for i in picks])
