"""The ten training panels: pure functions from one training step's arrays to an RGB image.

Every panel takes a `PanelInputs` (numpy, the normalized action space of one step) and returns an
RGB uint8 image `[720, 960, 3]` (the theme's fixed size), so WandB and the run directory show the
same picture at the same size at every step. `PANELS` maps the config name of each panel
(`training.wandb.visualizations.<name>.frequency`) to its function; `due_panels` says which are due.

    x       generated chunks        [B, G, T, A]   G samples per observation
    expert  expert chunks           [B, T, A]      the positives
    V       drift applied to x      [B, G, T, A]   in x's coordinates: the loss target is x + V

Panels that show single chunks use the first observations of the batch; the distribution panels
(B1, B2, A4, C2) use the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from drifting_vla.logging.themes import THEME, PanelTheme, figure_to_rgb, panel_figure
from drifting_vla.specs import ActionSpec

LAMBDA_V_KEY = "train/lambda_V"
LOSS_KEYS = ("train/loss", "val/loss")
RAW_DRIFT_NORM_PREFIX = "train/raw_drift_norm/"
"""Per-temperature drift norms: `train/raw_drift_norm/0.02` etc. (DriftingLoss metrics + `train/`)."""

MAX_OBSERVATIONS_SHOWN = 4


# --------------------------------------------------------------------------------------------
# Inputs


class MetricHistory:
    """Every scalar metric logged so far, as `(steps, values)` per key: the trend panels' input."""

    def __init__(self) -> None:
        self._series: dict[str, tuple[list[int], list[float]]] = {}

    def record(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            steps, values = self._series.setdefault(key, ([], []))
            steps.append(int(step))
            values.append(float(value))

    @classmethod
    def from_jsonl(cls, path, up_to_step: int) -> MetricHistory:
        """The history a run had logged by `up_to_step`, read back from its `metrics.jsonl` (so a
        resumed run's trend panels continue; lines a killed run wrote after its checkpoint are left out).
        A line that is not JSON (a SIGKILL mid-write cuts the last one short) is left out with a
        warning: the history only draws the trend panels, and is not worth refusing the resume for."""
        import json
        import logging
        from pathlib import Path

        history = cls()
        path = Path(path)
        if path.is_file():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                try:
                    record = json.loads(line) if line.strip() else {}
                except ValueError:
                    logging.getLogger(__name__).warning("%s line %d is not JSON (a write cut short?); left out of the "
                                                        "trend panels: %.80s", path, number, line)
                    continue
                if isinstance(record, dict) and "step" in record and int(record["step"]) <= up_to_step:
                    step = record.pop("step")
                    history.record(step, {k: v for k, v in record.items() if isinstance(v, (int, float))})
        return history

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """`(steps [N] int, values [N] float)`; empty arrays for a key never logged."""
        steps, values = self._series.get(key, ([], []))
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)

    def keys_under(self, prefix: str) -> list[str]:
        return sorted(k for k in self._series if k.startswith(prefix))


def dimension_names(spec: ActionSpec) -> tuple[str, ...]:
    """One short label per dimension of the network's (normalized) action: `x y z r00 r10 r20 r01
    r11 r21 gripper ignore_collisions` for RLBench, whose rotation the network sees as two
    rotation-matrix columns."""
    names: list[str] = []
    for component in spec.components:
        if component.kind == "quaternion":
            names += ["r00", "r10", "r20", "r01", "r11", "r21"]
        elif component.dim == 1:
            names.append(component.name)
        elif component.dim == 3:
            prefix = "d" if component.name.startswith("delta") else ""
            names += [f"{prefix}{axis}" for axis in "xyz"]
        else:
            names += [f"{component.name}[{i}]" for i in range(component.dim)]
    return tuple(names)


