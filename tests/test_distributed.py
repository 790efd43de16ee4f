"""Multi-process training on the CPU (gloo): synchronised BatchNorm against one process on the whole batch, DDP
without it against per-share normalisation, uneven shares, and the command line under torchrun (only rank 0 writes,
SIGTERM + --resume is exact, a dead rank ends the run with an error instead of a hang).

Tolerances. In float64 the distributed runs equal the one-process twin to 1e-9 of each tensor's scale: the
collectives only reorder sums, whose roundings are ~1e-16 relative, and three SGD steps of this model amplify a
perturbation by far less than 1e7. In float32 the comparison is against the float64 twin: the distributed run's error
may be at most 8× the float32 noise of this problem, measured as the larger error of the two backends' one-process
float32 runs (floored at one float32 ulp of the tensor's scale). Noise, not a relative bound, because some gradients
here are small differences of large terms (BatchNorm's backward removes the mean and the x̂-component of dz), and
their float32 roundings, amplified by three steps, reach ~1e-3 of the weights in every implementation that does not
accumulate in double (the fused kernels and the synchronised path; ATen's CPU BatchNorm accumulates in double).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fused_hourglass import StackedHourglass, _ext, load_checkpoint
from fused_hourglass.engine.distributed import freeze_unused_skips
from fused_hourglass.ops.sync_bn import collective_bytes

from . import _dist_worker as w
from .conftest import requires_extension

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

ROOT = Path(__file__).resolve().parents[1]
SPAWN_TIMEOUT_S = 180
# (shares of the 4-sample batch per process, synchronised BatchNorm)
SCENARIOS = [(shares, sync, dtype) for dtype in (torch.float64, torch.float32)
             for shares, sync in (([2, 2], True), ([2, 2], False), ([3, 1], True))]


def _spawn(backend: str, tmp_path: Path, comm: str = "gloo", scenarios=SCENARIOS) -> list[list[dict]]:
    import torch.multiprocessing as mp

    init = tmp_path / "init"
    ctx = mp.start_processes(w.worker, args=(2, str(init), backend, scenarios, str(tmp_path), comm), nprocs=2,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-process run did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _assert_close_to_exact(got: dict[str, torch.Tensor], noise: list[dict[str, torch.Tensor]] | None,
                           exact: dict[str, torch.Tensor], what: str) -> None:
    """got against the float64 one-process run: to 1e-9 of the scale when got is float64, else within 8× the
    float32 noise (the largest error of the float32 one-process runs in `noise`)."""
    assert got.keys() == exact.keys()
    for key, ref in exact.items():
        if not ref.is_floating_point():
            assert torch.equal(got[key], ref), f"{what}: {key} {got[key]} != {ref}"
            continue
        scale = ref.abs().max().item()
        err = (got[key].double() - ref).abs().max().item()
        if noise is None:
            assert err <= 1e-9 * scale, f"{what}: {key} differs from the one-process run by {err:.3g} (of {scale:.3g})"
            continue
        own = max((n[key].double() - ref).abs().max().item() for n in noise)
        assert err <= 8 * max(own, 2.0**-23 * scale), (f"{what}: {key} differs from the float64 run by {err:.3g}, "
                                                      f"the one-process float32 runs by up to {own:.3g}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param("fused", marks=requires_extension), "reference"])
def test_two_processes_equal_one(backend, tmp_path):
    results = _spawn(backend, tmp_path)
    backends = ["reference"] + (["fused"] if backend == "fused" or _ext.HAS_EXTENSION else [])
    for i, (shares, sync, dtype) in enumerate(SCENARIOS):
        what = f"{backend}, {dtype}, shares {shares}, sync_bn={sync}"
        exact = w.run_single(backend, shares, sync, torch.float64)
        noise = None if dtype == torch.float64 else [w.run_single(b, shares, sync, torch.float32) for b in backends]
        rank0, rank1 = results[0][i], results[1][i]
        # weights equal on both ranks (DDP), and with sync_bn the running statistics too (no broadcast needed)
        for k, v in rank0["state"].items():
            if sync or "running" not in k:
                assert torch.equal(v, rank1["state"][k]), f"{what}: {k} differs between the ranks"
        _assert_close_to_exact(rank0["state"], noise and [n["state"] for n in noise], exact["state"], what)
        for j, (got, ref) in enumerate(zip(rank0["losses"], exact["losses"], strict=True)):
            own = 1e-9 * abs(ref) if noise is None else 8 * max(max(abs(n["losses"][j] - ref) for n in noise),
                                                               2.0**-23 * abs(ref))
            assert abs(got - ref) <= own, (what, j, got, ref)
        # the run changed something: three steps moved the weights away from their initial values
        init = w.make_model(backend, torch.float32, False).state_dict()
        assert not torch.equal(init["pre.0.conv.weight"], rank0["state"]["pre.0.conv.weight"])
    # under bfloat16 autocast: the one-process run's output dtype, and values as close to the float32 run as the
    # one-process autocast run's (within 4× its error: two draws of the same bfloat16 rounding noise)
    single = w.autocast_step(backend, False, None, 1)
    fp32 = w.autocast_step(backend, False, None, 1, enabled=False)
    halves = torch.cat([results[0][-1]["y"], results[1][-1]["y"]])
    assert results[0][-1]["dtype"] == single["dtype"] == torch.bfloat16
    for name, got in (("y", halves), ("grad", results[0][-1]["grad"]), ("running_var", results[0][-1]["running_var"])):
        err, own = (got - fp32[name]).abs().max(), (single[name] - fp32[name]).abs().max()
        assert err <= 4 * own + 2.0**-8 * fp32[name].abs().max(), (name, err, own)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="needs 2 CUDA devices (one per NCCL process) and NCCL")
@pytest.mark.parametrize("backend", ["fused", "triton", "reference"])
def test_two_processes_equal_one_nccl(backend, tmp_path):
    """The float64 scenarios over NCCL, each process on its own GPU, against one process on cuda:0 (float64: the
    Triton backend runs synchronised Residuals through the fused ops, so only its sync-bn scenarios apply)."""
    scenarios = [s for s in SCENARIOS if s[2] == torch.float64 and (s[1] or backend != "triton")]
    results = _spawn(backend, tmp_path, "nccl", scenarios)
    for i, (shares, sync, dtype) in enumerate(scenarios):
        exact = w.run_single(backend, shares, sync, dtype, "cuda:0")
        _assert_close_to_exact(results[0][i]["state"], None, exact["state"], f"nccl {backend} {shares} {sync}")


def test_sync_bn_without_process_group_is_plain_batchnorm():
    """Without an initialised process group sync_bn=True changes nothing: outputs and gradients equal the plain
    model's bit for bit."""
    x, target = w.fixed_batch(torch.float32)
    outs = []
    for sync in (False, True):
        model = w.make_model("reference", torch.float32, sync)
        y = model(x)
        ((y - 0.5) ** 2).mean().backward()
        outs.append((y.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1], strict=True))


