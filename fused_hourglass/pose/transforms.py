"""Person-centred crop transforms in the port's convention, batched.

A crop is given by a centre (x, y) and a scale, the box side being ``200 * scale`` source pixels, mapped onto a
``res`` grid and optionally rotated by ``rot`` degrees about the crop centre. Pixel ``i``'s centre is coordinate ``i``
(cv2.warpAffine's convention, used by the port's augmentation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _res_hw(res: int | tuple[int, int]) -> tuple[int, int]:
    hw = (res, res) if isinstance(res, int) else tuple(res)
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise ValueError(f"res: expected a positive int or (h, w) of positive ints, got {res!r}")
    return hw


def get_transform(center, scale, res: int | tuple[int, int], rot=0) -> torch.Tensor:
    """Affine matrix from source pixels to crop pixels, as the port's ``get_transform``.

    ``t = [[w / L, 0, w (0.5 - cx / L)], [0, h / L, h (0.5 - cy / L)], [0, 0, 1]]`` with ``L = 200 scale``; for
    ``rot != 0`` it is followed by a rotation by ``-rot`` degrees (the port negates it) about ``(w / 2, h / 2)``.

    Args:
        center: [B, 2] (x, y) or [2]; tensor or array-like.
        scale: [B] or scalar.
        res: crop size, int or (h, w).
        rot: degrees, scalar or [B].

    Returns:
        [B, 3, 3] (or [3, 3] for a [2] center) in center's dtype when floating, else float64; on center's device.
    """
    center = torch.as_tensor(center)
    dtype = center.dtype if center.is_floating_point() else torch.float64
    if center.shape[-1:] != (2,) or center.ndim not in (1, 2):
        raise ValueError(f"center: expected shape [B, 2] or [2], got {tuple(center.shape)}")
    h, w = _res_hw(res)
    c = center.to(torch.float64).reshape(-1, 2)
    n = c.shape[0]
    kw = {"dtype": torch.float64, "device": c.device}
    s = torch.as_tensor(scale, **kw)
    r = torch.as_tensor(rot, **kw)
    for name, v in (("scale", s), ("rot", r)):
        if v.ndim > 1 or (v.ndim == 1 and v.shape[0] not in (1, n)):
            raise ValueError(f"{name}: expected a scalar or shape [{n}] to match center, got {tuple(v.shape)}")
    s, r = s.reshape(-1).expand(n), r.reshape(-1).expand(n)

    side = 200 * s
    zero, one = torch.zeros_like(side), torch.ones_like(side)
    t = torch.stack([torch.full_like(side, w) / side, zero, w * (-c[:, 0] / side + 0.5),
                     zero, torch.full_like(side, h) / side, h * (-c[:, 1] / side + 0.5),
                     zero, zero, one], -1).reshape(n, 3, 3)
    ang = -r * math.pi / 180
    sn, cs = torch.sin(ang), torch.cos(ang)
    rmat = torch.stack([cs, -sn, zero, sn, cs, zero, zero, zero, one], -1).reshape(n, 3, 3)
    to_c = torch.eye(3, **kw).repeat(n, 1, 1)
    to_c[:, 0, 2], to_c[:, 1, 2] = -w / 2, -h / 2
    from_c = to_c.clone()
    from_c[:, :2, 2] *= -1
    rotated = from_c @ (rmat @ (to_c @ t))
    t = torch.where((r != 0)[:, None, None], rotated, t).to(dtype)
    return t[0] if center.ndim == 1 else t


def transform_points(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply affine matrices to points: ``[x', y'] = M[:2, :2] @ [x, y] + M[:2, 2]`` (computed in float64).

    Args:
        points: [B, J, 2] (x, y) (or [J, 2]).
        matrix: [B, 3, 3] or [B, 2, 3] (or unbatched, broadcast over B).

    Returns:
        [B, J, 2] in points' dtype when floating, else float64.
    """
    if not isinstance(points, torch.Tensor) or points.ndim < 2 or points.shape[-1] != 2:
        got = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"points: expected a tensor of shape [B, J, 2], got {got}")
    if not isinstance(matrix, torch.Tensor) or matrix.ndim < 2 or tuple(matrix.shape[-2:]) not in ((3, 3), (2, 3)):
        got = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"matrix: expected a tensor of shape [B, 3, 3] or [B, 2, 3], got {got}")
    m = matrix.to(device=points.device, dtype=torch.float64)
    out = points.to(torch.float64) @ m[..., :2, :2].transpose(-1, -2) + m[..., None, :2, 2]
    return out.to(points.dtype if points.is_floating_point() else torch.float64)


def inverse_transform_points(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Map points through the inverse of 3x3 ``matrix`` (e.g. crop pixels back to source pixels); shapes as
    :func:`transform_points`."""
    if not isinstance(matrix, torch.Tensor) or matrix.ndim < 2 or tuple(matrix.shape[-2:]) != (3, 3):
        got = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"matrix: expected a tensor of shape [B, 3, 3], got {got}")
    return transform_points(points, torch.linalg.inv(matrix.to(torch.float64)))


def crop(images: torch.Tensor, center, scale, res: int | tuple[int, int], rot=0, *, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """Batched affine crop: output pixel (u, v) samples the source at ``inv(get_transform(...)) @ (u, v, 1)``.

    Source coordinates are pixel indices (pixel i's centre at i, cv2.warpAffine's convention); one
    ``F.affine_grid`` / ``F.grid_sample`` call (align_corners=False) for the whole batch.

    Args:
        images: [B, C, H, W] floating point (16-bit types are sampled in float32) or uint8 (returns float32,
            values not rescaled).
        center, scale, res, rot: as :func:`get_transform`, one crop per image (center [B, 2] or [2]).
        mode, padding_mode: passed to ``F.grid_sample``.

    Returns:
        [B, C, h, w] crops, h = w = res for an int res.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a tensor of shape [B, C, H, W], got {got}")
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise TypeError(f"images: expected a floating-point or uint8 tensor, got dtype {images.dtype}")
    b, _, src_h, src_w = images.shape
    if src_h < 1 or src_w < 1:
        raise ValueError(f"images: expected images of at least 1×1 pixels to crop from, got height {src_h} and "
                         f"width {src_w}")
    h, w = _res_hw(res)
    center = torch.as_tensor(center, device=images.device).to(torch.float64)
    if center.shape not in ((b, 2), (2,)):
        raise ValueError(f"center: expected shape [{b}, 2] or [2] to match images {tuple(images.shape)}, "
                         f"got {tuple(center.shape)}")
    mat = get_transform(center.reshape(-1, 2).expand(b, 2), scale, (h, w), rot)

    # align_corners=False: normalised n = (2 i + 1) / size - 1 for pixel index i, and back i = ((n + 1) size - 1) / 2
    kw = {"dtype": torch.float64, "device": images.device}
    src_to_norm = torch.tensor([[2 / src_w, 0, 1 / src_w - 1], [0, 2 / src_h, 1 / src_h - 1], [0, 0, 1]], **kw)
    norm_to_out = torch.tensor([[w / 2, 0, (w - 1) / 2], [0, h / 2, (h - 1) / 2], [0, 0, 1]], **kw)
    theta = src_to_norm @ torch.linalg.inv(mat) @ norm_to_out
    work = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    grid = F.affine_grid(theta[:, :2].to(work), [b, images.shape[1], h, w], align_corners=False)
    out = F.grid_sample(images.to(work), grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    return out if images.dtype == torch.uint8 else out.to(images.dtype)
