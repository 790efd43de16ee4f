"""PCKh (percentage of correct keypoints, head-normalised) in the MPII benchmark's and the port's conventions."""

from __future__ import annotations

import math

import torch

from .heatmaps import MPII_JOINTS

MPII_MEAN_EXCLUDED = (6, 7)  # pelvis, thorax: left out of the MPII benchmark's mean
_MPII_LABEL = "MPII mean (w/o pelvis, thorax)"


def pckh(pred: torch.Tensor, gt: torch.Tensor, normalize: torch.Tensor, threshold: float = 0.5) -> dict:
    """PCKh of predictions against annotations.

    A joint counts when its gt x is not 0 (the MPII files mark unannotated joints with (0, 0); the port tests x
    only), and is correct when ``||pred - gt|| / normalize < threshold`` (strict).

    Args:
        pred: [N, J, 2] predicted (x, y) in image pixels.
        gt: [N, J, 2] annotated (x, y) in image pixels.
        normalize: [N] per-person normaliser (MPII: 0.6 x head-box diagonal).
        threshold: PCKh threshold, 0.5 for PCKh@0.5.

    Returns:
        dict with ``"per_joint"`` float64 tensor [J] of fractions (NaN for a joint never annotated),
        ``"per_joint_count"`` int64 tensor [J] of annotated instances, ``"mpii"`` (correct / annotated pooled over all
        joints but pelvis and thorax; NaN unless J == 16), ``"all16"`` (pooled over all J joints, as the port
        prints), ``"count"`` (annotated joints, int) and ``"threshold"``. Fractions are in [0, 1].
    """
    for name, t in (("pred", pred), ("gt", gt), ("normalize", normalize)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if gt.ndim != 3 or gt.shape[-1] != 2:
        raise ValueError(f"gt: expected shape [N, J, 2], got {tuple(gt.shape)}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape [N, J, 2], got pred {tuple(pred.shape)} "
                         f"and gt {tuple(gt.shape)}")
    if normalize.shape != gt.shape[:1]:
        raise ValueError(f"normalize: expected shape [N] = {tuple(gt.shape[:1])} to match gt {tuple(gt.shape)}, "
                         f"got {tuple(normalize.shape)}")
    if not 0 < float(threshold) < math.inf:
        raise ValueError(f"threshold: expected a positive number, got {threshold!r}")

    p, g = pred.to(torch.float64), gt.to(device=pred.device, dtype=torch.float64)
    norm = normalize.to(device=pred.device, dtype=torch.float64)
    annotated = g[..., 0] != 0
    error = torch.linalg.vector_norm(p - g, dim=-1) / norm[:, None]
    correct = (error < threshold) & annotated
    n_correct, n_annot = correct.sum(0), annotated.sum(0)
    per_joint = torch.where(n_annot > 0, n_correct.double() / n_annot.clamp(min=1), math.nan)

    def pooled(joints: list[int]) -> float:
        total = int(n_annot[joints].sum())
        return int(n_correct[joints].sum()) / total if total else math.nan

    num_j = g.shape[1]
    mpii = pooled([j for j in range(num_j) if j not in MPII_MEAN_EXCLUDED]) if num_j == 16 else math.nan
    return {"per_joint": per_joint, "per_joint_count": n_annot, "mpii": mpii,
            "all16": pooled(list(range(num_j))), "count": int(n_annot.sum()), "threshold": float(threshold)}


def format_pckh_table(results_by_name: dict[str, dict]) -> str:
    """Plain-text table of PCKh results: one row per joint and a column per entry, in percent (one decimal),
    then the MPII-benchmark mean and the all-joint mean.

    Args:
        results_by_name: e.g. ``{"no flip": pckh(...), "flip": pckh(...)}``, all with the same number of joints.
    """
    if not isinstance(results_by_name, dict) or not results_by_name:
        raise ValueError("results_by_name: expected a non-empty dict of name -> pckh() result")
    sizes = {name: len(r["per_joint"]) for name, r in results_by_name.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"results_by_name: entries have different joint counts {sizes}")
    num_j = next(iter(sizes.values()))
    names = list(MPII_JOINTS) if num_j == 16 else [f"joint {j}" for j in range(num_j)]
    rows = [[name, *(float(r["per_joint"][j]) for r in results_by_name.values())] for j, name in enumerate(names)]
    rows.append([_MPII_LABEL, *(float(r["mpii"]) for r in results_by_name.values())])
    rows.append([f"all {num_j} joints", *(float(r["all16"]) for r in results_by_name.values())])

    threshold = {float(r.get("threshold", 0.5)) for r in results_by_name.values()}
    head = [f"PCKh@{threshold.pop():g}" if len(threshold) == 1 else "PCKh", *results_by_name]
    cells = [head] + [[row[0], *(f"{100 * v:.1f}" for v in row[1:])] for row in rows]
    width0 = max(len(c[0]) for c in cells)
    widths = [max(len(c[i]) for c in cells) for i in range(1, len(head))]
    lines = [c[0].ljust(width0) + "".join("  " + v.rjust(wd) for v, wd in zip(c[1:], widths, strict=True))
             for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 2, "-" * len(lines[0]))
    return "\n".join(lines)
