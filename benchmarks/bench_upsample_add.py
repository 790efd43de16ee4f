"""upsample_add on CPU at hourglass sizes: fused vs eager `skip + F.interpolate(low, 2)`, vs torch.compile of
that, vs `skip.clone()` (the memory yardstick: the fused op moves 2.25 bytes per output byte, a copy 2).

    pytest benchmarks/bench_upsample_add.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median
"""

import pytest
import torch

from fused_hourglass import benchmarking

CASES = benchmarking.upsample_add_cases()


@pytest.mark.parametrize("impl", ["fused", "eager", "compile", "copy"])
@pytest.mark.parametrize("case", CASES, ids=[c.label.replace(" ", "-") for c in CASES])
def test_upsample_add(benchmark, case, impl):
    benchmark.group = f"upsample_add {case.label}"
    benchmark.extra_info["bytes_moved"] = case.bytes_moved
    args = case.inputs()
    out = benchmark(case.impls[impl], *args)
    expected = case.impls[case.reference_impl](*args) if impl != "copy" else args[1]
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
