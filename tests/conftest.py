"""Shared test settings: hypothesis profile sized for a 2-core CPU, skip markers, and the guard that turns a
missing extension into an error when FH_REQUIRE_EXTENSION=1 (CI), so a broken build cannot pass as skips."""

import os

import torch

if not torch.cuda.is_available():
    # Triton picks its interpreter when a kernel is decorated, so this must precede any import of triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from fused_hourglass import _ext  # noqa: E402

settings.register_profile("fh", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("fh")

requires_extension = pytest.mark.skipif(not _ext.HAS_EXTENSION,
                                        reason=f"fused_hourglass._C is not built: {_ext.EXTENSION_ERROR}")
requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.has_kernel("bn_relu_apply", "cuda")),
                                   reason="needs a CUDA device and the extension built with CUDA kernels")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    if os.environ.get("FH_REQUIRE_EXTENSION") == "1" and not _ext.HAS_EXTENSION:
        raise pytest.UsageError(f"FH_REQUIRE_EXTENSION=1 but fused_hourglass._C did not load: {_ext.EXTENSION_ERROR}")
