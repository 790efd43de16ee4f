"""Training configuration: one flat dataclass, two presets, and the rules for overriding them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SYNTHETIC_VAL_SEED = 1_000_003  # the held-out synthetic images: a seed no training run uses by default


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint as "train_config"."""

    preset: str = "demo"
    # data
    data: str = "synthetic"  # "synthetic" | "mpii"
    annotations: str | None = None  # MPII training annotations (h5)
    val_annotations: str | None = None  # MPII validation annotations (h5)
    images: str | None = None  # MPII image folder
    train_size: int = 200_000  # synthetic training images (each seen at most once in a demo run)
    val_size: int = 256  # held-out images used by the periodic validation
    res: int = 64  # input side in pixels (heatmaps are res/4)
    sigma: float | None = 2.0  # heatmap Gaussian σ in heatmap pixels; None: the port's res/4/64
    # model
    nstack: int = 1
    inp_dim: int = 64
    oup_dim: int = 16
    increase: int = 0
    backend: str = "fused"
    recompute: str = "none"  # the fused backend's memory policy: "none" | "conv1" | "block" (StackedHourglass)
    channels_last: bool = True
    # optimisation
    batch_size: int = 16
    lr: float = 4e-2
    schedule: str = "onecycle"  # "onecycle" (warm-up then cosine to 0) | "step" (the port's: lr -> lr_drop_to)
    lr_drop_step: int = 100_000
    lr_drop_to: float = 2e-4
    steps: int = 1000
    amp: bool = False  # a preset may say "auto": resolved by from_preset (resolve_amp)
    grad_accum: int = 1  # micro-batches of batch_size per process summed into one optimizer step
    sync_bn: bool = False  # BatchNorm statistics over all processes of a distributed run
    # running
    device: str = "auto"
    workers: int = 1
    seed: int = 0
    out: str = "runs/demo"
    log_every: int = 10
    val_every: int = 200
    checkpoint_every: int = 200
    keep_last: int = 2
    dist_timeout: float = 600.0  # seconds any collective may wait for the other processes
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # A small model on SyntheticPoses at 128 px, sized for at most about five minutes on two CPU cores (2.5 min on
    # a 2-core AMD EPYC with AVX512-BF16). 128 px rather than 64: a 64 px figure's forearm is about 4 px wide, and a
    # 16 px heatmap's cell (4 px) is more than the PCKh threshold (half the head size, 2.7-3.8 px there): at 64 px
    # the demo ended at 74 % after 1,000 steps and 84.8 % after 1,900 (as long as 900 steps at 128 px, which reach
    # 87 %). Mixed precision where the device computes bf16 natively ("auto": resolve_amp), 1.7x the fp32 step
    # at 128 px there. σ = 2 heatmap pixels: σ must make 3σ whole for the port's patch to be centred on the joint
    # (σ = 1.5 puts the peak half a pixel off, tied between two cells: 39 % PCKh against 63 % at 64 px). Adam's
    # peak 4e-2 (63, 68, 72, 74 % at 5e-3, 1e-2, 2e-2, 4e-2 at 64 px).
    "demo": {"res": 128, "steps": 900, "amp": "auto"},
    # The published port's recipe: 8 stacks of 256 features, 256 px input, batch 16, Adam at 1e-3 dropped to 2e-4
    # after 100k iterations, 200k iterations in all.
    "mpii": {
        "data": "mpii", "res": 256, "nstack": 8, "inp_dim": 256, "batch_size": 16, "lr": 1e-3, "schedule": "step",
        "lr_drop_step": 100_000, "lr_drop_to": 2e-4, "steps": 200_000, "workers": 4, "val_size": 2958, "sigma": None,
        "log_every": 50, "val_every": 5_000, "checkpoint_every": 1_000, "keep_last": 3, "out": "runs/mpii",
    },
}

# Options that may differ from the checkpoint's on --resume: they do not change what is computed.
RESUMABLE_OVERRIDES = ("steps", "workers", "out", "log_every", "val_every", "checkpoint_every", "keep_last", "device",
                       "dist_timeout")


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bf16 convolutions are
    faster than fp32 ones; elsewhere they are emulated and slower."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_amp(amp: Any, device: str, backend: str) -> bool:
    """`amp` as a bool: "auto" is on where mixed precision is fast and trains as the reference does (CUDA; a CPU
    with native bf16), off elsewhere and on the triton backend (which refuses --amp for training)."""
    if amp != "auto":
        return amp
    if backend == "triton":
        return False
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return False  # validate() names the bad --device
    return kind == "cuda" or (kind == "cpu" and native_bf16_cpu())


def from_preset(preset: str, **overrides: Any) -> TrainConfig:
    """The preset's configuration with every non-None override applied (and a preset's "auto" mixed precision
    resolved for this machine: see resolve_amp)."""
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown training option {unknown[0]!r}")
    base = TrainConfig()
    values["amp"] = resolve_amp(values.get("amp", base.amp), values.get("device", base.device),
                                values.get("backend", base.backend))
    config = TrainConfig(preset=preset, **values)
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    """Raise a ValueError naming the option for any value a run cannot start with."""
    positive = ("train_size", "val_size", "res", "nstack", "inp_dim", "oup_dim", "batch_size", "steps", "log_every",
                "val_every", "checkpoint_every", "keep_last", "grad_accum")
    for name in positive:
        value = getattr(c, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if c.res % 64:
        raise ValueError(f"--res must be a multiple of 64 (the network's input side), got {c.res}")
    if c.inp_dim % 2 or c.inp_dim < 2:
        raise ValueError(f"--inp-dim must be an even number (the bottleneck halves it), got {c.inp_dim}")
    if not c.lr > 0:
        raise ValueError(f"--lr must be positive, got {c.lr}")
    if c.sigma is not None and not c.sigma > 0:
        raise ValueError(f"--sigma must be positive, got {c.sigma}")
    if not c.dist_timeout > 0:
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {c.dist_timeout!r}")
    if c.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {c.workers}")
    if c.data not in ("synthetic", "mpii"):
        raise ValueError(f"--data must be 'synthetic' or 'mpii', got {c.data!r}")
    if c.schedule not in ("onecycle", "step"):
        raise ValueError(f"--schedule must be 'onecycle' or 'step', got {c.schedule!r}")
    if c.backend not in ("auto", "reference", "fused", "triton"):
        raise ValueError(f"--backend must be one of auto, reference, fused, triton; got {c.backend!r}")
    if c.recompute not in ("none", "conv1", "block"):
        raise ValueError(f"--recompute must be one of none, conv1, block; got {c.recompute!r}")
    if not isinstance(c.amp, bool):
        raise ValueError(f"--amp must be on or off (a preset's 'auto' is resolved by from_preset), got {c.amp!r}")
    if c.amp and c.backend == "triton":
        raise ValueError("--amp: training under autocast is not yet as accurate as the reference on --backend triton "
                         "(its gradients there are 10-50x the reference's error); use --backend fused or reference")
    if c.data == "mpii":
        for name in ("annotations", "images"):
            if not getattr(c, name):
                raise ValueError(f"--data mpii needs --{name} (see the README's 'Preparing MPII' section)")
