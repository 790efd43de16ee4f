"""Whole model on the CPU: the public StackedHourglass (backend "auto") vs the plain-PyTorch reference (eager)
vs torch.compile of the reference; eval forward and one training step (forward, loss, backward, SGD step).

    pytest benchmarks/bench_model.py --benchmark-only --benchmark-group-by=group --benchmark-columns=min,median

torch.compile of the whole network takes minutes on a 2-core CPU, so with benchmarks disabled (the smoke run
of the test suite) the compile rows are skipped; they run under --benchmark-only.
"""

import pytest
import torch

from fused_hourglass import HeatmapLoss, StackedHourglass, reference

CONFIG = {"nstack": 2, "inp_dim": 128, "oup_dim": 16}
BATCH, SIDE = 2, 128


def _models(impl):
    torch.manual_seed(0)
    ref = reference.StackedHourglass(**CONFIG)
    if impl == "fused":
        model = StackedHourglass(**CONFIG, backend="auto")
        model.load_state_dict(ref.state_dict())
        return model, ref
    if impl == "compile":
        return torch.compile(ref), ref
    return ref, ref


def _inputs(layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, SIDE, SIDE, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.rand(BATCH, CONFIG["oup_dim"], SIDE // 4, SIDE // 4, generator=g)
    return x, target


def _skip_compile_in_smoke_mode(benchmark, impl):
    if impl == "compile" and benchmark.disabled:
        pytest.skip("torch.compile of the whole model takes minutes here; it runs under --benchmark-only")


@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_forward_eval(benchmark, impl, layout):
    _skip_compile_in_smoke_mode(benchmark, impl)
    benchmark.group = f"model forward eval {layout}"
    model, ref = _models(impl)
    model.eval()
    ref.eval()
    x, _ = _inputs(layout)
    with torch.no_grad():
        out = benchmark(model, x)
        torch.testing.assert_close(out, ref(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["fused", "eager", "compile"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_train_step(benchmark, impl, layout):
    _skip_compile_in_smoke_mode(benchmark, impl)
    benchmark.group = f"model training step {layout}"
    model, _ = _models(impl)
    model.train()
    x, target = _inputs(layout)
    loss_fn = HeatmapLoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    loss = benchmark(step)
    assert torch.isfinite(loss)


def test_model_side_by_side(benchmark):
    """The interleaved side-by-side table of `python -m fused_hourglass bench --model` (every backend, layout, bf16
    autocast, memory policy and torch.compile, ratios to eager NCHW, compile times apart); printed with -s. With
    benchmarks disabled, a tiny model without the compile rows checks the machinery."""
    from fused_hourglass import model_bench

    benchmark.group = "model side by side (interleaved rounds)"
    if benchmark.disabled:
        rows = benchmark(lambda: model_bench.run(1, 16, 64, 2, rounds=1, compile=False, say=lambda s: None))
        assert all(f"| {r.name} |" in model_bench.table(rows, "") for r in rows)
    else:
        rows = benchmark.pedantic(lambda: model_bench.run(CONFIG["nstack"], CONFIG["inp_dim"], SIDE, 4, rounds=7,
                                                          say=print), rounds=1, iterations=1)
        print("\n" + model_bench.table(rows, f"({CONFIG['nstack']}, {CONFIG['inp_dim']}, 16), {SIDE} px, batch 4"))
        for row in rows:
            benchmark.extra_info[row.name] = round(1e3 * sorted(row.times["train"])[len(row.times["train"]) // 2], 1)
    assert all(len(r.times["train"]) == len(r.times["eval"]) > 0 for r in rows)
    by_name = {r.name: r for r in rows}
    # the memory policies save less than the default fused path, which saves less than eager
    saved = [by_name[n].saved_mib for n in ("reference eager, NCHW", "fused, channels_last",
                                            "fused, recompute=conv1, CL", "fused, recompute=block, CL")]
    assert saved == sorted(saved, reverse=True) and saved[-1] < saved[0]
