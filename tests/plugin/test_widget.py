"""The dock widget with napari's ``make_napari_viewer(show=True)`` and a tiny random model.

These check the wiring (prompt layers -> engine -> preview -> labels, workers, undo, errors as
notifications) quickly; the real-model liver test is in ``test_liver.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_samed._layers import box_vertices  # noqa: E402

pytestmark = pytest.mark.gui

SHAPE = (6, 48, 64)


def _volume():
    rng = np.random.default_rng(1)
    vol = rng.normal(0, 10, SHAPE).astype(np.float32)
    vol[:, 5:45, 5:60] += 100  # propagation (box grows 2 px a slice) stays in one tissue
    return vol


@pytest.fixture
def setup(make_napari_viewer, qtbot, box_model_session):
    from napari_samed._widget import SamedWidget

    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(_volume(), name="vol", scale=(3.0, 1.5, 1.5))
    widget = SamedWidget(viewer, session=box_model_session)
    viewer.window.add_dock_widget(widget, name="samed")
    qtbot.waitUntil(lambda: widget.session.model_loaded, timeout=60_000)  # loads in a worker
    yield viewer, widget, image
    widget.stop()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)


def _wait_for_mask(qtbot, widget, z):
    qtbot.waitUntil(lambda: z in widget.annotator.masks, timeout=60_000)


def test_box_prompt_gives_preview_and_undo_restores_layers(setup, qtbot):
    viewer, widget, image = setup
    ann = widget.annotator  # creates labels, preview and prompt layers
    for name in ("samed preview", "samed positive", "samed negative", "samed boxes"):
        assert name in viewer.layers
    assert viewer.layers["vol labels"].data.shape == SHAPE
    boxes = viewer.layers["samed boxes"]
    np.testing.assert_allclose(boxes.scale, image.scale)
    boxes.add_rectangles(box_vertices(2, (20, 15, 44, 34)))
    _wait_for_mask(qtbot, widget, 2)  # first click on a slice embeds it in a worker
    assert ann.prompts[2].box == (20.0, 15.0, 44.0, 34.0)  # (x0, y0, x1, y1): x = column
    ys, xs = np.nonzero(ann.masks[2])  # the fake model's mask is the box itself
    assert abs(ys.min() - 15) <= 1 and abs(ys.max() - 34) <= 1
    assert abs(xs.min() - 20) <= 1 and abs(xs.max() - 44) <= 1
    assert not ann.masks[1].any() if 1 in ann.masks else True
    preview = viewer.layers["samed preview"]
    np.testing.assert_array_equal(preview.data[2] > 0, ann.masks[2])
    # a positive point on the same cached slice: decoder only, synchronous
    viewer.layers["samed positive"].add([2, 40, 55])  # (z, row, column), outside the box
    assert ann.prompts[2].points == ((55.0, 40.0),) and ann.prompts[2].labels == (1,)
    # a click refines: the box widens to take in the positive click and the previous mask is
    # kept (the fake model's mask is its box)
    assert ann.masks[2][40, 55] and ann.masks[2][15:35, 20:45].all()
    assert widget.timings["click_to_preview_ms"] > 0
    widget.undo()
    assert len(viewer.layers["samed positive"].data) == 0
    assert ann.prompts[2].points == () and ann.prompts[2].box is not None
    widget.undo()
    assert len(boxes.data) == 0 and not preview.data.any()
    widget.redo()
    assert len(boxes.data) == 1 and 2 in ann.masks


def test_accept_preserves_other_labels_and_undo_is_exact(setup, qtbot):
    viewer, widget, _ = setup
    ann = widget.annotator
    labels = viewer.layers["vol labels"]
    labels.data[3, 10:40, 10:30] = 1  # an earlier object the model may overlap
    labels.refresh()
    before = labels.data.copy()
    viewer.layers["samed boxes"].add_rectangles(box_vertices(3, (5, 5, 60, 44)))
    _wait_for_mask(qtbot, widget, 3)
    widget.ui.label_spin.setValue(2)
    assert labels.selected_label == 2
    widget.accept()
    after = labels.data.copy()
    assert ((after == 1) == (before == 1)).all(), "accept overwrote another label"
    inner = np.zeros(SHAPE[1:], bool)
    inner[7:43, 7:59] = True  # the box (rows 5-44, columns 5-60) less a 2 px border
    outer = np.ones(SHAPE[1:], bool)
    outer[3:47, 3:63] = False
    assert (after[3][inner & (before[3] != 1)] == 2).all()
    assert not (after[3][outer] == 2).any() and not (after[:3] == 2).any()
    assert ann.masks == {}
    assert not viewer.layers["samed preview"].data.any()
    widget.undo()
    np.testing.assert_array_equal(labels.data, before)
    widget.redo()
    np.testing.assert_array_equal(labels.data, after)


def test_propagate_and_embed_run_in_workers_with_progress(setup, qtbot):
    viewer, widget, _ = setup
    widget.embed()
    assert widget.busy and widget.ui.progress.isVisible()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert all(widget.annotator.engine.is_embedded(z) for z in range(SHAPE[0]))
    viewer.layers["samed boxes"].add_rectangles(box_vertices(2, (20, 15, 44, 34)))
    ann = widget.annotator
    assert 2 in ann.masks  # embedded: synchronous
    widget.ui.direction_combo.setCurrentText("forward")
    widget.propagate()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert ann.history[-1].startswith("propagate from slice 2 (forward")
    assert sorted(ann.masks) == [2, 3, 4, 5]
    assert (viewer.layers["samed preview"].data[5] > 0).sum() > 0


def test_errors_become_notifications(setup, qtbot, monkeypatch):
    viewer, widget, _ = setup
    shown = []
    monkeypatch.setattr("napari_samed._widget.show_error", lambda msg: shown.append(msg))
    widget.propagate()  # nothing to propagate
    assert shown and "nothing to propagate" in shown[-1]
    widget.automatic()  # no automatic adapter
    assert "automatic adapter" in shown[-1]
    viewer.layers.remove("vol")
    widget.accept()
    assert "no image layer" in shown[-1]


def test_shortcuts_and_export(setup, qtbot, tmp_path):
    import nibabel as nib

    viewer, widget, _ = setup
    from napari_samed._widget import KEYS

    bound = {str(k).replace("+", "-"): f for k, f in viewer.keymap.items()}
    for key in KEYS:
        assert key in bound, key
    ann = widget.annotator
    viewer.layers["samed boxes"].add_rectangles(box_vertices(1, (5, 5, 60, 44)))
    _wait_for_mask(qtbot, widget, 1)
    bound["Shift-A"](viewer)  # accept through the shortcut
    assert ann.history[-1].startswith("accept")
    out = widget.export(str(tmp_path / "labels.nii.gz"))
    img = nib.load(out[0])
    assert img.shape == SHAPE[::-1]
    np.testing.assert_allclose(np.diag(img.affine)[:3], (1.5, 1.5, 3.0))
    np.testing.assert_array_equal(np.asarray(img.dataobj).T, viewer.layers["vol labels"].data)


def test_radiological_view_turns_the_camera_not_the_data(
    make_napari_viewer, qtbot, box_model_session
):
    from napari_samed._reader import volume_layer_data
    from napari_samed._widget import SamedWidget, viewer_camera, viewer_text_overlay

    from samed.io import Volume

    viewer = make_napari_viewer(show=True)
    # RAS voxel order (x -> patient's right, y -> anterior): shown as stored, anterior would be
    # at the bottom and the patient's right on the screen's right
    ras = Volume(_volume(), np.diag([1.5, 1.5, 3.0, 1.0]), modality="CT")
    data, kwargs, _ = volume_layer_data(ras, name="ras")
    image = viewer.add_image(data, **kwargs)
    widget = SamedWidget(viewer, session=box_model_session)
    viewer.window.add_dock_widget(widget, name="samed")
    assert widget.ui.radiological_check.isChecked()
    assert tuple(str(v.value) for v in viewer_camera(viewer).orientation2d) == ("up", "left")
    assert (
        viewer_text_overlay(viewer).visible and "radiological" in viewer_text_overlay(viewer).text
    )
    np.testing.assert_array_equal(image.data, ras.array)  # the data is not reoriented
    # prompts still land on the same voxels: positions go through world coordinates
    widget.annotator.engine  # noqa: B018 - creates the prompt layers
    viewer.layers["samed boxes"].add_rectangles(box_vertices(2, (20, 15, 44, 34)))
    _wait_for_mask(qtbot, widget, 2)
    ys, xs = np.nonzero(widget.annotator.masks[2])
    got = np.array([ys.min(), ys.max(), xs.min(), xs.max()])
    assert np.abs(got - [15, 34, 20, 44]).max() <= 1  # as with the default view (test above)
    widget.ui.radiological_check.setChecked(False)
    assert tuple(str(v.value) for v in viewer_camera(viewer).orientation2d) == ("down", "right")
    assert not viewer_text_overlay(viewer).visible
    widget.ui.radiological_check.setChecked(True)
    assert tuple(str(v.value) for v in viewer_camera(viewer).orientation2d) == ("up", "left")
    viewer.dims.order = (1, 0, 2)  # a coronal-like plane on screen: not the axial view any more
    assert tuple(str(v.value) for v in viewer_camera(viewer).orientation2d) == ("down", "right")
    assert not viewer_text_overlay(viewer).visible
    viewer.dims.order = (0, 1, 2)
    assert tuple(str(v.value) for v in viewer_camera(viewer).orientation2d) == ("up", "left")
    lps = Volume(_volume(), np.diag([-1.5, -1.5, 3.0, 1.0]), modality="CT")  # LPS: already so
    data, kwargs, _ = volume_layer_data(lps, name="lps")
    viewer.add_image(data, **kwargs)
    widget.ui.image_combo.setCurrentText("lps")
    assert tuple(str(v.value) for v in viewer_camera(viewer).orientation2d) == ("down", "right")
    widget.stop()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
