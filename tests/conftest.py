"""Shared test settings: hypothesis profile sized for a 2-core CPU, and the compiled-extension skip marker."""

import pytest
import torch
from hypothesis import settings

from fused_hourglass import _ext

settings.register_profile("fh", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("fh")

requires_ext = pytest.mark.skipif(not _ext.HAS_EXTENSION,
                                  reason=f"fused_hourglass._C is not built: {_ext.EXTENSION_ERROR}")
requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_kernel("bn_relu_apply", "cuda")),
                                   reason="needs a CUDA device and the extension built with CUDA kernels")
