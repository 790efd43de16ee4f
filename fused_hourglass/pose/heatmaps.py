"""MPII keypoint layout and Gaussian target heatmaps in the stacked-hourglass convention."""

from __future__ import annotations

import math

import torch

MPII_JOINTS: tuple[str, ...] = (
    "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax",
    "upper_neck", "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist",
)
"""The 16 MPII joint names, in the dataset's index order."""

MPII_FLIP: tuple[int, ...] = (5, 4, 3, 2, 1, 0, 6, 7, 8, 9, 15, 14, 13, 12, 11, 10)
"""Joint permutation of a horizontal mirror: joint ``j`` of a mirrored person is joint ``MPII_FLIP[j]``."""

MPII_SKELETON: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 2), (5, 4), (4, 3),  # ankle - knee - hip, right then left
    (6, 2), (6, 3), (6, 7),  # pelvis - hips, pelvis - thorax
    (7, 8), (8, 9),  # thorax - upper neck - head top
    (10, 11), (11, 12), (15, 14), (14, 13),  # wrist - elbow - shoulder, right then left
    (12, 7), (13, 7),  # shoulders - thorax
)
"""Limbs as (a, b) joint-index pairs, for drawing; the 15 edges form a tree over the 16 joints."""


def make_heatmaps(joints: torch.Tensor, out_res: int, sigma: float | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian target heatmaps, one per joint, exactly as the port's ``GenerateHeatmap``.

    The port's rule (reproduced to float32 rounding): a patch ``g[k, l] = exp(-((l - c)^2 + (k - c)^2) / (2 sigma^2))``
    for ``k, l`` in ``0 .. ceil(6 sigma + 3) - 1``, ``c = 3 sigma + 1``, is pasted with its top-left corner at
    ``ul = int(x - 3 sigma - 1)`` (end ``br = int(x + 3 sigma + 2)``, exclusive) where ``x = int(joint_x)``; likewise
    in y, clipped at the borders. ``int`` truncates toward zero (also in ``ul``, which matters when it is negative).
    The peak is 1 at the truncated position only when ``3 sigma`` is an integer; for fractional sigma (out_res 32 or
    16 with the default) the patch is off-centre by the fractional part, as in the port.

    Args:
        joints: [B, J, 2] (x, y) in heatmap pixels, any real dtype (computed in float64).
        out_res: side R of the square heatmaps.
        sigma: Gaussian sigma in heatmap pixels; ``None`` means ``out_res / 64`` (the port's).
        mask: optional [B, J] bool, False drops the joint.

    Returns:
        float32 [B, J, R, R] (rows are y). A joint gives an all-zero map when ``joint_x <= 0`` (unannotated), when its
        truncated position lies outside ``[0, R)`` or when it is masked out.
    """
    if not isinstance(joints, torch.Tensor) or joints.ndim != 3 or joints.shape[-1] != 2:
        got = tuple(joints.shape) if isinstance(joints, torch.Tensor) else type(joints).__name__
        raise ValueError(f"joints: expected a tensor of shape [B, J, 2], got {got}")
    if joints.is_complex() or joints.dtype == torch.bool:
        raise TypeError(f"joints: expected a real-valued tensor, got dtype {joints.dtype}")
    if isinstance(out_res, bool) or not isinstance(out_res, int) or out_res <= 0:
        raise ValueError(f"out_res: expected a positive int, got {out_res!r}")
    s = out_res / 64 if sigma is None else float(sigma)
    if not s > 0 or not math.isfinite(s):
        raise ValueError(f"sigma: expected a positive finite number or None, got {sigma!r}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(joints.shape[:2])):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a bool tensor of shape {tuple(joints.shape[:2])} ([B, J]), got {got}")

    pts = joints.to(torch.float64)
    xi, yi = pts.unbind(-1)
    valid = xi > 0  # also False for NaN
    xi, yi = torch.trunc(xi), torch.trunc(yi)
    valid &= (xi >= 0) & (yi >= 0) & (xi < out_res) & (yi < out_res)
    if mask is not None:
        valid &= mask.to(device=valid.device, dtype=torch.bool)
    xi, yi = torch.where(valid, xi, 0.0), torch.where(valid, yi, 0.0)

    n, c = math.ceil(6 * s + 3), 3 * s + 1  # patch size as np.arange(0, 6s + 3) gives it, patch centre
    grid = torch.arange(out_res, dtype=torch.float64, device=pts.device)

    def axis_terms(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ul, br = torch.trunc(t - 3 * s - 1), torch.trunc(t + 3 * s + 2)  # same float ops as the port's int(...)
        k = grid - ul[..., None]  # [B, J, R] patch index of each pixel
        inside = (k >= 0) & (k < n) & (grid < br[..., None])
        return (k - c) ** 2, inside

    dx2, in_x = axis_terms(xi)
    dy2, in_y = axis_terms(yi)
    g = torch.exp(-(dx2[..., None, :] + dy2[..., :, None]) / (2 * s**2))
    keep = in_y[..., :, None] & in_x[..., None, :] & valid[..., None, None]
    return torch.where(keep, g, 0.0).to(torch.float32)
