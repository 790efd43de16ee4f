"""MPII augmentation done on the collated batch, on the training device, as one batched affine warp.

The published port crops each person at (center, scale), then warps the crop again by a random rotation and scale
about its centre, flips, and jitters colour, per sample on CPU workers. Here the two warps are composed into one
matrix per sample, ``get_transform(center, scale·s_aug, inp_res, rot)`` followed by the flip ``x -> inp_res-1-x``,
so images are interpolated once and joints follow the same matrix exactly. Differences from the port, all small:
one interpolation instead of two, no integer truncation of joints after the first crop, and a flip that mirrors
joints about the same axis as the pixels (the port maps joints to ``res - x`` but pixels to ``res - 1 - x``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..pose import MPII_FLIP, crop, get_transform, make_heatmaps, transform_points

NUM_JOINTS = 16
_BATCH_KEYS = ("image", "center", "scale", "joints", "visible", "normalize")
_PARAM_KEYS = ("rot", "scale", "flip", "color", "hue", "saturation", "brightness", "contrast")


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, 3, H, W] RGB in [0, 1] -> hue in degrees [0, 360), saturation, value, each [B, H, W] (cv2's float rule)."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    cs = c.clamp_min(1e-12)  # c == 0 only for greys, where every numerator below is 0 too
    h = torch.where(v == r, (g - b) / cs, torch.where(v == g, (b - r) / cs + 2, (r - g) / cs + 4))
    return (h * 60) % 360, c / v.clamp_min(1e-12), v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_rgb_to_hsv``: channel n of (5, 3, 1) is v - v·s·clamp(min(k, 4 - k), 0, 1), k = (n + h/60) % 6."""
    k = (torch.tensor([5.0, 3.0, 1.0], device=h.device, dtype=h.dtype).view(1, 3, 1, 1) + h.unsqueeze(1) / 60) % 6
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x: torch.Tensor, hue: torch.Tensor, saturation: torch.Tensor, brightness: torch.Tensor,
                 contrast: torch.Tensor) -> torch.Tensor:
    """The port's jitter on [B, 3, H, W] RGB in [0, 1] with per-sample [B] parameters, in its order: hue += hue·360°
    (mod 360), saturation ·= saturation (clipped to [0, 1]), += brightness, then "contrast": each pixel's deviation
    from its own channel mean ·= contrast; the result is clipped to [0, 1]."""
    per = {"hue": hue, "saturation": saturation, "brightness": brightness, "contrast": contrast}
    for name, t in per.items():
        if t.shape != (x.shape[0],):
            raise ValueError(f"color_jitter: {name} must have shape [{x.shape[0]}], got {list(t.shape)}")
    hue, sat, bright, con = (t.to(x.device, x.dtype).view(-1, 1, 1, 1) for t in per.values())
    h, s, v = _rgb_to_hsv(x)
    x = _hsv_to_rgb((h + hue[:, 0] * 360) % 360, (s * sat[:, 0]).clamp(0, 1), v) + bright
    mean = x.mean(1, keepdim=True)
    return ((x - mean) * con + mean).clamp(0, 1)


