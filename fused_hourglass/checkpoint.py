"""Checkpoints: the published port's format, bare state dicts and our own, all loaded with weights_only=True.

Format written by `save_checkpoint`: {'state_dict', 'optimizer', 'epoch', 'config', **extra}; the state dict has the
port's keys without wrapper prefixes. Accepted on load, besides that: the port's releases ({'state_dict',
'optimizer', 'epoch'}, keys prefixed `model.module.`) and bare state dicts, in torch.save's zip format or its
legacy pickle format. Anything else is refused with a `CheckpointError` naming the file and what was wrong.
Everything stored must load with weights_only=True: tensors, None, bools, numbers, strings, bytes, torch.Size,
dtypes, devices and dicts, lists, tuples and sets of those; `rng_state` keeps to that too.
"""

from __future__ import annotations

import contextlib
import operator
import os
import pickle
import random
import re
import secrets
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .reference.model import StackedHourglass as _ReferenceHourglass

__all__ = [
    "CheckpointError", "PORT_PREFIXES", "load_checkpoint", "read_state_dict", "infer_config", "check_compatible",
    "save_checkpoint", "step_checkpoints", "prune_checkpoints", "rng_state", "set_rng_state",
]

PORT_PREFIXES = ("model.module.", "module.", "model.", "_orig_mod.")
_RESERVED = ("state_dict", "optimizer", "epoch", "config")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # torch.save's legacy format: a protocol-2 pickle stream


class CheckpointError(ValueError):
    """A file or object that is not a usable checkpoint; the message names it and says what was wrong."""


# ---------------------------------------------------------------------------------------------------------- loading

def _file_label(path: str) -> str:
    return f"checkpoint file '{path}'"