def test_unused_skip_parameters_are_frozen_and_the_state_dict_kept():
    model = StackedHourglass(8, 256, 16, backend="reference")
    keys = list(model.state_dict())
    assert freeze_unused_skips(model) == 7_385_216
    assert list(model.state_dict()) == keys
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".skip_layer." in n for n in frozen)
    assert freeze_unused_skips(model) == 0  # idempotent


def test_collective_bytes_from_structure():
    model = StackedHourglass(1, 16, 4, backend="reference")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    c = sum(m.num_features for m in bns)
    got = collective_bytes(model)
    assert got == {"layers": len(bns), "collectives": 2 * len(bns), "forward_bytes": (2 * c + len(bns)) * 8,
                   "backward_bytes": 2 * c * 4, "bytes": (2 * c + len(bns)) * 8 + 2 * c * 4}


# ---------------------------------------------------------------------------------------------------------------
# The command line under torchrun

AUDIT = '''
import json, os, sys, atexit
_out = os.environ.get("FH_TEST_AUDIT_DIR")
_run = os.environ.get("FH_TEST_RUN_DIR")
_rank = os.environ.get("RANK")
if _out and _run and _rank is not None:
    _writes = []
    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            mode, flags = args[1], args[2]
            writing = (mode is not None and any(c in mode for c in "wax+")) or \\
                (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and os.path.abspath(path).startswith(_run):
                _writes.append(path)
        elif event in ("os.rename", "os.replace", "os.mkdir") and args:
            target = args[1] if event != "os.mkdir" else args[0]
            if isinstance(target, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(target)).startswith(_run):
                _writes.append(os.fsdecode(target))
    sys.addaudithook(_hook)
    def _dump():
        with open(os.path.join(_out, f"rank{_rank}.json"), "w") as f:
            json.dump(_writes, f)
    atexit.register(_dump)
'''

TRAIN = ["--nstack", "1", "--inp-dim", "16", "--res", "64", "--batch-size", "2", "--train-size", "96", "--val-size",
         "8", "--workers", "0", "--log-every", "1", "--val-every", "1000", "--checkpoint-every", "5", "--lr", "1e-3",
         "--no-progress", "--device", "cpu"]


