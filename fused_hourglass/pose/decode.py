"""Heatmap decoding (the port's HeatmapParser with its quarter-pixel adjustment) and flip-test inference."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .heatmaps import MPII_FLIP


def decode_heatmaps(heatmaps: torch.Tensor, stride: float = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint coordinates and confidences from heatmaps, by the port's rule.

    1. 3x3 max-pool NMS (stride 1, pad 1): values equal to their pooled maximum are kept, others become 0.
    2. Per joint, the (first) argmax of the NMS map gives integer (x, y); the confidence is the raw value there.
    3. On the raw heatmap, x moves +0.25 when the right neighbour is strictly larger than the left one and -0.25
       otherwise (so a tie, e.g. a symmetric peak, moves -0.25: the port's rule); likewise y with the neighbours
       below/above. Neighbour indices are clamped at the borders. Then +0.5, then x ``stride``.
       As in the port, step 3's shift and the +0.5 apply only where the confidence is > 0; other joints return
       ``argmax * stride``.

    Args:
        heatmaps: [B, J, H, W], or [B, nstack, J, H, W] (the last stack is used); floating point.
        stride: input pixels per heatmap pixel.

    Returns:
        coords [B, J, 2] (x, y) in input pixels (float32, or float64 for float64 heatmaps) and confidences [B, J]
        in the heatmaps' dtype.
    """
    if not isinstance(heatmaps, torch.Tensor) or heatmaps.ndim not in (4, 5):
        got = tuple(heatmaps.shape) if isinstance(heatmaps, torch.Tensor) else type(heatmaps).__name__
        raise ValueError(f"heatmaps: expected a tensor of shape [B, J, H, W] or [B, nstack, J, H, W], got {got}")
    if not heatmaps.is_floating_point():
        raise TypeError(f"heatmaps: expected a floating-point tensor, got dtype {heatmaps.dtype}")
    hm = heatmaps[:, -1] if heatmaps.ndim == 5 else heatmaps
    b, j, h, w = hm.shape
    if b * j * h * w == 0:
        raise ValueError(f"heatmaps: expected non-empty [B, J, H, W], got {tuple(hm.shape)}")

    nms = torch.where(F.max_pool2d(hm, 3, stride=1, padding=1) == hm, hm, 0.0)
    flat = hm.reshape(b, j, h * w)
    idx = nms.reshape(b, j, h * w).argmax(-1)
    px, py = idx % w, idx // w
    conf = flat.gather(-1, idx[..., None]).squeeze(-1)

    def at(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return flat.gather(-1, (y.clamp(0, h - 1) * w + x.clamp(0, w - 1))[..., None]).squeeze(-1)

    dx = torch.where(at(py, px + 1) > at(py, px - 1), 0.25, -0.25)
    dy = torch.where(at(py + 1, px) > at(py - 1, px), 0.25, -0.25)
    shift = torch.stack((dx, dy), -1) + 0.5
    out_dtype = torch.promote_types(hm.dtype, torch.float32)
    coords = torch.stack((px, py), -1).to(out_dtype) + torch.where(conf[..., None] > 0, shift, 0.0).to(out_dtype)
    return coords * stride, conf


def flip_test(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              flip_pairs: Sequence[int] = MPII_FLIP) -> torch.Tensor:
    """Flip-test heatmaps: the mean of the model's heatmaps for the images and, mirrored back, for their mirrors.

    The model runs once, under ``torch.no_grad``, on the 2B images ``cat([images, images.flip(-1)])``. The mirrored
    half of its last-stack output is flipped back along width and its joints permuted by ``flip_pairs``
    (``out[:, j] = mirrored[:, flip_pairs[j]]``). The port's test script then clips the mean at 1; this function
    does not.

    Args:
        model: maps [2B, C, H, W] images to heatmaps [2B, nstack, J, h, w] (or [2B, J, h, w]).
        images: [B, C, H, W] (NCHW; width is the last axis).
        flip_pairs: joint permutation of a horizontal mirror, length J.

    Returns:
        [B, J, h, w] heatmaps.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a tensor of shape [B, C, H, W], got {got}")
    perm = torch.as_tensor(list(flip_pairs), dtype=torch.long)
    if perm.ndim != 1 or not torch.equal(perm.sort().values, torch.arange(len(perm))):
        raise ValueError(f"flip_pairs: expected a permutation of 0..J-1, got {list(flip_pairs)}")
    b = images.shape[0]
    with torch.no_grad():
        out = model(torch.cat((images, images.flip(-1))))
    if not isinstance(out, torch.Tensor) or out.ndim not in (4, 5) or out.shape[0] != 2 * b:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model output: expected [{2 * b}, nstack, J, h, w] or [{2 * b}, J, h, w], got {got}")
    hm = out[:, -1] if out.ndim == 5 else out
    if hm.shape[1] != len(perm):
        raise ValueError(f"flip_pairs: has {len(perm)} entries but the model predicts {hm.shape[1]} joints")
    mirrored = hm[b:].flip(-1)[:, perm.to(hm.device)]
    return (hm[:b] + mirrored) / 2
