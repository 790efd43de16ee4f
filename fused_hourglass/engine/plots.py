"""Pictures: training curves (matplotlib, optional) and predictions drawn on images (Pillow)."""

from __future__ import annotations

import numpy as np
import torch

from .. import pose

# Colours of the person's right side, left side and the middle (the body's axis).
_RIGHT, _LEFT, _MIDDLE = (235, 64, 52), (52, 140, 235), (90, 220, 90)
_RIGHT_JOINTS, _LEFT_JOINTS = {0, 1, 2, 10, 11, 12}, {3, 4, 5, 13, 14, 15}


def _side_colour(*joints: int) -> tuple[int, int, int]:
    if all(j in _RIGHT_JOINTS for j in joints):
        return _RIGHT
    if all(j in _LEFT_JOINTS for j in joints):
        return _LEFT
    return _MIDDLE


def draw_skeleton(image, coords: np.ndarray, confidence: np.ndarray | None = None, *, min_confidence: float = 0.0,
                  width: int = 3):
    """Draw the 16-joint MPII skeleton on a PIL image in place: right limbs red, left blue, the axis green;
    joints below `min_confidence` are left out."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    ok = np.ones(len(coords), bool) if confidence is None else confidence >= min_confidence
    for a, b in pose.MPII_SKELETON:
        if ok[a] and ok[b]:
            draw.line([tuple(coords[a]), tuple(coords[b])], fill=_side_colour(a, b), width=width)
    r = width + 1
    for j, (x, y) in enumerate(coords):
        if ok[j]:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_side_colour(j), outline=(255, 255, 255))
    return image


def heatmap_image(heatmaps: torch.Tensor, size: tuple[int, int]):
    """The joints' heatmaps [J, h, w] summed (negative values as 0), divided by their maximum when that exceeds 1
    (overlapping joints), coloured black-red-yellow-white and resized to `size` (w, h), as a PIL image."""
    from PIL import Image

    h = heatmaps.float().clamp_min(0).sum(0)
    h = (h / h.max().clamp_min(1.0)).cpu().numpy()
    rgb = np.stack([np.clip(3 * h, 0, 1), np.clip(3 * h - 1, 0, 1), np.clip(3 * h - 2, 0, 1)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize(size, Image.BILINEAR)


def prediction_figure(image, coords: np.ndarray, confidence: np.ndarray, heatmaps: torch.Tensor, crop=None,
                      *, max_side: int = 512):
    """Side by side: the image with the predicted skeleton, and the summed heatmaps (over the crop when given)."""
    from PIL import Image

    scale = max_side / max(image.size)
    shown = image.convert("RGB").resize((max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
                                        Image.BILINEAR)
    draw_skeleton(shown, coords * scale, confidence, width=max(2, round(max_side / 150)))
    side = shown.size[1]
    heat = heatmap_image(heatmaps, (side, side))
    if crop is not None:
        heat = Image.blend(crop.convert("RGB").resize((side, side), Image.BILINEAR), heat, 0.6)
    figure = Image.new("RGB", (shown.size[0] + side + 8, side), (255, 255, 255))
    figure.paste(shown, (0, 0))
    figure.paste(heat, (shown.size[0] + 8, 0))
    return figure


def tensor_to_pil(image: torch.Tensor):
    """[3, H, W] float in [0, 1] or uint8 to a PIL image."""
    from PIL import Image

    x = image.detach().cpu()
    if x.is_floating_point():
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy())


@torch.no_grad()
def plot_sample_prediction(model, source, device, path: str, *, channels_last: bool = False, count: int = 4) -> str:
    """Predictions of the model on the first `count` held-out images, each beside its heatmaps, as one PNG."""
    from PIL import Image
    from torch.utils.data import default_collate

    from .evaluate import predict_heatmaps

    was_training = model.training
    model.eval()
    try:
        samples = [source.val_set[i] for i in range(min(count, len(source.val_set)))]
        batch = (source.collate or default_collate)(samples)
        images = source.prepare(batch, device, 0, train=False)["image"]  # the crops the model sees
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        heat = predict_heatmaps(model, images).float()
        coords, conf = pose.decode_heatmaps(heat, stride=4)
    finally:
        model.train(was_training)
    tiles = [prediction_figure(tensor_to_pil(images[i]), coords[i].cpu().numpy(), conf[i].cpu().numpy(), heat[i],
                               max_side=192) for i in range(len(images))]
    columns = 2 if len(tiles) > 1 else 1
    rows = (len(tiles) + columns - 1) // columns
    w, h = max(t.size[0] for t in tiles), max(t.size[1] for t in tiles)
    sheet = Image.new("RGB", (columns * (w + 16) - 16, rows * (h + 16) - 16), (255,) * 3)
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % columns) * (w + 16), (i // columns) * (h + 16)))
    sheet.save(path)
    return f"wrote {path} (predictions on held-out images, with their heatmaps)"


def plot_curves(rows: list[dict[str, float]], path: str) -> str:
    """Loss and validation PCKh against the step, as a PNG; a note instead when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: no {path} (pip install matplotlib, or the [plot] extra)"
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    pck = [(r["step"], 100 * r["pckh_mpii"], 100 * r["pckh_all16"]) for r in rows if "pckh_mpii" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    if losses:
        ax1.plot(*zip(*losses, strict=True), color="tab:blue")
        ax1.set_yscale("log")
    ax1.set(xlabel="step", ylabel="heatmap loss (MSE)", title="training loss")
    if pck:
        steps, mpii, all16 = zip(*pck, strict=True)
        ax2.plot(steps, mpii, "o-", label="MPII mean (w/o pelvis, thorax)")
        ax2.plot(steps, all16, "s--", label="all 16 joints")
        ax2.legend(loc="lower right")
    ax2.set(xlabel="step", ylabel="PCKh@0.5 (%)", title="validation", ylim=(0, 100))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"wrote {path} (loss and validation PCKh curves)"
