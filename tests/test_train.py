"""The training engine and the command line: a short run lowers the loss; a run stopped by SIGTERM and resumed
equals the uninterrupted run bit for bit; failed checkpoint writes and bad files; evaluate and predict on a
trained checkpoint; command-line errors without tracebacks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fused_hourglass import StackedHourglass, checkpoint
from fused_hourglass.cli import main
from fused_hourglass.engine import from_preset, train

# A tiny network on 64 px synthetic images in fp32 (whatever the demo's "auto" precision is here): about 20-40 ms
# a step on two cores.
TINY = {"nstack": 1, "inp_dim": 16, "res": 64, "batch_size": 2, "val_size": 4, "train_size": 64, "workers": 0,
        "log_every": 1, "amp": False}


def tiny(tmp_path: Path, name: str, **over) -> object:
    return from_preset("demo", **{**TINY, "out": str(tmp_path / name), **over})


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    path = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_short_run_lowers_the_loss(tmp_path):
    config = tiny(tmp_path, "run", steps=40, lr=3e-3, val_every=40, checkpoint_every=40, batch_size=4,
                  train_size=400)
    summary = train(config, progress=False)
    assert summary["status"] == "finished" and summary["step"] == 40
    curve = losses(tmp_path / "run")
    assert len(curve) == 40
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    for name in ("log.csv", "summary.json", "config.json", "model.pt", "prediction.png", "checkpoints/best.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    assert (tmp_path / "run" / "prediction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, amp):
    steps, k = 8, 3
    common = {"steps": steps, "val_every": 4, "checkpoint_every": 100, "keep_last": 1, "amp": amp}
    train(tiny(tmp_path, "whole", **common), progress=False)

    def stop_at_k(step: int) -> None:
        if step == k:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: checkpoint at this step boundary

    interrupted = train(tiny(tmp_path, "split", **common), on_step=stop_at_k, progress=False)
    assert interrupted["status"] == "interrupted" and interrupted["step"] == k
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")[:k]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    resumed = train(None, resume=str(tmp_path / "split"), progress=False)
    assert resumed["status"] == "finished" and resumed["step"] == steps
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # bit for bit, every step
    assert_same_state(final_state(tmp_path / "split"), final_state(tmp_path / "whole"))
    a = torch.load(sorted((tmp_path / "split" / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    b = torch.load(sorted((tmp_path / "whole" / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    assert a["scheduler"] == b["scheduler"] and a["best_pckh"] == b["best_pckh"]
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in group_a:
            assert torch.equal(group_a[key], group_b[key])


def test_runs_train_with_fused_adam_and_resume_with_the_saved_choice(tmp_path):
    """The loop's Adam is the fused implementation on the CPU, its checkpoints say so, and a checkpoint saved by the
    per-parameter loop (fused unset) resumes with that loop, as torch's load_state_dict restores it."""
    from fused_hourglass.engine.train import build_optimizer

    config = tiny(tmp_path, "run", steps=2, val_every=100, checkpoint_every=1, schedule="step")
    opt = build_optimizer(StackedHourglass(1, 16, 16), config)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["fused"] is True
    train(config, progress=False)
    path = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1]
    saved = torch.load(path, weights_only=True)
    assert all(group["fused"] is True for group in saved["optimizer"]["param_groups"])
    for group in saved["optimizer"]["param_groups"]:
        group["fused"] = None
    torch.save(saved, path)
    resumed = train(None, resume=str(tmp_path / "run"), overrides={"steps": 3}, progress=False)
    assert resumed["status"] == "finished" and resumed["step"] == 3
    latest = torch.load(sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    assert all(group["fused"] is None for group in latest["optimizer"]["param_groups"])


def test_resume_log_drops_rows_after_the_checkpoint(tmp_path):
    """A run that died after its last checkpoint left log rows past it; the resumed log has each step once."""
    config = tiny(tmp_path, "run", steps=4, val_every=100, checkpoint_every=2, keep_last=5)
    train(config, progress=False)
    os.remove(tmp_path / "run" / "checkpoints" / "step-00000004.pt")  # as if killed between step 2's checkpoint and 4
    train(None, resume=str(tmp_path / "run"), progress=False)
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_prunes_to_the_last_k_and_keeps_best(tmp_path):
    train(tiny(tmp_path, "run", steps=6, val_every=3, checkpoint_every=1, keep_last=2), progress=False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["best.pt", "step-00000005.pt", "step-00000006.pt"]


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    config = tiny(tmp_path, "run", steps=4, val_every=100, checkpoint_every=2, keep_last=5)
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"PK\x03\x04 partial")
            raise OSError(28, "No space left on device")
        calls["n"] += 1
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(config, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["step-00000002.pt"]  # no temporary file left, no partial step 4
    ok = checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-00000002.pt"))
    assert ok["step"] == 2
    resumed = train(None, resume=str(tmp_path / "run"), progress=False)
    assert resumed["step"] == 4


def test_resume_removes_what_a_killed_write_left(tmp_path, capsys):
    """A run killed during a checkpoint write leaves a temporary file; the resumed run removes it and says so."""
    train(tiny(tmp_path, "run", steps=4, val_every=100, checkpoint_every=2), progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / "run" / "checkpoints" / f".step-00000004.pt.{dead.pid}.deadbeef.tmp"
    leftover.write_bytes(b"PK\x03\x04 partial")
    capsys.readouterr()
    train(None, resume=str(tmp_path / "run"), overrides={"steps": 4}, progress=False)
    assert not leftover.exists() and f"removed {leftover}" in capsys.readouterr().out


def test_resume_refuses_other_computations_and_foreign_files(tmp_path):
    train(tiny(tmp_path, "run", steps=2, val_every=100, checkpoint_every=2), progress=False)
    with pytest.raises(ValueError, match="--lr .* differs from the checkpoint"):
        train(None, resume=str(tmp_path / "run"), overrides={"lr": 0.5}, progress=False)
    port_style = tmp_path / "weights.pt"
    torch.save({"state_dict": StackedHourglass(1, 16, 16).state_dict(), "epoch": 3}, port_style)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        train(None, resume=str(port_style), progress=False)
    with pytest.raises(FileNotFoundError, match="no step-"):
        train(None, resume=str(tmp_path), progress=False)


def test_demo_preset_resolves_auto_precision_for_this_machine():
    """The demo's mixed precision is "auto": on for CUDA and for a CPU with native bf16, off elsewhere and on the
    triton backend; an explicit --amp/--no-amp wins; the saved configuration holds the resolved bool."""
    from fused_hourglass.engine.config import PRESETS, native_bf16_cpu, resolve_amp, validate

    assert PRESETS["demo"]["amp"] == "auto"
    assert from_preset("demo", device="cpu").amp is native_bf16_cpu()
    assert from_preset("demo", device="cpu", amp=False).amp is False
    assert from_preset("demo", device="cpu", amp=True).amp is True
    assert from_preset("demo", backend="triton").amp is False
    assert resolve_amp("auto", "cuda:0", "fused") is True
    assert resolve_amp("auto", "not-a-device", "fused") is False
    config = from_preset("demo", device="cpu")
    config.amp = "auto"
    with pytest.raises(ValueError, match="--amp must be on or off"):
        validate(config)


def test_run_states_its_precision(tmp_path, capsys):
    train(tiny(tmp_path, "run", steps=1, val_every=100, checkpoint_every=100, amp=True), progress=False)
    assert "bf16 autocast" in capsys.readouterr().out
    train(tiny(tmp_path, "run32", steps=1, val_every=100, checkpoint_every=100), progress=False)
    assert ", fp32," in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    train(from_preset("demo", **{**TINY, "out": str(out), "steps": 6, "val_every": 6, "checkpoint_every": 6}),
          progress=False)
    return out


def test_evaluate_writes_table_and_json(trained, tmp_path, capsys):
    out_json = tmp_path / "pckh.json"
    assert main(["evaluate", "--checkpoint", str(trained), "--flip", "-n", "8", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "MPII mean" in text and "all 16" in text and "flip" in text and "r_ankle" in text
    report = json.loads(out_json.read_text())
    assert report["res"] == 64 and report["images"] == 8
    for name in ("no flip", "flip"):
        r = report["results"][name]
        assert 0.0 <= r["mpii"] <= 1.0 and 0.0 <= r["all16"] <= 1.0
        assert set(r["per_joint"]) == set(__import__("fused_hourglass").pose.MPII_JOINTS)


def test_predict_writes_json_and_png(trained, tmp_path):
    from PIL import Image

    from fused_hourglass.data.synthetic import render

    sample = render(5, 0, 64)
    image_path = tmp_path / "person.png"
    Image.fromarray((sample["image"] * 255).astype("uint8")).resize((96, 80)).save(image_path)
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained / "model.pt"), str(image_path), "--out", str(out)]) == 0
    result = json.loads((out / "person.json").read_text())
    assert [k["joint"] for k in result["keypoints"]][:3] == ["r_ankle", "r_knee", "r_hip"]
    assert result["center"] == [48.0, 40.0] and result["scale"] == pytest.approx(96 / 200)
    for k in result["keypoints"]:
        # the crop is the whole image padded to a square: predictions land inside that square
        assert -1 <= k["x"] <= 97 and -9 <= k["y"] <= 89 and k["confidence"] == k["confidence"]
    with Image.open(out / "person.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]
    assert main(["predict", "--checkpoint", str(trained / "model.pt"), str(image_path), "--box", "10,5,60,70",
                 "--out", str(out)]) == 0
    boxed = json.loads((out / "person.json").read_text())
    assert boxed["center"] == [35.0, 37.5] and boxed["scale"] == pytest.approx(1.25 * 65 / 200)


@pytest.mark.parametrize("argv, message", [
    (["train", "--res", "100"], "--res must be a multiple of 64"),
    (["train", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["train", "--amp", "--backend", "triton"], "--amp: training under autocast is not yet as accurate"),
    (["train", "--grad-accum", "0"], "--grad-accum must be a positive integer"),
    (["train", "--dist-timeout", "0"], "--dist-timeout must be a positive number"),
    (["train", "--data", "mpii"], "--data mpii needs --annotations"),
    (["train", "--device", "cuda:7"], "no CUDA device" if not torch.cuda.is_available() else "cuda"),
    (["predict", "--checkpoint", "missing.pt", "nothing.jpg"], "nothing.jpg"),
    (["predict", "--checkpoint", "x.pt", "img.png", "--box", "1,2,3"], "--box must be four"),
])
def test_command_line_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img.png").write_bytes(b"")
    assert main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_checkpoint_file_is_refused_by_evaluate(tmp_path, capsys):
    bad = tmp_path / "random.pt"
    bad.write_bytes(os.urandom(4096))
    assert main(["evaluate", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "random.pt" in err and "Traceback" not in err


@pytest.mark.slow
def test_command_line_sigterm_exits_zero_and_resumes_exactly(tmp_path):
    """The real thing: `python -m fused_hourglass train` in a subprocess, SIGTERM once it has logged a step, exit
    status 0 with a message, then --resume to the end equals an uninterrupted run. A loader worker runs beside it
    (the demo's setting), and the signal goes to the whole process group, as a terminal's Ctrl-C or a scheduler's
    SIGTERM does."""
    args = [sys.executable, "-m", "fused_hourglass", "train", "--nstack", "1", "--inp-dim", "16", "--res", "64",
            "--batch-size", "2", "--val-size", "4", "--train-size", "64", "--workers", "1", "--log-every", "1",
            "--steps", "12", "--val-every", "100", "--checkpoint-every", "100", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(args + ["--out", str(tmp_path / "whole")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "split")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = tmp_path / "split" / "log.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    if "SIGTERM: stopped after step" not in stdout:  # it may have finished before the signal arrived
        assert "done: 12 steps" in stdout
    resumed = subprocess.run([sys.executable, "-m", "fused_hourglass", "train", "--resume", str(tmp_path / "split"),
                              "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert_same_state(final_state(tmp_path / "split"), final_state(tmp_path / "whole"))


MPII_H5 = Path(__file__).resolve().parents[2] / "shared" / "data" / "mpii_valid.h5"


@pytest.mark.skipif(not MPII_H5.is_file(), reason=f"MPII validation annotations not found at {MPII_H5}")
def test_mpii_training_and_evaluation_on_a_made_up_image_folder(tmp_path, capsys):
    """The MPII path end to end: real annotations of 8 people, noise JPEGs in their names (the real images are not
    here), batched augmentation on the device, validation and `evaluate --data mpii` mapping back to image pixels."""
    import h5py
    import numpy as np
    from PIL import Image

    from fused_hourglass.data import MPIIAnnotations

    sub = MPIIAnnotations(MPII_H5).subset(range(8))
    h5 = tmp_path / "eight.h5"
    with h5py.File(MPII_H5, "r") as src, h5py.File(h5, "w") as dst:
        for key in src:
            dst[key] = src[key][:8]
    images = tmp_path / "images"
    images.mkdir()
    extent = torch.maximum(sub.part.amax(1), sub.center) + 40
    rng = np.random.default_rng(0)
    for name, (w, h) in zip(sub.imgname, extent.ceil().long().tolist(), strict=True):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name, quality=60)
    config = from_preset("demo", data="mpii", annotations=str(h5), images=str(images), out=str(tmp_path / "run"),
                         nstack=1, inp_dim=16, res=64, batch_size=2, val_size=4, steps=3, val_every=3, log_every=1,
                         checkpoint_every=3, workers=0)
    summary = train(config, progress=False)
    assert summary["status"] == "finished" and 0.0 <= summary["final_pckh_mpii"] <= 1.0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--data", "mpii", "--annotations", str(h5),
                 "--images", str(images), "--json", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["data"] == "mpii" and report["images"] == 8 and report["res"] == 64
    (images / sub.imgname[3]).unlink()
    assert main(["train", "--data", "mpii", "--annotations", str(h5), "--images", str(images), "--out",
                 str(tmp_path / "r2")]) == 2
    assert sub.imgname[3] in capsys.readouterr().err


def test_evaluate_and_predict_take_the_ports_checkpoint_format(tmp_path, capsys):
    """A file laid out as the port's released ones ({'state_dict', 'optimizer', 'epoch'}, keys prefixed
    `model.module.`, no training options) works unchanged; --res gives its input side."""
    model = StackedHourglass(1, 16, 16)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {f"model.module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 12}, path)
    assert main(["evaluate", "--checkpoint", str(path), "--res", "64", "-n", "4"]) == 0
    assert "at 64 px" in capsys.readouterr().out
    from PIL import Image

    Image.new("RGB", (70, 50), (120, 30, 200)).save(tmp_path / "flat.jpg")
    assert main(["predict", "--checkpoint", str(path), "--res", "64", str(tmp_path / "flat.jpg"), "--out",
                 str(tmp_path / "p"), "--flip"]) == 0
    assert len(json.loads((tmp_path / "p" / "flat.json").read_text())["keypoints"]) == 16
