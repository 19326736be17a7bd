"""In-plane orientation: an automatic adapter sees slices as it was trained (issue #13, other sites).

BTCV is LAS; the TotalSegmentator CT NIfTI is RAS (mirrored left-right), DICOM series are LPS.
"""

from __future__ import annotations

from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from realdata import shared_path

from samed.engine.orientation import check_orientation, describe_orientation, orientation_flips
from samed.io import load_label_map, load_volume


def _restored_as(vol, flip_rows: bool, flip_cols: bool):
    """The same voxels in world space, stored with the rows and / or columns reversed."""
    arr, aff = vol.array, vol.affine.copy()
    for axis, col, flip in ((1, 1, flip_rows), (2, 0, flip_cols)):
        if flip:
            arr = np.flip(arr, axis)
            aff[:3, 3] += aff[:3, col] * (vol.shape[axis] - 1)
            aff[:3, col] *= -1
    return replace(vol, array=np.ascontiguousarray(arr), affine=aff)


def test_flips_bring_a_slice_to_the_training_orientation():
    assert orientation_flips("LAS", "LAS") == (False, False)
    assert orientation_flips("RAS", "LAS") == (False, True)  # columns mirrored
    assert orientation_flips("LPS", "LAS") == (True, False)  # rows upside down (DICOM)
    assert orientation_flips("RPI", "LAS") == (True, True)
    assert orientation_flips("ALS", "LAS") is None  # rows and columns swapped: not a flip
    assert orientation_flips("LSA", "LAS") is None  # a coronal slice
    assert "columns flipped" in describe_orientation("RAS", "LAS")
    assert "none needed" in describe_orientation("LAS", "LAS")
    assert describe_orientation("RAS", None).startswith("none: the adapter records no")
    for bad in ("LA", "LLS", "XYZ", 3):
        with pytest.raises(ValueError, match="three axis codes"):
            check_orientation(bad, "test")


def test_restored_volume_keeps_its_world_geometry():
    vol = load_volume(shared_path("chaos_t2/imagesTr/chaos_t2_05.nii.gz"))
    ras = _restored_as(vol, False, True)
    assert vol.orientation == "LAS" and ras.orientation == "RAS"
    # voxel (x, y, z) of the copy sits where voxel (X-1-x, y, z) of the original does
    x, y, z = 10, 20, 3
    a = vol.affine @ [vol.shape[2] - 1 - x, y, z, 1]
    b = ras.affine @ [x, y, z, 1]
    assert np.allclose(a, b) and ras.array[z, y, x] == vol.array[z, y, vol.shape[2] - 1 - x]


def test_training_flips_every_volume_to_the_first_ones_orientation(tmp_path):
    from samed.train.config import config_from_dict
    from samed.train.data import load_cases

    img = shared_path("chaos_t2/imagesTr/chaos_t2_05.nii.gz")
    lab = shared_path("chaos_t2/labelsTr/chaos_t2_05.nii.gz")
    paths = {}
    for name, p in (("img", img), ("lab", lab)):
        im = nib.load(p)
        a = np.asanyarray(im.dataobj)[::-1]  # x reversed: RAS
        aff = im.affine.copy()
        aff[:3, 3] += aff[:3, 0] * (a.shape[0] - 1)
        aff[:3, 0] *= -1
        paths[name] = tmp_path / f"{name}_ras.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(a), aff), paths[name])
    cases = [
        {"id": "las", "image": str(img), "label": str(lab), "split": "train"},
        {"id": "ras", "image": str(paths["img"]), "label": str(paths["lab"]), "split": "train"},
    ]
    labels = {1: {"name": "liver", "source": [1]}, 2: {"name": "kidney_right", "source": [2]}}
    labels |= {3: {"name": "kidney_left", "source": [3]}, 4: {"name": "spleen", "source": [4]}}
    data = {"format": "pairs", "cases": cases, "labels": labels, "spacing": 1.5}
    data |= {"intensity": ["percentile", 0.5, 99.5], "val_split": None}
    cfg = config_from_dict({"name": "t", "mode": "automatic", "data": data})
    loaded, _, summary = load_cases(cfg.data, "train")
    assert summary["orientation"] == "LAS"
    assert np.array_equal(loaded[0].label, loaded[1].label)
    assert np.allclose(loaded[0].image, loaded[1].image, atol=1e-5)
    # the right kidney (2) stays on the same side of the canvas as in the LAS original
    ras_first = config_from_dict(
        {"name": "t", "mode": "automatic", "data": {**data, "cases": cases[::-1]}}
    )
    assert load_cases(ras_first.data, "train")[2]["orientation"] == "RAS"


@pytest.mark.slow
def test_mirrored_storage_gives_the_mirrored_segmentation():
    """abdomen-ct (trained on LAS) on a BTCV val slab and on the same voxels stored RAS / LPS."""
    from samed.engine import Session
    from samed.lora import load_adapter
    from samed.model import build_model
    from samed.registry import resolve_adapter

    vol = load_volume(shared_path("btcv/imagesTr/btcv_0037.nii.gz"))  # val: never trained on
    gt = np.asarray(
        load_label_map(shared_path("btcv/labelsTr/btcv_0037.nii.gz"), reference=vol).array
    )
    zs = [64, 66]  # liver, spleen and both kidneys
    model = build_model("litemedsam", device="cpu")
    load_adapter(model, resolve_adapter("abdomen-ct"))
    assert model.adapter.orientation == "LAS"
    ref = Session(model, vol).automatic(slices=zs, postprocess="none")
    for rows, cols in ((False, True), (True, False)):
        other = _restored_as(vol, rows, cols)
        sess = Session(model, other)
        assert "flipped for the model" in sess.preprocessing["reorientation"]
        pred = sess.automatic(slices=zs, postprocess="none")
        back = pred[:, ::-1] if rows else pred
        back = back[:, :, ::-1] if cols else back
        assert np.array_equal(back[zs], ref[zs]), (rows, cols)
    # and the result is a segmentation: kidneys found on their own side
    for k in (2, 3):
        inter = ((ref[zs] == k) & (gt[zs] == k)).sum()
        assert 2 * inter / ((ref[zs] == k).sum() + (gt[zs] == k).sum()) > 0.3, k
