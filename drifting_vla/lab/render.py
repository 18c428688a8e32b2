"""Pictures of lab runs: PNG frames with drift arrows, an animation, and a side-by-side summary."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from drifting_vla.lab.dynamics import Frame, LabRun  # noqa: E402

TARGET_COLOR, SAMPLE_COLOR, ARROW_COLOR = "#b9bec7", "#1f6feb", "#d1242f"
LIMIT = 3.2
MAX_ARROWS = 200


def draw_frame(ax, frame: Frame, target_points: Tensor, title: str) -> None:
    ax.scatter(*target_points.T.numpy(), s=3, c=TARGET_COLOR, label="target", rasterized=True)
    ax.scatter(*frame.samples.T.numpy(), s=4, c=SAMPLE_COLOR, label="samples", rasterized=True)
    if frame.field is not None:
        idx = np.linspace(0, len(frame.samples) - 1, min(MAX_ARROWS, len(frame.samples))).astype(int)
        xy, uv = frame.samples[idx].numpy(), frame.field[idx].numpy()
        ax.quiver(*xy.T, *uv.T, color=ARROW_COLOR, angles="xy", scale_units="xy", scale=1, width=0.003, label="drift V")
    ax.set_xlim(-LIMIT, LIMIT)
    ax.set_ylim(-LIMIT, LIMIT)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=11)


def write_frames(run: LabRun, target_points: Tensor, out_dir: Path, animation: str = "gif") -> list[Path]:
    """One PNG per frame in `out_dir/frames/`, plus `out_dir/<mode>.gif` (or .mp4)."""
    frame_dir = out_dir / "frames"
    frame_dir.mkdir(parents=True, exist_ok=True)
    paths, images = [], []
    for frame in run.frames:
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        label = "solver step" if run.mode.startswith("diffusion") else "step"
        draw_frame(ax, frame, target_points, f"{run.mode}  {label} {frame.step}")
        ax.legend(loc="lower left", fontsize=8, markerscale=3, framealpha=0.8)
        fig.tight_layout()
        path = frame_dir / f"{run.mode}_{frame.step:05d}.png"
        fig.savefig(path)
        fig.canvas.draw()
        images.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
        plt.close(fig)
        paths.append(path)
    if animation == "gif":
        imageio.mimsave(out_dir / f"{run.mode}.gif", images, duration=0.15, loop=0)
    elif animation == "mp4":
        imageio.mimsave(out_dir / f"{run.mode}.mp4", images, fps=8, macro_block_size=1)
    elif animation != "none":
        raise ValueError(f"animation must be gif, mp4 or none, got {animation!r}")
    return paths


def write_summary(runs: list[LabRun], metrics: dict[str, dict], target_points: Tensor, path: Path) -> None:
    """Final samples of every run side by side, each titled with its NFE and energy distance."""
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.6), dpi=100, squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        m = metrics[run.mode]
        nfe = "no network" if run.nfe == 0 else f"NFE {run.nfe}"
        title = f"{run.mode}\n{nfe} | energy dist {m['energy_distance']:.3f} | modes {m['modes_covered']}/{m['modes_total']}"
        draw_frame(ax, Frame(run.frames[-1].step, run.samples), target_points, title)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
