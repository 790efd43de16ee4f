"""Plain-PyTorch reference: the published port's network and the unfused twins of every fused op."""

from . import ops
from .model import HOURGLASS_DEPTH, SIDE_MULTIPLE, Conv, Hourglass, Merge, Pool, Residual, StackedHourglass, check_input

__all__ = ["ops", "HOURGLASS_DEPTH", "SIDE_MULTIPLE", "Conv", "Hourglass", "Merge", "Pool", "Residual",
           "StackedHourglass", "check_input"]
