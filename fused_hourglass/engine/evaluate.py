"""PCKh of a model on a data source: the evaluation used by periodic validation and `python -m fused_hourglass
evaluate`."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from .. import pose
from .config import TrainConfig


@torch.no_grad()
def predict_heatmaps(model: nn.Module, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The last stack's heatmaps [B, J, h, w] of a model in eval mode (flip-tested when `flip`)."""
    if flip:
        return pose.flip_test(model, images)
    return model(images)[:, -1]


@torch.no_grad()
def pckh_on(model: nn.Module, loader, source, device: torch.device, *, flip: bool = False,
            channels_last: bool = False) -> dict[str, Any]:
    """PCKh@0.5 over every sample of `loader`, predictions mapped back to the original image's pixels. The model is
    put in eval mode for the call and returned to its previous mode."""
    was_training = model.training
    model.eval()
    preds, gts, norms = [], [], []
    try:
        for batch in loader:
            b = source.prepare(batch, device, 0, train=False)
            images = b["image"]
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            coords, _ = pose.decode_heatmaps(predict_heatmaps(model, images, flip).float(), stride=4)
            if b["matrix"] is not None:
                coords = pose.inverse_transform_points(coords.double(), b["matrix"])
            preds.append(coords.float().cpu())
            gts.append(b["gt"].float().cpu())
            norms.append(b["normalize"].float().cpu())
    finally:
        model.train(was_training)
    return pose.pckh(torch.cat(preds), torch.cat(gts), torch.cat(norms))


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in result.items():
        out[k] = v.tolist() if isinstance(v, torch.Tensor) else v
    if "per_joint" in out and len(out["per_joint"]) == len(pose.MPII_JOINTS):
        out["per_joint"] = dict(zip(pose.MPII_JOINTS, out["per_joint"], strict=True))
    return out


def evaluate(checkpoint: str, *, data: str = "synthetic", annotations: str | None = None, images: str | None = None,
             flip: bool = False, n: int | None = None, batch_size: int = 32, device: str = "auto",
             backend: str = "fused", res: int | None = None, out_json: str | None = None) -> dict[str, Any]:
    """PCKh table (printed) and a JSON of the same, for a checkpoint on `n` held-out synthetic images (default
    500, at the checkpoint's resolution) or on MPII annotations with their images (default: every entry)."""
    from .. import StackedHourglass
    from ..checkpoint import load_checkpoint
    from .data import make_source, val_loader
    from .train import resolve_device

    dev = resolve_device(device)
    obj = load_checkpoint(checkpoint)
    saved = obj.get("train_config") if isinstance(obj.get("train_config"), dict) else {}
    res = res or saved.get("res") or 256  # the port's released models take 256 px crops
    model = StackedHourglass.from_checkpoint(obj, backend=backend).to(dev).eval()
    if n is None:
        n = 500 if data == "synthetic" else 10**9  # every MPII entry
    if n < 1:
        raise ValueError(f"evaluate: -n must be a positive number of images, got {n}")
    config = TrainConfig(data=data, annotations=annotations, val_annotations=annotations, images=images, res=res,
                         val_size=n, train_size=1, batch_size=batch_size)
    if data == "mpii" and not (annotations and images):
        raise ValueError("evaluate --data mpii needs --annotations H5 and --images DIR")
    source = make_source(config, with_train=False)
    loader = val_loader(source, config, batch_size)
    results = {"no flip": pckh_on(model, loader, source, dev)}
    if flip:
        results["flip"] = pckh_on(model, loader, source, dev, flip=True)
    print(f"PCKh@0.5 of {checkpoint} on {len(source.val_set)} {'held-out synthetic' if data == 'synthetic' else 'MPII'}"
          f" images at {res} px:")
    print(pose.format_pckh_table(results))
    report = {"checkpoint": os.path.abspath(checkpoint), "data": data, "res": res, "images": len(source.val_set),
              "results": {k: _jsonable(v) for k, v in results.items()}}
    if out_json:
        os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {out_json}")
    return report

