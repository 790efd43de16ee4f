"""A checkpoint as an ONNX file: the reference network with its BatchNorms folded (`folding.fold_reference`), exported
by torch.onnx's dynamo exporter (which needs the `onnx` and `onnxscript` packages: the `onnx` extra) at a fixed
opset, with a dynamic batch axis.

The file's graph: input "images" [batch, 3, res, res] float32 (NCHW, RGB in [0, 1], as the model takes them), output
"heatmaps" [batch, nstack, oup_dim, res/4, res/4]. Each Residual's bn1 remains a BatchNormalization node; every other
BatchNorm is inside its convolution's weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

OPSET = 18  # ONNX opset of the exported file (default domain)


def _check_packages() -> None:
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"export: torch.onnx's exporter needs the {' and '.join(missing)} package"
                         f"{'s' if len(missing) > 1 else ''}: pip install 'fused_hourglass[onnx]' (or "
                         f"pip install {' '.join(missing)})")


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx logs a warning per torchvision op it cannot register when torchvision is absent: not ours."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, res: int | None = None,
                opset: int = OPSET) -> dict[str, Any]:
    """Write the network of `checkpoint` (ours or the port's) to `out` as ONNX; returns what was written: path,
    opset, res, the model's config and the BatchNorms folded."""
    from .. import StackedHourglass, folding
    from ..checkpoint import load_checkpoint
    from ..reference.model import SIDE_MULTIPLE

    out = os.fspath(out)
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"export: --onnx {out!r}: the directory {directory!r} does not exist")
    if res is not None and (res <= 0 or res % SIDE_MULTIPLE):
        raise ValueError(f"export: --res must be a positive multiple of {SIDE_MULTIPLE}, got {res}")
    obj = load_checkpoint(checkpoint)
    _check_packages()
    saved = obj.get("train_config") if isinstance(obj.get("train_config"), dict) else {}
    res = res or saved.get("res") or 256
    model = StackedHourglass.from_checkpoint(obj, backend="reference").eval()
    folded = folding.fold_reference(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    kept = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    images = torch.rand(1, 3, res, res)
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(folded, (images,), out, dynamo=True, opset_version=opset, input_names=["images"],
                          output_names=["heatmaps"], dynamic_shapes={"imgs": {0: torch.export.Dim("batch")}},
                          external_data=False, verbose=False)
    return {"path": out, "opset": opset, "res": res, "config": model.config, "batchnorms": n_bn,
            "folded": n_bn - kept}
