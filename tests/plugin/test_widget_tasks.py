"""Widget behaviour a clinician meets on first use (issue #11), on real files from ../shared/data.

A :class:`conftest.BoxModel` stands in for the network where only the widget's logic is under test
(its mask is the prompt box), so these run in seconds; the model-loading test uses LiteMedSAM.
"""

from __future__ import annotations

import numpy as np
import pytest
from realdata import shared_path

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_samed._layers import box_vertices  # noqa: E402

pytestmark = pytest.mark.gui

CT = ("totalsegmentator", "ct_3mm", "example_ct.nii.gz")
SEG = ("totalsegmentator", "ct_3mm", "example_seg_fast_force_split.nii.gz")
NRRD = ("pyradiomics", "brain1_image.nrrd")
DICOM = ("totalsegmentator", "dicom_ct", "example_ct_dicom")


def _liver_box(z: int | None = None):
    from samed.io import load_label_map

    gt = load_label_map(shared_path(*SEG)).array == 5
    z = int(gt.sum((1, 2)).argmax()) if z is None else z
    ys, xs = np.nonzero(gt[z])
    return z, (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))


@pytest.fixture
def ct_widget(make_napari_viewer, qtbot, box_model_session):
    from napari_samed._widget import SamedWidget

    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(shared_path(*CT)), plugin="samed")
    widget = SamedWidget(viewer, session=box_model_session)
    viewer.window.add_dock_widget(widget, name="samed")
    qtbot.waitUntil(lambda: widget.session.model_loaded, timeout=60_000)
    yield viewer, widget, image
    widget.stop()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)


def _box(qtbot, viewer, widget, z, box):
    viewer.layers["samed boxes"].add_rectangles(box_vertices(z, box))
    qtbot.waitUntil(lambda: z in widget.annotator.masks, timeout=60_000)


def _propagate(qtbot, widget):
    widget.propagate()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert not widget.last_error, widget.last_error


def test_slice_range_limits_propagation(ct_widget, qtbot):
    viewer, widget, _ = ct_widget
    z, box = _liver_box()
    viewer.dims.set_current_step(0, z)
    _box(qtbot, viewer, widget, z, box)
    ann = widget.annotator
    _propagate(qtbot, widget)
    unlimited = {k for k, m in ann.masks.items() if m.any()}
    assert min(unlimited) < z - 2 and max(unlimited) > z + 1  # the object runs past the range
    widget.undo()
    widget.ui.range_check.setChecked(True)
    widget.ui.range_from.setValue(z - 2)
    widget.ui.range_to.setValue(z + 1)
    assert widget.slice_range() == (z - 2, z + 1)
    _propagate(qtbot, widget)
    limited = {k for k, m in ann.masks.items() if m.any()}
    assert limited == set(range(z - 2, z + 2))
    widget.ui.range_from.setValue(z + 1)  # the prompted slice outside the range: refused
    widget.propagate()
    assert "outside the slice range" in widget.last_error


def test_delete_active_label_on_one_slice_is_undoable(ct_widget, qtbot):
    viewer, widget, _ = ct_widget
    z, box = _liver_box()
    viewer.dims.set_current_step(0, z)
    _box(qtbot, viewer, widget, z, box)
    _propagate(qtbot, widget)
    widget.ui.label_spin.setValue(5)
    widget.accept()
    labels = viewer.layers["example_ct labels"]
    before = labels.data.copy()
    assert (before[z + 1] == 5).any() and (before[z] == 5).any()
    n = widget.delete_slice(z + 1)
    assert n == int((before[z + 1] == 5).sum())
    assert not (labels.data[z + 1] == 5).any()
    np.testing.assert_array_equal(np.delete(labels.data, z + 1, 0), np.delete(before, z + 1, 0))
    widget.undo()
    np.testing.assert_array_equal(labels.data, before)
    bound = {str(k).replace("+", "-"): f for k, f in viewer.keymap.items()}
    viewer.dims.set_current_step(0, z)
    bound["Shift-D"](viewer)  # the shortcut deletes on the slice on screen
    assert not (labels.data[z] == 5).any() and (labels.data[z + 1] == 5).any()


