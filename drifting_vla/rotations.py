"""Rotations as the network sees them: the continuous 6D representation (Zhou et al., "On the
Continuity of Rotation Representations in Neural Networks", CVPR 2019), as 3D Diffuser Actor uses.

Datasets and simulators speak quaternions `[qx, qy, qz, qw]`; q and -q are the same rotation, so
any sign convention (e.g. qw >= 0) is discontinuous somewhere. RLBench grippers sit exactly there:
a top-down grasp has qw = 0 for any yaw, and a 1 degree tilt either way flips the canonical sign.
The 6D form, the first two columns of the rotation matrix, is the same for q and -q and varies
continuously with the rotation:

    quaternion [..., 4] --quaternion_to_rotation6d--> [..., 6] = [R[:, 0], R[:, 1]]
    [..., 6] --rotation6d_to_quaternion (Gram-Schmidt, then qw >= 0)--> quaternion [..., 4]

Torch only, no other module of ours: data/ (the normalizer) and models/ (the decoder) share it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """[..., 4] as [qx, qy, qz, qw] (any length) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = F.normalize(q, dim=-1, eps=1e-8).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quaternion(m: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> [..., 4] as [qx, qy, qz, qw], unit, qw >= 0.

    Each of the four candidate formulas divides by one of |qx|, |qy|, |qz|, |qw|; the one with
    the largest denominator is taken, so the result is accurate for every rotation."""
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    four_sq = torch.stack(  # 4 qx^2, 4 qy^2, 4 qz^2, 4 qw^2
        [1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22, 1 + m00 + m11 + m22], dim=-1
    ).clamp_min(0)
    candidates = torch.stack(  # row k: 4 q_k times the quaternion [qx, qy, qz, qw]
        [
            torch.stack([four_sq[..., 0], m01 + m10, m02 + m20, m21 - m12], dim=-1),
            torch.stack([m01 + m10, four_sq[..., 1], m12 + m21, m02 - m20], dim=-1),
            torch.stack([m02 + m20, m12 + m21, four_sq[..., 2], m10 - m01], dim=-1),
            torch.stack([m21 - m12, m02 - m20, m10 - m01, four_sq[..., 3]], dim=-1),
        ],
        dim=-2,
    )
    best = four_sq.argmax(dim=-1)
    q = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = F.normalize(q, dim=-1, eps=1e-12)
    return torch.where(q[..., 3:4] < 0, -q, q)


def rotation6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """[..., 6] (two 3-vectors, any length, not parallel) -> rotation matrices [..., 3, 3] by
    Gram-Schmidt: the columns are a1/|a1|, the part of a2 orthogonal to it, and their cross product."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1, eps=1e-8)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1, eps=1e-8)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def quaternion_to_rotation6d(q: torch.Tensor) -> torch.Tensor:
    """[..., 4] -> [..., 6]: the first two columns of the rotation matrix (equal for q and -q)."""
    m = quaternion_to_matrix(q)
    return torch.cat([m[..., :, 0], m[..., :, 1]], dim=-1)


def rotation6d_to_quaternion(d6: torch.Tensor) -> torch.Tensor:
    """[..., 6] -> [..., 4] as [qx, qy, qz, qw], unit, qw >= 0."""
    return matrix_to_quaternion(rotation6d_to_matrix(d6))


def orthonormal_rotation6d(d6: torch.Tensor) -> torch.Tensor:
    """[..., 6] -> the 6D form of the nearest-by-Gram-Schmidt rotation: a valid rotation's columns."""
    m = rotation6d_to_matrix(d6)
    return torch.cat([m[..., :, 0], m[..., :, 1]], dim=-1)
