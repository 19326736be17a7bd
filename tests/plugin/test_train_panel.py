"""The Train adapter and uncertainty panels of the widget, opened through the Plugins menu entry
(``add_plugin_dock_widget``), driven by their buttons, with a tiny random model and tiny
synthetic volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")

pytestmark = pytest.mark.gui

TINY = {
    "model.kind": "tiny",
    "train.max_minutes": None,
    "train.iterations": 4,
    "train.batch_size": 1,
    "train.cache_copies": 1,
    "train.device": "cpu",
    "validation.interval": 2,
}


@pytest.fixture
def panel_widget(make_napari_viewer, qtbot, monkeypatch, make_tiny_volume):
    monkeypatch.setenv("SAMED_CACHE_DIR", "none")
    viewer = make_napari_viewer(show=True)
    _dock, widget = viewer.window.add_plugin_dock_widget("samed", "samed segmentation")
    for i in range(4):
        vol = make_tiny_volume(seed=i)
        viewer.add_image(vol.array, name=f"vol{i}")
        lab = np.zeros(vol.array.shape, np.int32)
        lab[:, 20:40, 30:60] = 1
        viewer.add_labels(lab, name=f"vol{i} labels")
    yield viewer, widget
    widget.train_panel.stop()
    widget.train_panel.wait(120)


def _train(panel, qtbot, name: str, options: dict, layers=None) -> None:
    panel.train_options = {"overrides": options}
    panel.set_checked(layers or [f"vol{i} labels" for i in range(4)])
    panel.name_edit.setText(name)
    panel.train_btn.click()
    assert panel.running and not panel.train_btn.isEnabled()


def test_train_from_layers_lists_the_adapter(panel_widget, qtbot):
    from samed.registry import find_adapters, user_adapter_dir

    viewer, widget = panel_widget
    panel = widget.train_panel
    assert [panel.layers_list.item(i).text() for i in range(4)] == [
        f"vol{i} labels" for i in range(4)
    ]
    _train(panel, qtbot, "from-layers", TINY)
    qtbot.waitUntil(lambda: panel.result is not None or bool(panel.error), timeout=300_000)
    assert not panel.error
    res = panel.result
    assert res["steps"] == 4 and Path(res["installed"]) == user_adapter_dir() / "from-layers"
    combo = widget.ui.adapter_combo
    assert "from-layers" in [combo.itemData(i) for i in range(combo.count())]
    assert "from-layers" in {a.name for a in find_adapters()}
    kinds = [e["event"] for e in panel.events]
    assert "cache" in kinds and "step" in kinds and "val" in kinds
    assert "installed" in panel.status.text()
    meta = json.loads((Path(res["installed"]) / "metadata.json").read_text())
    assert [i["name"] for i in meta["annotations"]["images"]] == [
        f"vol{i} labels" for i in range(4)
    ]


def test_bad_name_is_refused_before_training(panel_widget):
    _viewer, widget = panel_widget
    panel = widget.train_panel
    panel.set_checked(["vol0 labels"])
    panel.name_edit.setText("../escape")
    assert panel.start() is False and not panel.running
    assert "adapter name" in panel.status.text()


def test_short_dock_cuts_the_layer_list_not_the_fields(panel_widget, qtbot):
    """A dock shorter than the widget wants squeezes the panel below its minimum: in the session-7
    benchmark window (1400 x 1494) it got 279 px, and the Name/Mode form's rows overlapped (Mode's
    text was cut). At that height, while training, every field and button keeps its full height,
    the layer list (which scrolls) still shows two rows and the status line (step and minutes
    are on the bar) shows all of ACDC's three classes; its whole text is also in the tooltip."""
    _viewer, widget = panel_widget
    panel = widget.train_panel
    text = "loss 0.1234   val Dice 0.850 (best 0.860) at step 100: RV 0.800 MYO 0.850 LV 0.900"
    panel._say(text)
    g = panel.geometry()
    panel.setGeometry(g.x(), g.y(), 412, 279)  # as the widget's layout sized it there
    assert panel.height() == 279
    fields = (panel.folder_edit, panel.name_edit, panel.mode_combo, panel.train_btn)
    for w in (*fields, panel.stop_btn):
        assert w.height() >= w.minimumSizeHint().height(), (w, w.height())
    assert panel.mode_combo.geometry().top() >= panel.name_edit.geometry().top()
    assert panel.minutes_spin.geometry().top() >= panel.mode_combo.geometry().bottom()
    assert panel.layers_list.height() >= 2 * panel.layers_list.sizeHintForRow(0)
    assert panel.status.height() >= panel.status.heightForWidth(panel.status.width())
    assert panel.status.toolTip() == text
    # the image layers started a model load in a worker: let it end inside this test (a worker
    # left running past the viewer's close disturbs later tests' model-loading timing)
    qtbot.waitUntil(lambda: not widget.model_loading, timeout=120_000)