def test_stopping_embedding_says_stopped_and_keeps_what_it_embedded(ct_widget, qtbot):
    _viewer, widget, image = ct_widget
    widget.session.fake_model.encode_seconds = 0.05
    widget.embed()
    qtbot.waitUntil(lambda: widget.ui.progress.value() >= 3, timeout=60_000)
    widget.stop()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    engine = widget.annotator.engine
    done = sum(engine.is_embedded(z) for z in range(image.data.shape[0]))
    assert 3 <= done < image.data.shape[0]
    status = widget.ui.status.text()
    assert status.startswith("embedding stopped") and f"{done} of" in status
    assert "ready" not in status


def test_stopped_propagation_keeps_an_earlier_propagation(ct_widget, qtbot):
    viewer, widget, _ = ct_widget
    z, box = _liver_box()
    viewer.dims.set_current_step(0, z)
    _box(qtbot, viewer, widget, z, box)
    ann = widget.annotator
    _propagate(qtbot, widget)
    first = {k: m.copy() for k, m in ann.masks.items()}
    assert len(first) > 10
    widget.session.fake_model.encode_seconds = 0.0
    widget.propagate()  # again, and stop at once
    widget.stop()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert set(ann.masks) == set(first), "slices of the earlier propagation were dropped"
    for k, m in first.items():
        np.testing.assert_array_equal(ann.masks[k], m)
    assert "stopped" in widget.ui.status.text()