def end_effector_dims(spec: ActionSpec) -> tuple[slice | None, bool]:
    """Where the end-effector xyz sits and whether it is a delta (to integrate) or a position.

    A `position` component is absolute (RLBench); a 3-dim component named `delta_*` holds deltas
    (Meta-World). `(None, False)` when the spec has neither.
    """
    slices = spec.network_slices()
    for component in spec.components:
        if component.kind == "position" and component.dim == 3:
            return slices[component.name], False
    for component in spec.components:
        if component.dim == 3 and component.name.startswith("delta"):
            return slices[component.name], True
    return None, False


@dataclass(frozen=True)
class PanelInputs:
    """One training step, as numpy arrays in the normalized action space (shapes in module doc)."""

    generated: np.ndarray
    expert: np.ndarray
    drift: np.ndarray
    dim_names: tuple[str, ...]
    history: MetricHistory = field(default_factory=MetricHistory)
    end_effector: slice | None = None
    end_effector_is_delta: bool = False

    def __post_init__(self) -> None:
        b, g, t, a = self.generated.shape
        if self.expert.shape != (b, t, a):
            raise ValueError(f"expert must be [B, T, A] = {(b, t, a)}, got {self.expert.shape}")
        if self.drift.shape != self.generated.shape:
            raise ValueError(
                f"drift must match generated {self.generated.shape}, got {self.drift.shape}"
            )
        if len(self.dim_names) != a:
            raise ValueError(f"{len(self.dim_names)} dim_names for an action dim of {a}")

    @classmethod
    def from_step(
        cls, generated, expert, drift, spec: ActionSpec, history: MetricHistory
    ) -> PanelInputs:
        """Build from the trainer's tensors (any device/dtype) and the dataset's action spec."""
        end_effector, is_delta = end_effector_dims(spec)
        return cls(
            generated=_to_numpy(generated),
            expert=_to_numpy(expert),
            drift=_to_numpy(drift),
            dim_names=dimension_names(spec),
            history=history,
            end_effector=end_effector,
            end_effector_is_delta=is_delta,
        )

    @property
    def observations_shown(self) -> int:
        return min(self.generated.shape[0], MAX_OBSERVATIONS_SHOWN)


def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Small numerics shared by the panels


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-2 principal axes of `points [N, D]`: `(mean [D], axes [D, 2], explained share [2])`."""
    mean = points.mean(axis=0)
    _, singular, vt = np.linalg.svd(points - mean, full_matrices=False)
    axes = np.zeros((points.shape[1], 2))
    k = min(2, vt.shape[0])
    axes[:, :k] = vt[:k].T
    variance = singular**2
    share = np.zeros(2)
    share[:k] = variance[:k] / max(variance.sum(), 1e-12)
    return mean, axes, share


def kmeans(
    points: np.ndarray, k: int, iterations: int = 25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic k-means++ / Lloyd on `points [N, D]`: `(centers [k, D], labels [N])`."""
    rng = np.random.default_rng(seed)
    centers = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = ((points[:, None] - np.asarray(centers)[None]) ** 2).sum(-1).min(1)
        probabilities = d2 / d2.sum() if d2.sum() > 0 else np.full(len(points), 1 / len(points))
        centers.append(points[rng.choice(len(points), p=probabilities)])
    centers = np.asarray(centers, dtype=np.float64)
    for _ in range(iterations):
        labels = nearest_center(points, centers)
        for j in range(k):
            if np.any(labels == j):
                centers[j] = points[labels == j].mean(0)
    return centers, nearest_center(points, centers)


