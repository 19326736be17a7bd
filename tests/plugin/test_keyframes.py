"""The widget's keyframe list follows prompts, undo and redo; the adapter marked as the
interactive default is preselected (issue #17). A :class:`conftest.BoxModel` stands in for the
network (its mask is the prompt box), on the real TotalSegmentator CT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from realdata import shared_path

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_samed._layers import box_vertices  # noqa: E402

pytestmark = pytest.mark.gui

CT = ("totalsegmentator", "ct_3mm", "example_ct.nii.gz")
SEG = ("totalsegmentator", "ct_3mm", "example_seg_fast_force_split.nii.gz")


def _widget(make_napari_viewer, qtbot, session):
    from napari_samed._widget import SamedWidget

    viewer = make_napari_viewer(show=True)
    viewer.open(str(shared_path(*CT)), plugin="samed")
    widget = SamedWidget(viewer, session=session)
    viewer.window.add_dock_widget(widget, name="samed")
    qtbot.waitUntil(lambda: widget.session.model_loaded, timeout=60_000)
    return viewer, widget


def test_keyframe_list_follows_a_click_and_its_undo_and_redo(
    make_napari_viewer, qtbot, box_model_session
):
    from samed.io import load_label_map

    viewer, widget = _widget(make_napari_viewer, qtbot, box_model_session)
    gt = load_label_map(shared_path(*SEG)).array == 5  # liver
    z = int(gt.sum((1, 2)).argmax())
    ys, xs = np.nonzero(gt[z])
    box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
    assert widget.ui.keyframes.text().endswith("none")
    viewer.dims.set_current_step(0, z)
    viewer.layers["samed boxes"].add_rectangles(box_vertices(z, box))
    qtbot.waitUntil(lambda: z in widget.annotator.masks, timeout=60_000)
    assert widget.ui.keyframes.text().endswith(f": {z}")
    widget.propagate()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert not widget.last_error, widget.last_error
    ann = widget.annotator
    k = z + 2
    assert k in ann.masks
    my, mx = np.nonzero(ann.masks[k])
    viewer.layers["samed negative"].add([[k, float(my[len(my) // 2]), float(mx[len(mx) // 2])]])
    qtbot.waitUntil(lambda: k in ann.prompts, timeout=60_000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert widget.ui.keyframes.text().endswith(f": {z}, {k}")
    widget.undo()  # the click and its re-propagation: the keyframe goes with them
    assert k not in ann.prompts
    assert widget.ui.keyframes.text().endswith(f": {z}")
    widget.redo()
    assert k in ann.prompts
    assert widget.ui.keyframes.text().endswith(f": {z}, {k}")
    widget.stop()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)


def test_the_adapter_marked_as_interactive_default_is_preselected(
    make_napari_viewer, qtbot, box_model_session, tmp_path, monkeypatch
):
    folder = tmp_path / "adapters" / "clicky"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "adapter_config.json").write_text(
        json.dumps({"format": "samed-lora", "mode": "prompted", "base_model": "litemedsam"})
    )
    (folder / "metadata.json").write_text(json.dumps({"interactive_default": True}))
    monkeypatch.setenv("SAMED_ADAPTERS", str(tmp_path / "adapters"))
    _viewer, widget = _widget(make_napari_viewer, qtbot, box_model_session)
    assert widget.ui.adapter_combo.currentData() == "clicky"
    assert widget.session.settings.adapter == "clicky"
    widget.stop()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
