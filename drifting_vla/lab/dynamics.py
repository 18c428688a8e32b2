"""The three things the lab runs on a 2D target.

- particles:  x <- x + step * V_raw(x) (+ Brownian noise): the field itself, no network. The raw
              (unnormalized) field, because it vanishes at equilibrium; the normalized field
              keeps unit RMS by construction and would make converged particles jitter.
- generator:  a one-step MLP generator trained with DriftingLoss; sampling is 1 NFE.
- diffusion:  the baseline, reverse VP-SDE (Euler-Maruyama) or probability-flow ODE (RK4) with
              the target's exact score, so its only error is discretization: what NFE buys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from drifting_vla.lab.targets import Target
from drifting_vla.objectives.losses import DriftingLoss

LAB_AFFINITY_FLOOR = 0.0
"""Algorithm 2 exactly. The release's floor (1e-6 on A_row * A_col) is meant for small problems:
with hundreds of samples per problem the uniform product is ~1/N^2, the floor swamps the kernel,
every target gets the same affinity and all samples are pulled to the target's mean (at N=512
on 8 gaussians the generator collapses to the centre). A policy has G=8 per problem, where the
floor is negligible."""


@dataclass
class Frame:
    """One picture: samples `[N, 2]` and the raw drift field at them `[N, 2]` (None for diffusion)."""

    step: int
    samples: Tensor
    field: Tensor | None = None


@dataclass
class LabRun:
    mode: str
    samples: Tensor
    nfe: int
    seconds: float
    frames: list[Frame] = field(default_factory=list)


def run_particles(
    target: Target,
    *,
    particles: int = 512,
    positives: int = 512,
    steps: int = 300,
    step_size: float = 1.0,
    noise: float = 0.0,
    temperatures: Sequence[float] = (0.02, 0.05, 0.2),
    affinity_floor: float = LAB_AFFINITY_FLOOR,
    frames: int = 30,
    seed: int = 0,
) -> LabRun:
    """Particles start as N(0, I) and follow the raw multi-temperature field, with a fresh batch
    of positives every step (as a training step sees)."""
    g = torch.Generator().manual_seed(seed)
    loss = DriftingLoss(temperatures, affinity_floor=affinity_floor)
    x = torch.randn(particles, 2, generator=g)
    every = max(1, steps // frames)
    shots = []
    start = time.perf_counter()
    for step in range(steps + 1):
        drift = loss(x[None], target.sample(positives, g)[None]).raw_field[0]
        if step % every == 0 or step == steps:
            shots.append(Frame(step, x.clone(), drift.clone()))
        if step < steps:
            x = x + step_size * drift + noise * math.sqrt(step_size) * torch.randn(x.shape, generator=g)
    return LabRun("particles", x, nfe=0, seconds=time.perf_counter() - start, frames=shots)


class MLPGenerator(nn.Module):
    """noise `[N, noise_dim]` -> sample `[N, 2]` in one forward pass."""

    def __init__(self, noise_dim: int = 8, hidden: int = 256, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = noise_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)
        self.noise_dim = noise_dim

    def forward(self, noise: Tensor) -> Tensor:
        return self.net(noise)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self(torch.randn(n, self.noise_dim, generator=generator))


def train_generator(
    target: Target,
    *,
    samples: int = 256,
    positives: int = 256,
    steps: int = 1500,
    lr: float = 1e-3,
    temperatures: Sequence[float] = (0.02, 0.05, 0.2),
    affinity_floor: float = LAB_AFFINITY_FLOOR,
    frames: int = 30,
    eval_samples: int = 2000,
    seed: int = 0,
) -> LabRun:
    """Train the one-step generator; frames show its samples and the field during training."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MLPGenerator()
    loss_fn = DriftingLoss(temperatures, affinity_floor=affinity_floor)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.05)
    every = max(1, steps // frames)
    shots = []
    start = time.perf_counter()
    for step in range(steps + 1):
        x = model.sample(samples, g)
        out = loss_fn(x[None], target.sample(positives, g)[None])
        if step % every == 0 or step == steps:
            shots.append(Frame(step, x.detach().clone(), out.raw_field[0].detach().clone()))
        if step < steps:
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final = model.sample(eval_samples, g)
    return LabRun("generator", final, nfe=1, seconds=seconds, frames=shots)


def reverse_diffusion(
    target: Target,
    *,
    method: str = "sde",
    steps: int = 100,
    samples: int = 2000,
    frames: int = 30,
    beta_min: float = 0.1,
    beta_max: float = 20.0,
    seed: int = 0,
) -> LabRun:
    """Sample the VP-SDE (beta linear in t) backwards from t=1 to t=eps with the exact score.

    NFE: `steps` for Euler-Maruyama ("sde"); 4 * `steps` for RK4 on the probability-flow ODE ("ode").
    """
    if method not in ("sde", "ode"):
        raise ValueError(f"method must be 'sde' or 'ode', got {method!r}")
    g = torch.Generator().manual_seed(seed)

    def beta(t: float) -> float:
        return beta_min + t * (beta_max - beta_min)

    def score(x: Tensor, t: float) -> Tensor:
        log_mean = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        mean_scale = math.exp(log_mean)
        return target.score(x, mean_scale, 1.0 - mean_scale**2)

    def ode_drift(x: Tensor, t: float) -> Tensor:
        return -0.5 * beta(t) * (x + score(x, t))

    eps = 1e-3
    ts = torch.linspace(1.0, eps, steps + 1).tolist()
    x = torch.randn(samples, 2, generator=g)
    every = max(1, steps // frames)
    shots = [Frame(0, x.clone())]
    start = time.perf_counter()
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]  # dt < 0: integrating backwards in time
        if method == "sde":
            drift = -0.5 * beta(t) * x - beta(t) * score(x, t)
            x = x + drift * dt + math.sqrt(beta(t) * -dt) * torch.randn(x.shape, generator=g)
        else:
            k1 = ode_drift(x, t)
            k2 = ode_drift(x + 0.5 * dt * k1, t + 0.5 * dt)
            k3 = ode_drift(x + 0.5 * dt * k2, t + 0.5 * dt)
            k4 = ode_drift(x + dt * k3, t + dt)
            x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if (i + 1) % every == 0 or i + 1 == steps:
            shots.append(Frame(i + 1, x.clone()))
    nfe = steps if method == "sde" else 4 * steps
    return LabRun(f"diffusion-{method}", x, nfe=nfe, seconds=time.perf_counter() - start, frames=shots)