def _label(source: Any) -> str:
    return _file_label(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "checkpoint object"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not merely a character cut at the end of the sample
            return False
        text = head[:err.start].decode("utf-8")
    return bool(text) and all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def _weights_only_reason(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds {found.group(1)}, not plain data"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("WeightsUnpickler error:")), "")
    return line.removeprefix("WeightsUnpickler error:").strip()[:200]


def _check_zip(path: str, label: str) -> None:
    """Refuse a zip file that is incomplete, holds something other than a torch checkpoint, or fails a CRC check
    (torch.load itself would load flipped bits silently)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
                raise CheckpointError(f"{label} is a zip archive but not a torch checkpoint: it has no data.pkl "
                                      f"record (it holds {shown or 'nothing'})")
            broken = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError) as err:
        raise CheckpointError(f"{label} is truncated or corrupt: it starts as torch.save's zip format but the archive "
                              f"cannot be read ({err})") from None
    if broken is not None:
        raise CheckpointError(f"{label} is corrupt: record {broken!r} of its zip archive fails its CRC check")


def _read_failure(label: str, head: bytes, err: BaseException) -> CheckpointError:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    kind = "its zip archive" if head.startswith(_ZIP_MAGIC) else "a legacy torch.save pickle stream"
    return CheckpointError(f"{label} is truncated or corrupt: torch.load could not read {kind} "
                           f"({type(err).__name__}: {first})")


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict stored in the checkpoint file `path`, loaded with torch.load(weights_only=True).

    It must hold a model state dict: under 'state_dict', or be one itself (keys may keep wrapper prefixes; see
    `read_state_dict`). A missing file raises FileNotFoundError; any other file that is not such a checkpoint (a
    directory, an empty, truncated, text or random file, a zip of something else or one failing its CRC checks, a
    pickle holding objects other than plain data, a non-dict) raises CheckpointError naming the file and the
    reason."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_checkpoint: path must be a str or os.PathLike, got {type(path).__name__}")
    if isinstance(map_location, (str, torch.device)):  # so that torch.load's errors can only be about the file
        try:
            device = torch.device(map_location)
        except RuntimeError as err:
            raise ValueError(f"load_checkpoint: map_location={map_location!r} is not a device ({err})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"load_checkpoint: map_location={map_location!r} but CUDA is not available")
    path = os.fspath(path)
    label = _file_label(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{label} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"{label} is a directory, not a checkpoint file")
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{label} is empty (0 bytes): not a checkpoint")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        if _looks_like_text(head):
            snippet = head[:40].decode("utf-8", errors="replace")
            raise CheckpointError(f"{label} is a text file, not a checkpoint (it starts with {snippet!r})")
        raise CheckpointError(f"{label} is not a checkpoint: it is neither torch.save's zip format nor its legacy "
                              f"pickle format (first bytes {head[:8].hex(' ')})")
    if head.startswith(_ZIP_MAGIC):
        _check_zip(path, label)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise _read_failure(label, head, err) from None
        reason = _weights_only_reason(err)
        raise CheckpointError(f"{label} is not a plain-tensor checkpoint: weights only loading refuses what it holds"
                              + (f" ({reason})" if reason else "")
                              + "; only tensors, numbers, strings and containers of them are loaded") from None
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, IndexError, KeyError, ...
        raise _read_failure(label, head, err) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label}: expected a dict (a state dict, or one with a 'state_dict' key), "
                              f"got {type(obj).__name__}")
    _model_state(obj, label)
    return obj if isinstance(obj, dict) else dict(obj)


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    state = dict(state)
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in PORT_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
                break
    return state


def _model_state(obj: Mapping[str, Any], label: str) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint, prefixes removed; CheckpointError if there is none."""
    if "state_dict" in obj:
        state = obj["state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{label}: 'state_dict' is a {type(state).__name__}, expected a dict of tensors")
        where = "its 'state_dict'"
    else:
        state = obj
        if not any(isinstance(v, torch.Tensor) for v in obj.values()):
            keys = ", ".join(repr(k) for k in list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
            raise CheckpointError(f"{label} holds no model state dict: it has no 'state_dict' key and no tensors "
                                  f"(keys: {keys or 'none'})")
        where = "its state dict"
    if not state:
        raise CheckpointError(f"{label}: {where} is empty")
    bad_key = next((k for k in state if not isinstance(k, str)), None)
    if bad_key is not None:
        raise CheckpointError(f"{label}: state dict keys must be strings, got {bad_key!r}")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{label}: state dict values must be tensors, {bad!r} is {type(state[bad]).__name__}")
    return _strip_prefixes(state)


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint path or an already loaded object, with wrapper prefixes
    (`model.module.` from the port's DataParallel trainer, `module.`, `_orig_mod.` from torch.compile) removed.
    Checks that it is a complete stacked hourglass (the keys and shapes of the network `infer_config` reads off
    it); CheckpointError naming the source otherwise."""
    label = _label(source)
    obj = load_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{label}: expected a dict (a state dict, or one with a 'state_dict' key), "
                              f"got {type(obj).__name__}")
    state = _model_state(obj, label)
    try:
        config = infer_config(state)
    except CheckpointError as err:
        raise CheckpointError(f"{label}: {err}") from None
    with torch.device("meta"):
        expected = _ReferenceHourglass(**config).state_dict()
    problems = _key_problems(expected, state)
    if problems:
        shown = ", ".join(f"{k}={v}" for k, v in config.items())
        raise CheckpointError(f"{label} is not a complete stacked-hourglass state dict (its tensors say {shown}): "
                              "keys " + "; ".join(problems))
    return state


def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """nstack, inp_dim, oup_dim and increase of the network a state dict belongs to (CheckpointError if it is not
    a stacked hourglass's)."""
    required = ("pre.4.conv3.conv.weight", "outs.0.conv.weight", "hgs.0.0.low1.conv3.conv.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"not a stacked-hourglass state dict, key {missing[0]!r} is missing")
    for k in required:
        if not isinstance(state[k], torch.Tensor) or state[k].dim() != 4:
            shape = list(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            raise CheckpointError(f"not a stacked-hourglass state dict, {k!r} should be a 4-d conv weight, "
                                  f"got {shape}")
    stacks = {int(m.group(1)) for k in state if (m := re.match(r"hgs\.(\d+)\.", k))}
    inp_dim = state["pre.4.conv3.conv.weight"].shape[0]
    return {
        "nstack": max(stacks) + 1,
        "inp_dim": inp_dim,
        "oup_dim": state["outs.0.conv.weight"].shape[0],
        "increase": state["hgs.0.0.low1.conv3.conv.weight"].shape[0] - inp_dim,
    }


def _key_problems(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
    if shaped:
        k = shaped[0]
        problems.append(f"{len(shaped)} with the wrong shape (first {k!r}: checkpoint {list(state[k].shape)}, "
                        f"model {list(own[k].shape)})")
    return problems


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the first missing, unexpected and wrongly shaped keys, if any."""
    problems = _key_problems(model.state_dict(), state)
    if problems:
        raise ValueError("checkpoint does not fit the model: keys " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------- saving

_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Size, torch.device, torch.dtype)
_CONTAINERS = (dict, OrderedDict, Counter, list, tuple, set)


def _safe_types() -> tuple[type, ...]:
    """Classes the user allowed with torch.serialization.add_safe_globals."""
    found = []
    for entry in torch.serialization.get_safe_globals():
        obj = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(obj, type):
            found.append(obj)
    return tuple(found)


def _check_loadable(obj: Any, where: str, safe: tuple[type, ...], active: set[int]) -> None:
    """TypeError naming the first value under `where` that torch.load(weights_only=True) would refuse."""
    kind = type(obj)
    if kind in _LEAVES or kind in (torch.Tensor, nn.Parameter) or (safe and isinstance(obj, safe)):
        return
    if kind not in _CONTAINERS:
        raise TypeError(f"save_checkpoint: {where} is a {kind.__module__}.{kind.__qualname__}, which "
                        "torch.load(weights_only=True) refuses; store tensors, numbers, strings, None, or dicts, "
                        "lists and tuples of them (e.g. float(x), torch.as_tensor(array))")
    if id(obj) in active:  # a reference cycle: pickle's memo handles it
        return
    active.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_loadable(k, f"{where} key {k!r}", safe, active)
            _check_loadable(v, f"{where}[{k!r}]", safe, active)
    else:
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]", safe, active)
    active.discard(id(obj))


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _fsync_directory(directory: str) -> None:
    """Make a rename in `directory` durable, where the OS lets a directory be opened and synced."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse to sync a directory (EINVAL): best effort
            os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    epoch: int = 0, **extra: Any) -> None:
    """Write {'state_dict', 'optimizer', 'epoch', 'config', **extra} atomically.

    The file at `path` is either the old checkpoint or the complete new one, never a partial write: the payload
    goes to a temporary file in the same directory, which is fsynced, renamed over `path`, and the directory
    fsynced. On any failure the temporary file is removed and `path` is untouched. Wrappers (DataParallel, DDP,
    torch.compile) are unwrapped, so the state dict has the port's keys. Every value, `extra` included (e.g.
    scheduler, step, rng, sampler, best_metric), must load with weights_only=True: TypeError naming the first one
    that would not, before anything is written."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_checkpoint: path must be a str or os.PathLike, got {type(path).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_checkpoint: model must be an nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"save_checkpoint: optimizer must be a torch.optim.Optimizer or None, "
                        f"got {type(optimizer).__name__}")
    if isinstance(epoch, bool):
        raise TypeError("save_checkpoint: epoch must be an int, got bool")
    try:
        epoch = operator.index(epoch)
    except TypeError:
        raise TypeError(f"save_checkpoint: epoch must be an int, got {type(epoch).__name__}") from None
    reserved = [k for k in extra if k in _RESERVED]
    if reserved:
        raise ValueError(f"save_checkpoint: extra key {reserved[0]!r} is reserved (the checkpoint's own "
                         f"{', '.join(_RESERVED)})")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"save_checkpoint: path '{path}' is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"save_checkpoint: directory '{directory}' of path '{path}' does not exist")

    net = _unwrap(model)
    payload: dict[str, Any] = {"state_dict": net.state_dict(),
                               "optimizer": optimizer.state_dict() if optimizer is not None else None,
                               "epoch": epoch, **extra}
    config = getattr(net, "config", None)
    if config is not None:
        payload["config"] = dict(config)
    safe = _safe_types()
    for key, value in payload.items():
        _check_loadable(value, f"{'extra ' if key in extra else ''}{key!r}", safe, set())

    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files save_checkpoint left in `directory` when its process died mid-write (a SIGKILL, a
    power cut): `.<file name>.<pid>.<8 hex digits>.tmp` whose pid is no running process here. Another live
    process's files are kept (it may be writing). Returns the deleted paths."""
    removed = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = _TEMPORARY.match(p.name)
        if m is None or not p.is_file() or p.is_symlink() or _process_alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's, or not ours to judge: keep its file
    return True


def step_checkpoints(directory: str | os.PathLike, pattern: str = "step-*.pt",
                     protect: Iterable[str] = ("best.pt", "last.pt")) -> list[Path]:
    """The files in `directory` matching `pattern`, oldest first by the step number in the name (the last run of
    digits: `step-00001200.pt` is step 1200; ties by name). Names in `protect`, the files they link to, links, files
    without a number and non-files are left out."""
    root = Path(directory)
    protected = set(protect)
    linked = {(root / name).resolve() for name in protected if (root / name).is_symlink()}
    numbered = []
    for p in root.glob(pattern):
        digits = re.findall(r"\d+", p.stem)
        if p.name in protected or not digits or p.is_symlink() or not p.is_file() or p.resolve() in linked:
            continue
        numbered.append((int(digits[-1]), p.name, p))
    return [p for _, _, p in sorted(numbered)]


def prune_checkpoints(directory: str | os.PathLike, keep_last: int, pattern: str = "step-*.pt",
                      protect: Iterable[str] = ("best.pt", "last.pt")) -> list[Path]:
    """Delete all but the newest `keep_last` files in `directory` matching `pattern`, newest by the step number in
    the name (the last run of digits: `step-00001200.pt` is step 1200; ties by name). Names in `protect`, the files
    they link to, files without a number and non-files are never touched. Returns the deleted paths, oldest first."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"prune_checkpoints: keep_last must be an int >= 0, got {keep_last!r}")
    if isinstance(protect, str):
        raise TypeError(f"prune_checkpoints: protect must be a collection of file names, got the str {protect!r}")
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"prune_checkpoints: directory '{root}' is not a directory")
    numbered = step_checkpoints(root, pattern, protect)
    doomed = numbered[:max(len(numbered) - keep_last, 0)]
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return doomed


# ------------------------------------------------------------------------------------------------------------- RNGs

_RNG_KEYS = ("python", "numpy", "torch", "cuda")


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in types torch.load(weights_only=True) accepts:
    {'python': {'version', 'state' (int64 tensor), 'gauss_next'}, 'numpy': {'bit_generator', 'keys' (int64
    tensor), 'pos', 'has_gauss', 'cached_gaussian'} (numpy's legacy global RandomState; absent without numpy),
    'torch': CPU generator state (uint8 tensor), 'cuda': one state per CUDA device (only when CUDA is available;
    reading it initialises CUDA)}."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_state(value: Any, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
        got = f"{value.dtype} tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) \
            else type(value).__name__
        raise TypeError(f"set_rng_state: state[{name}] must be a 1-d uint8 tensor (a generator state), got {got}")
    return value.cpu()


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states `rng_state` captured (the whole dict, possibly after a save and load). Every part is
    checked before any generator is changed. Parts absent from `state` are left alone; 'cuda' is applied to the
    devices present (the first min(saved, visible)) and ignored when CUDA is unavailable."""
    if not isinstance(state, Mapping):
        raise TypeError(f"set_rng_state: state must be the dict rng_state() returned, got {type(state).__name__}")
    unknown = [k for k in state if k not in _RNG_KEYS]
    if unknown:
        raise ValueError(f"set_rng_state: unknown key {unknown[0]!r} in state, expected some of {_RNG_KEYS}")
    actions = []
    if "python" in state:
        part = state["python"]
        try:
            py = (int(part["version"]), tuple(int(v) for v in torch.as_tensor(part["state"]).tolist()),
                  part["gauss_next"])
            random.Random().setstate(py)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            raise ValueError(f"set_rng_state: state['python'] is not a Python random state ({err!r})") from None
        actions.append(lambda: random.setstate(py))
    if "numpy" in state:
        import numpy as np

        part = state["numpy"]
        try:
            legacy = (str(part["bit_generator"]), torch.as_tensor(part["keys"]).cpu().numpy().astype(np.uint32),
                      int(part["pos"]), int(part["has_gauss"]), float(part["cached_gaussian"]))
            if legacy[1].shape != (624,):
                raise ValueError(f"keys has shape {list(legacy[1].shape)}, expected [624]")
            np.random.RandomState().set_state(legacy)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            raise ValueError(f"set_rng_state: state['numpy'] is not a numpy RandomState state ({err!r})") from None
        actions.append(lambda: np.random.set_state(legacy))
    if "torch" in state:
        cpu = _byte_state(state["torch"], "'torch'")
        try:
            torch.Generator().set_state(cpu)
        except RuntimeError as err:
            raise ValueError(f"set_rng_state: state['torch'] is not a CPU generator state ({err})") from None
        actions.append(lambda: torch.set_rng_state(cpu))
    if "cuda" in state:
        if not isinstance(state["cuda"], (list, tuple)):
            raise TypeError(f"set_rng_state: state['cuda'] must be a list of device states, "
                            f"got {type(state['cuda']).__name__}")
        cuda = [_byte_state(s, f"'cuda'][{i}") for i, s in enumerate(state["cuda"])]
        if torch.cuda.is_available():
            def restore_cuda() -> None:
                for i, s in enumerate(cuda[:torch.cuda.device_count()]):
                    torch.cuda.set_rng_state(s, i)
            actions.append(restore_cuda)
    for act in actions:
        act()
