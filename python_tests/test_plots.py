"""keypointops.plots: the part-mask picture."""
import numpy as np
import pytest
from PIL import Image

from keypointops.plots import plot_part_masks


def test_part_masks_picture(tmp_path):
    frames = np.zeros((2, 64, 32, 3), np.uint8)
    masks = np.random.default_rng(0).random((2, 3, 8, 4))
    masks /= masks.sum((-2, -1), keepdims=True)
    plot_part_masks(frames, masks, tmp_path / "masks.png")
    with Image.open(tmp_path / "masks.png") as image:
        width, height = image.size
    assert height > width / 2       # two rows of frame + three masks
    with pytest.raises(ValueError, match="masks \\[N, 3, h, w\\]"):
        plot_part_masks(frames, masks[:, :2], tmp_path / "bad.png")