class MPIIAugment:
    """Batched crop, augmentation and heatmap targets for collated MPII batches (see ``collate_mpii``).

    Training draws per sample, as the port does: rot ~ U(-rot, rot) degrees, scale factor ~ U(1 - scale, 1 + scale)
    (box side 200·scale·factor, so > 1 zooms out), one fair coin that flips (with the MPII_FLIP joint swap) and, as
    in the port, gates the colour jitter (the port jitters exactly its flipped samples; ``flip=False`` keeps the
    coin for the jitter): hue shift U(-0.2, 0.2) of a turn, saturation ·U(0.5, 1.5), brightness +U(-0.3, 0.3),
    contrast ·U(0.5, 1.5). Evaluation (``train=False``) only crops at the annotated center and scale.
    """

    def __init__(self, inp_res: int = 256, out_res: int = 64, train: bool = True, rot: float = 30.0,
                 scale: float = 0.25, flip: bool = True, color: bool = True, sigma: float | None = None):
        for name, res in (("inp_res", inp_res), ("out_res", out_res)):
            if not isinstance(res, int) or isinstance(res, bool) or res <= 0:
                raise ValueError(f"MPIIAugment: {name} must be a positive int, got {res!r}")
        if not 0 <= rot < math.inf:
            raise ValueError(f"MPIIAugment: rot must be a finite number of degrees >= 0, got {rot!r}")
        if sigma is not None and not 0 < sigma < math.inf:
            raise ValueError(f"MPIIAugment: sigma must be None or a positive finite number, got {sigma!r}")
        if not 0 <= scale < 1:
            raise ValueError(f"MPIIAugment: scale must be in [0, 1), got {scale!r}")
        self.inp_res, self.out_res, self.train, self.rot, self.scale = inp_res, out_res, train, float(rot), scale
        self.flip, self.color, self.sigma = flip, color, sigma

    def draw(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample parameters, each [batch_size], from ONE draw of ``generator`` (default: torch's global CPU
        RNG) on the generator's device, so a seeded CPU generator gives the same parameters whatever the batch's
        device. Keys: rot (degrees), scale (factor), flip, color (bool), hue, saturation, brightness, contrast."""
        if not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"MPIIAugment.draw: batch_size must be an int >= 0, got {batch_size!r}")
        dev = generator.device if generator is not None else torch.device("cpu")
        if self.train:
            u = torch.rand(batch_size, 7, generator=generator, dtype=torch.float64, device=dev)
        else:  # the midpoint of every range is the identity, and 0.5 is not < 0.5: no flip, no jitter
            u = torch.full((batch_size, 7), 0.5, dtype=torch.float64, device=dev)
        coin = u[:, 2] < 0.5
        return {"rot": (2 * u[:, 0] - 1) * self.rot, "scale": 1 + (2 * u[:, 1] - 1) * self.scale,
                "flip": coin & self.flip, "color": coin & self.color, "hue": (2 * u[:, 3] - 1) * 0.2,
                "saturation": u[:, 4] + 0.5, "brightness": (2 * u[:, 5] - 1) * 0.3, "contrast": u[:, 6] + 0.5}

    def apply(self, batch: Mapping, params: Mapping, device: torch.device | str | None = None) -> dict:
        """Augment ``batch`` with ``params`` (from ``draw``) on ``device`` (default: the batch image's device).

        Colour jitter applies to the samples whose ``params["color"]`` is set, in training mode with ``color=True``.
        Returns ``"image"`` float32 [B, 3, inp_res, inp_res] in [0, 1]; ``"heatmaps"`` float32 [B, 16, out_res,
        out_res]; ``"joints"`` [B, 16, 2] in input-crop pixels, (0, 0) where unannotated or outside
        [0, inp_res-1]²; ``"valid"`` [B, 16] bool, the joints kept; ``"visible"`` [B, 16] (0 where not kept);
        ``"normalize"`` [B] in input-crop pixels; ``"center"`` [B, 2], ``"scale"`` [B] (the box actually cropped),
        ``"rot"`` [B] degrees, ``"flipped"`` [B] bool, ``"matrix"`` [B, 3, 3] image -> input crop (flip included),
        all geometry float64; ``"index"`` when the batch has one. Joints and visibility are permuted by MPII_FLIP
        on flipped samples, so channel k is always joint k of the mirrored person.
        """
        if not isinstance(batch, Mapping) or any(k not in batch for k in _BATCH_KEYS):
            raise ValueError(f"MPIIAugment: batch must be a mapping with keys {_BATCH_KEYS} (see collate_mpii), got "
                             f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
        image = batch["image"]
        if image.ndim != 4 or image.shape[1] != 3 or not (image.dtype == torch.uint8 or image.is_floating_point()):
            raise ValueError(f"MPIIAugment: batch['image'] must be uint8 or float [B, 3, H, W], "
                             f"got {image.dtype} {list(image.shape)}")
        n, res = image.shape[0], self.inp_res
        shapes = {"center": (n, 2), "scale": (n,), "joints": (n, NUM_JOINTS, 2), "visible": (n, NUM_JOINTS),
                  "normalize": (n,)}
        for k, want in shapes.items():
            if tuple(batch[k].shape) != want:
                raise ValueError(f"MPIIAugment: batch[{k!r}] must have shape {list(want)}, got {list(batch[k].shape)}")
        for k in _PARAM_KEYS:
            if k not in params or tuple(params[k].shape) != (n,):
                raise ValueError(f"MPIIAugment: params[{k!r}] must be a [{n}] tensor (see draw), "
                                 f"got {tuple(params[k].shape) if k in params else 'nothing'}")
        dev = torch.device(device) if device is not None else image.device
        image = image.to(dev)
        center, scale, joints, visible, normalize = (batch[k].to(dev, torch.float64) for k in _BATCH_KEYS[1:])
        p = {k: params[k].to(dev) for k in _PARAM_KEYS}
        rot, flip, scale = p["rot"].double(), p["flip"].bool(), scale * p["scale"].double()

        mirror = torch.tensor([[-1.0, 0, res - 1], [0, 1, 0], [0, 0, 1]], dtype=torch.float64, device=dev)
        unflipped = get_transform(center, scale, res, rot)
        matrix = torch.where(flip.view(-1, 1, 1), mirror @ unflipped, unflipped)
        # uint8 is sampled in float32, so scale after the crop; a batch left empty by the collate has no pixels
        out = crop(image, center, scale, res, rot) if n else torch.zeros(0, 3, res, res, device=dev)
        out = out / 255 if image.dtype == torch.uint8 else out.float()
        # Mirroring the crop's pixel grid is exactly the warp by ``mirror @ unflipped``: one interpolation either way.
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        if self.train and self.color:
            jittered = color_jitter(out, p["hue"], p["saturation"], p["brightness"], p["contrast"])
            out = torch.where(p["color"].bool().view(-1, 1, 1, 1), jittered, out)

        pts = transform_points(joints, matrix)
        valid = (joints[..., 0] > 0) & ((pts >= 0) & (pts <= res - 1)).all(-1)
        perm = torch.tensor(MPII_FLIP, device=dev)
        pts, valid, visible = (torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t[:, perm], t)
                               for t in (pts, valid, visible))
        pts = torch.where(valid.unsqueeze(-1), pts, torch.zeros_like(pts))
        heatmaps = make_heatmaps(pts * (self.out_res / res), self.out_res, self.sigma, mask=valid)
        result = {"image": out, "heatmaps": heatmaps, "joints": pts, "valid": valid, "visible": visible * valid,
                  "normalize": normalize * res / (200 * scale), "center": center, "scale": scale, "rot": rot,
                  "flipped": flip, "matrix": matrix}
        if "index" in batch:
            result["index"] = torch.as_tensor(batch["index"]).to(dev)
        return result

    def __call__(self, batch: Mapping, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> dict:
        """``apply(batch, draw(B, generator), device)``: see ``apply`` for the outputs."""
        n = len(batch["image"]) if isinstance(batch, Mapping) and "image" in batch else 0  # apply checks the batch
        return self.apply(batch, self.draw(n, generator), device)
