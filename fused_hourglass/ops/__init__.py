"""Fused ops. Each is a compiled `torch.ops.fused_hourglass.*` op with a fake implementation and autograd,
and falls back to its plain-PyTorch twin in `fused_hourglass.reference.ops` (with a one-time warning) when
the extension or a kernel for the tensor's device is missing."""

from .bn_relu import BatchNormReLU2d, bn_relu
from .bn_relu_conv import bn_relu_conv2d
from .max_pool import max_pool2x2
from .upsample_add import sum_pool2x2, upsample_add

__all__ = ["upsample_add", "sum_pool2x2", "bn_relu", "BatchNormReLU2d", "max_pool2x2", "bn_relu_conv2d"]
