import pytest
import torch

from fused_hourglass import _ext

requires_extension = pytest.mark.skipif(not _ext.HAS_EXTENSION,
                                        reason=f"compiled extension not built: {_ext.EXTENSION_ERROR}")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
