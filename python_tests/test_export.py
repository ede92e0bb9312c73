"""Export that serves: every model, in both formats, with a dynamic batch axis, the keypoints
input where the embedding reads it, and the copy agreeing with PyTorch at batch 1 and 5."""
import pytest
import torch

from helpers import one_thread  # noqa: F401 (the fixture)
from keypointops.engine import make_config
from keypointops.export import export_model
from keypointops.models import build_model

# kmpnet: exported in both formats through the command in test_cli.py; its inference model is its
# visual branch, a PCBVideo with the pcb preset's options, so that export is pcb's too.
MODELS = ["resnet50", "ctl", "rgcn", "lgcn", "alignnet"]
READS_KEYPOINTS = {"ctl", "rgcn", "lgcn", "alignnet"}


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_model_exports_in_both_formats(name, tmp_path):
    config = make_config(name, "cpu", train_overrides=dict(frames=2, height=64, width=32),
                         model_overrides=dict(width=0.125))
    torch.manual_seed(0)
    model = build_model(name, 5, **{**config["model_options"], "ops_backend": "reference"})
    paths = {"onnx": tmp_path / "model.onnx", "exported": tmp_path / "model.pt2"}
    report = export_model(model, paths, frames=2, height=64, width=32)
    assert report["inputs"] == (("images", "keypoints") if name in READS_KEYPOINTS else ("images",))
    assert all(axes[0] == "batch" for axes in report["dynamic"].values())
    for fmt in paths:
        assert {"batch 1", "batch 5"} <= set(report["errors"][fmt])
        assert max(report["errors"][fmt].values()) <= 1e-4, (fmt, report["errors"][fmt])
