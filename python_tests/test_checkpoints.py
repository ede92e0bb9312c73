"""Checkpoints (keypointops.checkpoints): the atomic write and the one-line errors of a bad file."""
import pytest
import torch

from keypointops.checkpoints import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"x": torch.ones(3)})

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"x": torch.zeros(3)})
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "corrupt.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a keypointops training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "config": {"model": "pcb"}}, tmp_path / "pcb.pt")
    with pytest.raises(CheckpointError, match="holds a 'pcb' model"):
        load_checkpoint(tmp_path / "pcb.pt", "kmpnet")


class _RunsCode:
    """Unpickling this would run a shell command (writes the marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_untrusted_and_incomplete_checkpoints(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"format": CHECKPOINT_FORMAT, "config": _RunsCode(marker)}, tmp_path / "evil.pt")
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 3)
    for name in ("evil.pt", "random.pt"):
        with pytest.raises(CheckpointError, match=name) as err:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value) and "weights_only=false" not in str(err.value).lower()
    assert not marker.exists()
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, tmp_path / "no-config.pt")
    with pytest.raises(CheckpointError, match="incomplete: it holds no run config"):
        load_checkpoint(tmp_path / "no-config.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "config": {"model": "pcb"}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks num_classes, epoch, model, optimizer, scheduler"):
        load_checkpoint(tmp_path / "partial.pt")


def test_wrong_shaped_weight_names_the_tensor():
    from keypointops.checkpoints import model_from_checkpoint
    from keypointops.models import build_model

    weights = build_model("resnet50", 5, width=0.125).state_dict()
    weights["backbone.conv1.weight"] = torch.zeros(3, 3, 7, 7)
    state = {"config": {"model": "resnet50", "model_options": {"width": 0.125}}, "num_classes": 5, "model": weights}
    with pytest.raises(CheckpointError, match="size mismatch for backbone.conv1.weight") as err:
        model_from_checkpoint(state)
    assert "\n" not in str(err.value)
