"""Tests of fused_hourglass.pose: heatmaps, decoding, flip test, PCKh and crop transforms, against literal loop
implementations of the stacked-hourglass port's rules and on the real MPII validation annotations."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fused_hourglass.pose import (
    MPII_FLIP,
    MPII_JOINTS,
    MPII_SKELETON,
    crop,
    decode_heatmaps,
    flip_test,
    format_pckh_table,
    get_transform,
    inverse_transform_points,
    make_heatmaps,
    pckh,
    transform_points,
)

MPII_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "mpii_valid.h5"


# ----------------------------------------------------------------------------------------------------- references
def ref_heatmaps(joints: np.ndarray, res: int, sigma: float | None = None, mask: np.ndarray | None = None):
    """The port's heatmap rule, one joint and one pixel at a time."""
    s = res / 64 if sigma is None else sigma
    ax = np.arange(0, 6 * s + 3, 1, float)
    c = 3 * s + 1
    patch = np.exp(-((ax[None, :] - c) ** 2 + (ax[:, None] - c) ** 2) / (2 * s**2))
    out = np.zeros(joints.shape[:2] + (res, res), np.float32)
    for b in range(joints.shape[0]):
        for j in range(joints.shape[1]):
            fx, fy = joints[b, j]
            if not fx > 0 or (mask is not None and not mask[b, j]):
                continue
            x, y = int(fx), int(fy)
            if x < 0 or y < 0 or x >= res or y >= res:
                continue
            x0, y0 = int(x - 3 * s - 1), int(y - 3 * s - 1)
            x1, y1 = int(x + 3 * s + 2), int(y + 3 * s + 2)
            for row in range(max(0, y0), min(y1, res)):
                for col in range(max(0, x0), min(x1, res)):
                    out[b, j, row, col] = max(out[b, j, row, col], patch[row - y0, col - x0])
    return out


def ref_decode(hm: np.ndarray, stride: float):
    """The port's parser + adjust, one joint at a time: 3x3 NMS, first argmax, quarter-pixel step, +0.5, x stride."""
    num_b, num_j, h, w = hm.shape
    coords, conf = np.zeros((num_b, num_j, 2)), np.zeros((num_b, num_j))
    for b in range(num_b):
        for j in range(num_j):
            m = hm[b, j]
            nms = np.zeros_like(m)
            for y in range(h):
                for x in range(w):
                    if m[y, x] == m[max(0, y - 1):y + 2, max(0, x - 1):x + 2].max():
                        nms[y, x] = m[y, x]
            y, x = divmod(int(np.argmax(nms)), w)
            fx, fy = float(x), float(y)
            if m[y, x] > 0:
                fx += 0.25 if m[y, min(x + 1, w - 1)] > m[y, max(x - 1, 0)] else -0.25
                fy += 0.25 if m[min(y + 1, h - 1), x] > m[max(y - 1, 0), x] else -0.25
                fx, fy = fx + 0.5, fy + 0.5
            coords[b, j] = fx * stride, fy * stride
            conf[b, j] = m[y, x]
    return coords, conf


def ref_get_transform(center, scale, res, rot=0.0):
    """The port's crop matrix for one person, in numpy."""
    side = 200 * scale
    t = np.zeros((3, 3))
    t[0, 0], t[1, 1] = float(res[1]) / side, float(res[0]) / side
    t[0, 2] = res[1] * (-float(center[0]) / side + 0.5)
    t[1, 2] = res[0] * (-float(center[1]) / side + 0.5)
    t[2, 2] = 1
    if rot != 0:
        a = -rot * np.pi / 180
        r = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        shift = np.eye(3)
        shift[:2, 2] = -res[1] / 2, -res[0] / 2
        back = np.eye(3)
        back[:2, 2] = res[1] / 2, res[0] / 2
        t = back @ (r @ (shift @ t))
    return t


def ref_pckh_counts(pred: np.ndarray, gt: np.ndarray, normalize: np.ndarray, bound: float = 0.5):
    """Correct / annotated counts per joint, one person and joint at a time."""
    correct, count = np.zeros(gt.shape[1], int), np.zeros(gt.shape[1], int)
    for p, g, n in zip(pred, gt, normalize, strict=True):
        for j in range(g.shape[0]):
            if g[j, 0] == 0:
                continue
            count[j] += 1
            if bound > np.linalg.norm(p[j] - g[j]) / n:
                correct[j] += 1
    return correct, count


