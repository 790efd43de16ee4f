"""Ahead-of-time compile check of every Triton kernel × autotune configuration × arch × dtype, for GPUs this
machine does not have (DESIGN.md §4); the Triton part of `fused_hourglass.kernel_report`, whose docstring says how.
Prints a table and exits non-zero on any compile error, register spill or shared-memory overflow.

    python tools/triton_aot.py [--jobs 2] [--arch 80 90] [--dtype bf16 fp32 tf32] [--ptxas /usr/local/cuda/bin/ptxas]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the GPU autotune configurations, not the interpreter's

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused_hourglass.kernel_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--triton-only", *sys.argv[1:]]))