def test_prompt_layers_exist_and_model_loads_in_a_worker(make_napari_viewer, qtbot, monkeypatch):
    from qtpy.QtCore import QTimer

    monkeypatch.setenv("SAMED_CACHE_DIR", "none")
    viewer = make_napari_viewer(show=True)
    _dock, widget = viewer.window.add_plugin_dock_widget("samed", "samed segmentation")
    assert widget.ui.model_state.text().startswith("Model: not loaded")
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(widget.model_loading))
    timer.start(20)
    viewer.open(str(shared_path(*NRRD)), plugin="samed")
    for name in ("samed boxes", "samed positive", "samed negative", "samed preview"):
        assert name in viewer.layers  # before any button
    assert widget.model_loading and "loading litemedsam" in widget.ui.model_state.text()
    assert widget.ui.model_progress.isVisible()
    qtbot.waitUntil(lambda: widget.session.model_loaded, timeout=120_000)
    qtbot.waitUntil(lambda: not widget.model_loading, timeout=10_000)
    timer.stop()
    # a 20 ms timer that fired while ``model_loading`` was set: the event loop ran during the
    # load (a load on the GUI thread lets no tick through before it ends). One tick, not three:
    # on a quiet machine the load can take < 60 ms (a fresh-clone CI run got 2, 2026-12-02).
    assert sum(ticks) >= 1, "the GUI's event loop did not run while the model loaded"
    assert widget.ui.model_state.text().startswith("Model: ready: litemedsam")
    assert not widget.ui.model_progress.isVisible()
    # an MR image: auto means percentile scaling, and the display shows that contrast
    assert widget.ui.window_combo.itemText(0) == "auto (MR: percentile 0.5-99.5)"
    image = viewer.layers["brain1_image"]
    lo, hi = np.percentile(image.data[:: max(1, image.data.shape[0] // 16)], (0.5, 99.5))
    np.testing.assert_allclose(image.contrast_limits, (lo, hi), rtol=1e-5)
    widget.ui.window_combo.setCurrentIndex(widget.ui.window_combo.findData("minmax"))
    np.testing.assert_allclose(image.contrast_limits, (image.data.min(), image.data.max()))


@pytest.mark.parametrize("parts", [CT, NRRD, DICOM])
def test_samed_is_the_preferred_reader(make_napari_viewer, qtbot, parts):
    from napari.settings import get_settings
    from napari_samed._prefs import READER_PATTERNS, prefer_samed_reader

    viewer = make_napari_viewer(show=True)
    get_settings().plugins.extension2reader = {"*.nrrd": "napari"}  # a choice the user made
    assert "*.nrrd" not in prefer_samed_reader()  # ... is kept
    assert get_settings().plugins.extension2reader["*.nrrd"] == "napari"
    get_settings().plugins.extension2reader = {}
    from importlib.resources import files

    import npe2

    mf = npe2.PluginManifest.from_file(files("napari_samed") / "napari.yaml")
    assert mf.on_activate == "napari_samed._prefs:activate"  # first use of any contribution
    _dock, widget = viewer.window.add_plugin_dock_widget("samed", "samed segmentation")  # or this
    assert {
        p: "samed" for p in READER_PATTERNS
    }.items() <= get_settings().plugins.extension2reader.items()
    path = str(shared_path(*parts))
    # what File > Open does with the chosen files (no reader dialog: the preference decides)
    viewer.window._qt_viewer._qt_open([path], stack=False)
    layer = (
        viewer.layers[-1]
        if "samed boxes" not in viewer.layers
        else next(ly for ly in viewer.layers if "samed_volume" in ly.metadata)
    )
    vol = layer.metadata["samed_volume"]
    np.testing.assert_allclose(layer.scale, vol.spacing)
    assert layer.source.reader_plugin == "samed"
    [again] = viewer.open(path, plugin=None)  # a script that leaves the choice to napari
    assert "samed_volume" in again.metadata
    qtbot.waitUntil(lambda: not widget.model_loading, timeout=120_000)


def test_mgz_opens_through_the_plugin_and_read_errors_reach_the_user(
    make_napari_viewer, qtbot, tmp_path
):
    import nibabel as nib
    from napari.utils.notifications import notification_manager

    src = nib.load(str(shared_path("sammed3d_brats", "BraTS2021_01646_flair.nii.gz")))
    mgz = tmp_path / "flair.mgz"
    nib.save(nib.MGHImage(np.asarray(src.dataobj, dtype=np.float32), src.affine), str(mgz))
    viewer = make_napari_viewer(show=True)
    _dock, widget = viewer.window.add_plugin_dock_widget("samed", "samed segmentation")
    [layer] = viewer.open(str(mgz), plugin=None)  # napari's reader choice: samed
    vol = layer.metadata["samed_volume"]
    np.testing.assert_allclose(vol.affine, src.affine, atol=1e-4)
    assert layer.data.shape == src.shape[::-1]
    np.testing.assert_allclose(layer.scale, (1.5, 1.5, 1.5))
    # an unreadable file: samed's own message, in full, as a notification
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    n0 = len(notification_manager.records)
    with pytest.raises(Exception):  # noqa: B017 - napari wraps the reader's error in its own
        viewer.open(str(bad), plugin=None)
    messages = [str(r.message) for r in notification_manager.records[n0:]]
    assert any(m.startswith("samed could not read broken.nii.gz: ") for m in messages), messages
    assert any("broken.nii.gz" in m and len(m) > 60 for m in messages)
    qtbot.waitUntil(lambda: not widget.model_loading, timeout=120_000)


def test_label_table_names_concepts_colours_and_algorithm_type_go_into_dicom_seg(
    make_napari_viewer, qtbot, box_model_session, tmp_path
):
    import highdicom as hd
    from napari_samed._labeltable import set_label_info
    from napari_samed._widget import SamedWidget

    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(str(shared_path(*DICOM)), plugin="samed")
    widget = SamedWidget(viewer, session=box_model_session)
    viewer.window.add_dock_widget(widget, name="samed")
    qtbot.waitUntil(lambda: widget.session.model_loaded, timeout=60_000)
    ann = widget.annotator
    labels = widget._labels
    # label 1 drawn interactively, named and coded in the table
    widget.ui.label_spin.setValue(1)
    table = widget.ui.label_table
    assert table.rowCount() == 1 and table.item(0, 0).text() == "1"
    combo = table.cellWidget(0, 2)
    combo.setCurrentIndex(combo.findData("liver"))  # the concept names the label
    assert table.item(0, 1).text() == "liver"
    table.item(0, 3).setText("200, 80, 40")  # the colour
    viewer.layers["samed boxes"].add_rectangles(box_vertices(10, (150, 150, 300, 320)))
    qtbot.waitUntil(lambda: 10 in ann.masks, timeout=60_000)
    widget.accept()
    # label 2 as the automatic mode writes it (the adapter's class, no person involved)
    auto = np.zeros(labels.data.shape, labels.data.dtype)
    auto[12:14, 350:400, 100:160] = 2
    ann.fill(auto, description="automatic")
    labels.metadata["samed_label_algorithm"][2] = "AUTOMATIC"
    set_label_info(labels, 2, name="right kidney", concept="right kidney")
    out = widget.export(str(tmp_path / "seg.dcm"))
    seg = hd.seg.segread(out[0])
    d1, d2 = seg.get_segment_description(1), seg.get_segment_description(2)
    assert d1.SegmentLabel == "liver" and d2.SegmentLabel == "right kidney"
    assert d1.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED CT liver
    assert d1.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # anatomy
    assert d2.SegmentedPropertyTypeCodeSequence[0].CodeValue == "9846003"
    assert d1.SegmentAlgorithmType == "SEMIAUTOMATIC" and d2.SegmentAlgorithmType == "AUTOMATIC"
    assert d1.SegmentAlgorithmName == "samed litemedsam"
    lab = hd.color.CIELabColor.from_rgb(200, 80, 40).value
    assert tuple(d1.RecommendedDisplayCIELabValue) == tuple(lab)
    # the layer shows the table's colour
    np.testing.assert_allclose(
        labels.colormap.map(np.array([1]))[0][:3], (200 / 255, 80 / 255, 40 / 255), atol=0.01
    )
    # Ctrl-Z is the widget's undo while the widget is open
    bound = {str(k).replace("+", "-"): f for k, f in viewer.keymap.items()}
    key = next(k for k in bound if k.lower() in ("ctrl-z", "control-z"))
    bound[key](viewer)
    assert not (labels.data == 2).any() and (labels.data == 1).any()
    # the export dialog opens beside the source series
    assert widget.export_folder(image.metadata["samed_volume"]) == shared_path(*DICOM).parent


def test_seg_opened_back_shows_names_and_colours(
    make_napari_viewer, qtbot, box_model_session, tmp_path
):
    """Export a SEG from the label table, read it back on its series and show it with the SEG's
    names and colours (screenshots: ``SAMED_SCREENSHOT_DIR``, else tmp_path)."""
    import os
    from pathlib import Path

    import highdicom as hd
    from napari_samed._labeltable import label_info, set_label_info
    from napari_samed._widget import SamedWidget

    from samed.io import read_dicom_seg

    folder = Path(os.environ.get("SAMED_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 1000)
    [image] = viewer.open(str(shared_path(*DICOM)), plugin="samed")
    widget = SamedWidget(viewer, session=box_model_session)
    viewer.window.add_dock_widget(widget, name="samed")
    qtbot.waitUntil(lambda: widget.session.model_loaded, timeout=60_000)
    labels = widget.new_labels_layer()
    z, (x0, y0, x1, y1) = _liver_box_dicom(image)
    labels.data[z - 2 : z + 3, y0:y1, x0:x1] = 1  # stand-ins for two accepted objects
    labels.data[z - 1 : z + 2, y0 + 60 : y0 + 110, x0 + 70 : x0 + 130] = 2
    set_label_info(labels, 1, name="liver", concept="liver")
    set_label_info(labels, 2, name="tumour", concept="tumour", color=(255, 220, 0))
    labels.metadata["samed_label_algorithm"] = {1: "SEMIAUTOMATIC", 2: "SEMIAUTOMATIC"}
    widget.ui.label_spin.setValue(2)
    viewer.dims.set_current_step(0, z)
    qtbot.wait(200)
    viewer.screenshot(str(folder / "plugin_label_table.png"), canvas_only=False)
    out = widget.export(str(tmp_path / "seg.dcm"))

    back = read_dicom_seg(out[0], shared_path(*DICOM))
    seg = hd.seg.segread(out[0])
    layer = viewer.add_labels(
        back.array, name="SEG read back", scale=back.spacing, metadata={"samed_volume": back}
    )
    for value, info in back.meta["segments"].items():
        d = seg.get_segment_description(info["segment_number"])
        rgb = hd.color.CIELabColor.from_dicom_value(d.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.subtract(rgb, label_info(labels, value)[2])).max() <= 2  # as set
        set_label_info(layer, value, name=info["label"], color=rgb)
    for name in (labels.name, "samed preview"):
        viewer.layers[name].visible = False
    widget.ui.labels_combo.setCurrentText(layer.name)
    assert [widget.ui.label_table.item(r, 1).text() for r in range(2)] == ["liver", "tumour"]
    np.testing.assert_array_equal(layer.data, labels.data)
    qtbot.wait(200)
    viewer.screenshot(str(folder / "plugin_seg_read_back.png"), canvas_only=False)
    assert (folder / "plugin_seg_read_back.png").stat().st_size > 10_000


def _liver_box_dicom(image):
    from samed.io import align_to, load_label_map

    seg = align_to(
        load_label_map(shared_path(*DICOM[:2], "example_seg_dicom.nii.gz")),
        image.metadata["samed_volume"],
    )
    gt = seg.array == 5
    z = int(gt.sum((1, 2)).argmax())
    ys, xs = np.nonzero(gt[z])
    return z, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def test_a_layer_opened_by_napari_builtins_is_re_read_with_samed_geometry(
    make_napari_viewer, qtbot
):
    """A script's plain ``viewer.open(path)`` (napari's default: its builtins reader) gives a
    layer without spacing; choosing it in the widget re-reads it with samed."""
    from samed.io import load_volume

    path = str(shared_path(*DICOM))
    viewer = make_napari_viewer(show=True)
    [image] = viewer.open(path)  # no plugin named: napari's builtins
    assert image.source.reader_plugin == "napari"
    assert "samed_volume" not in image.metadata
    assert tuple(image.scale) == (1.0, 1.0, 1.0)
    _dock, widget = viewer.window.add_plugin_dock_widget("samed", "samed segmentation")
    qtbot.waitUntil(lambda: "samed_volume" in image.metadata, timeout=60_000)
    vol = load_volume(path)
    np.testing.assert_allclose(image.scale, vol.spacing)
    assert image.data.shape == vol.array.shape
    np.testing.assert_array_equal(np.asarray(image.data), vol.array)
    assert "samed boxes" in viewer.layers  # prompt layers for the re-read image
    qtbot.waitUntil(lambda: not widget.model_loading, timeout=120_000)


def test_a_click_on_a_propagated_object_refines_and_re_propagates_as_one_undo_step(
    ct_widget, qtbot
):
    viewer, widget, _ = ct_widget
    z, box = _liver_box()
    viewer.dims.set_current_step(0, z)
    _box(qtbot, viewer, widget, z, box)
    _propagate(qtbot, widget)
    ann = widget.annotator
    assert widget.ui.repropagate_check.isChecked()  # on by default
    before = {k: m.copy() for k, m in ann.masks.items()}
    assert len(before) > 3
    assert widget.ui.keyframes.text().endswith(str(z))
    # a negative click inside the mask on a propagated (non-prompted) slice
    k = z + 2
    ys, xs = np.nonzero(before[k])
    i = len(ys) // 2
    viewer.layers["samed negative"].add([[k, float(ys[i]), float(xs[i])]])
    qtbot.waitUntil(lambda: k in ann.prompts, timeout=60_000)
    assert not widget.last_error, widget.last_error
    assert not (ann.masks[k] & ~before[k]).any()  # a negative click never grows its slice
    assert not ann.masks[k][ys[i], xs[i]]
    np.testing.assert_array_equal(ann.masks[z], before[z])  # the keyframe is untouched
    assert widget.ui.keyframes.text().endswith(f"{z}, {k}")
    # the preview shows the whole object as the annotator has it
    preview = np.asarray(viewer.layers["samed preview"].data)
    for s, m in ann.masks.items():
        np.testing.assert_array_equal(preview[s] > 0, m)
    changed = [s for s, m in ann.masks.items() if s != k and not np.array_equal(m, before[s])]
    widget.undo()  # click + re-propagation: one step back to the propagated object
    assert "re-propagate" in widget.ui.status.text(), widget.ui.status.text()
    print("slices changed by the re-propagation besides the clicked one:", changed)
    assert set(ann.masks) == set(before)
    for s, m in before.items():
        np.testing.assert_array_equal(ann.masks[s], m)
    assert k not in ann.prompts
