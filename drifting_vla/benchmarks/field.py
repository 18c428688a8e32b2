"""The drifting field and loss, batched, against a naive per-problem Python loop in the same run.

Cases (docs/drifting.md#cost): a policy-sized batch (B=256 observations, N=8 generated chunks,
P=1 expert chunk, D=128) and an image-sized one (B=64, N=64, P=64, D=256).
"""

from __future__ import annotations

import math

import torch

from drifting_vla.benchmarks.timing import Row, time_call
from drifting_vla.objectives.drifting_field import (
    compute_drift,
    drift_from_distances,
    pairwise_distances,
)
from drifting_vla.objectives.losses import DriftingLoss

SIZES = {"policy B256 N8 P1 D128": (256, 8, 1, 128), "image B64 N64 P64 D256": (64, 64, 64, 256)}
TEMPERATURES = (0.02, 0.05, 0.2)


def run(args) -> list[Row]:
    return [row for label, size in SIZES.items() for row in _rows_for(label, *size, device=args.device)]


def _rows_for(label: str, b: int, n: int, p: int, d: int, device: str) -> list[Row]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=g).to(device)
    y = torch.randn(b, p, d, generator=g).to(device)
    loss_fn = DriftingLoss(TEMPERATURES)

    def loss_step():
        xg = x.clone().requires_grad_(True)
        loss_fn(xg, y).loss.backward()

    def naive_loss_step():
        xg = x.clone().requires_grad_(True)
        _naive_loss(xg, y).backward()

    loop, loss_loop = f"{label} loop over problems", f"{label} loss fwd+bwd loop"
    return [
        Row("field", loop, time_call(lambda: _naive_field(x, y), repeats=3)),
        Row("field", f"{label} batched", time_call(lambda: compute_drift(x, y, temperature=0.05)), baseline=loop),
        Row("field", loss_loop, time_call(naive_loss_step, repeats=3)),
        Row("field", f"{label} loss fwd+bwd batched", time_call(loss_step), baseline=loss_loop, extra={"temperatures": len(TEMPERATURES)}),
    ]


def _naive_field(x, y):
    return torch.cat([compute_drift(x[i : i + 1], y[i : i + 1], temperature=0.05) for i in range(x.shape[0])])


def _naive_loss(x, y):
    """The same objective computed the obvious way: problem by problem, distances recomputed for
    the scale and for every temperature."""
    b, n, d = x.shape
    xd = x.detach()
    with torch.no_grad():
        scale = sum(pairwise_distances(xd[i : i + 1], torch.cat([xd[i : i + 1], y[i : i + 1]], 1)).sum() for i in range(b))
        scale = scale / (b * n * (n + y.shape[1]))
        s_in = scale / math.sqrt(d)
        field = torch.zeros_like(xd)
        for t in TEMPERATURES:
            per_t = []
            for i in range(b):
                targets = torch.cat([xd[i : i + 1], y[i : i + 1]], 1) / s_in
                dist = pairwise_distances(xd[i : i + 1], torch.cat([xd[i : i + 1], y[i : i + 1]], 1)) / scale
                per_t.append(drift_from_distances(dist, xd[i : i + 1] / s_in, targets, num_negatives=n, temperature=t, negatives_are_x=True))
            per_t = torch.cat(per_t)
            field += per_t / per_t.square().mean().sqrt()
        goal = xd / s_in + field
    return (x / s_in - goal).square().mean()
