import os

import pytest
import torch

from fused_hourglass import StackedHourglass, reference, save_checkpoint


@pytest.fixture
def port_model():
    model = reference.StackedHourglass(2, 32, 5)
    # Non-default buffers so a load that skipped them would be caught.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(7)
    return model


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0)


def test_loads_port_release_format(tmp_path, port_model):
    optimizer = torch.optim.Adam(port_model.parameters())
    release = {"state_dict": {"model.module." + k: v for k, v in port_model.state_dict().items()},
               "optimizer": optimizer.state_dict(), "epoch": 12}
    path = tmp_path / "checkpoint.pt"
    torch.save(release, path)
    model = StackedHourglass.from_checkpoint(path)
    assert model.config == {"nstack": 2, "inp_dim": 32, "oup_dim": 5, "increase": 0}
    _assert_same_state(model, port_model)
    x = torch.randn(2, 3, 64, 64)
    port_model.eval()
    model.eval()
    torch.testing.assert_close(model(x), port_model(x), atol=1e-5, rtol=1e-5)


def test_loads_bare_state_dict_and_infers_increase(port_model):
    wide = reference.StackedHourglass(1, 16, 3, increase=8)
    model = StackedHourglass.from_checkpoint(wide.state_dict(), backend="reference")
    assert model.config == {"nstack": 1, "inp_dim": 16, "oup_dim": 3, "increase": 8}
    assert model.backend == "reference"
    _assert_same_state(model, wide)


def test_round_trip_own_checkpoint(tmp_path):
    model = StackedHourglass(1, 16, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    path = tmp_path / "own.pt"
    save_checkpoint(path, model, optimizer, epoch=3)
    payload = torch.load(path, weights_only=True)
    assert payload["epoch"] == 3 and payload["config"]["inp_dim"] == 16
    assert set(payload) >= {"state_dict", "optimizer", "epoch"}
    restored = StackedHourglass.from_checkpoint(path)
    _assert_same_state(restored, model)
    opt2 = torch.optim.SGD(restored.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(payload["optimizer"])
    assert len(opt2.state) == len(optimizer.state)


def test_failed_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    model = StackedHourglass(1, 16, 4)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, epoch=1)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_mismatch_names_first_missing_unexpected_and_misshaped(port_model):
    state = dict(port_model.state_dict())
    del state["hgs.0.0.up1.bn1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["outs.1.conv.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as info:
        StackedHourglass.from_checkpoint(state)
    message = str(info.value)
    assert "1 missing (first 'hgs.0.0.up1.bn1.weight')" in message
    assert "1 unexpected (first 'extra.weight')" in message
    assert "'outs.1.conv.bias': checkpoint [7], model [5]" in message


def test_conflicting_config_and_non_checkpoint_are_errors(port_model, tmp_path):
    with pytest.raises(ValueError, match="inp_dim=64 was given but the checkpoint has inp_dim=32"):
        StackedHourglass.from_checkpoint(port_model.state_dict(), inp_dim=64)
    with pytest.raises(ValueError, match="not a stacked-hourglass state dict"):
        StackedHourglass.from_checkpoint({"weight": torch.zeros(1)})
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="expected a dict"):
        StackedHourglass.from_checkpoint(path)


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "hook": os.getcwd}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        StackedHourglass.from_checkpoint(path)
