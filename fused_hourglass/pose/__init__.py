"""Pose utilities around the model: target heatmaps, decoding, flip test, PCKh and crop transforms.

Batched torch functions that keep tensors on their device; by default they follow the published stacked-hourglass
port's conventions, some of which are unusual:

- Heatmaps: Gaussian sigma = out_res / 64 heatmap pixels, patch pasted at the TRUNCATED joint position
  (``int(x), int(y)``); joints with x <= 0 are unannotated and give all-zero maps.
- Decoding: 3x3 NMS and argmax, then a 0.25-pixel step toward the larger neighbour in x and in y (-0.25 on a tie),
  then +0.5, then x stride (4) into input pixels.
- Flip test: mean of the heatmaps and the mirrored-back heatmaps of the mirrored image (joints swapped by MPII_FLIP).
- PCKh: ||pred - gt|| / normalize < threshold (strict), gt x == 0 skipped; the MPII benchmark's mean leaves out
  pelvis and thorax, the port's pools all 16 joints: both are reported.
- Crops: box side 200 * scale source pixels around center, rotated by rot degrees (the port negates it) about the
  crop centre; pixel i's centre is coordinate i (cv2.warpAffine's convention).
"""

from __future__ import annotations

from .decode import decode_heatmaps, flip_test
from .heatmaps import MPII_FLIP, MPII_JOINTS, MPII_SKELETON, make_heatmaps
from .metrics import format_pckh_table, pckh
from .transforms import crop, get_transform, inverse_transform_points, transform_points

__all__ = [
    "MPII_JOINTS", "MPII_FLIP", "MPII_SKELETON", "make_heatmaps", "decode_heatmaps", "flip_test", "pckh",
    "format_pckh_table", "get_transform", "transform_points", "inverse_transform_points", "crop",
]
