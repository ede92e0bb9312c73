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