def _torchrun(args: list[str], tmp_path: Path, env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "fused_hourglass", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{out[-3000:]}")
    return out


def _workers(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    found: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while len(found) < 2 and time.monotonic() < deadline:
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            for child in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                for item in environ:
                    if item.startswith(b"RANK="):
                        found[int(item[5:])] = int(child)
        time.sleep(0.1)
    return found


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"torchrun exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if log.exists():
            rows = [r for r in log.read_text().splitlines()[1:] if r]
            if rows and int(rows[-1].split(",")[0]) >= step:
                return
        time.sleep(0.02)
    pytest.fail(f"{log} did not reach step {step} within {timeout} s")


def _final_state(run: Path) -> tuple[dict[str, torch.Tensor], list[float]]:
    ckpt = load_checkpoint(sorted((run / "checkpoints").glob("step-*.pt"))[-1])
    losses = [float(r.split(",")[2]) for r in (run / "log.csv").read_text().splitlines()[1:] if r]
    return ckpt["state_dict"], losses


@pytest.mark.slow
@requires_extension
def test_torchrun_sigterm_resume_is_exact_and_only_rank0_writes(tmp_path):
    steps = ["--steps", "30", "--sync-bn"]
    whole = tmp_path / "whole"
    audit = tmp_path / "audit"
    audit.mkdir()
    proc = _torchrun([*TRAIN, *steps, "--out", str(whole)], tmp_path,
                     {"FH_TEST_AUDIT_DIR": str(audit), "FH_TEST_RUN_DIR": str(whole)})
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "global batch 4 (2 per process × 2 processes)" in out and "synchronised BatchNorm" in out
    assert out.count("done: 30 steps") == 1  # rank 0 alone prints
    writes = {r: json.loads((audit / f"rank{r}.json").read_text()) for r in range(2)}
    assert writes[1] == [], f"rank 1 wrote {writes[1][:5]}"
    assert any(p.endswith(".pt") or ".checkpoint-" in p for p in writes[0]) and any("log.csv" in p for p in writes[0])
    ckpt = load_checkpoint(whole / "checkpoints" / "step-00000030.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_per_rank"]) == 2
    # the ranks' RNG streams differ (derived from the seed and the rank) and are both saved
    assert not torch.equal(ckpt["rng_per_rank"][0]["torch"], ckpt["rng_per_rank"][1]["torch"])

    cut = tmp_path / "cut"
    proc = _torchrun([*TRAIN, *steps, "--out", str(cut)], tmp_path)
    pids = _workers(proc)
    assert set(pids) == {0, 1}
    _wait_for_step(cut / "log.csv", 3, proc)
    os.kill(pids[1], signal.SIGTERM)  # one rank alone is told to stop: both stop at the same step
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped after step" in out and "received by another process" in out, out[-2000:]
    stopped = int(out.split("stopped after step ")[1].split(";")[0])
    assert 3 <= stopped < 30
    proc = _torchrun(["--resume", str(cut), "--no-progress"], tmp_path)
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    a, losses_a = _final_state(whole)
    b, losses_b = _final_state(cut)
    assert losses_a == losses_b
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after SIGTERM at step {stopped} and --resume"


@pytest.mark.slow
def test_torchrun_dead_rank_ends_the_run(tmp_path):
    run = tmp_path / "run"
    proc = _torchrun([*TRAIN, "--backend", "reference", "--steps", "100000", "--dist-timeout", "30", "--out",
                      str(run)], tmp_path)
    pids = _workers(proc)
    _wait_for_step(run / "log.csv", 2, proc)
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    out = _finish(proc, timeout=90)
    assert proc.returncode != 0, out[-3000:]
    assert time.monotonic() - start < 90
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)  # rank 0 is gone too


def test_resume_with_another_world_size_is_refused(tmp_path):
    from fused_hourglass.engine.config import from_preset
    from fused_hourglass.engine.train import train

    config = from_preset("demo", res=64, amp=False, nstack=1, inp_dim=16, batch_size=2, train_size=32, val_size=4,
                         steps=2, workers=0, checkpoint_every=1, out=str(tmp_path / "run"), device="cpu",
                         backend="reference", schedule="step")
    train(config, progress=False)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002.pt"
    data = torch.load(ckpt, weights_only=True)
    data["world_size"] = 2
    torch.save(data, ckpt)
    with pytest.raises(ValueError, match="written by a run of 2 process"):
        train(None, resume=str(tmp_path / "run"), overrides={"steps": 3}, progress=False)


def test_grad_accum_equals_summed_micro_batches(tmp_path):
    """--grad-accum 2: one optimizer step on the mean of two micro-batches' losses, each micro-batch normalised by
    its own BatchNorm statistics, equals that loop written out by hand."""
    from torch.utils.data import default_collate

    from fused_hourglass import HeatmapLoss
    from fused_hourglass.engine.config import from_preset
    from fused_hourglass.engine.data import ResumableBatchSampler, make_source
    from fused_hourglass.engine.train import build_optimizer, build_scheduler, train

    config = from_preset("demo", res=64, amp=False, nstack=1, inp_dim=16, batch_size=2, grad_accum=2, train_size=32,
                         val_size=4, steps=2, workers=0, checkpoint_every=1, out=str(tmp_path / "run"), device="cpu",
                         backend="reference", channels_last=False)
    train(config, progress=False)
    got = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002.pt")["state_dict"]

    torch.manual_seed(config.seed)
    source = make_source(config)
    model = StackedHourglass(1, 16, 16, backend="reference")
    freeze_unused_skips(model)
    opt = build_optimizer(model, config)  # the run's Adam implementation: the conv biases ahead of training-mode
    sched = build_scheduler(opt, config)  # BatchNorms get rounding-noise gradients, which Adam scales up
    batches = iter(ResumableBatchSampler(len(source.train_set), 2, config.seed))
    loss_fn = HeatmapLoss()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        for _ in range(2):
            batch = default_collate([source.train_set[i] for i in next(batches)])
            (loss_fn(model(batch["image"]), batch["heatmaps"]) / 2).backward()
        opt.step()
        sched.step()
    want = model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