def test_stop_keeps_a_loadable_adapter(panel_widget, qtbot, make_tiny_volume):
    from samed.engine import Session
    from samed.lora import load_adapter
    from samed.model import build_tiny_model

    _viewer, widget = panel_widget
    panel = widget.train_panel
    _train(panel, qtbot, "stopped", {**TINY, "train.iterations": 100000})
    qtbot.waitUntil(lambda: any(e["event"] == "val" for e in panel.events), timeout=300_000)
    panel.stop_btn.click()
    qtbot.waitUntil(lambda: panel.result is not None or bool(panel.error), timeout=300_000)
    res = panel.result
    assert res["stopped"] and res["best_step"] >= 2 and res["steps"] < 100000
    model = build_tiny_model("tinyvit", seed=0)
    load_adapter(model, res["installed"])
    out = Session(model, make_tiny_volume()).automatic(postprocess="none")
    assert out.shape == (3, 60, 80)


def test_uncertainty_panel_shows_map_and_ranked_slices(
    make_napari_viewer, qtbot, make_tiny_model, make_tiny_volume
):
    from napari_samed._session import PluginSession
    from napari_samed._uncertainty_panel import layer_name
    from napari_samed._widget import SamedWidget

    from samed.lora import LoraConfig, apply_lora

    model = make_tiny_model()
    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    viewer = make_napari_viewer(show=True)
    session = PluginSession(model_factory=lambda settings: model, cache_dir=None)
    widget = SamedWidget(viewer, session=session)
    viewer.window.add_dock_widget(widget)
    vol = make_tiny_volume(z=4)
    viewer.add_image(vol.array, name="vol")
    panel = widget.uncertainty_panel
    assert panel.start()
    assert panel.wait(120) and not panel.error
    assert panel.result.method == "flip"  # the automatic default (DEFAULT_METHOD)
    layer = viewer.layers[layer_name("vol")]
    assert layer.data.shape == vol.array.shape
    assert panel.slices_list.count() >= 1
    z = int(panel.slices_list.item(0).data(256))
    panel._go(panel.slices_list.item(0))
    assert viewer.dims.current_step[0] == z