def nearest_center(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the closest center for each of `points [N, D]`: `[N]`."""
    return ((points[:, None] - centers[None]) ** 2).sum(-1).argmin(1)


def _grid(count: int) -> tuple[int, int]:
    """Rows and columns for `count` small plots on a 4:3 canvas."""
    rows = max(1, math.ceil(math.sqrt(count * 3 / 4)))
    return rows, math.ceil(count / rows)


def _subplots(figure: Figure, count: int, **kwargs) -> list[Axes]:
    """`count` axes on a grid; unused grid cells are hidden."""
    rows, cols = _grid(count)
    axes = figure.subplots(rows, cols, squeeze=False, **kwargs).ravel()
    for unused in axes[count:]:
        unused.set_visible(False)
    return list(axes[:count])


def _label_bottom_x(axes: list[Axes], label: str) -> None:
    """The x label only under the lowest plot of each grid column, not repeated on every row."""
    _, cols = _grid(len(axes))
    for i, single in enumerate(axes):
        if i + cols >= len(axes):
            single.set_xlabel(label)


def _empty_message(axes: Axes, message: str) -> None:
    axes.set_axis_off()
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, wrap=True)


def _figure_legend(figure: Figure, axes: Axes, columns: int = 4) -> None:
    """One legend for the whole figure, below the plots, from the handles of `axes`."""
    handles, labels = axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=columns)


# --------------------------------------------------------------------------------------------
# A: the drift and how training converges


def drifting_field(inputs: PanelInputs, theme: PanelTheme = THEME) -> np.ndarray:
    """A1: per observation, a 2D PCA of its G generated chunks and the expert chunk, with arrows V.

    Arrow directions are exact (a linear projection of V); their lengths are rescaled so the
    longest is a quarter of the point cloud's extent, and the factor is printed in the legend.
    """
    with panel_figure(
        "A1  Drifting field: generated chunks and drift V (PCA of the chunk)", theme
    ) as fig:
        for b, axes in enumerate(_subplots(fig, inputs.observations_shown)):
            x = inputs.generated[b].reshape(inputs.generated.shape[1], -1)
            y = inputs.expert[b].reshape(1, -1)
            v = inputs.drift[b].reshape(x.shape)
            mean, pcs, share = pca_2d(np.concatenate([x, y, x + v]))
            px, py, pv = (x - mean) @ pcs, (y - mean) @ pcs, v @ pcs
            extent = max(np.ptp(np.concatenate([px, py]), axis=0).max(), 1e-6)
            scale = 0.25 * extent / max(np.linalg.norm(pv, axis=1).max(), 1e-12)
            axes.scatter(*px.T, s=45, color=theme.generated, label="generated x", zorder=3)
            axes.scatter(*py.T, s=260, marker="*", color=theme.expert, label="expert", zorder=4)
            axes.quiver(
                *px.T,
                *(scale * pv).T,
                color=theme.drift,
                angles="xy",
                scale_units="xy",
                scale=1,
                width=0.006,
                label=f"drift V (x{scale:.2g})",
                zorder=2,
            )
            axes.set_title(f"observation {b}")
            axes.set_xlabel(f"PC1 ({share[0]:.0%})")
            axes.set_ylabel(f"PC2 ({share[1]:.0%})")
        _figure_legend(fig, fig.axes[0], columns=3)
        return figure_to_rgb(fig)


def lambda_v_trend(inputs: PanelInputs, theme: PanelTheme = THEME) -> np.ndarray:
    """A2: `train/lambda_V` over steps on a log scale: the convergence signal (falls as x -> data)."""
    steps, values = inputs.history.series(LAMBDA_V_KEY)
    keep = np.isfinite(values) & (values > 0)
    with panel_figure(
        "A2  lambda_V trend (raw drift norm; lower = closer to the data)", theme
    ) as fig:
        axes = fig.subplots()
        if not keep.any():
            _empty_message(axes, f"no positive '{LAMBDA_V_KEY}' logged yet")
            return figure_to_rgb(fig)
        steps, values = steps[keep], values[keep]
        axes.plot(steps, values, color=theme.generated, alpha=0.35, lw=1, label="lambda_V")
        axes.plot(steps, _smooth(values), color=theme.drift, lw=2.5, label="smoothed (EMA 0.9)")
        axes.scatter(steps[-1:], values[-1:], color=theme.drift, zorder=3)
        axes.annotate(
            f"{values[-1]:.3g}",
            (steps[-1], values[-1]),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=theme.label_size,
        )
        axes.set_yscale("log")
        axes.set_xlabel("step")
        axes.set_ylabel("lambda_V (log)")
        axes.legend(loc="upper right")
        return figure_to_rgb(fig)


def _smooth(values: np.ndarray, decay: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average, the usual smoothing of a noisy training curve."""
    out, running = np.empty_like(values), 0.0
    for i, value in enumerate(values):
        running = decay * running + (1 - decay) * value
        out[i] = running / (1 - decay ** (i + 1))
    return out


def prediction_vs_ground_truth(inputs: PanelInputs, theme: PanelTheme = THEME) -> np.ndarray:
    """A3: observation 0, each action dimension over the chunk: expert, G samples, their mean."""
    generated, expert = inputs.generated[0], inputs.expert[0]
    steps = np.arange(expert.shape[0])
    with panel_figure("A3  Prediction vs ground truth per dimension (observation 0)", theme) as fig:
        grid = _subplots(fig, len(inputs.dim_names))
        for d, axes in enumerate(grid):
            for g, sample in enumerate(generated):
                axes.plot(
                    steps,
                    sample[:, d],
                    color=theme.generated,
                    alpha=0.35,
                    lw=1,
                    label="generated samples" if g == 0 else None,
                )
            axes.plot(
                steps,
                generated[:, :, d].mean(0),
                color=theme.generated,
                lw=2.2,
                ls="--",
                label="generated mean",
            )
            axes.plot(steps, expert[:, d], color=theme.expert, lw=2.5, label="expert")
            axes.set_title(inputs.dim_names[d])
        _label_bottom_x(grid, "chunk step")
        _figure_legend(fig, fig.axes[0], columns=3)
        return figure_to_rgb(fig)


def error_radar(inputs: PanelInputs, theme: PanelTheme = THEME) -> np.ndarray:
    """A4: per dimension, RMS error to the expert next to the spread of the G samples.

    Error much larger than spread: the samples agree with each other but miss the expert (bias or
    mode collapse). Spread near zero everywhere: the generator ignores its noise.
    """
    error = np.sqrt(((inputs.generated - inputs.expert[:, None]) ** 2).mean(axis=(0, 1, 2)))
    spread = inputs.generated.std(axis=1).mean(axis=(0, 1))
    angles = np.linspace(0, 2 * np.pi, len(error), endpoint=False)
    closed = np.append(angles, angles[0])
    with panel_figure("A4  Per-dimension error (whole batch, normalized units)", theme) as fig:
        axes = fig.subplots(subplot_kw={"projection": "polar"})
        for values, color, label in (
            (error, theme.drift, "RMS error to expert"),
            (spread, theme.generated, "spread of G samples"),
        ):
            axes.plot(closed, np.append(values, values[0]), color=color, lw=2.5, label=label)
            axes.fill(closed, np.append(values, values[0]), color=color, alpha=0.15)
        axes.set_xticks(angles, inputs.dim_names, fontsize=theme.label_size)
        axes.set_ylim(0, max(error.max(), spread.max(), 1e-6) * 1.1)
        axes.tick_params(axis="x", pad=12)
        axes.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1))
        return figure_to_rgb(fig)


