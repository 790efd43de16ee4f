"""Plain-PyTorch stacked hourglass, point for point the published PyTorch port (DESIGN.md §1).

This is the twin every fused path is tested against. Module names, attribute order and therefore
state-dict keys match the port exactly, so checkpoints interchange.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Conv", "Residual", "Hourglass", "Merge", "Pool", "StackedHourglass", "check_input", "HOURGLASS_DEPTH",
           "SIDE_MULTIPLE"]

HOURGLASS_DEPTH = 4
# Stem stride (7×7 conv stride 2, then a 2×2 pool) times one 2×2 pool per hourglass level.
SIDE_MULTIPLE = 4 * 2**HOURGLASS_DEPTH


class Conv(nn.Module):
    """`nn.Conv2d` (bias always kept, 'same' padding) → optional BatchNorm → optional ReLU."""

    def __init__(self, inp_dim: int, out_dim: int, kernel_size: int = 3, stride: int = 1,
                 bn: bool = False, relu: bool = True) -> None:
        super().__init__()
        self.inp_dim = inp_dim
        self.conv = nn.Conv2d(inp_dim, out_dim, kernel_size, stride, padding=(kernel_size - 1) // 2, bias=True)
        self.relu = nn.ReLU() if relu else None
        self.bn = nn.BatchNorm2d(out_dim) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class Pool(nn.Module):
    def __init__(self, kernel_size: int = 2, stride: int = 2) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


class Residual(nn.Module):
    """Pre-activation bottleneck: (BN → ReLU → conv) ×3 (1×1, 3×3, 1×1) plus a skip.

    `skip_layer` is built in every block, as in the port, but only applied when the channel count
    changes; otherwise the identity is added.
    """

    def __init__(self, inp_dim: int, out_dim: int) -> None:
        super().__init__()
        mid = out_dim // 2
        self.relu = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(inp_dim)
        self.conv1 = Conv(inp_dim, mid, 1, relu=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = Conv(mid, mid, 3, relu=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = Conv(mid, out_dim, 1, relu=False)
        self.skip_layer = Conv(inp_dim, out_dim, 1, relu=False)
        self.need_skip = inp_dim != out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip_layer(x) if self.need_skip else x
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


class Hourglass(nn.Module):
    """One hourglass of depth `n`: up1(x) + nearest_up2x(low3(low2(low1(pool(x)))))."""

    # Subclasses swap in their own blocks; the module tree (and so the state dict) stays the same.
    residual_cls = Residual
    pool_cls = Pool

    def __init__(self, n: int, f: int, bn: bool | None = None, increase: int = 0) -> None:
        super().__init__()
        nf = f + increase
        block = self.residual_cls
        self.up1 = block(f, f)
        self.pool1 = self.pool_cls(2, 2)
        self.low1 = block(f, nf)
        self.n = n
        # `increase` is deliberately not passed down the recursion, as in the port.
        self.low2 = type(self)(n - 1, nf, bn=bn) if n > 1 else block(nf, nf)
        self.low3 = block(nf, f)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up1 = self.up1(x)
        low3 = self.low3(self.low2(self.low1(self.pool1(x))))
        return up1 + self.up2(low3)


class Merge(nn.Module):
    def __init__(self, x_dim: int, y_dim: int) -> None:
        super().__init__()
        self.conv = Conv(x_dim, y_dim, 1, relu=False, bn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def check_input(imgs: torch.Tensor, input_format: str = "NCHW") -> None:
    """Raise a clear error for an image batch the network cannot take, before any layer runs."""
    if not isinstance(imgs, torch.Tensor):
        raise TypeError(f"StackedHourglass: imgs must be a torch.Tensor, got {type(imgs).__name__}")
    if imgs.dim() != 4:
        raise ValueError(f"StackedHourglass: imgs must be 4-D {input_format}, got shape {list(imgs.shape)}")
    if not imgs.is_floating_point():
        raise TypeError(f"StackedHourglass: imgs must be a floating-point tensor, got {imgs.dtype}")
    c, h, w = imgs.shape[1:] if input_format == "NCHW" else (imgs.shape[3], imgs.shape[1], imgs.shape[2])
    if c != 3:
        raise ValueError(f"StackedHourglass: imgs must have 3 channels ({input_format}), got {c} "
                         f"in shape {list(imgs.shape)}")
    if h % SIDE_MULTIPLE or w % SIDE_MULTIPLE or h == 0 or w == 0:
        raise ValueError(f"StackedHourglass: image height and width must be positive multiples of {SIDE_MULTIPLE} "
                         f"(stride 4 stem, then {HOURGLASS_DEPTH} halvings), got {h}×{w}")


class StackedHourglass(nn.Module):
    """The port's `PoseNet(nstack, inp_dim, oup_dim, bn=False, increase=0)` in plain PyTorch.

    Input: images [B, 3, H, W] (NCHW, the default) or [B, H, W, 3] with `input_format="NHWC"` (the
    port's convention); H and W multiples of 64. Output: heatmaps [B, nstack, oup_dim, H/4, W/4].
    """

    residual_cls = Residual
    hourglass_cls = Hourglass
    pool_cls = Pool
    conv_cls = Conv  # the convolutions followed by BatchNorm and ReLU (the stem, each stack's features)

    def __init__(self, nstack: int = 8, inp_dim: int = 256, oup_dim: int = 16, bn: bool = False, increase: int = 0,
                 *, input_format: str = "NCHW") -> None:
        super().__init__()
        if input_format not in ("NCHW", "NHWC"):
            raise ValueError(f"StackedHourglass: input_format must be 'NCHW' or 'NHWC', got {input_format!r}")
        for name, value in (("nstack", nstack), ("inp_dim", inp_dim), ("oup_dim", oup_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"StackedHourglass: {name} must be a positive int, got {value!r}")
        if not isinstance(increase, int) or increase < 0:
            raise ValueError(f"StackedHourglass: increase must be a non-negative int, got {increase!r}")
        self.nstack = nstack
        self.input_format = input_format
        block = self.residual_cls
        self.pre = nn.Sequential(
            self.conv_cls(3, 64, 7, 2, bn=True, relu=True),
            block(64, 128),
            self.pool_cls(2, 2),
            block(128, 128),
            block(128, inp_dim),
        )
        self.hgs = nn.ModuleList([nn.Sequential(self.hourglass_cls(HOURGLASS_DEPTH, inp_dim, bn, increase))
                                  for _ in range(nstack)])
        self.features = nn.ModuleList([
            nn.Sequential(block(inp_dim, inp_dim), self.conv_cls(inp_dim, inp_dim, 1, bn=True, relu=True))
            for _ in range(nstack)
        ])
        self.outs = nn.ModuleList([Conv(inp_dim, oup_dim, 1, relu=False, bn=False) for _ in range(nstack)])
        self.merge_features = nn.ModuleList([Merge(inp_dim, inp_dim) for _ in range(nstack - 1)])
        self.merge_preds = nn.ModuleList([Merge(oup_dim, inp_dim) for _ in range(nstack - 1)])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        check_input(imgs, self.input_format)
        x = imgs.permute(0, 3, 1, 2) if self.input_format == "NHWC" else imgs
        x = self.pre(x)
        preds_per_stack = []
        for i in range(self.nstack):
            feature = self.features[i](self.hgs[i](x))
            preds = self.outs[i](feature)
            preds_per_stack.append(preds)
            if i < self.nstack - 1:
                x = x + self.merge_preds[i](preds) + self.merge_features[i](feature)
        return torch.stack(preds_per_stack, 1)

