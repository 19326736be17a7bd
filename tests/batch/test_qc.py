"""QC montages: slice choice, overlay colours, display orientation, PNG output."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from realdata import shared_path

from samed.batch.qc import label_color, montage, pick_slices, save_qc_png


def _volume() -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((10, 40, 60), dtype=np.float32)
    labels = np.zeros((10, 40, 60), dtype=np.uint8)
    labels[3:7, 5:15, 5:20] = 1  # top-left corner of the stored slice
    labels[5, 25:35, 40:55] = 2
    return image, labels


def test_pick_slices_covers_the_labelled_range():
    _, labels = _volume()
    assert pick_slices(labels, 12) == [3, 4, 5, 6]
    assert pick_slices(labels, 2) == [3, 6]
    assert pick_slices(np.zeros((50, 4, 4)), 5) == [0, 12, 24, 37, 49]
    with pytest.raises(ValueError, match="n=0"):
        pick_slices(labels, 0)


def test_montage_overlays_label_colours_and_tiles():
    image, labels = _volume()
    pic = montage(image, labels, window=(0, 1), tile=60, columns=2)
    assert pic.dtype == np.uint8 and pic.shape == (2 * 40, 2 * 60, 3)  # 4 slices, 2x2 tiles
    colours = {tuple(c) for c in pic.reshape(-1, 3)}
    assert label_color(1) in colours and label_color(2) in colours
    with pytest.raises(ValueError, match="one shape"):
        montage(image, labels[:5])
    with pytest.raises(ValueError, match="label value 0 has no colour"):
        label_color(0)


@pytest.mark.parametrize(
    ("codes", "label_at_top_left"),
    [("LPS", True), ("RAS", False)],  # RAS slices are flipped: anterior up, patient right left
)
def test_montage_shows_axial_slices_radiologically(codes, label_at_top_left):
    image, labels = _volume()
    flips = {"R": 1.0, "L": -1.0, "A": 1.0, "P": -1.0}  # nibabel: +x = R, +y = A
    affine = np.diag([flips[codes[0]], flips[codes[1]], 1.0, 1.0])
    pic = montage(image, labels, affine=affine, window=(0, 1), slices=[4], tile=60)
    corner = tuple(pic[14, 18])  # inside the label box in the stored order, below the text
    assert (corner != (0, 0, 0)) == label_at_top_left


def test_montage_respects_pixel_spacing():
    image, labels = _volume()
    affine = np.diag([1.0, 2.0, 3.0, 1.0])  # rows are 2 mm: the picture is 80 mm x 60 mm
    pic = montage(image, labels, affine=affine, slices=[4], tile=80)
    assert pic.shape[:2] == (80, 60)


def test_save_qc_png_on_a_real_ct(tmp_path):
    img = nib.load(shared_path("totalsegmentator", "ct_3mm", "example_ct_sm.nii.gz"))
    seg = nib.load(shared_path("totalsegmentator", "ct_3mm", "example_seg.nii.gz"))
    image = np.asarray(img.dataobj).T
    labels = np.asarray(seg.dataobj).T.astype(np.int16)
    path = save_qc_png(tmp_path / "qc.png", image, labels, affine=img.affine, window=(-160, 240))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size[0] == 4 * 256
    assert not list(tmp_path.glob(".tmp*"))
