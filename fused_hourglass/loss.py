"""The port's heatmap loss with intermediate supervision (DESIGN.md §1.8)."""

from __future__ import annotations

import torch
from torch import nn


class HeatmapLoss(nn.Module):
    """Mean squared error per sample over (C, H, W), for every stack against the same target.

    Args:
        reduction: "mean" (default) averages over stacks and batch to a scalar; "none" returns the
            port's combined loss, [B, nstack].
    Shapes: pred [B, nstack, C, H, W] (the model's output), target [B, C, H, W].
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "none"):
            raise ValueError(f"HeatmapLoss: reduction must be 'mean' or 'none', got {reduction!r}")
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.dim() != 5:
            raise ValueError(f"HeatmapLoss: pred must be 5-D [B, nstack, C, H, W], got shape {list(pred.shape)}")
        if target.dim() != 4 or target.shape[0] != pred.shape[0] or target.shape[1:] != pred.shape[2:]:
            raise ValueError(f"HeatmapLoss: target must be [B, C, H, W] = {[pred.shape[0], *pred.shape[2:]]} "
                             f"to match pred {list(pred.shape)}, got {list(target.shape)}")
        per_stack = ((pred - target.unsqueeze(1)) ** 2).mean(dim=(2, 3, 4))
        return per_stack if self.reduction == "none" else per_stack.mean()
