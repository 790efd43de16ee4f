import os

import pytest
import torch

from fused_hourglass import _ext

requires_extension = pytest.mark.skipif(not _ext.HAS_EXTENSION,
                                        reason=f"compiled extension not built: {_ext.EXTENSION_ERROR}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    if os.environ.get("FH_REQUIRE_EXTENSION") == "1" and not _ext.HAS_EXTENSION:
        raise pytest.UsageError(f"FH_REQUIRE_EXTENSION=1 but fused_hourglass._C did not load: {_ext.EXTENSION_ERROR}")
