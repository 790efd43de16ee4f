"""MPII annotations, the decode-only dataset and its collate, and the batched augmentation.

Geometry is checked against a literal NumPy transcription of the port's ``get_transform`` and against where a
drawn blob actually lands in the crop; colour jitter against ``colorsys``.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from fused_hourglass.data import augment
from fused_hourglass.data.augment import MPIIAugment
from fused_hourglass.data.mpii import H5_KEYS, MPIIAnnotations, MPIIDataset, collate_mpii

MPII_H5 = Path(__file__).resolve().parents[2] / "shared" / "data" / "mpii_valid.h5"
needs_h5 = pytest.mark.skipif(not MPII_H5.is_file(), reason=f"MPII validation annotations not found at {MPII_H5}")
FLIP = (5, 4, 3, 2, 1, 0, 6, 7, 8, 9, 15, 14, 13, 12, 11, 10)


def port_get_transform(center, scale, res, rot=0.0):
    """The port's utils.img.get_transform, written out in NumPy for one sample (square res)."""
    h = 200 * scale
    t = np.array([[res / h, 0, res * (-center[0] / h + 0.5)], [0, res / h, res * (-center[1] / h + 0.5)], [0, 0, 1]])
    if rot != 0:
        a = -rot * np.pi / 180
        r = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        to_c = np.array([[1, 0, -res / 2], [0, 1, -res / 2], [0, 0, 1]])
        from_c = np.array([[1, 0, res / 2], [0, 1, res / 2], [0, 0, 1]])
        t = from_c @ r @ to_c @ t
    return t


def write_h5(path: Path, data: dict) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f[k] = v
    return path


@pytest.fixture(scope="module")
def ann():
    if not MPII_H5.is_file():
        pytest.skip(f"MPII validation annotations not found at {MPII_H5}")
    return MPIIAnnotations(MPII_H5)


# ---------------------------------------------------------------- annotations


@needs_h5
def test_annotations_read_whole_file(ann):
    assert len(ann) == 2958 and len(ann.imgname) == 2958
    shapes = {"center": (2958, 2), "scale": (2958,), "part": (2958, 16, 2), "visible": (2958, 16),
              "normalize": (2958,), "index": (2958,), "person": (2958,), "torsoangle": (2958,)}
    for k, shape in shapes.items():
        t = getattr(ann, k)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float64 and tuple(t.shape) == shape, k
    assert ann.imgname[0] == "005808361.jpg"
    assert ann.center[0].tolist() == pytest.approx([966.0, 410.7773184])
    assert ann.part[0, 9].tolist() == [962.0, 80.0]  # head top of the first person
    with h5py.File(MPII_H5, "r") as f:
        for i in (1, 1234, 2957):
            e = ann[i]
            assert e["imgname"] == f["imgname"][i].decode()
            for k in H5_KEYS[1:]:
                np.testing.assert_array_equal(e[k].numpy(), f[k][i], err_msg=k)
    sub = ann.subset([5, 2, 5])
    assert sub.imgname == [ann.imgname[5], ann.imgname[2], ann.imgname[5]]
    assert torch.equal(sub.part, ann.part[[5, 2, 5]]) and len(sub) == 3
    with pytest.raises(IndexError, match="2958"):
        ann[2958]


def test_annotations_bad_files(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        MPIIAnnotations(missing)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="garbage.h5.*not an HDF5"):
        MPIIAnnotations(garbage)
    n = 3
    good = {"imgname": np.array([b"a.jpg", b"b.jpg", b"c.jpg"]), "center": np.ones((n, 2)), "scale": np.ones(n),
            "part": np.ones((n, 16, 2)), "visible": np.ones((n, 16)), "normalize": np.ones(n),
            "index": np.arange(n, dtype=float), "person": np.zeros(n), "torsoangle": np.zeros(n)}
    assert MPIIAnnotations(write_h5(tmp_path / "good.h5", good)).imgname == ["a.jpg", "b.jpg", "c.jpg"]
    lacking = write_h5(tmp_path / "lacking.h5", {k: v for k, v in good.items() if k != "normalize"})
    with pytest.raises(ValueError, match=r"lacking\.h5.*'normalize'"):
        MPIIAnnotations(lacking)
    bad_shape = write_h5(tmp_path / "shape.h5", {**good, "part": np.ones((n, 14, 2))})
    with pytest.raises(ValueError, match=r"shape\.h5.*'part'.*\(3, 16, 2\)"):
        MPIIAnnotations(bad_shape)


