"""The training loop: model, Adam, learning-rate schedule, resumable data order, periodic validation, logging,
atomic checkpoints that carry every RNG state, and a clean stop on SIGINT/SIGTERM at the next step boundary.

Under torchrun the same loop runs in every process (`engine.distributed`): DistributedDataParallel, each rank on
its share of every global batch, optional synchronised BatchNorm, and rank 0 alone printing, validating and writing
files; every rank's RNG states go into the checkpoint, so a resume with the same world size is exact."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..checkpoint import (
    CheckpointError,
    load_checkpoint,
    prune_checkpoints,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
)
from . import distributed
from .config import RESUMABLE_OVERRIDES, TrainConfig, validate

LOG_FIELDS = ("step", "epoch", "loss", "lr", "images_per_s", "elapsed_s", "pckh_mpii", "pckh_all16")


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, a checkpoint that does not belong to the run)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda})")
    return dev


def find_checkpoint(path: str) -> str:
    """A checkpoint file given as itself or as a run directory (its newest step checkpoint)."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for d in (os.path.join(path, "checkpoints"), path):
            steps = step_checkpoints(d) if os.path.isdir(d) else []
            if steps:
                return str(steps[-1])
        raise FileNotFoundError(f"--resume {path}: no step-*.pt checkpoint in it or in its checkpoints/ folder")
    raise FileNotFoundError(f"--resume {path}: no such file or directory")


def resume_config(checkpoint: dict[str, Any], path: str, overrides: dict[str, Any]) -> TrainConfig:
    """The checkpoint's training configuration with the overrides that do not change what is computed."""
    saved = checkpoint.get("train_config")
    if not isinstance(saved, dict) or "step" not in checkpoint or not checkpoint.get("optimizer"):
        raise CheckpointError(f"{path}: not a training checkpoint of this package (it has no train_config, step and "
                              f"optimizer state), so a run cannot resume from it; to start a run from its weights, "
                              f"use it with StackedHourglass.from_checkpoint in your own loop")
    config = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    for name, value in overrides.items():
        if value is None or name == "preset":
            continue
        if name == "steps" and config.schedule == "onecycle" and value != config.steps:
            raise ValueError(f"--steps {value} differs from the checkpoint's {config.steps}: the onecycle learning-"
                             f"rate schedule is fixed by the run's length (the step schedule can be extended)")
        if name in RESUMABLE_OVERRIDES:
            setattr(config, name, value)
        elif getattr(config, name) != value:
            raise ValueError(f"--{name.replace('_', '-')} {value!r} differs from the checkpoint's "
                             f"{getattr(config, name)!r}; a resumed run keeps what it computes (only "
                             f"{', '.join('--' + o.replace('_', '-') for o in RESUMABLE_OVERRIDES)} may change)")
    validate(config)
    return config


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Adam:
    """Adam at config.lr, as the port trains; its fused implementation (one kernel over every parameter) where the
    parameters' device has one: at (2, 128, 16) on two CPU cores a step of 3.4 ms against 11 ms for the default
    per-parameter loop. A resumed run takes the implementation its checkpoint was saved with
    (`Optimizer.load_state_dict` restores it)."""
    params = list(model.parameters())
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=config.lr, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.schedule == "step":
        drop = config.lr_drop_to / config.lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 if s < config.lr_drop_step else drop)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                               pct_start=0.15, div_factor=10.0, final_div_factor=100.0)


class _StopRequest:
    """SIGINT/SIGTERM handlers that ask the loop to stop at the next step boundary; a second SIGINT interrupts at
    once. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> _StopRequest:
        if _is_main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _CsvLog:
    """log.csv of every logged step; on resume, rows past the checkpoint's step (written after it by a run that
    then died) are dropped, so the log reads as one run."""

    def __init__(self, path: str, start_step: int) -> None:
        self.path = path
        rows = []
        if start_step and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_log(path: str) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


_QUIET = False  # True on the processes of a distributed run other than rank 0


def _say(message: str) -> None:
    from tqdm import tqdm

    if not _QUIET:
        tqdm.write(message, file=sys.stdout)


def train(config: TrainConfig, *, resume: str | None = None, on_step: Callable[[int], None] | None = None,
          progress: bool | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run; returns its summary (also written to OUT/summary.json).

    `resume`: a checkpoint file or a run directory; the run continues exactly where the checkpoint was written
    (model, optimizer, schedule, step, RNG states, data order). `on_step(step)` is called after every step.
    `progress`: show a tqdm bar (None: when stderr is a terminal).

    Started by torchrun (WORLD_SIZE > 1 in the environment), every process runs this with the same config; see
    `engine.distributed`."""
    global _QUIET
    checkpoint = None
    if resume is not None:
        resume = find_checkpoint(resume)
        checkpoint = load_checkpoint(resume)
        config = resume_config(checkpoint, resume, overrides or {})
    validate(config)
    ctx = distributed.setup(resolve_device(config.device), config.dist_timeout)
    _QUIET = not ctx.is_main
    try:
        return _train(config, ctx, checkpoint, resume, on_step, progress)
    finally:
        _QUIET = False
        distributed.teardown(ctx)


