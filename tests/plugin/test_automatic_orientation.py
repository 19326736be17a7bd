"""The plugin's *Automatic* gives ``samed segment``'s result on a file stored in another
orientation than the adapter's training data (issue #13: orientation everywhere).

TotalSegmentator's 3 mm CT is RAS (mirrored left-right against BTCV, on which abdomen-ct was
trained, LAS); a 3-slice crop through both kidneys is opened with ``viewer.open`` and segmented
with the real LiteMedSAM + abdomen-ct.
"""

from __future__ import annotations

import numpy as np
import pytest
from realdata import shared_path

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = [pytest.mark.gui, pytest.mark.slow]

CT = ("totalsegmentator", "ct_3mm", "example_ct.nii.gz")
ZS = (88, 91)  # both kidneys and the spleen in view


def _crop(tmp_path):
    import nibabel as nib

    img = nib.load(shared_path(*CT))
    z0, z1 = ZS
    aff = img.affine.copy()
    aff[:3, 3] += aff[:3, 2] * z0
    path = tmp_path / "ct_crop.nii.gz"
    data = np.asarray(img.dataobj[:, :, z0:z1])
    nib.save(nib.Nifti1Image(data.astype(np.int16), aff), path)
    return path


def test_plugin_automatic_equals_session_automatic_on_a_mirrored_file(
    make_napari_viewer, qtbot, tmp_path
):
    from napari_samed._session import PluginSession
    from napari_samed._widget import SamedWidget

    from samed.engine import Session
    from samed.engine.preprocess import inplane_spacing
    from samed.io import load_volume
    from samed.model import load_model

    path = _crop(tmp_path)
    model = load_model("litemedsam", adapter="abdomen-ct", device="cpu")
    assert model.adapter.orientation == "LAS"
    vol = load_volume(path)
    assert vol.orientation == "RAS"
    ref = Session(model, vol).automatic()  # what `samed segment` computes
    assert "columns flipped" in Session(model, vol).preprocessing["reorientation"]

    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(path), plugin="samed")
    widget = SamedWidget(viewer, session=PluginSession(lambda s: model, cache_dir=None))
    viewer.window.add_dock_widget(widget, name="samed")
    widget.automatic()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    assert not widget.last_error, widget.last_error
    engine = widget.annotator.engine
    assert engine.orientation == "RAS"
    got = np.asarray(viewer.layers["ct_crop labels"].data)
    assert got.shape == ref.shape and (ref > 0).sum() > 1000
    np.testing.assert_array_equal(got, ref)

    # the orientation is what made them equal: the same voxels without it segment differently
    plain = Session(model, vol.array, spacing=inplane_spacing(vol.affine)).automatic()
    assert (plain != ref).sum() > 500
