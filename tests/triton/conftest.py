"""Triton tests run on CPU tensors through the Triton interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before `triton.jit` decorates our kernels (it picks the interpreter at decoration),
so it is set here, at conftest import, which pytest performs before importing the test modules of this directory.
If another module decorated our kernels first without it (e.g. a test file elsewhere imported
`fused_hourglass.triton` earlier in the same session), the CPU tests skip with that reason instead of failing.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _skip_reason() -> str | None:
    import fused_hourglass.triton as ft

    if not ft.AVAILABLE:
        return f"Triton kernels unavailable: {ft.UNAVAILABLE_REASON}"
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(ft.conv_kernels._channel_stats_kernel, InterpretedFunction):
            return ("no CUDA device, and the Triton kernels were compiled without the interpreter: "
                    "triton was imported before TRITON_INTERPRET=1 could be set; run tests/triton on its own "
                    "or export TRITON_INTERPRET=1")
    return None


SKIP_REASON = _skip_reason()


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON is None:
        return
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
