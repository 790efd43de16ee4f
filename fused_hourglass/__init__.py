"""fused_hourglass: fused CUDA, Triton and C++ kernels for Stacked Hourglass pose networks, as drop-in
PyTorch modules whose weights interchange with the published PyTorch port."""

from . import ops, pose, reference
from ._ext import HAS_EXTENSION
from .checkpoint import CheckpointError, load_checkpoint, prune_checkpoints, rng_state, save_checkpoint, set_rng_state
from .loss import HeatmapLoss
from .model import BACKENDS, StackedHourglass

__version__ = "0.1.0"
__all__ = ["ops", "pose", "reference", "HAS_EXTENSION", "CheckpointError", "load_checkpoint", "save_checkpoint",
           "prune_checkpoints", "rng_state", "set_rng_state", "HeatmapLoss", "BACKENDS", "StackedHourglass"]