def loss_and_drift_norms(inputs: PanelInputs, theme: PanelTheme = THEME) -> np.ndarray:
    """A5: the loss (sits around 1..9 by design) above the raw drift norm per temperature (log)."""
    history = inputs.history
    with panel_figure("A5  Loss and raw drift norm per temperature", theme) as fig:
        loss_axes, norm_axes = fig.subplots(2, 1, sharex=True)
        for key, color in zip(LOSS_KEYS, (theme.generated, theme.expert), strict=True):
            steps, values = history.series(key)
            if len(steps):
                loss_axes.plot(steps, values, color=color, lw=1, alpha=0.35)
                loss_axes.plot(
                    steps, _smooth(values), color=color, lw=2.5, label=f"{key} (smoothed)"
                )
        loss_axes.set_ylabel("loss")
        temperature_keys = history.keys_under(RAW_DRIFT_NORM_PREFIX)
        colors = _series_colors(theme, len(temperature_keys))
        for key, color in zip(temperature_keys, colors, strict=True):
            steps, values = history.series(key)
            positive = values > 0
            norm_axes.plot(
                steps[positive],
                values[positive],
                color=color,
                lw=2,
                label=f"T = {key.removeprefix(RAW_DRIFT_NORM_PREFIX)}",
            )
        norm_axes.set_ylabel("raw drift norm (log)")
        norm_axes.set_xlabel("step")
        for axes, what in ((loss_axes, "loss"), (norm_axes, "per-temperature drift norm")):
            if axes.lines:
                axes.legend(loc="upper right")
            else:
                axes.text(0.5, 0.5, f"no {what} logged yet", ha="center", transform=axes.transAxes)
        if norm_axes.lines:
            norm_axes.set_yscale("log")
        return figure_to_rgb(fig)


