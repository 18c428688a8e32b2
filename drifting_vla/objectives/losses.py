"""DriftingLoss: the multi-temperature, normalized drifting objective (docs/drifting.md, the normalized multi-temperature loss).

    x [B, G, T, A] generated  --group-->  problems of G samples, D features each:
        chunk:      B problems,   D = T*A  (the whole chunk of one observation)
        timestep:   B*T problems, D = A    (each chunk step of one observation)
        dimension:  B*A problems, D = T    (each action dimension's trajectory of one observation)
    S      = weighted mean generated-to-target distance over ALL problems (global across ranks)
    s_in   = S / sqrt(D)                   work in x / s_in: the mean distance is about sqrt(D)
             (S and s_in clipped at 1e-3 as in the authors' release: when the G samples of every
             problem collapse onto their target, the gradient would otherwise grow as 1 / s_in)
    V_T    = field at temperature T on distances / S, in x / s_in coordinates
    lambda_T = RMS of V_T over all problems and dims (global across ranks)
    V      = sum_T V_T / lambda_T          normalized per temperature, then summed
    loss   = mean((x / s_in - stopgrad(x / s_in + V))^2)

The loss value sits around 1..9 by construction and never reaches zero; its gradient is
d loss / d x = -2 V / (numel(x) * s_in). Convergence is read from `lambda_V` and the
per-temperature `raw_drift_norm/<T>`, which do go down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from drifting_vla.distributed import all_reduce_sum
from drifting_vla.objectives.drifting_field import drift_from_distances, pairwise_distances

GROUPINGS = ("chunk", "timestep", "dimension")
SCALE_FLOOR = 1e-3
"""The release's floor on the feature scale S and on s_in = S / sqrt(D): collapsed samples
(S -> 0) would otherwise blow the normalized coordinates x / s_in, and the gradient, up."""


@dataclass
class DriftingOutput:
    """`loss`: scalar to backpropagate. `field`: the normalized field V in x's own coordinates
    (`V * s_in`, shaped like x), i.e. where this step moves each sample. `raw_field`: the sum of
    the unnormalized per-temperature fields, same coordinates; unlike `field` it goes to zero at
    equilibrium. `metrics`: 0-dim detached tensors (no host sync until the caller logs them)."""

    loss: Tensor
    field: Tensor
    raw_field: Tensor
    metrics: dict[str, Tensor]


class DriftingLoss(nn.Module):
    """One drift problem per condition; statistics global across data-parallel ranks; fp32 math.

    Args:
        temperatures: kernel temperatures, in units of the feature scale S.
        affinity_floor: the release's `sqrt(max(A_row * A_col, floor))`; 0 is Algorithm 2 exactly.
        grouping: how x `[B, G, T, A]` splits into drift problems (module docstring). Every
            grouping keeps the observation: samples of different observations never share a problem.
    """

    def __init__(
        self,
        temperatures: Sequence[float] = (0.02, 0.05, 0.2),
        *,
        affinity_floor: float = 1e-6,
        grouping: str = "chunk",
    ) -> None:
        super().__init__()
        if not temperatures or any(t <= 0 for t in temperatures):
            raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {temperatures}")
        self.temperatures = tuple(float(t) for t in temperatures)
        self.affinity_floor = affinity_floor
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping={grouping!r} is unknown; choose from {GROUPINGS}")
        self.grouping = grouping

    def forward(
        self,
        x: Tensor,
        y_pos: Tensor,
        y_neg: Tensor | None = None,
        neg_weight: float | Tensor = 1.0,
        pos_weight: float | Tensor = 1.0,
    ) -> DriftingOutput:
        """x `[B, G, ...]` generated; y_pos `[B, P, ...]` expert samples of the same condition;
        y_neg `[B, K, ...]` optional unconditional negatives (e.g. expert chunks of OTHER
        observations, for guidance) with weight `neg_weight` (scalar or `[K]`), the paper's
        `(alpha - 1)(G - 1) / K`. The generated samples are always negatives too (self-masked).
        `pos_weight` (scalar or `[P]`) weights the positive columns the same way, after the
        softmaxes and in S: 1 (the paper) counts every positive alike; below 1 an extra positive
        (a neighbour's chunk) pulls less than the observation's own expert chunk."""
        _check_shapes(x, y_pos, y_neg)
        gen = self._problems(x)
        extra = [] if y_neg is None else [self._problems(y_neg.detach())]
        pos = self._problems(y_pos.detach())
        num_problems, num_gen, feat_dim = gen.shape

        # fp32 field math even inside the trainer's bf16 autocast (which would recast the matmuls).
        with torch.no_grad(), torch.autocast(gen.device.type, enabled=False):
            gen_fixed = gen.detach().float()
            targets = torch.cat([gen_fixed, *[e.float() for e in extra], pos.float()], dim=1)
            weights = self._column_weights(num_gen, extra, pos.shape[1], neg_weight, pos_weight, gen.device)
            distances = pairwise_distances(gen_fixed, targets)

            weighted_sum = (distances * weights).sum()
            weight_total = weights.sum() * num_gen * num_problems
            weighted_sum, weight_total = all_reduce_sum(torch.stack([weighted_sum, weight_total]))
            feature_scale = (weighted_sum / weight_total).clamp_min(SCALE_FLOOR)
            s_in = (feature_scale / math.sqrt(feat_dim)).clamp_min(SCALE_FLOOR)

            x_scaled, targets_scaled = gen_fixed / s_in, targets / s_in
            raw_fields = [
                drift_from_distances(
                    distances / feature_scale,
                    x_scaled,
                    targets_scaled,
                    num_negatives=targets.shape[1] - pos.shape[1],
                    temperature=t,
                    negatives_are_x=True,
                    column_weights=weights,
                    affinity_floor=self.affinity_floor,
                )
                for t in self.temperatures
            ]
            summed_raw = torch.stack(raw_fields).sum(0)
            squares = torch.stack([v.square().sum() for v in [*raw_fields, summed_raw]])
            count = torch.tensor(float(summed_raw.numel()), device=gen.device)
            sums = all_reduce_sum(torch.cat([squares, count[None]]))
            rms = (sums[:-1] / sums[-1]).sqrt()
            lambdas = rms[:-1].clamp_min(1e-4)
            field_scaled = sum(v / lam for v, lam in zip(raw_fields, lambdas, strict=True))
            goal = x_scaled + field_scaled

        with torch.autocast(gen.device.type, enabled=False):
            loss = (gen.float() / s_in - goal).square().mean()
        metrics = {
            "loss": loss.detach(),
            "lambda_V": rms[-1],
            "raw_drift_norm": rms[-1] * s_in,
            "feature_scale": feature_scale,
            **{f"raw_drift_norm/{t:g}": lam for t, lam in zip(self.temperatures, rms[:-1], strict=True)},
        }
        return DriftingOutput(
            loss=loss,
            field=self._unproblems(field_scaled * s_in, x.shape),
            raw_field=self._unproblems(summed_raw * s_in, x.shape),
            metrics=metrics,
        )

    def _problems(self, samples: Tensor) -> Tensor:
        """`[B, S, T, A]` (or any `[B, S, ...]` for chunk grouping) -> `[problems, S, D]`."""
        if self.grouping == "chunk":
            return samples.flatten(2)
        if samples.dim() != 4:
            raise ValueError(f"grouping={self.grouping!r} needs [B, G, T, A] chunks, got shape {tuple(samples.shape)}")
        b, s, t, a = samples.shape
        if self.grouping == "timestep":
            return samples.permute(0, 2, 1, 3).reshape(b * t, s, a)
        return samples.permute(0, 3, 1, 2).reshape(b * a, s, t)

    def _unproblems(self, field: Tensor, shape: torch.Size) -> Tensor:
        if self.grouping == "chunk":
            return field.reshape(shape)
        b, g, t, a = shape
        if self.grouping == "timestep":
            return field.reshape(b, t, g, a).permute(0, 2, 1, 3)
        return field.reshape(b, a, g, t).permute(0, 2, 3, 1)

    @staticmethod
    def _column_weights(
        num_gen: int, extra: list[Tensor], num_pos: int, neg_weight: float | Tensor, pos_weight: float | Tensor,
        device: torch.device,
    ) -> Tensor:
        """Weights of the target columns `[C]`: 1 for generated columns, the guidance weight for
        unconditional negatives, `pos_weight` for positives."""
        parts = [torch.ones(num_gen, device=device)]
        if extra:
            k = extra[0].shape[1]
            parts.append(torch.as_tensor(neg_weight, dtype=torch.float32, device=device).expand(k).clone())
        parts.append(torch.as_tensor(pos_weight, dtype=torch.float32, device=device).expand(num_pos).clone())
        return torch.cat(parts)


def _check_shapes(x: Tensor, y_pos: Tensor, y_neg: Tensor | None) -> None:
    for name, y in (("y_pos", y_pos), ("y_neg", y_neg)):
        if y is not None and (y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]):
            raise ValueError(
                f"{name} has shape {tuple(y.shape)} but x has {tuple(x.shape)}: expected [B, *, "
                f"{', '.join(map(str, x.shape[2:]))}] with the same B (one drift problem per condition)"
            )
    if x.shape[1] < 2:
        raise ValueError(f"x has G={x.shape[1]} samples per condition; the drifting loss needs G >= 2")

