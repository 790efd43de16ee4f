"""Checkpoints: the published port's format, bare state dicts and our own, all loaded with weights_only=True."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

PORT_PREFIXES = ("model.module.", "module.", "model.")


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict inside a checkpoint path or an already loaded object, with wrapper prefixes
    (`model.module.` from the port's DataParallel trainer, `module.`) removed."""
    obj = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, (str, os.PathLike)) \
        else source
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint: expected a dict (a state dict, or one with a 'state_dict' key), "
                         f"got {type(obj).__name__}")
    state = obj["state_dict"] if "state_dict" in obj and isinstance(obj["state_dict"], Mapping) else obj
    for prefix in PORT_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            break
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint: state dict values must be tensors, {bad[0]!r} is {type(state[bad[0]]).__name__}")
    return dict(state)


def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """nstack, inp_dim, oup_dim and increase of the network a state dict belongs to."""
    required = ("pre.4.conv3.conv.weight", "outs.0.conv.weight", "hgs.0.0.low1.conv3.conv.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"checkpoint: not a stacked-hourglass state dict, key {missing[0]!r} is missing")
    stacks = {int(m.group(1)) for k in state if (m := re.match(r"hgs\.(\d+)\.", k))}
    inp_dim = state["pre.4.conv3.conv.weight"].shape[0]
    return {
        "nstack": max(stacks) + 1,
        "inp_dim": inp_dim,
        "oup_dim": state["outs.0.conv.weight"].shape[0],
        "increase": state["hgs.0.0.low1.conv3.conv.weight"].shape[0] - inp_dim,
    }


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the first missing, unexpected and wrongly shaped keys, if any."""
    own = model.state_dict()
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
    if problems:
        raise ValueError("checkpoint does not fit the model: keys " + "; ".join(problems))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    epoch: int = 0, **extra: Any) -> None:
    """Write {'state_dict', 'optimizer', 'epoch', 'config', ...} atomically: the file at `path` is either the
    old checkpoint or the complete new one, never a partial write."""
    payload = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
               "epoch": int(epoch), **extra}
    config = getattr(model, "config", None)
    if config is not None:
        payload["config"] = dict(config)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