def _series_colors(theme: PanelTheme, count: int) -> list:
    """`count` colors evenly spaced along the theme's series colormap (temperatures, modes)."""
    colormap = mpl.colormaps[theme.series_colormap]
    return [colormap(0.85 * i / max(count - 1, 1)) for i in range(count)]


# --------------------------------------------------------------------------------------------
# B: actions


def action_distributions(inputs: PanelInputs, theme: PanelTheme = THEME) -> np.ndarray:
    """B1: per dimension, histograms of every generated vs every expert value in the batch."""
    a = len(inputs.dim_names)
    generated = inputs.generated.reshape(-1, a)
    expert = inputs.expert.reshape(-1, a)
    with panel_figure(
        "B1  Action distributions, whole batch (density, normalized units)", theme
    ) as fig:
        for d, axes in enumerate(_subplots(fig, a)):
            both = np.concatenate([generated[:, d], expert[:, d]])
            low, high = both.min(), both.max()
            bins = np.linspace(low - 1e-6, high + 1e-6, 31)
            axes.hist(
                expert[:, d], bins=bins, density=True, color=theme.expert, alpha=0.5, label="expert"
            )
            axes.hist(
                generated[:, d],
                bins=bins,
                density=True,
                histtype="step",
                lw=2,
                color=theme.generated,
                label="generated",
            )
            axes.set_title(inputs.dim_names[d])
            axes.set_yticks([])
        _figure_legend(fig, fig.axes[0], columns=2)
        return figure_to_rgb(fig)


def error_heatmap(inputs: PanelInputs, theme: PanelTheme = THEME) -> np.ndarray:
    """B2: mean |x - expert| over the batch and the G samples, per chunk step and dimension [T x D].

    Error growing down the rows means the far end of the chunk is harder (usual); a bright column
    names the dimension the policy has not learned.
    """
    error = np.abs(inputs.generated - inputs.expert[:, None]).mean(axis=(0, 1))
    with panel_figure("B2  Action error heatmap: mean |generated - expert|", theme) as fig:
        axes = fig.subplots()
        image = axes.imshow(
            error, aspect="auto", cmap=theme.error_colormap, vmin=0, interpolation="nearest"
        )
        axes.set_xticks(range(len(inputs.dim_names)), inputs.dim_names)
        axes.set_xlabel("action dimension")
        axes.set_ylabel("chunk step")
        axes.grid(False)
        fig.colorbar(image, ax=axes, label="mean absolute error (normalized)")
        return figure_to_rgb(fig)


