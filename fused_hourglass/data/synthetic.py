"""Procedurally drawn articulated people with the 16 MPII joints: the embedded default data set.

Each sample is a pure function of `(seed, index)`: a figure built from a kinematic tree in the MPII joint order
(torso lean, neck and head, hips and shoulders, thighs, shins, upper arms, forearms; each limb's length and angle
drawn at random), rotated by up to ±30°, scaled and placed at random over a cluttered background of random shapes
and colours, and drawn in a random depth order, so limbs occlude each other. The figure faces the camera: the
person's right side starts on the image's left, as in most of MPII. A mirrored figure is again such a figure with
its left and right joints swapped, so a flip test (`fused_hourglass.pose.flip_test`) applies as on real images.

The crop is the whole image (centre res/2, scale res/200, as the port's crop convention), so joints are in both
image and crop pixels. `normalize` is the MPII head size, 0.6 × the diagonal of the head box; the head box is the
square whose side is 1.2 × the upper-neck-to-head-top distance (about 0.1 × the image side, as in MPII's
validation crops, where it is 0.1 × the 200·scale box).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

NUM_JOINTS = 16
# Joint indices (MPII order).
R_ANKLE, R_KNEE, R_HIP, L_HIP, L_KNEE, L_ANKLE, PELVIS, THORAX, NECK, HEAD = range(10)
R_WRIST, R_ELBOW, R_SHOULDER, L_SHOULDER, L_ELBOW, L_WRIST = range(10, 16)

# Drawn parts: (joint a, joint b, radius as a fraction of the figure unit, colour group).
_PARTS = (
    (PELVIS, THORAX, 0.085, "shirt"),
    (R_HIP, L_HIP, 0.06, "trousers"),
    (R_SHOULDER, L_SHOULDER, 0.05, "shirt"),
    (THORAX, NECK, 0.035, "skin"),
    (R_HIP, R_KNEE, 0.048, "trousers"),
    (R_KNEE, R_ANKLE, 0.045, "trousers"),
    (L_HIP, L_KNEE, 0.048, "trousers"),
    (L_KNEE, L_ANKLE, 0.045, "trousers"),
    (R_SHOULDER, R_ELBOW, 0.045, "shirt"),
    (R_ELBOW, R_WRIST, 0.04, "skin"),
    (L_SHOULDER, L_ELBOW, 0.045, "shirt"),
    (L_ELBOW, L_WRIST, 0.04, "skin"),
)
_HEAD_PART = len(_PARTS)  # drawn as a disc between the upper neck and the head top
# Limb chains drawn as units in a random depth order: torso block, head, each leg, each arm.
_CHAINS = ((0, 1, 2, 3, _HEAD_PART), (4, 5), (6, 7), (8, 9), (10, 11))
# The parts touching each joint: a joint is visible when the part drawn on top at its pixel is one of them.
_JOINT_PARTS = tuple(
    frozenset(i for i, p in enumerate(_PARTS) if j in p[:2]) | ({_HEAD_PART} if j in (NECK, HEAD) else set())
    for j in range(NUM_JOINTS)
)


def _unit(angle: float) -> np.ndarray:
    """The direction `angle` radians clockwise from straight up, in image coordinates (y down)."""
    return np.array([math.sin(angle), -math.cos(angle)])


def _skeleton(rng: np.random.Generator) -> np.ndarray:
    """Joint positions [16, 2] of a figure with unit height scale, pelvis at the origin, before rotation."""
    length = lambda base: base * rng.uniform(0.88, 1.12)  # noqa: E731
    deg = math.radians
    lean = rng.normal(0.0, deg(8))
    j = np.zeros((NUM_JOINTS, 2))
    j[THORAX] = j[PELVIS] + length(0.30) * _unit(lean)
    j[NECK] = j[THORAX] + length(0.07) * _unit(lean + rng.normal(0, deg(8)))
    j[HEAD] = j[NECK] + length(0.13) * _unit(lean + rng.normal(0, deg(12)))
    right = _unit(lean - math.pi / 2)  # the person's right, the image's left for a figure facing the camera
    hip_w, shoulder_w = length(0.075), length(0.105)
    j[R_HIP], j[L_HIP] = j[PELVIS] + hip_w * right, j[PELVIS] - hip_w * right
    j[R_SHOULDER], j[L_SHOULDER] = j[THORAX] + shoulder_w * right, j[THORAX] - shoulder_w * right
    thigh, shin, upper, fore = length(0.24), length(0.23), length(0.17), length(0.155)
    down = lean + math.pi
    for side, (hip, knee, ankle) in ((1, (R_HIP, R_KNEE, R_ANKLE)), (-1, (L_HIP, L_KNEE, L_ANKLE))):
        # Outward is toward the person's own side: counter-clockwise from "down" for the right leg.
        kick = rng.random() < 0.1
        outward = rng.uniform(deg(20), deg(70)) if kick else rng.uniform(deg(-10), deg(30))
        bend = rng.uniform(deg(-50), deg(10))
        a = down - side * outward
        j[knee] = j[hip] + thigh * _unit(a)
        j[ankle] = j[knee] + shin * _unit(a - side * bend)
    for side, (shoulder, elbow, wrist) in ((1, (R_SHOULDER, R_ELBOW, R_WRIST)), (-1, (L_SHOULDER, L_ELBOW, L_WRIST))):
        outward = rng.uniform(deg(-15), deg(120))
        bend = rng.uniform(deg(-100), deg(20))
        a = down - side * outward
        j[elbow] = j[shoulder] + upper * _unit(a)
        j[wrist] = j[elbow] + fore * _unit(a - side * bend)
    return j


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.05, 0.95, size=3)


def _draw_capsule(image: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float, colour: np.ndarray,
                  labels: np.ndarray | None = None, label: int = 0, rim: np.ndarray | None = None) -> None:
    """Blend an anti-aliased capsule from a to b (pixels, (x, y)) into image [H, W, 3] in place, working on its
    bounding box only; with `rim`, its outer fifth (at least a pixel) takes that colour, as a silhouette's edge.
    Where it covers at least half a pixel, write `label` into labels [H, W]."""
    h, w = image.shape[:2]
    x0, y0 = np.floor(np.minimum(a, b) - radius - 1).astype(int)
    x1, y1 = np.ceil(np.maximum(a, b) + radius + 2).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x0 >= x1 or y0 >= y1:
        return
    ab = (b - a).astype(np.float32)
    apx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(a[0])
    apy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(a[1])
    t = (apx * ab[0] + apy * ab[1]) * np.float32(1.0 / max(float(ab @ ab), 1e-9))
    np.clip(t, 0.0, 1.0, out=t)
    d = np.hypot(apx - t * ab[0], apy - t * ab[1])
    box = image[y0:y1, x0:x1]
    outer = np.minimum(np.maximum(np.float32(radius + 0.5) - d, 0.0), 1.0)
    if rim is not None:
        box += outer[..., None] * (rim.astype(np.float32) - box)
        inner = np.minimum(np.maximum(np.float32(radius + 0.5 - max(1.0, 0.2 * radius)) - d, 0.0), 1.0)
        box += inner[..., None] * (colour.astype(np.float32) - box)
    else:
        box += outer[..., None] * (colour.astype(np.float32) - box)
    if labels is not None:
        labels[y0:y1, x0:x1][outer >= 0.5] = label


def render(seed: int, index: int, res: int = 128) -> dict[str, np.ndarray]:
    """Draw sample `index` of the data set seeded with `seed`: image [res, res, 3] float32 in [0, 1], joints
    [16, 2] float32 (x, y) in pixels, visible [16] float32, normalize (float), and parts [res, res] int64: the
    figure's part drawn on top at each pixel (an index into the parts table, -1 for background)."""
    rng = np.random.default_rng([int(seed), int(index)])
    # Figure: rotated by U(-30°, 30°), the unit scaled so the figure is 0.65-0.85 of the image (MPII's crops frame
    # a person at 0.8 of the box), then shrunk if its limbs reach out of the image, and placed at random where it
    # fits with a margin.
    joints = _skeleton(rng)
    rot = math.radians(rng.uniform(-30.0, 30.0))
    rmat = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    joints = joints @ rmat.T
    unit = rng.uniform(0.65, 0.85) * res
    margin = 0.05 * res + 0.06 * unit
    extent = joints.max(0) - joints.min(0)
    unit = min(unit, float(np.min((res - 2 * margin) / np.maximum(extent, 1e-6))))
    margin = 0.05 * res + 0.06 * unit
    joints = joints * unit
    lo, hi = joints.min(0), joints.max(0)
    slack = (res - 2 * margin) - (hi - lo)
    offset = margin - lo + rng.uniform(0.0, 1.0, size=2) * np.maximum(slack, 0.0)
    joints = joints + offset

    # Background: a vertical gradient between two colours, clutter of random discs and bars, pixel noise.
    top, bottom = _colour(rng).astype(np.float32), _colour(rng).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, res, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(top + (bottom - top) * ramp, (res, res, 3)).copy()
    for _ in range(int(rng.integers(2, 8))):
        a = rng.uniform(0, res, size=2)
        if rng.random() < 0.5:
            _draw_capsule(image, a, a + rng.normal(0, 0.25 * res, size=2), rng.uniform(0.01, 0.04) * res, _colour(rng))
        else:
            _draw_capsule(image, a, a, rng.uniform(0.03, 0.15) * res, _colour(rng))

    # Figure parts, in a random depth order of the limb chains.
    groups = {"shirt": _colour(rng), "trousers": _colour(rng), "skin": _colour(rng)}
    head_mid = (joints[NECK] + joints[HEAD]) / 2
    head_r = 0.55 * float(np.linalg.norm(joints[HEAD] - joints[NECK]))
    top_part = np.full((res, res), -1, dtype=np.int64)
    for chain in rng.permutation(len(_CHAINS)):
        for part in _CHAINS[chain]:
            if part == _HEAD_PART:
                a, b, radius, group = head_mid, head_mid, head_r, "skin"
            else:
                ja, jb, r, group = _PARTS[part]
                a, b, radius = joints[ja], joints[jb], r * unit
            # a darker rim, as a silhouette's edge, so that parts of one colour stay apart where they overlap
            _draw_capsule(image, a, b, radius, groups[group], top_part, part, rim=0.55 * groups[group])
    image += np.float32(0.03) * rng.standard_normal(size=image.shape, dtype=np.float32)
    np.clip(image, 0.0, 1.0, out=image)

    ix = np.clip(np.round(joints).astype(np.int64), 0, res - 1)
    on_top = top_part[ix[:, 1], ix[:, 0]]
    visible = np.array([on_top[j] in _JOINT_PARTS[j] for j in range(NUM_JOINTS)], dtype=np.float32)
    head_side = 1.2 * float(np.linalg.norm(joints[HEAD] - joints[NECK]))
    normalize = 0.6 * math.sqrt(2.0) * head_side
    return {"image": image, "joints": joints.astype(np.float32), "visible": visible, "normalize": normalize,
            "parts": top_part}


