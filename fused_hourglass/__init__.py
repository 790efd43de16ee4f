"""fused_hourglass: fused CUDA, Triton and C++ kernels for Stacked Hourglass pose networks, as drop-in
PyTorch modules whose weights interchange with the published PyTorch port."""

from . import ops, reference
from ._ext import HAS_EXTENSION
from .checkpoint import save_checkpoint
from .loss import HeatmapLoss
from .model import BACKENDS, StackedHourglass

__version__ = "0.1.0"
__all__ = ["ops", "reference", "HAS_EXTENSION", "save_checkpoint", "HeatmapLoss", "BACKENDS", "StackedHourglass"]
