"""MPII Human Pose: the stacked-hourglass h5 annotations, a decode-only Dataset and its collate.

Conventions: (x, y) image pixels; a joint with x <= 0 is unannotated (the file marks them (0, 0)); the person box
side is 200·scale px; ``center`` and ``scale`` are used as stored (the file already shifts the centre down by
15·s and multiplies the scale by 1.25). Augmentation is not done here but on the batch: see ``augment.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

NUM_JOINTS = 16
H5_KEYS = ("imgname", "center", "scale", "part", "visible", "normalize", "index", "person", "torsoangle")
_SHAPES = {"center": (2,), "part": (NUM_JOINTS, 2), "visible": (NUM_JOINTS,)}  # trailing shapes; others are [N]


class MPIIAnnotations:
    """The h5 annotation file, read whole into float64 tensors: ``center`` [N, 2], ``scale`` [N], ``part``
    [N, 16, 2], ``visible`` [N, 16], ``normalize`` [N] (PCKh head size), ``index``, ``person``, ``torsoangle``
    [N]; ``imgname`` is a list of N str. ``ann[i]`` is a dict of entry i; ``ann.subset(indices)`` selects entries.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MPIIAnnotations: annotation file {str(path)!r} does not exist")
        if not h5py.is_hdf5(path):
            raise ValueError(f"MPIIAnnotations: {str(path)!r} is not an HDF5 file")
        with h5py.File(path, "r") as f:
            missing = [k for k in H5_KEYS if k not in f]
            if missing:
                raise ValueError(f"MPIIAnnotations: {str(path)!r} lacks key(s) {missing}; expected keys {H5_KEYS}")
            data = {k: f[k][()] for k in H5_KEYS}
        n = len(data["imgname"])
        for k in H5_KEYS[1:]:
            want = (n, *_SHAPES.get(k, ()))
            if data[k].shape != want:
                raise ValueError(f"MPIIAnnotations: {str(path)!r} key {k!r} must have shape {want}, "
                                 f"got {data[k].shape}")
        self.path = path
        self.imgname = [s.decode() if isinstance(s, bytes) else str(s) for s in data["imgname"]]
        for k in H5_KEYS[1:]:
            setattr(self, k, torch.from_numpy(np.asarray(data[k], dtype=np.float64)))

    def __len__(self) -> int:
        return len(self.imgname)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"MPIIAnnotations: index {i} out of range for {len(self)} entries")
        return {"imgname": self.imgname[i], **{k: getattr(self, k)[i] for k in H5_KEYS[1:]}}

    def subset(self, indices: Sequence[int] | torch.Tensor) -> MPIIAnnotations:
        """A new MPIIAnnotations holding entries ``indices`` (in that order) of this one."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        out = object.__new__(MPIIAnnotations)
        out.path, out.imgname = self.path, [self.imgname[i] for i in idx.tolist()]
        for k in H5_KEYS[1:]:
            setattr(out, k, getattr(self, k)[idx])
        return out


class MPIIDataset(torch.utils.data.Dataset):
    """Decode-only MPII dataset: sample i is ``{"image": uint8 [3, H, W] RGB, "index": i, "center": [2],
    "scale": [], "joints": [16, 2], "visible": [16], "normalize": []}`` (float64, image pixels), or ``None`` when
    Pillow cannot decode the file (warned, and counted in ``corrupt_count`` of the process that decoded it).

    ``annotations``: an MPIIAnnotations or a path to the h5 file. ``train`` is recorded for the pipeline (which
    augmentation mode to use); decoding does not depend on it. ``check_files`` checks at construction that every
    image exists, raising FileNotFoundError naming the first missing one.
    """

    def __init__(self, annotations: MPIIAnnotations | str | Path, image_dir: str | Path, train: bool = True, *,
                 check_files: bool = True):
        if isinstance(annotations, (str, Path)):
            annotations = MPIIAnnotations(annotations)
        if not isinstance(annotations, MPIIAnnotations):
            raise TypeError(f"MPIIDataset: annotations must be an MPIIAnnotations or a path, "
                            f"got {type(annotations).__name__}")
        self.annotations, self.image_dir, self.train = annotations, Path(image_dir), bool(train)
        self.corrupt_count = 0
        if check_files:
            if not self.image_dir.is_dir():
                raise FileNotFoundError(f"MPIIDataset: image_dir {str(self.image_dir)!r} is not a directory")
            missing = [n for n in dict.fromkeys(annotations.imgname) if not (self.image_dir / n).is_file()]
            if missing:
                raise FileNotFoundError(f"MPIIDataset: {len(missing)} image file(s) missing from "
                                        f"{str(self.image_dir)!r}; first missing: {str(self.image_dir / missing[0])!r}")

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, i: int) -> dict | None:
        ann = self.annotations[i]
        path = self.image_dir / ann["imgname"]
        try:
            with Image.open(path) as im:
                pixels = np.array(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            self.corrupt_count += 1
            warnings.warn(f"MPIIDataset: skipping corrupt image {str(path)!r} ({e})", stacklevel=2)
            return None
        return {"image": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), "index": int(i) % len(self),
                "center": ann["center"], "scale": ann["scale"], "joints": ann["part"], "visible": ann["visible"],
                "normalize": ann["normalize"]}


def collate_mpii(samples: Sequence[dict | None]) -> dict:
    """Batch MPIIDataset samples, dropping ``None`` (counted in ``"skipped"``). Images are zero-padded at the
    bottom and right to the largest H and W, so pixel coordinates are unchanged: ``"image"`` uint8
    [B, 3, Hmax, Wmax], ``"image_size"`` int64 [B, 2] as (w, h), ``"center"`` [B, 2], ``"scale"`` [B],
    ``"joints"`` [B, 16, 2], ``"visible"`` [B, 16], ``"normalize"`` [B] (float64), ``"index"`` int64 [B].
    """
    kept = [s for s in samples if s is not None]
    sizes = torch.tensor([[s["image"].shape[2], s["image"].shape[1]] for s in kept], dtype=torch.long).reshape(-1, 2)
    w, h = sizes.max(0).values.tolist() if kept else (0, 0)
    image = torch.zeros(len(kept), 3, h, w, dtype=torch.uint8)
    for b, s in enumerate(kept):
        image[b, :, : s["image"].shape[1], : s["image"].shape[2]] = s["image"]

    def stack(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not kept:
            return torch.zeros(0, *shape, dtype=torch.float64)
        return torch.stack([torch.as_tensor(s[key], dtype=torch.float64) for s in kept])

    return {"image": image, "image_size": sizes, "center": stack("center", (2,)), "scale": stack("scale", ()),
            "joints": stack("joints", (NUM_JOINTS, 2)), "visible": stack("visible", (NUM_JOINTS,)),
            "normalize": stack("normalize", ()), "index": torch.tensor([s["index"] for s in kept], dtype=torch.long),
            "skipped": len(samples) - len(kept)}
