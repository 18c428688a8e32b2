"""2D target distributions for the lab, each a Gaussian mixture so the diffusion baseline can use
its exact score: "8 gaussians" has 8 components; point-cloud shapes (ring, S-curve,
checkerboard, an image mask) are the Gaussian kernel density of a fixed set of points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from drifting_vla.logging.visualizations import kmeans

TARGETS = ("gaussians", "ring", "s_curve", "checkerboard", "image")


@dataclass
class Target:
    """An isotropic Gaussian mixture with equal weights: centers `[K, 2]`, one std.

    `modes` `[M, 2]` and `mode_radius` define what "covering a mode" means for the metrics.
    """

    name: str
    centers: Tensor
    std: float
    modes: Tensor
    mode_radius: float

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        idx = torch.randint(len(self.centers), (n,), generator=generator)
        return self.centers[idx] + self.std * torch.randn(n, 2, generator=generator)

    def score(self, x: Tensor, mean_scale: float, noise_var: float) -> Tensor:
        """Exact score of the mixture after x -> mean_scale * x + N(0, noise_var): `[N, 2]`."""
        var = mean_scale**2 * self.std**2 + noise_var
        diff = mean_scale * self.centers[None] - x[:, None]  # [N, K, 2]
        log_resp = -(diff.square().sum(-1)) / (2 * var)
        resp = torch.softmax(log_resp, dim=1)
        return (resp[..., None] * diff).sum(1) / var


def make_target(name: str, *, clusters: int = 8, seed: int = 0, image: Path | None = None) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose from {TARGETS}")
    if name == "gaussians":
        angles = torch.arange(clusters) * (2 * math.pi / clusters)
        centers = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
        return Target(name, centers, 0.1, centers, 0.4)
    rng = np.random.default_rng(seed)
    points = {"ring": _ring, "s_curve": _s_curve, "checkerboard": _checkerboard, "image": _image_points}[name](rng, image)
    centers = torch.as_tensor(points, dtype=torch.float32)
    modes = torch.as_tensor(kmeans(points, clusters, seed=seed)[0], dtype=torch.float32)
    spread = torch.cdist(centers, modes).min(1).values.mean().item()
    return Target(name, centers, 0.04, modes, 2.0 * spread)


def _ring(rng: np.random.Generator, _image) -> np.ndarray:
    angles = rng.uniform(0, 2 * np.pi, 1500)
    return 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)


def _s_curve(rng: np.random.Generator, _image) -> np.ndarray:
    t = rng.uniform(-1.5 * np.pi, 1.5 * np.pi, 1500)
    return np.stack([np.sin(t), np.sign(t) * (np.cos(t) - 1)], 1) * 1.2


def _checkerboard(rng: np.random.Generator, _image) -> np.ndarray:
    x = rng.uniform(-2, 2, 6000)
    y = rng.uniform(-2, 2, 6000)
    keep = (np.floor(x) + np.floor(y)) % 2 == 0
    return np.stack([x[keep], y[keep]], 1)[:1500]


def _image_points(rng: np.random.Generator, image: Path | None) -> np.ndarray:
    """Points on the dark pixels of an image (any format Pillow reads), scaled to [-2, 2]."""
    if image is None:
        raise ValueError("target 'image' needs --image PATH (dark pixels become the target)")
    from PIL import Image

    try:
        gray = np.asarray(Image.open(image).convert("L"), dtype=np.float32) / 255.0
    except OSError as err:
        raise ValueError(f"cannot read image {image}: {err}") from err
    rows, cols = np.nonzero(gray < 0.5)
    if len(rows) == 0:
        raise ValueError(f"image {image} has no dark pixels (value < 128) to use as the target")
    pick = rng.choice(len(rows), size=min(1500, len(rows)), replace=False)
    h, w = gray.shape
    size = max(h, w)
    xy = np.stack([cols[pick] - w / 2, h / 2 - rows[pick]], 1) / size * 4.0
    return xy + rng.uniform(-0.5, 0.5, xy.shape) * 4.0 / size