class SyntheticPoses(Dataset):
    """`n` procedurally drawn people (see the module docstring), sample `i` a pure function of `(seed, i)`.

    Each sample is a dict: "image" [3, res, res] float32 in [0, 1]; "heatmaps" [16, res/4, res/4] float32 (the
    port's targets, `fused_hourglass.pose.make_heatmaps` at σ = (res/4)/64); "joints" [16, 2] float32 (x, y) in image
    pixels; "visible" [16] float32; "normalize" float32 scalar (the MPII head size); "center" [2] and "scale" (the
    crop, which is the whole image); "index". `sigma` (heatmap pixels) overrides the port's σ for "heatmaps".
    """

    def __init__(self, n: int, res: int = 128, seed: int = 0, sigma: float | None = None) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"SyntheticPoses: n must be a positive int, got {n!r}")
        if not isinstance(res, int) or res < 64 or res % 64:
            raise ValueError(f"SyntheticPoses: res must be a positive multiple of 64 (the network input), got {res!r}")
        self.n, self.res, self.seed, self.sigma = n, res, int(seed), sigma

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.n <= index < self.n:
            raise IndexError(f"SyntheticPoses: index {index} out of range for {self.n} samples")
        index %= self.n
        from ..pose import make_heatmaps

        s = render(self.seed, index, self.res)
        joints = torch.from_numpy(s["joints"])
        out_res = self.res // 4
        return {
            "image": torch.from_numpy(s["image"]).permute(2, 0, 1).contiguous(),
            "heatmaps": make_heatmaps(joints[None] * (out_res / self.res), out_res, sigma=self.sigma)[0],
            "joints": joints,
            "visible": torch.from_numpy(s["visible"]),
            "normalize": torch.tensor(s["normalize"], dtype=torch.float32),
            "center": torch.tensor([self.res / 2, self.res / 2], dtype=torch.float32),
            "scale": torch.tensor(self.res / 200, dtype=torch.float32),
            "index": torch.tensor(index),
        }