# ---------------------------------------------------------------------------------------------------- constants
def test_mpii_constants_are_consistent():
    assert len(MPII_JOINTS) == 16 and len(set(MPII_JOINTS)) == 16
    assert MPII_JOINTS[6:10] == ("pelvis", "thorax", "upper_neck", "head_top")
    swap = {"r": "l", "l": "r"}
    for j, name in enumerate(MPII_JOINTS):
        mirrored = MPII_JOINTS[MPII_FLIP[j]]
        expected = swap[name[0]] + name[1:] if name[:2] in ("r_", "l_") else name
        assert mirrored == expected
        assert MPII_FLIP[MPII_FLIP[j]] == j
    # the skeleton is a tree spanning all 16 joints, and mirroring maps it onto itself
    edges = {frozenset(e) for e in MPII_SKELETON}
    assert len(edges) == len(MPII_SKELETON) == 15
    reached, frontier = {0}, [0]
    while frontier:
        a = frontier.pop()
        for e in edges:
            if a in e and (b := next(iter(e - {a}))) not in reached:
                reached.add(b)
                frontier.append(b)
    assert reached == set(range(16))
    assert {frozenset(MPII_FLIP[i] for i in e) for e in edges} == edges


# ----------------------------------------------------------------------------------------------------- heatmaps
def _joint_cases(res: int, gen: torch.Generator) -> torch.Tensor:
    r = float(res)
    special = [(0.0, 5.0), (-3.0, 5.0), (0.3, 5.0), (0.0, 0.0), (1.0, 0.0), (r - 1, r - 1), (r - 0.01, 3.0),
               (r, 3.0), (r + 3.5, 2.0), (5.0, -0.5), (5.0, -1.0), (5.0, r - 0.5), (2.0, 3.0), (3.0, 2.0),
               (2.7, 3.9), (r / 2, r / 2), (1.5, r - 1.5), (r - 2.2, 1.1)]
    rand = torch.rand(2, 14, 2, generator=gen, dtype=torch.float64) * (r + 4) - 2
    return torch.cat([torch.tensor(special, dtype=torch.float64).reshape(1, -1, 2).expand(2, -1, -1), rand], 1)


@pytest.mark.parametrize("res", [16, 32, 64, 128])
def test_make_heatmaps_matches_port_rule(res):
    joints = _joint_cases(res, torch.Generator().manual_seed(res))
    mask = torch.rand(joints.shape[:2], generator=torch.Generator().manual_seed(1)) > 0.2
    for m in (None, mask):
        got = make_heatmaps(joints, res, mask=m)
        want = ref_heatmaps(joints.numpy(), res, mask=None if m is None else m.numpy())
        assert got.dtype == torch.float32 and got.shape == (2, joints.shape[1], res, res)
        assert (want.reshape(2, joints.shape[1], -1).max(-1) > 0).sum() > 30  # most maps are not empty
        np.testing.assert_array_equal(got.numpy(), want)
    # float32 joints truncate to the same pixels
    assert torch.equal(make_heatmaps(joints.float(), res), make_heatmaps(joints.float().double(), res))


