"""The *Encoder* row of the widget's Model box: the CPU image-encoder backend
(``auto|torch|openvino``) and precision (``auto|fp32|bf16|int8|mixed``) of
:func:`samed.model.load_model`, wired to :class:`~napari_samed._session.Settings`.

Changing either drops the loaded model (it is part of ``Settings.model_key``) and loads it again
in a worker when an image is open; the model-state line then names the encoder that runs
(:func:`encoder_name`), which may be torch fp32 when the request cannot run on this machine
(``chosen_by="fallback"``, with a notice on stderr).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel

__all__ = ["EncoderControls", "attach_encoder_controls", "encoder_name"]

_BACKEND_TIPS = {
    "auto": "measure the candidates once per machine and model (first use: a minute or two), "
    "then load the fastest one that matches torch fp32; cached",
    "torch": "PyTorch (today's path; fp32 unless a precision is chosen)",
    "openvino": "OpenVINO (pip install 'samed[openvino]'); the adapter is merged into the "
    "converted encoder, converted once and cached",
}
_PRECISION_TIPS = {
    "auto": "torch: fp32; auto/openvino: the fastest precision that matches torch fp32 (int8 "
    "only when asked for)",
    "fp32": "float32",
    "bf16": "bfloat16, only on CPUs with native bf16 (AVX512-BF16 / AMX); else fp32",
    "int8": "OpenVINO int8 (NNCF, calibrated on real CT/MRI slices; a few minutes on first use)",
    "mixed": "torch bf16 with the convolutions in float32 (native-bf16 CPUs; else fp32)",
}


def encoder_name(model: Any) -> str:
    """The candidate a loaded model's image encoder runs as (``"openvino-bf16"``, ...):
    ``"torch-fp32"`` for a CPU model without a backend, ``""`` on CUDA (autocast decides)."""
    if str(getattr(model, "device", "cpu")) != "cpu":
        return ""
    be = getattr(model, "encoder_backend", None)
    return str(be.name) if be is not None else "torch-fp32"


class EncoderControls:
    """Two combo boxes (``backend_combo``, ``precision_combo``) in the widget's Model box."""

    def __init__(self, widget: Any) -> None:
        from samed.registry import BACKENDS, CPU_PRECISIONS

        self.widget = widget
        st = widget.session.settings
        self.backend_combo = QComboBox()
        self.precision_combo = QComboBox()
        for combo, values, tips, current in (
            (self.backend_combo, BACKENDS, _BACKEND_TIPS, st.backend),
            (self.precision_combo, CPU_PRECISIONS, _PRECISION_TIPS, st.precision),
        ):
            for v in (*values, *([current] if current not in values else [])):
                combo.addItem(v, v)
                combo.setItemData(combo.count() - 1, tips.get(v, v), 3)  # tooltip
            combo.setCurrentIndex(combo.findData(current))
        self.backend_combo.setToolTip("CPU image-encoder backend (CUDA always runs torch)")
        self.precision_combo.setToolTip("CPU image-encoder precision")
        row = QHBoxLayout()
        row.addWidget(self.backend_combo, 1)
        row.addWidget(QLabel("precision"))
        row.addWidget(self.precision_combo, 1)
        ui = widget.ui
        form = ui.adapter_combo.parentWidget().layout()  # the Model box's QFormLayout
        at, _role = form.getWidgetPosition(ui.adapter_combo)
        form.insertRow(at + 1, "Encoder", row)
        self.backend_combo.currentIndexChanged.connect(self._changed)
        self.precision_combo.currentIndexChanged.connect(self._changed)

    def _changed(self, *_: Any) -> None:
        w = self.widget
        backend = self.backend_combo.currentData()
        precision = self.precision_combo.currentData()
        st = w.session.settings
        if (backend, precision) == (st.backend, st.precision):
            return
        w.session.update(backend=backend, precision=precision)
        w._annotator = None  # its engine belongs to the old model
        w._status(f"encoder {backend} / {precision}: the model loads again")
        if w._image is not None:
            w.load_model()  # in a worker; a load already running reloads for the new choice


def attach_encoder_controls(widget: Any) -> EncoderControls:
    """Add the *Encoder* row under the widget's Adapter row and return it."""
    return EncoderControls(widget)
