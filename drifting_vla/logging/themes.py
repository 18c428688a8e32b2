"""One look for every training panel: fixed pixel size, colors that mean the same thing everywhere.

Expert (ground truth) is always blue, generated always orange, the drift field vermillion and samples
after the drift step green (Okabe-Ito colors, readable with the common color-vision deficiencies).
Panels are drawn on a matplotlib `Figure` with the Agg canvas, never through `pyplot`: no display,
no global figure list to leak, safe in a training process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass(frozen=True)
class PanelTheme:
    """Size, colors and font sizes shared by all panels (sizes in pixels and points)."""

    width_px: int = 960
    height_px: int = 720
    dpi: int = 100
    expert: str = "#0072B2"
    generated: str = "#E69F00"
    drift: str = "#D55E00"
    after_drift: str = "#009E73"
    neutral: str = "#555555"
    error_colormap: str = "magma_r"
    series_colormap: str = "viridis"
    mode_colormap: str = "tab10"
    title_size: float = 15
    label_size: float = 12
    tick_size: float = 10
    legend_size: float = 10

    def rc_params(self) -> dict:
        return {
            "font.size": self.label_size,
            "axes.titlesize": self.label_size + 1,
            "axes.titleweight": "bold",
            "axes.labelsize": self.label_size,
            "xtick.labelsize": self.tick_size,
            "ytick.labelsize": self.tick_size,
            "legend.fontsize": self.legend_size,
            "legend.framealpha": 0.85,
            "figure.titlesize": self.title_size,
            "figure.titleweight": "bold",
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }


THEME = PanelTheme()


@contextmanager
def panel_figure(title: str, theme: PanelTheme = THEME) -> Iterator[Figure]:
    """A titled figure of the theme's fixed pixel size; draw into it and call `figure_to_rgb`."""
    with mpl.rc_context(theme.rc_params()):
        figure = Figure(
            figsize=(theme.width_px / theme.dpi, theme.height_px / theme.dpi),
            dpi=theme.dpi,
            layout="constrained",
        )
        FigureCanvasAgg(figure)
        figure.suptitle(title)
        yield figure


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """Render to an RGB image `[H, W, 3]` uint8 of exactly the figure's pixel size."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
