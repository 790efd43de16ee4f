"""Keypoints on a user's own images: person box → crop → model → decode → back to the image's pixels."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import pose


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'x0,y0,x1,y1' in image pixels, x1 > x0 and y1 > y0."""
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box must be four comma-separated numbers x0,y0,x1,y1, got {text!r}") from None
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"--box {text}: x1 must exceed x0 and y1 must exceed y0")
    return x0, y0, x1, y1


def crop_parameters(width: int, height: int, box: Sequence[float] | None = None) -> tuple[list[float], float]:
    """The crop's centre and scale: without a box the whole image (centre = image centre, scale = max(h, w)/200,
    as the port's demo); with a box (x0, y0, x1, y1) its centre and scale = 1.25 · max(box side)/200."""
    if box is None:
        return [width / 2, height / 2], max(width, height) / 200
    x0, y0, x1, y1 = box
    return [(x0 + x1) / 2, (y0 + y1) / 2], 1.25 * max(x1 - x0, y1 - y0) / 200


def load_image(path: str) -> torch.Tensor:
    """[3, H, W] uint8 RGB; a clear error for a missing or undecodable file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"predict: image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"predict: {path!r} is not an image Pillow can decode ({exc})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@torch.no_grad()
def predict(checkpoint: str, images: Sequence[str], *, box: Sequence[float] | None = None, out: str = "predictions",
            device: str = "auto", backend: str = "fused", res: int | None = None, flip: bool = False) -> list[dict]:
    """Keypoints of the person in each image (one crop per image, all crops in one batch); writes NAME.json (the
    keypoints in the original image's pixels, with confidences) and NAME.png (the skeleton drawn on the image, the
    summed heatmaps beside it) into `out`."""
    from .. import StackedHourglass
    from ..checkpoint import load_checkpoint
    from .plots import prediction_figure, tensor_to_pil
    from .train import resolve_device

    if not images:
        raise ValueError("predict: give at least one IMAGE")
    pictures = [load_image(p) for p in images]  # every file checked before the model is built
    dev = resolve_device(device)
    obj = load_checkpoint(checkpoint)
    saved = obj.get("train_config") if isinstance(obj.get("train_config"), dict) else {}
    res = res or saved.get("res") or 256
    model = StackedHourglass.from_checkpoint(obj, backend=backend).to(dev).eval()

    centers, scales, crops = [], [], []
    for picture in pictures:
        c, s = crop_parameters(picture.shape[2], picture.shape[1], box)
        centers.append(c)
        scales.append(s)
        crops.append(pose.crop(picture[None].to(dev).float() / 255, torch.tensor([c]), torch.tensor([s]), res)[0])
    batch = torch.stack(crops)
    heat = pose.flip_test(model, batch) if flip else model(batch)[:, -1]
    coords, conf = pose.decode_heatmaps(heat.float(), stride=4)
    matrix = pose.get_transform(torch.tensor(centers, dtype=torch.float64), torch.tensor(scales, dtype=torch.float64),
                                res)
    original = pose.inverse_transform_points(coords.double().cpu(), matrix).float()

    os.makedirs(out, exist_ok=True)
    results = []
    for i, path in enumerate(images):
        name = os.path.splitext(os.path.basename(path))[0]
        result: dict[str, Any] = {
            "image": os.path.abspath(path), "width": int(pictures[i].shape[2]), "height": int(pictures[i].shape[1]),
            "box": list(box) if box is not None else None, "center": centers[i], "scale": scales[i], "input_res": res,
            "keypoints": [{"joint": j, "x": round(float(x), 2), "y": round(float(y), 2),
                           "confidence": round(float(p), 4)}
                          for j, (x, y), p in zip(pose.MPII_JOINTS, original[i].tolist(), conf[i].tolist(),
                                                  strict=True)],
        }
        json_path, png_path = os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.png")
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        figure = prediction_figure(tensor_to_pil(pictures[i]), original[i].numpy(), conf[i].cpu().numpy(), heat[i],
                                   crop=tensor_to_pil(batch[i]))
        figure.save(png_path)
        result["files"] = [json_path, png_path]
        results.append(result)
        print(f"{path}: keypoints -> {json_path}, picture -> {png_path}")
    return results
