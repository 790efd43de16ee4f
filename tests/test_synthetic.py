"""SyntheticPoses, the embedded default data: a pure function of (seed, index), joints in the MPII order inside
the image, visibility that agrees with what is drawn on top, the MPII head-size normaliser, the port's targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fused_hourglass import pose
from fused_hourglass.data import SyntheticPoses
from fused_hourglass.data import synthetic as syn


def test_sample_layout():
    ds = SyntheticPoses(10, res=128, seed=3)
    s = ds[4]
    assert s["image"].shape == (3, 128, 128) and s["image"].dtype == torch.float32
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0 and s["image"].std() > 0.05
    assert s["heatmaps"].shape == (16, 32, 32) and s["joints"].shape == (16, 2) and s["visible"].shape == (16,)
    assert s["normalize"].shape == () and s["center"].tolist() == [64.0, 64.0]
    assert s["scale"].item() == pytest.approx(128 / 200)
    expected = pose.make_heatmaps(s["joints"][None] / 4, 32)[0]
    assert torch.equal(s["heatmaps"], expected)  # the port's targets at the heatmap resolution


def test_pure_function_of_seed_and_index():
    a, b, other = SyntheticPoses(50, 64, seed=7), SyntheticPoses(50, 64, seed=7), SyntheticPoses(50, 64, seed=8)
    for i in (0, 13, 49):
        for key in ("image", "joints", "visible", "normalize"):
            assert torch.equal(a[i][key], b[i][key])
    assert torch.equal(a[13]["image"], a[-37]["image"])
    assert not torch.equal(a[13]["image"], a[14]["image"])
    assert not torch.equal(a[13]["joints"], other[13]["joints"])


@pytest.mark.parametrize("res", [64, 128, 256])
def test_joints_inside_and_plausible(res):
    for i in range(40):
        s = syn.render(0, i, res)
        j = s["joints"]
        assert np.all(j >= 0) and np.all(j <= res - 1), (i, j.min(), j.max())
        # every joint annotated (x > 0, as the pipeline's "annotated" test reads it)
        assert np.all(j[:, 0] > 0)
        # the figure faces the camera: the right hip and shoulder start on the image's left of the body axis
        axis = j[syn.THORAX] - j[syn.PELVIS]

        def cross(p, o, axis=axis):
            return axis[0] * (p[1] - o[1]) - axis[1] * (p[0] - o[0])

        assert cross(j[syn.R_HIP], j[syn.PELVIS]) < 0 < cross(j[syn.L_HIP], j[syn.PELVIS])
        assert cross(j[syn.R_SHOULDER], j[syn.THORAX]) < 0 < cross(j[syn.L_SHOULDER], j[syn.THORAX])
        head = float(np.linalg.norm(j[syn.HEAD] - j[syn.NECK]))
        assert s["normalize"] == pytest.approx(0.6 * math.sqrt(2) * 1.2 * head)
        assert 0.05 * res < s["normalize"] < 0.16 * res


def test_visibility_agrees_with_the_part_on_top():
    seen_hidden = 0
    for i in range(60):
        s = syn.render(1, i, 128)
        ix = np.clip(np.round(s["joints"]).astype(int), 0, 127)
        for j in range(16):
            on_top = s["parts"][ix[j, 1], ix[j, 0]]
            own = syn._JOINT_PARTS[j]
            assert bool(s["visible"][j]) == (on_top in own), (i, j, on_top)
            seen_hidden += not s["visible"][j]
    assert 0 < seen_hidden < 0.3 * 60 * 16  # self-occlusion happens, but most joints are visible


def test_draws_vary():
    """Rotation, scale, position, limb angles and colours all vary across indices."""
    samples = [syn.render(0, i, 128) for i in range(64)]
    torso = np.array([s["joints"][syn.THORAX] - s["joints"][syn.PELVIS] for s in samples])
    angles = np.degrees(np.arctan2(torso[:, 0], -torso[:, 1]))
    assert angles.min() < -20 and angles.max() > 20
    sizes = np.array([np.linalg.norm(t) for t in torso])
    assert sizes.max() > 1.3 * sizes.min()
    centres = np.array([s["joints"].mean(0) for s in samples])
    assert centres.std(0).min() > 3
    means = np.array([s["image"].mean((0, 1)) for s in samples])
    assert means.std(0).min() > 0.05


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must be a positive int"):
        SyntheticPoses(0)
    with pytest.raises(ValueError, match="res must be a positive multiple of 64"):
        SyntheticPoses(10, res=100)
    with pytest.raises(IndexError, match="out of range"):
        SyntheticPoses(10)[10]