def _train(config: TrainConfig, ctx: distributed.DistContext, checkpoint: dict[str, Any] | None, resume: str | None,
           on_step: Callable[[int], None] | None, progress: bool | None) -> dict[str, Any]:
    from tqdm import tqdm

    from .. import HeatmapLoss, StackedHourglass
    from .data import make_source, train_loader, val_loader
    from .evaluate import pckh_on

    device, main = ctx.device, ctx.is_main
    saved_world = int(checkpoint.get("world_size", 1)) if checkpoint is not None else ctx.world_size
    if saved_world != ctx.world_size:
        raise ValueError(f"--resume {resume}: the checkpoint was written by a run of {saved_world} process(es), this "
                         f"one has {ctx.world_size}; the global batch (--batch-size per process × processes) and "
                         f"the data order depend on it, so resume with --nproc-per-node × --nnodes = {saved_world}")
    out = config.out
    ckpt_dir = os.path.join(out, "checkpoints")
    if main:
        os.makedirs(ckpt_dir, exist_ok=True)
        for stale in remove_stale_temporaries(ckpt_dir):
            _say(f"removed {stale}: a checkpoint write that never finished (its process died)")

    import random

    import numpy as np

    if checkpoint is None:
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
    source = make_source(config)  # before the model: a missing image folder fails before any work
    source.rank = ctx.rank
    model = StackedHourglass(config.nstack, config.inp_dim, config.oup_dim, increase=config.increase,
                             backend=config.backend, sync_bn=config.sync_bn, recompute=config.recompute).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if checkpoint is None and ctx.rank:
        # the same initial weights on every rank (DDP broadcasts rank 0's anyway), then streams of its own
        seed = distributed.stream_seed(config.seed, ctx.rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    start, best, elapsed_before = 0, None, 0.0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start, best = int(checkpoint["step"]), checkpoint.get("best_pckh")
        elapsed_before = float(checkpoint.get("elapsed_s", 0.0))
        per_rank = checkpoint.get("rng_per_rank")
        set_rng_state(per_rank[ctx.rank] if per_rank else checkpoint["rng"])
        if start >= config.steps:
            _say(f"{resume} is at step {start}, not before --steps {config.steps}: nothing to train")
    trained = distributed.wrap(model, ctx, sync_bn=config.sync_bn)
    loss_fn = HeatmapLoss()
    accum = config.grad_accum
    loader, sampler = train_loader(source, config, start * accum, num_replicas=ctx.world_size, rank=ctx.rank,
                                   pin_memory=device.type == "cuda")
    val = val_loader(source, config)
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16) \
        if config.amp else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda") if config.amp and device.type == "cuda" else None
    if scaler is not None and checkpoint is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])

    def save(step: int, name: str | None = None, rng_per_rank: list[dict[str, Any]] | None = None) -> str:
        """Rank 0 writes; step checkpoints carry every rank's RNG states (gathered by the caller on all ranks)."""
        path = os.path.join(ckpt_dir, name or f"step-{step:08d}.pt")
        save_checkpoint(path, model, optimizer, epoch=sampler.epoch_of(step * accum), step=step,
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                        rng=rng_state(), rng_per_rank=rng_per_rank, world_size=ctx.world_size,
                        train_config=config.to_dict(), best_pckh=best,
                        elapsed_s=elapsed_before + time.perf_counter() - run_start)
        return path

    global_batch = config.batch_size * ctx.world_size * accum
    log = None
    if main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({**config.to_dict(), "world_size": ctx.world_size, "global_batch": global_batch}, f, indent=2)
        log = _CsvLog(os.path.join(out, "log.csv"), start)
    bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=True if not main else None if progress is None else not progress)
    batch_text = f"batch {config.batch_size}"
    if ctx.world_size > 1 or accum > 1:
        batch_text = (f"global batch {global_batch} ({config.batch_size} per process × {ctx.world_size} "
                      f"process{'es' if ctx.world_size > 1 else ''}"
                      + (f" × {accum} accumulated" if accum > 1 else "") + ")")
    where = f"{device}" if not ctx.enabled else (f"{ctx.world_size} processes ({ctx.backend}, "
                                                 f"{'synchronised' if config.sync_bn else 'per-process'} BatchNorm)")
    precision = ("bf16" if device.type == "cpu" else "fp16") + " autocast" if config.amp else "fp32"
    _say(f"training StackedHourglass(nstack={config.nstack}, inp_dim={config.inp_dim}) on {config.data} at "
         f"{config.res} px, {batch_text}, backend {model.resolve_backend(device)}, {where}, {precision}, "
         f"steps {start}..{config.steps}; writing to {out}")
    status, done = "finished", start
    interval_loss, interval_images, interval_seconds = 0.0, 0, 0.0
    run_start = time.perf_counter()
    last_saved = None
    batches = None
    try:
        with _StopRequest() as stop:
            batches = iter(loader)
            for step in range(start, config.steps):
                tick = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.zero_grad(set_to_none=True)
                loss_sum, count = 0.0, 0
                for micro in range(accum):
                    batch = source.prepare(next(batches), device, step * accum + micro)
                    images = batch["image"].contiguous(memory_format=memory_format)
                    # DDP all-reduces the gradients in the last micro-batch's backward only
                    sync = trained.no_sync() if ctx.enabled and micro < accum - 1 else contextlib.nullcontext()
                    with sync:
                        with amp:
                            loss = loss_fn(trained(images).float(), batch["heatmaps"])
                        scaled = loss / accum if accum > 1 else loss
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += loss.item() * images.shape[0]
                    count += images.shape[0]
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                loss_sum, count, stopping = distributed.step_reduce(ctx, loss_sum, count, stop.signal is not None)
                value = loss_sum / count
                if not math.isfinite(value):
                    raise TrainingError(f"the loss became {value} at step {step + 1}; the last checkpoint "
                                        f"({last_saved or 'none written yet'}) is intact: lower --lr and resume")
                done = step + 1
                # images/s counts the steps themselves (data wait included), not validation or checkpoints, over
                # all processes
                interval_seconds += time.perf_counter() - tick
                interval_loss += loss_sum
                interval_images += count
                rate = interval_images / max(interval_seconds, 1e-9)
                bar.set_postfix(loss=f"{value:.2e}", img_s=f"{rate:.1f}", refresh=False)
                bar.update(1)
                row = None
                if done % config.log_every == 0 or done == config.steps:
                    row = {"step": done, "epoch": sampler.epoch_of(step * accum),
                           "loss": interval_loss / interval_images,
                           "lr": lr, "images_per_s": round(rate, 3),
                           "elapsed_s": round(elapsed_before + time.perf_counter() - run_start, 3)}
                    interval_loss, interval_images, interval_seconds = 0.0, 0, 0.0
                if main and (done % config.val_every == 0 or done == config.steps):
                    result = pckh_on(model, val, source, device, channels_last=config.channels_last)
                    row = row or {"step": done, "epoch": sampler.epoch_of(step * accum)}
                    row.update(pckh_mpii=round(result["mpii"], 5), pckh_all16=round(result["all16"], 5))
                    _say(f"step {done}: validation PCKh@0.5 {100 * result['mpii']:.1f} % (MPII mean, w/o pelvis "
                         f"and thorax), {100 * result['all16']:.1f} % (all 16 joints) on {len(source.val_set)} "
                         f"held-out images")
                    if best is None or result["mpii"] > best:
                        best = result["mpii"]
                        save(done, "best.pt")
                if row is not None and log is not None:
                    log.write(row)
                if on_step is not None:
                    on_step(done)
                if not ctx.enabled:
                    stopping = stop.signal is not None  # a signal during this step's logging still counts
                if done % config.checkpoint_every == 0 or done == config.steps or stopping:
                    states = distributed.gather_objects(ctx, rng_state())
                    if main:
                        last_saved = save(done, rng_per_rank=states if ctx.enabled else None)
                        prune_checkpoints(ckpt_dir, config.keep_last)
                if stopping:
                    status = "interrupted"
                    why = signal.Signals(stop.signal).name if stop.signal is not None else "a stop request"
                    where = " (received by another process)" if stop.signal is None else ""
                    _say(f"{why}{where}: stopped after step {done}; checkpoint {last_saved}; "
                         f"continue with --resume {out}")
                    break
    finally:
        bar.close()
        if log is not None:
            log.close()
        # Workers ignore SIGTERM (the stop belongs to this process), so they are shut down here, through the
        # loader's own path, rather than left to multiprocessing's exit handler, whose SIGTERM they would ignore.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    seconds = elapsed_before + time.perf_counter() - run_start
    summary = {"status": status, "step": done, "best_pckh_mpii": best, "seconds": round(seconds, 2),
               "checkpoint": last_saved, "out": out, "config": config.to_dict(), "world_size": ctx.world_size,
               "rank": ctx.rank}
    if not main:
        return summary
    rows = read_log(os.path.join(out, "log.csv"))
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
    if rates:
        summary["images_per_s_median"] = sorted(rates)[len(rates) // 2]
    last_val = [r for r in rows if "pckh_mpii" in r]
    if last_val:
        summary["final_pckh_mpii"], summary["final_pckh_all16"] = last_val[-1]["pckh_mpii"], last_val[-1]["pckh_all16"]
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if status == "finished":
        best_path = os.path.join(ckpt_dir, "best.pt")
        if os.path.exists(best_path):
            shutil.copyfile(best_path, os.path.join(out, "model.pt"))
        from .plots import plot_curves, plot_sample_prediction

        for note in (plot_curves(rows, os.path.join(out, "curves.png")),
                     plot_sample_prediction(model, source, device, os.path.join(out, "prediction.png"),
                                            channels_last=config.channels_last)):
            _say(note)
    return summary
