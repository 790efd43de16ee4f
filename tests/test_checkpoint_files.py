"""Checkpoint files: refusal of everything that is not a checkpoint, atomic saves, pruning, RNG states."""

from __future__ import annotations

import io
import os
import random
import stat
import zipfile

import numpy as np
import pytest
import torch

from fused_hourglass import StackedHourglass, reference, save_checkpoint
from fused_hourglass.checkpoint import (
    CheckpointError,
    load_checkpoint,
    prune_checkpoints,
    read_state_dict,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)


@pytest.fixture(scope="module")
def port_state():
    model = reference.StackedHourglass(1, 16, 4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    return model.state_dict()


def _torch_bytes(obj, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _release(state) -> dict:
    """The port's released layout: DataParallel prefixes, optimizer, epoch."""
    return {"state_dict": {"model.module." + k: v for k, v in state.items()}, "optimizer": None, "epoch": 12}


def _flip_byte_in_tensor_record(data: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64)
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _random_bytes() -> bytes:
    data = random.Random(1234).randbytes(4096)
    assert not data.startswith((b"PK", b"\x80"))  # the case under test: neither format's magic
    return data


def _zip_of_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/readme.txt", "not a checkpoint")
    return buffer.getvalue()


# name -> (file contents from the port state dict, refusal the message must state)
BAD_FILES = {
    "empty": (lambda s: b"", "is empty"),
    "random": (lambda s: _random_bytes(), "neither torch.save's zip format nor its legacy pickle format"),
    "truncated": (lambda s: (d := _torch_bytes(_release(s)))[:len(d) // 2], "truncated or corrupt"),
    "truncated_legacy": (lambda s: (d := _torch_bytes(_release(s), _use_new_zipfile_serialization=False))[:len(d) // 2],
                         "truncated or corrupt"),
    "bit_flip": (lambda s: _flip_byte_in_tensor_record(_torch_bytes(_release(s))), "fails its CRC check"),
    "text": (lambda s: b"epoch: 3\nstate_dict: none\n", "is a text file"),
    "zip_of_something_else": (lambda s: _zip_of_text(), "zip archive but not a torch checkpoint"),
    "foreign_pickle": (lambda s: b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.", "truncated or corrupt"),
    "code": (lambda s: _torch_bytes({"state_dict": s, "hook": os.getcwd}), "not a plain-tensor checkpoint"),
    "list": (lambda s: _torch_bytes([1, 2]), "expected a dict"),
    "tensor": (lambda s: _torch_bytes(torch.zeros(3)), "expected a dict"),
    "no_state_dict": (lambda s: _torch_bytes({"epoch": 3, "optimizer": {"lr": 0.1}}), "holds no model state dict"),
    "state_dict_none": (lambda s: _torch_bytes({"state_dict": None, "epoch": 3}), "'state_dict' is a NoneType"),
    "state_dict_empty": (lambda s: _torch_bytes({"state_dict": {}, "epoch": 3}), "is empty"),
    "non_tensor_value": (lambda s: _torch_bytes({"state_dict": {**s, "pre.0.conv.weight": 1.5}}),
                         "values must be tensors, 'pre.0.conv.weight' is float"),
}
# Files torch.load reads, whose state dict is not a stacked hourglass: refused by read_state_dict/from_checkpoint.
NOT_HOURGLASS = {
    "other_network": (lambda s: _torch_bytes({"weight": torch.zeros(1)}),
                      "not a stacked-hourglass state dict, key 'pre.4.conv3.conv.weight' is missing"),
    "incomplete": (lambda s: _torch_bytes({k: v for k, v in s.items() if k != "hgs.0.0.up1.bn2.bias"}),
                   "1 missing (first 'hgs.0.0.up1.bn2.bias')"),
    "misshaped": (lambda s: _torch_bytes({**s, "outs.0.conv.bias": torch.zeros(9)}),
                  "'outs.0.conv.bias': checkpoint [9], model [4]"),
    "flat_weight": (lambda s: _torch_bytes({**s, "pre.4.conv3.conv.weight": torch.zeros(16)}),
                    "'pre.4.conv3.conv.weight' should be a 4-d conv weight, got [16]"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_refused_naming_file_and_reason(case, tmp_path, port_state):
    make, reason = BAD_FILES[case]
    path = tmp_path / f"{case}.pt"
    path.write_bytes(make(port_state))
    for load in (load_checkpoint, StackedHourglass.from_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert str(path) in str(info.value) and reason in str(info.value), str(info.value)
        assert info.value.__cause__ is None  # no IndexError/UnpicklingError traceback chained underneath
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("case", sorted(NOT_HOURGLASS))
def test_state_dict_that_is_not_a_stacked_hourglass(case, tmp_path, port_state):
    make, reason = NOT_HOURGLASS[case]
    path = tmp_path / f"{case}.pt"
    path.write_bytes(make(port_state))
    assert set(load_checkpoint(path))  # a readable checkpoint holding tensors ...
    for load in (read_state_dict, StackedHourglass.from_checkpoint):
        with pytest.raises(CheckpointError) as info:  # ... but not of this network
            load(path)
        assert str(path) in str(info.value) and reason in str(info.value), str(info.value)


def test_pickled_code_refusal_says_what_it_holds(tmp_path, port_state):
    path = tmp_path / "code.pt"
    path.write_bytes(BAD_FILES["code"][0](port_state))
    with pytest.raises(CheckpointError, match="weights only") as info:
        load_checkpoint(path)
    assert f"{os.getcwd.__module__}.getcwd" in str(info.value)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        StackedHourglass.from_checkpoint(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(CheckpointError, match="is a directory") as info:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        load_checkpoint(3)
    with pytest.raises(ValueError, match="map_location='gpu0' is not a device"):
        load_checkpoint(tmp_path / "x.pt", map_location="gpu0")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_pickle"])
def test_port_release_loads_in_both_torch_formats(legacy, tmp_path, port_state):
    path = tmp_path / "release.pt"
    path.write_bytes(_torch_bytes(_release(port_state), _use_new_zipfile_serialization=not legacy))
    payload = load_checkpoint(path)
    assert payload["epoch"] == 12 and next(iter(payload["state_dict"])).startswith("model.module.")
    state = read_state_dict(path)
    assert list(state) == list(port_state)
    for k, v in port_state.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_bare_state_dicts_with_wrapper_prefixes(prefix, tmp_path, port_state):
    path = tmp_path / "bare.pt"
    torch.save({prefix + k: v for k, v in port_state.items()}, path)
    state = read_state_dict(path)
    assert list(state) == list(port_state)
    assert torch.equal(state["hgs.0.0.up1.bn1.running_mean"], port_state["hgs.0.0.up1.bn1.running_mean"])


# --------------------------------------------------------------------------------------------------------- saving

@pytest.fixture
def tiny():
    return reference.StackedHourglass(1, 16, 4)


def test_extras_round_trip_under_weights_only(tmp_path, tiny):
    optimizer = torch.optim.SGD(tiny.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    for p in tiny.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # momentum buffers: tensors in the optimizer state
    scheduler.step()
    extra = {"scheduler": scheduler.state_dict(), "step": 1200, "rng": rng_state(),
             "sampler": {"epoch": 3, "order": torch.randperm(10)}, "best_metric": 0.8125}
    path = tmp_path / "step-00001200.pt"
    save_checkpoint(path, tiny, optimizer, epoch=3, **extra)
    payload = load_checkpoint(path)
    assert payload["epoch"] == 3 and payload["step"] == 1200 and payload["best_metric"] == 0.8125
    assert torch.equal(payload["sampler"]["order"], extra["sampler"]["order"])
    assert payload["scheduler"] == extra["scheduler"]
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=2).load_state_dict(payload["scheduler"])
    assert len(payload["optimizer"]["state"]) == len(optimizer.state)


def test_wrappers_are_saved_with_the_ports_keys(tmp_path, tiny):
    path = tmp_path / "dp.pt"
    save_checkpoint(path, torch.nn.DataParallel(tiny))
    assert list(load_checkpoint(path)["state_dict"]) == list(tiny.state_dict())


def test_file_mode_follows_umask(tmp_path, tiny):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "m.pt", tiny)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.pt").st_mode) == 0o640


def _breaking_save(exc):
    """A torch.save that writes the first half of the real serialization, then fails like a full disk."""
    real_save = torch.save

    def broken(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        raise exc

    return broken


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "interrupt"])
def test_failure_midway_keeps_previous_checkpoint(exc, tmp_path, tiny, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, tiny, epoch=1, step=10)
    before = path.read_bytes()
    broken = _breaking_save(exc)
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(type(exc)):
        save_checkpoint(path, tiny, epoch=2, step=20)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("extra, where", [
    ({"scheduler": {"fn": lambda e: 0.1}}, "extra 'scheduler'['fn'] is a builtins.function"),
    ({"best_metric": np.float64(0.5)}, "extra 'best_metric' is a numpy.float64"),
    ({"rng": {"numpy": [np.zeros(3, np.uint32)]}}, "extra 'rng'['numpy'][0] is a numpy.ndarray"),
])
def test_unloadable_extra_is_refused_before_writing(extra, where, tmp_path, tiny):
    path = tmp_path / "last.pt"
    save_checkpoint(path, tiny, epoch=1)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="weights_only=True") as info:
        save_checkpoint(path, tiny, epoch=2, **extra)
    assert where in str(info.value), str(info.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_bad_save_arguments(tmp_path, tiny):
    with pytest.raises(ValueError, match="extra key 'config' is reserved"):
        save_checkpoint(tmp_path / "a.pt", tiny, config={"nstack": 3})
    with pytest.raises(TypeError, match="epoch must be an int, got float"):
        save_checkpoint(tmp_path / "a.pt", tiny, epoch=2.5)
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        save_checkpoint(tmp_path / "a.pt", dict(tiny.state_dict()))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "missing" / "a.pt", tiny)
    assert list(tmp_path.iterdir()) == []


def test_file_and_directory_are_fsynced_around_the_rename(tmp_path, tiny, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    save_checkpoint(tmp_path / "a.pt", tiny)
    assert events == ["file", "rename", "dir"]


# -------------------------------------------------------------------------------------------------------- pruning

def test_prune_keeps_newest_by_step_number(tmp_path):
    steps = [100, 900, 1000, 1200, 50]
    for s in steps:
        (tmp_path / f"step-{s:08d}.pt").write_bytes(b"x")
    (tmp_path / "step-30.pt").write_bytes(b"x")  # unpadded: ordered by number, not by name
    (tmp_path / "best.pt").write_bytes(b"x")
    (tmp_path / "step-final.pt").write_bytes(b"x")  # no number: never pruned
    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / "step-00000010.pt").mkdir()  # not a file
    os.symlink("step-00000100.pt", tmp_path / "last.pt")  # protected name: its target stays too
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step-30.pt", "step-00000050.pt", "step-00000900.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "best.pt", "last.pt", "notes.txt", "step-final.pt", "step-00000010.pt",
        "step-00000100.pt", "step-00001000.pt", "step-00001200.pt"])
    assert (tmp_path / "last.pt").read_bytes() == b"x"


def test_prune_zero_custom_pattern_and_protect(tmp_path):
    for name in ["epoch-1.pt", "epoch-2.pt", "epoch-3.pt", "step-5.pt"]:
        (tmp_path / name).write_bytes(b"x")
    removed = prune_checkpoints(tmp_path, 0, pattern="epoch-*.pt", protect=["epoch-2.pt"])
    assert [p.name for p in removed] == ["epoch-1.pt", "epoch-3.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-2.pt", "step-5.pt"]
    assert prune_checkpoints(tmp_path, 5) == []


@pytest.mark.parametrize("keep", [-1, 1.5, True, "2"])
def test_prune_rejects_bad_keep_last(keep, tmp_path):
    with pytest.raises(ValueError, match=f"keep_last must be an int >= 0, got {keep!r}"):
        prune_checkpoints(tmp_path, keep)


def test_prune_rejects_bad_directory_and_protect(tmp_path):
    with pytest.raises(NotADirectoryError, match="missing"):
        prune_checkpoints(tmp_path / "missing", 1)
    with pytest.raises(TypeError, match="protect must be a collection of file names"):
        prune_checkpoints(tmp_path, 1, protect="best.pt")


# ----------------------------------------------------------------------------------------------------------- RNGs

def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), random.getrandbits(64),
            np.random.standard_normal(3).tolist(), np.random.randint(0, 1 << 30, 4).tolist(),
            torch.rand(5).tolist(), torch.randn(3).tolist())


def test_rng_round_trip_through_a_checkpoint(tmp_path, tiny):
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    _draws()  # leaves cached Gaussians behind in Python (gauss_next) and numpy (has_gauss)
    path = tmp_path / "rng.pt"
    save_checkpoint(path, tiny, rng=rng_state())
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(load_checkpoint(path)["rng"])
    assert _draws() == expected
    state = torch.load(path, weights_only=True)["rng"]
    assert state["python"]["state"].dtype == torch.int64 and state["numpy"]["keys"].dtype == torch.int64


def test_set_rng_state_checks_everything_before_changing_anything():
    state = rng_state()
    before = random.getstate()
    broken = {**state, "torch": torch.zeros(3, dtype=torch.float32)}
    random.random()
    moved = random.getstate()
    with pytest.raises(TypeError, match=r"state\['torch'\] must be a 1-d uint8 tensor"):
        set_rng_state(broken)
    assert random.getstate() == moved != before
    with pytest.raises(ValueError, match="unknown key 'mps'"):
        set_rng_state({**state, "mps": torch.zeros(1, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"state\['numpy'\] is not a numpy RandomState state"):
        set_rng_state({"numpy": {**state["numpy"], "keys": torch.zeros(5, dtype=torch.int64)}})
    with pytest.raises(TypeError, match="must be the dict rng_state"):
        set_rng_state([1, 2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_round_trip(tmp_path):
    torch.cuda.manual_seed_all(3)
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = torch.rand(4, device="cuda").cpu()
    torch.rand(4, device="cuda")
    set_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(4, device="cuda").cpu(), expected)


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    """A writer killed mid-save leaves `.<file name>.<pid>.<8 hex digits>.tmp`; it goes once its process is gone,
    while a living process's temporary, this process's own and files of other shapes stay."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".step-00000004.pt.{dead.pid}.0badf00d.tmp"
    mine = tmp_path / f".step-00000006.pt.{os.getpid()}.0123abcd.tmp"
    alive = tmp_path / ".best.pt.1.89abcdef.tmp"  # pid 1 always runs
    others = [tmp_path / "step-00000002.pt", tmp_path / ".notes.tmp", tmp_path / f".x.{dead.pid}.nothex!.tmp"]
    for p in [stale, mine, alive, *others]:
        p.write_bytes(b"PK\x03\x04 partial")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [mine, alive, *others])
    assert remove_stale_temporaries(tmp_path / "missing") == []