def end_effector_trajectory(inputs: PanelInputs, theme: PanelTheme = THEME) -> np.ndarray:
    """B4: observation 0, the chunk's end-effector path in 3D: expert vs the G generated samples.

    Delta actions are integrated from the origin (cumulative sum), absolute positions are drawn as
    they are; both in normalized units.
    """
    title = "B4  End-effector trajectory (observation 0, normalized units)"
    with panel_figure(title, theme) as fig:
        if inputs.end_effector is None:
            _empty_message(fig.subplots(), "this action spec has no end-effector position")
            return figure_to_rgb(fig)
        expert = _path(inputs.expert[0][:, inputs.end_effector], inputs.end_effector_is_delta)
        axes = fig.add_subplot(projection="3d")
        axes.set_box_aspect(None, zoom=1.1)
        for g, chunk in enumerate(inputs.generated[0]):
            path = _path(chunk[:, inputs.end_effector], inputs.end_effector_is_delta)
            axes.plot(
                *path.T,
                color=theme.generated,
                alpha=0.45,
                lw=1.2,
                label="generated" if g == 0 else None,
            )
        mean = _path(
            inputs.generated[0].mean(0)[:, inputs.end_effector], inputs.end_effector_is_delta
        )
        axes.plot(*mean.T, color=theme.generated, lw=3, ls="--", label="generated mean")
        axes.plot(*expert.T, color=theme.expert, lw=3, label="expert")
        axes.scatter(*expert[0], color=theme.neutral, s=50, label="chunk start")
        axes.scatter(*expert[-1], color=theme.expert, marker="*", s=180, label="expert end")
        for setter, name in zip(
            (axes.set_xlabel, axes.set_ylabel, axes.set_zlabel), "xyz", strict=True
        ):
            setter(name, labelpad=8)
        kind = "integrated deltas" if inputs.end_effector_is_delta else "absolute positions"
        axes.set_title(kind)
        axes.legend(loc="upper left")
        return figure_to_rgb(fig)


def _path(xyz: np.ndarray, is_delta: bool) -> np.ndarray:
    """`[T, 3]` positions; deltas are summed from the origin, which is prepended: `[T+1, 3]`."""
    if is_delta:
        return np.concatenate([np.zeros((1, 3)), np.cumsum(xyz, axis=0)])
    return xyz


# --------------------------------------------------------------------------------------------
# C: what the drift step does to the samples


def sample_transport(inputs: PanelInputs, theme: PanelTheme = THEME) -> np.ndarray:
    """C1: per observation, the G samples before (x) and after (x + V) the drift step, true scale.

    After the step the samples should sit closer to the expert, without collapsing onto one point;
    the subplot title gives the mean distance to the expert before -> after.
    """
    with panel_figure(
        "C1  Sample transport: x -> x + V (PCA of the chunk, true scale)", theme
    ) as fig:
        for b, axes in enumerate(_subplots(fig, inputs.observations_shown)):
            before = inputs.generated[b].reshape(inputs.generated.shape[1], -1)
            after = before + inputs.drift[b].reshape(before.shape)
            expert = inputs.expert[b].reshape(1, -1)
            mean, pcs, _ = pca_2d(np.concatenate([before, after, expert]))
            p_before, p_after, p_expert = ((a - mean) @ pcs for a in (before, after, expert))
            for start, end in zip(p_before, p_after, strict=True):
                axes.plot(*np.stack([start, end]).T, color=theme.neutral, lw=0.8, alpha=0.6)
            axes.scatter(
                *p_before.T,
                s=45,
                facecolors="none",
                edgecolors=theme.generated,
                lw=1.8,
                label="before: x",
            )
            axes.scatter(*p_after.T, s=45, color=theme.after_drift, label="after: x + V")
            axes.scatter(*p_expert.T, s=260, marker="*", color=theme.expert, label="expert")
            distance_before = np.linalg.norm(before - expert, axis=1).mean()
            distance_after = np.linalg.norm(after - expert, axis=1).mean()
            axes.set_title(
                f"obs {b}: distance to expert {distance_before:.2f} -> {distance_after:.2f}"
            )
            axes.set_xlabel("PC1")
            axes.set_ylabel("PC2")
        _figure_legend(fig, fig.axes[0], columns=3)
        return figure_to_rgb(fig)