# ---------------------------------------------------------------- dataset and collate


@pytest.fixture
def image_dir(ann, tmp_path):
    """A folder with the images of the first 8 entries: random-noise JPEGs just large enough for their people."""
    sub = ann.subset(range(8))
    rng = np.random.default_rng(1)
    extent = torch.maximum(sub.part.amax(1), sub.center) + 40
    for name, (w, h) in zip(sub.imgname, extent.ceil().long().tolist(), strict=True):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name, quality=70)
    return sub, tmp_path


@needs_h5
def test_dataset_decodes_and_collates(image_dir):
    sub, folder = image_dir
    ds = MPIIDataset(sub, folder)
    assert len(ds) == 8 and ds.train
    s = ds[3]
    ref = np.array(Image.open(folder / sub.imgname[3]).convert("RGB"))
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, *ref.shape[:2])
    np.testing.assert_array_equal(s["image"].permute(1, 2, 0).numpy(), ref)
    assert s["index"] == 3 and torch.equal(s["joints"], sub.part[3]) and torch.equal(s["center"], sub.center[3])
    assert s["scale"] == sub.scale[3] and s["normalize"] == sub.normalize[3]
    assert torch.equal(s["visible"], sub.visible[3])

    samples = [ds[i] for i in range(len(ds))]
    b = collate_mpii(samples)
    hmax, wmax = max(x["image"].shape[1] for x in samples), max(x["image"].shape[2] for x in samples)
    assert b["image"].shape == (8, 3, hmax, wmax) and b["image"].dtype == torch.uint8 and b["skipped"] == 0
    for i, x in enumerate(samples):
        _, h, w = x["image"].shape
        assert b["image_size"][i].tolist() == [w, h]
        assert torch.equal(b["image"][i, :, :h, :w], x["image"])
        assert int(b["image"][i, :, h:].abs().sum()) == 0 and int(b["image"][i, :, :, w:].abs().sum()) == 0
    assert torch.equal(b["joints"], sub.part) and torch.equal(b["index"], torch.arange(8))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_mpii)
    assert [tuple(x["index"].tolist()) for x in loader] == [(0, 1, 2, 3), (4, 5, 6, 7)]