def test_new_adapter_label_names_show_at_once(make_napari_viewer, qtbot, make_tiny_volume):
    """An adapter trained in the panel is chosen in the Adapter menu of the same widget and its
    label names (from the annotations' label table) name the labels *Automatic* writes, with no
    reopening of the widget."""
    from napari_samed._session import PluginSession
    from napari_samed._widget import SamedWidget

    from samed.lora import load_adapter
    from samed.model import build_tiny_model
    from samed.registry import resolve_adapter

    def factory(settings):
        model = build_tiny_model("tinyvit", seed=0)
        if settings.adapter:
            load_adapter(model, resolve_adapter(settings.adapter))
        return model

    viewer = make_napari_viewer(show=True)
    widget = SamedWidget(viewer, session=PluginSession(model_factory=factory, cache_dir=None))
    viewer.window.add_dock_widget(widget, name="samed")
    for i in range(4):
        vol = make_tiny_volume(seed=i)
        viewer.add_image(vol.array, name=f"vol{i}")
        lab = np.zeros(vol.array.shape, np.int32)
        lab[:, 20:40, 30:60] = 1
        lab[:, 45:55, 10:25] = 2
        viewer.add_labels(
            lab, name=f"vol{i} annotation", metadata={"samed_label_names": {1: "blob", 2: "dot"}}
        )
    panel = widget.train_panel
    try:
        _train(panel, qtbot, "named", TINY, [f"vol{i} annotation" for i in range(4)])
        qtbot.waitUntil(lambda: panel.result is not None or bool(panel.error), timeout=300_000)
    finally:
        panel.stop()
        panel.wait(120)
    assert not panel.error and panel.result["installed"]
    ui = widget.ui
    assert ui.adapter_combo.findData("named") > 0  # in the menu at once
    ui.adapter_combo.setCurrentIndex(ui.adapter_combo.findData("named"))
    assert ui.adapter_labels() == {1: "blob", 2: "dot"}
    ui.image_combo.setCurrentText("vol0")
    ui.new_labels_btn.click()  # an empty labels layer: no names of its own
    layer = widget._labels
    assert layer.name == "vol0 labels" and not layer.metadata.get("samed_label_names")
    ui.automatic_btn.click()
    qtbot.waitUntil(lambda: layer.metadata.get("samed_label_names"), timeout=120_000)
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert not widget.last_error
    assert layer.metadata["samed_label_names"] == {1: "blob", 2: "dot"}
    table = ui.label_table
    names = {table.item(r, 0).text(): table.item(r, 1).text() for r in range(table.rowCount())}
    assert names.get("1") == "blob" and names.get("2") == "dot"


def test_uncertainty_panel_maps_a_propagated_object(
    make_napari_viewer, qtbot, make_tiny_model, make_tiny_volume
):
    """No automatic adapter: *Uncertainty map* maps the current propagated object (box on one
    slice, Propagate), on the image's grid and scale, listing only the object's slices."""
    from napari_samed._layers import box_vertices
    from napari_samed._session import PluginSession
    from napari_samed._uncertainty_panel import layer_name
    from napari_samed._widget import SamedWidget

    model = make_tiny_model()
    viewer = make_napari_viewer(show=True)
    session = PluginSession(model_factory=lambda settings: model, cache_dir=None)
    widget = SamedWidget(viewer, session=session)
    viewer.window.add_dock_widget(widget)
    vol = make_tiny_volume(z=5, y=60, x=70)
    image = viewer.add_image(vol.array, name="vol", scale=(2.0, 1.0, 1.0))
    qtbot.waitUntil(lambda: widget.session.model_loaded, timeout=60_000)
    panel = widget.uncertainty_panel
    assert not panel.start() and "no propagated object" in panel.status.text()
    assert widget.annotator is not None  # creates the prompt layers
    viewer.layers["samed boxes"].add_rectangles(box_vertices(2, (30, 20, 59, 39)))
    qtbot.waitUntil(lambda: 2 in widget.annotator.masks, timeout=60_000)
    widget.propagate_options["max_intensity_shift"] = None
    widget.propagate_options["min_area"] = 1
    widget.propagate_options["min_score"] = -1e9  # a random model's IoU head is meaningless
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    widget.propagate()

    def object_slices() -> set:
        return {z for z, m in widget.annotator.masks.items() if m.any()}

    qtbot.waitUntil(lambda: len(object_slices()) >= 2 and not widget.busy, timeout=120_000)
    masks = object_slices()
    assert len(masks) >= 2 and 2 in masks
    assert panel.start()
    assert panel.wait(120) and not panel.error
    res = panel.result
    assert "seeds" in res.extra and res.extra["seeds"] == [2]
    assert res.method == "margin"  # the default for a propagated object (PROPAGATED_DEFAULT)
    layer = viewer.layers[layer_name("vol")]
    assert layer.data.shape == vol.array.shape
    np.testing.assert_allclose(layer.scale, image.scale)
    listed = {int(panel.slices_list.item(i).data(256)) for i in range(panel.slices_list.count())}
    assert listed and listed <= masks
    assert "object" in panel.status.text()
