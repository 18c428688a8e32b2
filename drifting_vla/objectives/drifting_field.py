"""The drifting field V of "Generative Modeling via Drifting" (Deng et al., 2026), Algorithm 2.

For B independent drift problems at once: generated samples x `[B, N, D]` are attracted by
positives and repelled by negatives. One problem = one condition (for a policy, one observation);
nothing here mixes problems, so problem b's field never depends on problem b''s data.

Layout of the target columns used throughout (C = M + P):

    targets = [ negatives (M columns) | positives (P columns) ]
               ^ when the negatives are x itself, column i of the negatives is sample i, masked

All math runs in fp32 whatever the input dtype, with exact distances: the `|x|^2 + |y|^2 - 2 x.y`
expansion loses the small distances that the T = 0.02 kernel depends on.
"""

from __future__ import annotations

import torch
from torch import Tensor

SELF_MASK_LOGIT = 1e4
"""Subtracted from a sample's logit against itself. exp(-1e4) is exactly 0 in fp32, so a sample
never repels itself (the authors' release adds 100 to the scaled distance, which for every
T <= 0.2 also underflows to exactly 0); being finite, a column never becomes all -inf, whose
softmax would be NaN."""


def pairwise_distances(x: Tensor, y: Tensor) -> Tensor:
    """Exact L2 distances (not squared) in fp32: x `[B, N, D]`, y `[B, C, D]` -> `[B, N, C]`."""
    return torch.cdist(x.float(), y.float(), compute_mode="donot_use_mm_for_euclid_dist")


def drift_from_distances(
    dist: Tensor,
    x: Tensor,
    targets: Tensor,
    *,
    num_negatives: int,
    temperature: float,
    negatives_are_x: bool,
    column_weights: Tensor | None = None,
    affinity_floor: float = 1e-6,
) -> Tensor:
    """Field for one temperature, given distances (already divided by the feature scale, if any).

    dist `[B, N, C]`, x `[B, N, D]`, targets `[B, C, D]` (negatives first, then positives),
    column_weights `[C]` or `[B, C]` (1 for ordinary columns; the guidance weight for
    unconditional negatives), applied to the affinities after both softmaxes.
    `negatives_are_x`: the first N negative columns are x itself, so their diagonal is masked.
    Returns V `[B, N, D]` in the coordinates of x and targets.

    Written as V_i = sum_c coeff_ic (y_c - x_i): the coefficients sum to zero analytically, and
    subtracting x_i explicitly keeps that true numerically, so V is exactly translation invariant.
    """
    logits = -dist / temperature
    if negatives_are_x:
        n = x.shape[1]
        self_mask = torch.zeros(n, dist.shape[-1], dtype=dist.dtype, device=dist.device)
        self_mask[:, :n].fill_diagonal_(SELF_MASK_LOGIT)
        logits = logits - self_mask
    affinity = torch.softmax(logits, dim=-1) * torch.softmax(logits, dim=-2)
    affinity = affinity.clamp_min(affinity_floor).sqrt() if affinity_floor > 0 else affinity.sqrt()
    if column_weights is not None:
        affinity = affinity * (column_weights if column_weights.dim() == 2 else column_weights[None]).unsqueeze(1)
    aff_neg, aff_pos = affinity[..., :num_negatives], affinity[..., num_negatives:]
    coeff = torch.cat(
        [-aff_neg * aff_pos.sum(-1, keepdim=True), aff_pos * aff_neg.sum(-1, keepdim=True)], dim=-1
    )
    return coeff @ targets - coeff.sum(-1, keepdim=True) * x


def compute_drift(
    x: Tensor,
    y_pos: Tensor,
    y_neg: Tensor | None = None,
    *,
    temperature: float,
    affinity_floor: float = 1e-6,
) -> Tensor:
    """Raw drifting field for B independent problems, in the coordinates it was given.

    x `[B, N, D]` generated, y_pos `[B, P, D]` positives, y_neg `[B, M, D]` negatives or None
    (None: the negatives are x itself, self-masked). Returns V `[B, N, D]` (fp32).

    `affinity_floor=0` is the paper's Algorithm 2 exactly (Laplace kernel exp(-d / T) on plain
    L2 distances, self-mask, geometric mean of the row and column softmaxes). The default 1e-6 is
    the floor of the authors' release, `A = sqrt(max(A_row * A_col, 1e-6))`.
    """
    x = x.float()
    negatives = x if y_neg is None else y_neg.float()
    targets = torch.cat([negatives, y_pos.float()], dim=1)
    return drift_from_distances(
        pairwise_distances(x, targets),
        x,
        targets,
        num_negatives=negatives.shape[1],
        temperature=temperature,
        negatives_are_x=y_neg is None,
        affinity_floor=affinity_floor,
    )