@needs_h5
def test_dataset_missing_image_fails_at_construction(image_dir):
    sub, folder = image_dir
    (folder / sub.imgname[5]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 image file\(s\) missing.*{sub.imgname[5]}") as e:
        MPIIDataset(sub, folder)
    assert str(folder) in str(e.value)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        MPIIDataset(sub, folder / "absent")
    assert MPIIDataset(sub, folder, check_files=False)[0] is not None  # the check can be skipped


@needs_h5
def test_corrupt_image_is_skipped_counted_and_dropped(image_dir):
    sub, folder = image_dir
    (folder / sub.imgname[2]).write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    ds = MPIIDataset(sub, folder)
    with pytest.warns(UserWarning, match=sub.imgname[2]):
        samples = [ds[i] for i in range(len(ds))]
    assert samples[2] is None and ds.corrupt_count == 1 and sum(s is None for s in samples) == 1
    b = collate_mpii(samples)
    assert b["skipped"] == 1 and b["index"].tolist() == [0, 1, 3, 4, 5, 6, 7] and b["image"].shape[0] == 7
    empty = collate_mpii([None, None])
    assert empty["skipped"] == 2 and empty["image"].shape == (0, 3, 0, 0) and empty["joints"].shape == (0, 16, 2)
    assert MPIIAugment()(empty)["heatmaps"].shape == (0, 16, 64, 64)  # an all-corrupt batch still flows through


def test_dataset_rejects_bad_annotations(tmp_path):
    with pytest.raises(TypeError, match="annotations must be an MPIIAnnotations"):
        MPIIDataset({"imgname": []}, tmp_path)


# ---------------------------------------------------------------- augmentation

def blob_batch(sizes=((300, 400, 1.3), (280, 360, 0.9))):
    """A collated float batch, per (h, w, scale) of ``sizes`` an image (zero-padded to the largest) with a red
    Gaussian blob at joint 0 (r-ankle) and a green one at joint 10 (r-wrist); the other joints are unannotated
    except 12 (r-shoulder), placed outside any crop."""
    b, hmax, wmax = len(sizes), max(r[0] for r in sizes), max(r[1] for r in sizes)
    image = torch.zeros(b, 3, hmax, wmax)
    joints = torch.zeros(b, 16, 2, dtype=torch.float64)
    center = torch.zeros(b, 2, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(hmax, dtype=torch.float64), torch.arange(wmax, dtype=torch.float64),
                            indexing="ij")
    for i, (h, w, _) in enumerate(sizes):
        center[i] = torch.tensor([w / 2 + 3.3 * i, h / 2 - 2.1 * i])
        joints[i, 0] = center[i] + torch.tensor([-30.4, 45.7])
        joints[i, 10] = center[i] + torch.tensor([37.2, -20.9])
        joints[i, 12] = torch.tensor([w - 1.0, 1.0])  # annotated, but the crop never reaches the corner
        for c, j in ((0, 0), (1, 10)):
            blob = torch.exp(-((xx - joints[i, j, 0]) ** 2 + (yy - joints[i, j, 1]) ** 2) / (2 * 3.0**2))
            image[i, c, :h, :w] = blob[:h, :w]
    scale = torch.tensor([r[2] for r in sizes], dtype=torch.float64)
    return {"image": image, "center": center, "scale": scale, "joints": joints,
            "visible": (joints[..., 0] > 0).double(), "normalize": torch.full((b,), 20.0, dtype=torch.float64),
            "index": torch.arange(b)}


def centroid(channel: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted (x, y) centre of a [H, W] map."""
    h, w = channel.shape
    wgt = channel.double() / channel.double().sum()
    return torch.stack([(wgt.sum(0) * torch.arange(w)).sum(), (wgt.sum(1) * torch.arange(h)).sum()])


def params_for(aug, n, **over):
    p = aug.draw(n)  # identity parameters in eval mode
    return {**p, **{k: torch.as_tensor(v).expand(n).clone() for k, v in over.items()}}


def test_eval_crop_follows_the_port_transform_and_the_pixels():
    batch = blob_batch()
    out = MPIIAugment(train=False)(batch)
    for i in range(2):
        ref = port_get_transform(batch["center"][i].numpy(), float(batch["scale"][i]), 256)
        np.testing.assert_allclose(out["matrix"][i].numpy(), ref, rtol=1e-12, atol=1e-9)
        for c, j in ((0, 0), (1, 10)):
            want = ref[:2, :2] @ batch["joints"][i, j].numpy() + ref[:2, 2]
            np.testing.assert_allclose(out["joints"][i, j].numpy(), want, atol=1e-9)
            assert torch.allclose(centroid(out["image"][i, c]), out["joints"][i, j], atol=0.05)
            hm = out["heatmaps"][i, j]
            peak = torch.tensor([hm.argmax() % 64, hm.argmax() // 64], dtype=torch.float64)
            assert (peak - out["joints"][i, j] / 4).abs().max() <= 1.0
    assert not out["valid"][:, 12].any() and out["joints"][:, 12].abs().sum() == 0  # outside the crop
    assert out["valid"][:, [0, 10]].all() and out["valid"].sum() == 4
    assert out["heatmaps"][:, 12].abs().sum() == 0 and out["heatmaps"][:, 1].abs().sum() == 0  # dropped, unannotated
    assert not out["flipped"].any() and (out["rot"] == 0).all() and torch.equal(out["scale"], batch["scale"])
    assert torch.allclose(out["normalize"], 20.0 * 256 / (200 * batch["scale"]))
    assert torch.equal(out["index"], batch["index"])


def test_shapes_dtypes_range_and_uint8_input():
    batch = blob_batch()
    batch["image"] = (batch["image"] * 255).round().to(torch.uint8)
    out = MPIIAugment(inp_res=128, out_res=32)(batch, torch.Generator().manual_seed(3))
    assert out["image"].shape == (2, 3, 128, 128) and out["image"].dtype == torch.float32
    assert 0 <= out["image"].min() and out["image"].max() <= 1 and out["image"].max() > 0.5
    assert out["heatmaps"].shape == (2, 16, 32, 32) and out["heatmaps"].dtype == torch.float32
    assert out["joints"].shape == (2, 16, 2) and out["matrix"].shape == (2, 3, 3)
    assert out["valid"].dtype == torch.bool and out["flipped"].dtype == torch.bool
    for k in ("joints", "normalize", "center", "scale", "rot", "matrix"):
        assert out[k].dtype == torch.float64, k


def test_flip_mirrors_pixels_and_swaps_joints():
    aug = MPIIAugment(train=False)
    batch = blob_batch()
    base = params_for(aug, 2, rot=torch.tensor(12.5, dtype=torch.float64), scale=torch.tensor(1.1, dtype=torch.float64))
    plain = aug.apply(batch, base)
    flipped = aug.apply(batch, {**base, "flip": torch.ones(2, dtype=torch.bool)})
    assert flipped["flipped"].all()
    assert torch.allclose(flipped["image"], plain["image"].flip(-1), atol=1e-5)
    perm = list(FLIP)
    mirrored = plain["joints"][:, perm].clone()
    mirrored[..., 0] = 255 - mirrored[..., 0]
    mirrored = torch.where(plain["valid"][:, perm, None], mirrored, 0.0)
    assert torch.allclose(flipped["joints"], mirrored, atol=1e-9)
    assert torch.equal(flipped["valid"], plain["valid"][:, perm])
    for i in range(2):  # the red r-ankle blob is now the left ankle (channel 5) of the mirrored person
        assert torch.allclose(centroid(flipped["image"][i, 0]), flipped["joints"][i, 5], atol=0.05)
        assert torch.allclose(centroid(flipped["image"][i, 1]), flipped["joints"][i, 15], atol=0.05)
    assert flipped["heatmaps"][:, 0].sum() == 0 and flipped["heatmaps"][:, 5].sum() > 0
    pts = torch.cat([batch["joints"], torch.ones(2, 16, 1, dtype=torch.float64)], -1)
    expect = (flipped["matrix"] @ pts.transpose(1, 2)).transpose(1, 2)[..., :2][:, perm]
    assert torch.allclose(flipped["joints"][:, [5, 15]], expect[:, [5, 15]], atol=1e-9)


def test_draw_ranges_and_seeding():
    aug = MPIIAugment()
    p = aug.draw(4000, torch.Generator().manual_seed(0))
    assert p["rot"].abs().max() <= 30 and p["rot"].abs().max() > 29 and p["rot"].mean().abs() < 1.5
    assert ((p["scale"] >= 0.75) & (p["scale"] <= 1.25)).all() and p["scale"].min() < 0.76
    assert 0.45 < p["flip"].double().mean() < 0.55 and torch.equal(p["color"], p["flip"])  # the port's coupling
    assert p["hue"].abs().max() <= 0.2 and p["brightness"].abs().max() <= 0.3
    assert ((p["saturation"] >= 0.5) & (p["saturation"] <= 1.5)).all() and p["contrast"].min() >= 0.5
    no_flip = MPIIAugment(flip=False).draw(100, torch.Generator().manual_seed(0))
    assert not no_flip["flip"].any() and no_flip["color"].any()

    batch = blob_batch()
    a = aug(batch, torch.Generator().manual_seed(7))
    b = aug(batch, torch.Generator().manual_seed(7))
    c = aug(batch, torch.Generator().manual_seed(8))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["rot"], c["rot"]) and not torch.equal(a["image"], c["image"])
    torch.manual_seed(5)
    d = aug(batch)
    torch.manual_seed(5)
    assert torch.equal(d["image"], aug(batch)["image"])  # default: torch's global RNG
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    MPIIAugment(train=False)(batch, g)
    assert torch.equal(g.get_state(), state)  # evaluation draws nothing


def test_batched_equals_per_sample():
    aug = MPIIAugment()
    batch = blob_batch()
    params = aug.draw(2, torch.Generator().manual_seed(11))
    params["flip"] = torch.tensor([True, False])
    params["color"] = torch.tensor([True, False])
    out = aug.apply(batch, params)
    for i, (h, w) in enumerate(((300, 400), (280, 360))):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        one["image"] = one["image"][..., :h, :w]  # the sample unpadded
        single = aug.apply(one, {k: v[i : i + 1] for k, v in params.items()})
        for k in out:
            assert torch.allclose(out[k][i : i + 1].double(), single[k].double(), atol=1e-5), k


def test_color_jitter_matches_colorsys_reference():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 5, 7, generator=gen)
    x[0, :, 0, 0] = 0.5  # a grey pixel
    hue, sat = torch.tensor([0.15, -0.2, 0.05]), torch.tensor([1.4, 0.6, 1.0])
    bright, con = torch.tensor([0.1, -0.25, 0.0]), torch.tensor([0.7, 1.3, 1.0])
    got = augment.color_jitter(x, hue, sat, bright, con)
    for b in range(3):
        for yy in range(5):
            for xx in range(7):
                h, s, v = colorsys.rgb_to_hsv(*x[b, :, yy, xx].tolist())
                rgb = np.array(colorsys.hsv_to_rgb((h + float(hue[b])) % 1.0, min(max(s * float(sat[b]), 0), 1), v))
                rgb = rgb + float(bright[b])
                rgb = np.clip((rgb - rgb.mean()) * float(con[b]) + rgb.mean(), 0, 1)
                np.testing.assert_allclose(got[b, :, yy, xx].numpy(), rgb, atol=1e-5)
    ident = augment.color_jitter(x, torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3))
    assert torch.allclose(ident, x, atol=1e-5)


def test_color_jitter_only_where_drawn():
    aug = MPIIAugment(train=True)
    batch = blob_batch()
    base = params_for(MPIIAugment(train=False), 2)
    jit = {**base, "color": torch.tensor([True, False]), "brightness": torch.full((2,), 0.2, dtype=torch.float64)}
    plain, out = aug.apply(batch, base), aug.apply(batch, jit)
    assert torch.equal(out["image"][1], plain["image"][1]) and not torch.allclose(out["image"][0], plain["image"][0])
    assert torch.equal(out["heatmaps"], plain["heatmaps"])


def test_rotation_moves_joints_with_the_pixels():
    aug = MPIIAugment(train=False)
    batch = blob_batch()
    out = aug.apply(batch, params_for(aug, 2, rot=torch.tensor([25.0, -17.0], dtype=torch.float64),
                                      scale=torch.tensor([0.8, 1.2], dtype=torch.float64)))
    for i in range(2):
        ref = port_get_transform(batch["center"][i].numpy(), float(out["scale"][i]), 256, float(out["rot"][i]))
        np.testing.assert_allclose(out["matrix"][i].numpy(), ref, atol=1e-9)
        assert torch.allclose(centroid(out["image"][i, 0]), out["joints"][i, 0], atol=0.05)
        assert torch.allclose(centroid(out["image"][i, 1]), out["joints"][i, 10], atol=0.05)
    assert math.isclose(float(out["scale"][0]), float(batch["scale"][0]) * 0.8)


def test_bad_input_is_rejected():
    batch = blob_batch()
    aug = MPIIAugment()
    with pytest.raises(ValueError, match="inp_res must be a positive int"):
        MPIIAugment(inp_res=0)
    with pytest.raises(ValueError, match=r"scale must be in \[0, 1\)"):
        MPIIAugment(scale=1.5)
    with pytest.raises(ValueError, match="sigma must be None or a positive"):
        MPIIAugment(sigma=-1.0)
    with pytest.raises(ValueError, match="batch must be a mapping with keys"):
        aug({k: v for k, v in batch.items() if k != "joints"})
    with pytest.raises(ValueError, match="batch must be a mapping with keys.*got list"):
        aug([batch])
    with pytest.raises(ValueError, match=r"batch\['image'\] must be uint8 or float \[B, 3, H, W\]"):
        aug({**batch, "image": batch["image"][:, :1]})
    with pytest.raises(ValueError, match=r"batch\['joints'\] must have shape \[2, 16, 2\]"):
        aug({**batch, "joints": batch["joints"][:, :14]})
    with pytest.raises(ValueError, match=r"params\['rot'\] must be a \[2\] tensor"):
        aug.apply(batch, {**aug.draw(2), "rot": torch.zeros(3)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    aug = MPIIAugment()
    batch = blob_batch()
    cpu = aug(batch, torch.Generator().manual_seed(4))
    gpu = aug(batch, torch.Generator().manual_seed(4), device="cuda")
    assert gpu["image"].is_cuda and gpu["heatmaps"].is_cuda
    for k in cpu:
        assert torch.allclose(cpu[k].double(), gpu[k].double().cpu(), atol=1e-4), k