def mode_coverage(inputs: PanelInputs, theme: PanelTheme = THEME, clusters: int = 6) -> np.ndarray:
    """C2: k-means modes of the batch's expert chunks, and how the generated chunks spread over them.

    Each generated chunk is assigned to its nearest mode. A mode is covered when at least one
    generated chunk lands in it; the bars compare the share of expert and generated chunks per mode
    (a generator that collapses shows one tall orange bar).
    """
    b, g = inputs.generated.shape[:2]
    expert = inputs.expert.reshape(b, -1).astype(np.float64)
    generated = inputs.generated.reshape(b * g, -1).astype(np.float64)
    k = min(clusters, b)
    centers, expert_modes = kmeans(expert, k)
    generated_modes = nearest_center(generated, centers)
    expert_share = np.bincount(expert_modes, minlength=k) / b
    generated_share = np.bincount(generated_modes, minlength=k) / (b * g)
    covered = int((generated_share > 0).sum())
    title = f"C2  Mode coverage: {covered}/{k} expert modes reached ({covered / k:.0%})"
    with panel_figure(title, theme) as fig:
        scatter_axes, bar_axes = fig.subplots(1, 2, width_ratios=(1.3, 1))
        mean, pcs, _ = pca_2d(np.concatenate([expert, generated]))
        palette = mpl.colormaps[theme.mode_colormap]
        colors = [palette(j % palette.N) for j in range(k)]
        p_generated, p_expert = (generated - mean) @ pcs, (expert - mean) @ pcs
        scatter_axes.scatter(
            *p_generated.T, s=14, marker="x", alpha=0.6, c=[colors[m] for m in generated_modes]
        )
        scatter_axes.scatter(
            *p_expert.T, s=90, edgecolors="black", c=[colors[m] for m in expert_modes]
        )
        scatter_axes.set_title("expert (dots) and generated (x) by mode")
        scatter_axes.set_xlabel("PC1")
        scatter_axes.set_ylabel("PC2")
        positions = np.arange(k)
        bar_axes.bar(positions - 0.2, expert_share, 0.4, color=theme.expert, label="expert")
        bar_axes.bar(
            positions + 0.2, generated_share, 0.4, color=theme.generated, label="generated"
        )
        bar_axes.set_xticks(positions, [f"mode {j}" for j in positions], rotation=30)
        bar_axes.set_ylabel("share of chunks")
        bar_axes.set_title("share per mode")
        bar_axes.legend(loc="upper right")
        return figure_to_rgb(fig)


# --------------------------------------------------------------------------------------------
# Registry and schedule

PANELS: dict[str, Callable[[PanelInputs], np.ndarray]] = {
    "a1_drifting_field": drifting_field,
    "a2_lambda_v_trend": lambda_v_trend,
    "a3_prediction_vs_ground_truth": prediction_vs_ground_truth,
    "a4_error_radar": error_radar,
    "a5_loss_and_drift_norms": loss_and_drift_norms,
    "b1_action_distributions": action_distributions,
    "b2_error_heatmap": error_heatmap,
    "b4_end_effector_trajectory": end_effector_trajectory,
    "c1_sample_transport": sample_transport,
    "c2_mode_coverage": mode_coverage,
}
"""Config name -> panel; the names are the keys of `training.wandb.visualizations`."""


def due_panels(step: int, visualizations: Mapping[str, Mapping]) -> list[str]:
    """Panels whose `frequency` divides `step` (frequency 0 turns a panel off).

    `visualizations` is the `training.wandb.visualizations` block (each panel's settings a mapping
    or a `PanelSchedule`, or its frequency alone); an unknown panel name or a
    missing/negative frequency is an error that names it.
    """
    unknown = sorted(set(visualizations) - set(PANELS))
    if unknown:
        raise KeyError(
            f"training.wandb.visualizations has unknown panels {unknown}; known: {sorted(PANELS)}"
        )
    due = []
    for name, settings in visualizations.items():
        frequency = settings.get("frequency") if isinstance(settings, Mapping) else getattr(settings, "frequency", settings)
        if not isinstance(frequency, int) or frequency < 0:
            raise ValueError(
                f"training.wandb.visualizations.{name}.frequency must be an integer >= 0 "
                f"(0 turns the panel off), got {frequency!r}"
            )
        if frequency and step % frequency == 0:
            due.append(name)
    return due