@pytest.mark.parametrize("sigma", [0.7, 1.5, 3.0])
def test_make_heatmaps_other_sigma(sigma):
    joints = _joint_cases(48, torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(make_heatmaps(joints, 48, sigma=sigma).numpy(),
                                  ref_heatmaps(joints.numpy(), 48, sigma=sigma))


def test_make_heatmaps_conventions():
    hm = make_heatmaps(torch.tensor([[[10.9, 20.2], [0.0, 7.0], [64.0, 3.0], [float("nan"), 3.0], [5.0, -0.9]]]), 64)
    assert hm[0, 0, 20, 10] == 1 and hm[0, 0].argmax() == 20 * 64 + 10  # truncated, sigma 1: peak 1 there
    assert hm[0, 0, 20, 10 + 4] == pytest.approx(math.exp(-8), rel=1e-6) and hm[0, 0, 20, 10 + 5] == 0  # 9-wide
    assert hm[0, 1:4].abs().sum() == 0  # x == 0, x == R, NaN: empty
    assert hm[0, 4, 0, 5] == 1  # y = -0.9 truncates to row 0
    # out_res 32 (sigma 0.5): the patch centre sits half a pixel off the truncated position, as in the port
    hm32 = make_heatmaps(torch.tensor([[[8.0, 8.0]]]), 32)[0, 0]
    assert torch.equal(hm32[7:9, 7:9], torch.full((2, 2), hm32.max()))


def test_make_heatmaps_bad_input():
    with pytest.raises(ValueError, match="joints"):
        make_heatmaps(torch.zeros(2, 16), 64)
    with pytest.raises(ValueError, match="mask"):
        make_heatmaps(torch.zeros(2, 16, 2), 64, mask=torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="out_res"):
        make_heatmaps(torch.zeros(2, 16, 2), 0)
    with pytest.raises(ValueError, match="sigma"):
        make_heatmaps(torch.zeros(2, 16, 2), 64, sigma=-1.0)


# ------------------------------------------------------------------------------------------------------- decode
def test_decode_recovers_encoded_joints_with_port_steps():
    gen = torch.Generator().manual_seed(3)
    joints = torch.randint(1, 63, (4, 16, 2), generator=gen).double()
    hm = make_heatmaps(joints, 64)
    coords, conf = decode_heatmaps(hm, stride=4)
    assert coords.shape == (4, 16, 2) and conf.shape == (4, 16)
    torch.testing.assert_close(coords, ((joints + 0.5 - 0.25) * 4).float(), rtol=0, atol=0)  # symmetric: ties
    torch.testing.assert_close(conf, torch.ones(4, 16))
    # a larger right / lower neighbour steps +0.25 in that axis only
    b, j = torch.arange(4)[:, None], torch.arange(16)[None]
    x, y = joints[..., 0].long(), joints[..., 1].long()
    right = hm.clone()
    right[b, j, y, x + 1] += 0.1
    below = hm.clone()
    below[b, j, y + 1, x] += 0.1
    step = torch.tensor([0.25, -0.25]).double()
    torch.testing.assert_close(decode_heatmaps(right)[0], ((joints + 0.5 + step) * 4).float(), rtol=0, atol=0)
    torch.testing.assert_close(decode_heatmaps(below)[0], ((joints + 0.5 + step.flip(0)) * 4).float(), rtol=0, atol=0)


def test_decode_matches_port_rule_with_ties_and_negatives():
    gen = torch.Generator().manual_seed(5)
    hm = torch.randint(0, 5, (3, 6, 7, 9), generator=gen).float() / 4  # coarse values: plateaus and ties
    hm[:, 4] -= 2  # all negative: the NMS zeros win the argmax and no adjustment is made
    hm[:, 5] = torch.rand(3, 7, 9, generator=gen)
    hm[0, 3] = 0
    coords, conf = decode_heatmaps(hm, stride=2.5)
    want_coords, want_conf = ref_decode(hm.numpy(), 2.5)
    np.testing.assert_array_equal(coords.numpy(), want_coords)
    np.testing.assert_array_equal(conf.numpy(), want_conf)
    assert torch.equal(coords[0, 3], torch.zeros(2))  # an empty map decodes to the origin with confidence 0


def test_decode_borders_clamp_neighbours():
    hm = torch.zeros(1, 4, 8, 8)
    hm[0, 0, 0, 0] = 1  # left/top neighbours clamp to the peak itself: peak > 0 neighbour -> -0.25
    hm[0, 1, 7, 7] = 1  # right/bottom neighbours clamp to the peak: peak > left/top -> +0.25
    hm[0, 2, 0, 7], hm[0, 2, 1, 7] = 1, 0.5  # top-right corner: x +0.25 (left < peak), y -0.25 (0.5 < peak)
    hm[0, 3, 7, 5:7] = 1  # plateau on the bottom row: first argmax (5, 7); right equal to it, so x +0.25
    coords, _ = decode_heatmaps(hm, stride=4)
    want = torch.tensor([[0.25, 0.25], [7.75, 7.75], [7.75, 0.25], [5.75, 7.75]]) * 4
    assert torch.equal(coords[0], want)


def test_decode_batch_equals_per_image_and_uses_last_stack():
    hm = torch.rand(5, 2, 16, 12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coords, conf = decode_heatmaps(hm)
    assert coords.dtype == torch.float64
    c4, f4 = decode_heatmaps(hm[:, -1])
    assert torch.equal(coords, c4) and torch.equal(conf, f4)
    for i in range(5):
        ci, fi = decode_heatmaps(hm[i:i + 1, 1])
        assert torch.equal(ci[0], coords[i]) and torch.equal(fi[0], conf[i])
    assert not torch.equal(decode_heatmaps(hm[:, 0])[0], coords)
    with pytest.raises(ValueError, match="heatmaps"):
        decode_heatmaps(torch.zeros(16, 8, 8))
    with pytest.raises(TypeError, match="heatmaps"):
        decode_heatmaps(torch.zeros(1, 16, 8, 8, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- flip test
class _ToyPose(nn.Module):
    """Two 'stacks' of per-pixel heatmaps from a 16-channel image: stack 1 = w * image + column index."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        ramp = torch.arange(x.shape[-1], dtype=x.dtype)
        return torch.stack([torch.zeros_like(x), self.w * x + ramp], 1)


def test_flip_test_mirrors_back_and_swaps_joints():
    model = _ToyPose()
    images = torch.rand(3, 16, 6, 7, generator=torch.Generator().manual_seed(2))
    out = flip_test(model, images)
    # (2x + ramp + flipback(2 flip(x) + ramp)[FLIP]) / 2 = x + x[FLIP] + (W - 1) / 2
    want = images + images[:, list(MPII_FLIP)] + 3.0
    torch.testing.assert_close(out, want)
    assert out.shape == (3, 16, 6, 7) and not out.requires_grad
    assert model.batch_sizes == [6]
    # for a model whose heatmaps of a mirrored image are the mirrored, joint-swapped heatmaps, the flip test
    # returns the plain prediction (here for any input, and not with an identity joint permutation)
    def equivariant(x):
        def g(t):
            mixed = 2 * t + t.roll(1, dims=1) + torch.arange(16.0)[:, None, None] * torch.arange(t.shape[-1])
            return torch.stack([t, mixed], 1)
        return g(x) + g(x.flip(-1)).flip(-1)[:, :, list(MPII_FLIP)]

    torch.testing.assert_close(flip_test(equivariant, images), equivariant(images)[:, -1])
    assert not torch.allclose(flip_test(equivariant, images, flip_pairs=range(16)), equivariant(images)[:, -1])
    with pytest.raises(ValueError, match="flip_pairs"):
        flip_test(model, images, flip_pairs=list(range(15)))


# --------------------------------------------------------------------------------------------------------- PCKh
@pytest.fixture(scope="module")
def mpii_valid():
    if not MPII_VALID.exists():
        pytest.skip(f"MPII validation annotations not found at {MPII_VALID}")
    h5py = pytest.importorskip("h5py")
    with h5py.File(MPII_VALID, "r") as f:
        return torch.from_numpy(f["part"][:]), torch.from_numpy(f["normalize"][:])


def test_pckh_gt_vs_gt(mpii_valid):
    gt, norm = mpii_valid
    r = pckh(gt, gt, norm)
    annotated = gt[..., 0] != 0
    assert r["count"] == int(annotated.sum()) > 40000
    assert torch.equal(r["per_joint_count"], annotated.sum(0))
    assert torch.all(r["per_joint"] == 1) and r["mpii"] == 1.0 and r["all16"] == 1.0 and r["threshold"] == 0.5


def test_pckh_known_shifts(mpii_valid):
    gt, norm = mpii_valid
    frac = torch.tensor([0.4 if j % 2 else 0.6 for j in range(16)], dtype=torch.float64)
    pred = gt.clone()
    pred[..., 0] += frac * norm[:, None]
    r = pckh(pred, gt, norm)
    annot = (gt[..., 0] != 0).sum(0).numpy()
    odd = np.arange(16) % 2 == 1
    np.testing.assert_array_equal(r["per_joint"].numpy(), odd.astype(float))
    body = np.ones(16, bool)
    body[[6, 7]] = False
    assert r["mpii"] == pytest.approx(annot[odd & body].sum() / annot[body].sum(), abs=1e-12)
    assert r["all16"] == pytest.approx(annot[odd].sum() / annot.sum(), abs=1e-12)
    assert 0.3 < r["mpii"] < 0.7 and r["mpii"] != r["all16"]
    # a tighter threshold rejects everything, a looser one accepts everything
    assert pckh(pred, gt, norm, threshold=0.3)["all16"] == 0.0
    assert pckh(pred, gt, norm, threshold=0.61)["all16"] == 1.0


def test_pckh_matches_loop_reference(mpii_valid):
    gt, norm = mpii_valid
    gen = torch.Generator().manual_seed(11)
    pred = gt + torch.randn(gt.shape, generator=gen, dtype=torch.float64) * norm[:, None, None] * 0.35
    pred[:, 3] = gt[:, 3] * 0.0 + 1e6  # hopeless joint
    r = pckh(pred, gt, norm)
    correct, count = ref_pckh_counts(pred.numpy(), gt.numpy(), norm.numpy())
    np.testing.assert_allclose(r["per_joint"].numpy(), correct / count, rtol=0, atol=1e-12)
    keep = [j for j in range(16) if j not in (6, 7)]
    assert r["mpii"] == pytest.approx(correct[keep].sum() / count[keep].sum(), abs=1e-12)
    assert r["all16"] == pytest.approx(correct.sum() / count.sum(), abs=1e-12)
    assert r["per_joint"][3] == 0 and 0.4 < r["all16"] < 0.95


def test_pckh_strict_threshold_missing_joints_and_shapes():
    gt = torch.tensor([[[10.0, 10.0], [0.0, 5.0], [4.0, 4.0]]])
    pred = torch.tensor([[[11.0, 10.0], [0.0, 5.0], [4.0, 4.5]]])
    r = pckh(pred, gt, torch.tensor([2.0]))
    assert r["per_joint"][0] == 0 and math.isnan(r["per_joint"][1]) and r["per_joint"][2] == 1  # 0.5 is not < 0.5
    assert r["count"] == 2 and r["all16"] == 0.5 and math.isnan(r["mpii"])  # mpii mean needs the 16 MPII joints
    with pytest.raises(ValueError, match=r"\(4, 16, 2\).*\(4, 15, 2\)"):
        pckh(torch.zeros(4, 16, 2), torch.zeros(4, 15, 2), torch.ones(4))
    with pytest.raises(ValueError, match=r"normalize.*\(3,\)"):
        pckh(torch.zeros(4, 16, 2), torch.zeros(4, 16, 2), torch.ones(3))


def test_format_pckh_table():
    gen = torch.Generator().manual_seed(4)
    gt = torch.rand(50, 16, 2, generator=gen, dtype=torch.float64) * 100 + 1
    norm = torch.full((50,), 10.0, dtype=torch.float64)
    r1 = pckh(gt + torch.randn(gt.shape, generator=gen, dtype=torch.float64) * 4, gt, norm)
    r2 = pckh(gt + torch.randn(gt.shape, generator=gen, dtype=torch.float64) * 2, gt, norm)
    table = format_pckh_table({"no flip": r1, "flip": r2})
    lines = table.splitlines()
    assert "no flip" in lines[0] and "flip" in lines[0]
    for j, name in enumerate(MPII_JOINTS):
        (row,) = [ln for ln in lines if ln.startswith(name + " ")]
        assert row.split()[1:] == [f"{100 * float(r1['per_joint'][j]):.1f}", f"{100 * float(r2['per_joint'][j]):.1f}"]
    (mean_row,) = [ln for ln in lines if ln.startswith("MPII mean (w/o pelvis, thorax)")]
    assert re.findall(r"\d+\.\d", mean_row) == [f"{100 * r1['mpii']:.1f}", f"{100 * r2['mpii']:.1f}"]
    (all_row,) = [ln for ln in lines if ln.startswith("all 16 joints")]
    assert re.findall(r"\d+\.\d", all_row) == [f"{100 * r1['all16']:.1f}", f"{100 * r2['all16']:.1f}"]
    with pytest.raises(ValueError, match="results_by_name"):
        format_pckh_table({})


# --------------------------------------------------------------------------------------------------- transforms
def test_get_transform_matches_port():
    gen = torch.Generator().manual_seed(8)
    center = torch.rand(6, 2, generator=gen, dtype=torch.float64) * 500
    scale = torch.rand(6, generator=gen, dtype=torch.float64) * 3 + 0.5
    rot = torch.tensor([0.0, 30.0, -17.5, 90.0, 0.0, 179.0], dtype=torch.float64)
    for res in [(256, 256), (64, 48)]:
        got = get_transform(center, scale, res, rot)
        assert got.shape == (6, 3, 3) and got.dtype == torch.float64
        for i in range(6):
            want = ref_get_transform(center[i].numpy(), float(scale[i]), res, float(rot[i]))
            if rot[i] == 0:
                np.testing.assert_array_equal(got[i].numpy(), want)
            else:
                np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-12, atol=1e-9)
    single = get_transform([320, 240], 1.5, 256, rot=10)
    assert single.shape == (3, 3) and single.dtype == torch.float64
    np.testing.assert_allclose(single.numpy(), ref_get_transform((320, 240), 1.5, (256, 256), 10), atol=1e-9)
    assert get_transform(center.float(), scale, 64).dtype == torch.float32
    with pytest.raises(ValueError, match="center"):
        get_transform(torch.zeros(4, 3), 1.0, 64)
    with pytest.raises(ValueError, match="scale"):
        get_transform(torch.zeros(4, 2), torch.ones(3), 64)
    with pytest.raises(ValueError, match="res"):
        get_transform(torch.zeros(4, 2), 1.0, 0)


def test_transform_points_round_trip(mpii_valid):
    gt, _ = mpii_valid
    gen = torch.Generator().manual_seed(9)
    pts = gt[:64]
    center = pts.mean(1) + torch.rand(64, 2, generator=gen, dtype=torch.float64) * 20
    mat = get_transform(center, torch.rand(64, generator=gen, dtype=torch.float64) * 2 + 1, 256,
                        torch.rand(64, generator=gen, dtype=torch.float64) * 60 - 30)
    crop_pts = transform_points(pts, mat)
    want = np.einsum("bij,bkj->bki", mat[:, :2, :2].numpy(), pts.numpy()) + mat[:, None, :2, 2].numpy()
    np.testing.assert_allclose(crop_pts.numpy(), want, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(inverse_transform_points(crop_pts, mat), pts, rtol=0, atol=1e-4)
    assert transform_points(pts.float(), mat).dtype == torch.float32


def _ramp_images(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([xs, ys])[None]


@pytest.mark.parametrize("rot", [0.0, 23.0])
def test_crop_samples_where_the_inverse_transform_points(rot):
    """A linear ramp image (channel 0 = x, channel 1 = y) is reproduced exactly by bilinear sampling, so the crop
    holds the source coordinate of every output pixel."""
    src_h, src_w, res = 70, 90, (48, 64)
    center, scale = torch.tensor([[41.3, 33.8]], dtype=torch.float64), 0.21
    out = crop(_ramp_images(src_h, src_w), center, scale, res, rot)
    assert out.shape == (1, 2, 48, 64) and out.dtype == torch.float64
    v, u = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    grid = torch.stack([u, v], -1).reshape(1, -1, 2).double()
    src = inverse_transform_points(grid, get_transform(center, scale, res, rot)).reshape(48, 64, 2)
    inside = (src[..., 0] >= 0) & (src[..., 0] <= src_w - 1) & (src[..., 1] >= 0) & (src[..., 1] <= src_h - 1)
    assert inside.float().mean() > 0.6
    torch.testing.assert_close(out[0].permute(1, 2, 0)[inside], src[inside], rtol=0, atol=1e-9)
    out32 = crop(_ramp_images(src_h, src_w).float(), center.float(), scale, res, rot)
    torch.testing.assert_close(out32[0].permute(1, 2, 0)[inside], src[inside].float(), rtol=0, atol=2e-3)


@pytest.mark.parametrize("rot", [0.0, 35.0])
def test_crop_bright_pixel_lands_on_transformed_point(rot):
    img = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    img[0, 0, 9, 5] = 1.0  # (x, y) = (5, 9)
    center, scale = torch.tensor([8.0, 8.0], dtype=torch.float64), 16 / 200  # magnification 64 / 16 = 4
    out = crop(img, center, scale, 64, rot)[0, 0]
    want = transform_points(torch.tensor([[5.0, 9.0]], dtype=torch.float64), get_transform(center, scale, 64, rot))[0]
    v, u = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centroid = torch.stack([(out * u).sum(), (out * v).sum()]) / out.sum()
    torch.testing.assert_close(centroid, want, rtol=0, atol=1e-9 if rot == 0 else 0.01)
    if rot == 0:
        assert want.tolist() == [20.0, 36.0] and out[36, 20] == 1 and out.sum() == pytest.approx(16.0)


def test_crop_identity_batch_and_dtypes():
    gen = torch.Generator().manual_seed(6)
    img = torch.rand(2, 3, 40, 40, generator=gen)
    torch.testing.assert_close(crop(img, torch.tensor([20.0, 20.0]), 40 / 200, 40), img, rtol=0, atol=1e-5)
    near = crop(img, torch.tensor([20.0, 20.0]), 40 / 200, 40, mode="nearest")
    assert torch.equal(near, img)
    # a batch with different crops equals one call per image
    images = torch.rand(3, 2, 50, 60, generator=gen)
    center = torch.tensor([[30.0, 25.0], [12.5, 40.0], [50.0, 10.0]])
    scale, rot = torch.tensor([0.2, 0.1, 0.35]), torch.tensor([0.0, 25.0, -40.0])
    batch = crop(images, center, scale, 32, rot)
    for i in range(3):
        single = crop(images[i:i + 1], center[i], float(scale[i]), 32, float(rot[i]))
        torch.testing.assert_close(batch[i:i + 1], single, rtol=0, atol=1e-5)
    # uint8 becomes float32 with the same values; 16-bit floats keep their dtype
    u8 = (images * 255).to(torch.uint8)
    out8 = crop(u8, center, scale, 32, rot)
    assert out8.dtype == torch.float32
    torch.testing.assert_close(out8, crop(u8.float(), center, scale, 32, rot))
    half = crop(images.half(), center, scale, 32, rot)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), batch, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="images"):
        crop(images[0], center, scale, 32)
    with pytest.raises(ValueError, match="center"):
        crop(images, center[:2], scale, 32)
    for empty in (images[:, :, :0], images[:, :, :, :0]):  # no pixels to sample: named, not a ZeroDivisionError
        with pytest.raises(ValueError, match=r"images: expected images of at least 1×1 pixels.*got height"):
            crop(empty, center, scale, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pose_functions_on_cuda_match_cpu():
    gen = torch.Generator().manual_seed(12)
    joints = torch.rand(4, 16, 2, generator=gen) * 70 - 3
    hm = make_heatmaps(joints, 64)
    assert torch.equal(make_heatmaps(joints.cuda(), 64).cpu(), hm)
    noisy = hm + torch.rand(hm.shape, generator=gen) * 0.05
    for got, want in zip(decode_heatmaps(noisy.cuda()), decode_heatmaps(noisy), strict=True):
        assert torch.equal(got.cpu(), want)
    images = torch.rand(4, 3, 64, 80, generator=gen)
    center, scale, rot = torch.rand(4, 2, generator=gen) * 60, torch.rand(4) * 0.3 + 0.1, torch.rand(4) * 60 - 30
    torch.testing.assert_close(crop(images.cuda(), center.cuda(), scale.cuda(), 32, rot.cuda()).cpu(),
                               crop(images, center, scale, 32, rot), rtol=0, atol=1e-4)
    r_gpu, r_cpu = pckh(joints.cuda() + 1, joints.cuda(), torch.full((4,), 3.0).cuda()), pckh(joints + 1, joints,
                                                                                              torch.full((4,), 3.0))
    assert r_gpu["all16"] == r_cpu["all16"] and torch.equal(r_gpu["per_joint"].cpu(), r_cpu["per_joint"])
