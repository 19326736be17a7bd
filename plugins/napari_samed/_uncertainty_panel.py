"""The *Where is it unsure?* panel: the automatic adapter's per-voxel uncertainty
(:func:`samed.uncertainty.automatic_uncertainty`) as an Image layer, and the slices to review
first as a list (click one to go there).

It reuses the widget's engine session, so after *Automatic* (slices embedded) the default
``entropy`` map costs only the decoder; it runs in a background thread while the widget is idle.
"""

from __future__ import annotations

import threading
from typing import Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
)

__all__ = ["UncertaintyPanel", "attach_uncertainty_panel", "layer_name"]


def layer_name(image_name: str) -> str:
    """The uncertainty layer's name for an image layer."""
    return f"{image_name} uncertainty"


class UncertaintyPanel(QGroupBox):
    """Button, method choice, ranked slice list. ``result`` holds the last
    :class:`samed.uncertainty.UncertaintyResult`."""

    def __init__(self, widget: Any) -> None:
        super().__init__("Where is it unsure?")
        from samed.uncertainty import DEFAULT_METHOD, METHODS

        self.widget = widget
        self.result: Any = None
        self.error = ""
        self._thread: threading.Thread | None = None
        self._out: dict[str, Any] = {}
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        self.run_btn = QPushButton("Uncertainty map")
        self.run_btn.setToolTip("Per-voxel uncertainty of the automatic adapter's result")
        self.method_combo = QComboBox()
        self.method_combo.addItems(list(METHODS))
        self.method_combo.setCurrentText(DEFAULT_METHOD)
        row.addWidget(self.run_btn)
        row.addWidget(self.method_combo)
        lay.addLayout(row)
        self.slices_list = QListWidget()
        self.slices_list.setMaximumHeight(110)
        self.slices_list.setToolTip("Slices to review first (most uncertain voxels); click to go")
        lay.addWidget(self.slices_list)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        self.run_btn.clicked.connect(lambda *_: self.start())
        self.slices_list.itemClicked.connect(self._go)
        self._timer = QTimer(self)
        self._timer.setInterval(150)
        self._timer.timeout.connect(self._poll)

    @property
    def running(self) -> bool:
        """Whether a map is being computed."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> bool:
        """Compute the map of the widget's current image in a thread; False with the reason in
        the status line when that is not possible now."""
        w = self.widget
        if self.running or w.busy:
            self.status.setText("busy: wait for the current task or press Stop")
            return False
        try:
            ann = w.annotator
            engine = ann.engine
            adapter = engine.model.adapter
            if adapter is None or adapter.mode != "automatic":
                raise ValueError("the uncertainty map needs an automatic adapter (Adapter menu)")
        except (ValueError, RuntimeError) as exc:
            self.error = str(exc)
            self.status.setText(str(exc))
            return False
        method = self.method_combo.currentText()
        image_name = w._image.name if w._image is not None else "image"
        self._out = {}

        def run() -> None:
            from samed.uncertainty import automatic_uncertainty

            try:
                self._out["result"] = automatic_uncertainty(engine, method)
            except Exception as exc:  # noqa: BLE001 - shown in the panel
                self._out["error"] = f"{type(exc).__name__}: {exc}"

        self._image_name = image_name
        self._thread = threading.Thread(target=run, daemon=True, name="samed-uncertainty")
        self.run_btn.setEnabled(False)
        self.status.setText(f"computing the {method} map ...")
        self._thread.start()
        self._timer.start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Join the thread and show its result (tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._poll()
        return not self.running

    def _poll(self) -> None:
        if self.running or not self._out:
            return
        self._timer.stop()
        self.run_btn.setEnabled(True)
        out, self._out = self._out, {}
        if "error" in out:
            self.error = out["error"]
            self.status.setText(out["error"])
            return
        res = self.result = out["result"]
        self._show(res)

    def _show(self, res: Any) -> None:
        viewer = self.widget.viewer
        name = layer_name(self._image_name)
        img = self.widget._image
        kw: dict[str, Any] = {}
        if img is not None:
            kw = {"scale": img.scale, "translate": img.translate}
        if name in viewer.layers:
            viewer.layers[name].data = res.uncertainty
        else:
            viewer.add_image(
                res.uncertainty,
                name=name,
                colormap="inferno",
                blending="additive",
                opacity=0.6,
                contrast_limits=(0.0, 1.0),
                **kw,
            )
        self.slices_list.clear()
        ranked = res.ranked_slices(20)
        for z, s in ranked:
            item = QListWidgetItem(f"slice {z}: {s:.0f}")
            item.setData(256, int(z))
            self.slices_list.addItem(item)
        self.status.setText(
            f"{res.method} map in {res.seconds:.1f} s; case score {res.score:.4f} "
            f"(uncertainty per segmented voxel); {len(ranked)} slices listed"
        )

    def _go(self, item: QListWidgetItem) -> None:
        z = int(item.data(256))
        viewer = self.widget.viewer
        step = list(viewer.dims.current_step)
        if len(step) >= 3:
            step[-3] = z
            viewer.dims.current_step = tuple(step)


def attach_uncertainty_panel(widget: Any) -> UncertaintyPanel:
    """Add an :class:`UncertaintyPanel` to the widget's layout and return it."""
    panel = UncertaintyPanel(widget)
    widget.layout().addWidget(panel)
    return panel
