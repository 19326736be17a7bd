"""``lateral_pairs``: mirror-image organs (kidneys) relabelled by the side of the body's midline."""

from __future__ import annotations

import numpy as np
import pytest
from realdata import shared_path

from samed.postprocess import apply_postprocessing, assign_sides


def _two_kidneys() -> np.ndarray:
    """(2, 8, 20) map, x grows toward the patient's left (LAS): liver (6) on the right side,
    the right kidney at x 3-5, the left at x 14-16, both partly labelled with the wrong class."""
    lab = np.zeros((2, 8, 20), dtype=np.int16)
    lab[:, 1:3, 0:8] = 6
    lab[:, 4:7, 3:6] = 3  # right kidney called left
    lab[0, 5, 4] = 2
    lab[:, 4:7, 14:17] = 2  # left kidney called right
    return lab


def test_pairs_are_relabelled_by_side_and_other_classes_kept():
    lab = _two_kidneys()
    out = assign_sides(lab, [[2, 3]], "LAS")
    assert (out[:, 4:7, 3:6] == 2).all() and (out[:, 4:7, 14:17] == 3).all()
    assert (out[lab == 6] == 6).all() and (out[lab == 0] == 0).all()
    # stored RAS (x grows toward the right): the same voxels mean the other sides
    ras = assign_sides(lab, [[2, 3]], "RAS")
    assert (ras[:, 4:7, 3:6] == 3).all() and (ras[:, 4:7, 14:17] == 2).all()
    # x not left-right (a sagittal slice): unchanged
    assert np.array_equal(assign_sides(lab, [[2, 3]], "ASL"), lab)


def test_the_midline_comes_from_the_body_when_the_image_is_given():
    lab = _two_kidneys()
    image = np.zeros(lab.shape, dtype=np.float32)
    image[:, :, 2:] = 1.0  # body spans x 2..19: midline 10.5
    lab[:, 0, 9] = 3  # a voxel left of the labels' own centre (x 8) but right of the body's (10.5)
    out = assign_sides(lab, [[2, 3]], "LAS", image)
    assert out[0, 0, 9] == 2
    assert assign_sides(lab, [[2, 3]], "LAS")[0, 0, 9] == 3  # labels' bbox centre 8


def test_spec_applies_sides_before_the_largest_component():
    lab = _two_kidneys()
    spec = {"lateral_pairs": [[2, 3]], "largest_component": [2, 3]}
    out = apply_postprocessing(lab, spec, None, "LAS")
    # without the side step the largest component of class 3 would be the right kidney
    assert (out[:, 4:7, 3:6] == 2).all() and (out[:, 4:7, 14:17] == 3).all()
    with pytest.raises(
        ValueError, match=r"lateral_pairs=\[2, 3\] must be a list of \[right, left\]"
    ):
        apply_postprocessing(lab, {"lateral_pairs": [2, 3]})


def test_shipped_abdomen_adapters_recommend_kidney_sides():
    import json

    from samed.registry import resolve_adapter

    meta = json.loads((resolve_adapter("abdomen-ct") / "metadata.json").read_text())
    assert [2, 3] in meta["postprocessing"]["lateral_pairs"]
    assert [12, 13] in meta["postprocessing"]["lateral_pairs"]  # adrenals (session 7, measured)
    assert meta["preprocessing"]["orientation"] == "LAS"


def test_btcv_labels_put_the_right_kidney_on_the_patients_right():
    """The rule's premise on the real training data (LAS): class 2 lies at smaller x than 3."""
    import nibabel as nib

    for case in ("btcv_0005", "btcv_0034"):
        lab = np.asarray(nib.load(shared_path(f"btcv/labelsTr/{case}.nii.gz")).dataobj)
        x_r, x_l = (np.nonzero(lab == k)[0].mean() for k in (2, 3))
        assert x_r < lab.shape[0] / 2 < x_l
        zyx = np.ascontiguousarray(lab.transpose(2, 1, 0))
        out = assign_sides(zyx, [[2, 3]], "LAS")
        assert np.array_equal(out, zyx)  # expert labels already obey it
        # the adrenal glands too: right (12) at smaller x than left (13)
        assert np.array_equal(assign_sides(zyx, [[12, 13]], "LAS"), zyx)
