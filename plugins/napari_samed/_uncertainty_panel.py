"""The *Where is it unsure?* panel: the per-voxel uncertainty of the automatic adapter's result
(:func:`samed.uncertainty.automatic_uncertainty`) or of the current propagated object
(:func:`samed.uncertainty.propagated_uncertainty`: its masks, the prompted slices as seeds with
the user's prompts, the widget's propagation options) as an Image layer, and the slices to
review first as a list (click one to go there).

*Of* chooses what: ``auto`` = the automatic result when the model carries an automatic adapter,
else the current object. It reuses the widget's engine session, so after *Automatic* or
*Propagate* (slices embedded) the ``entropy`` map costs only the decoder; it runs in a
background thread while the widget is idle.
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

__all__ = ["UncertaintyPanel", "attach_uncertainty_panel", "layer_name", "TARGETS"]

#: what the map is of (the *Of* menu)
TARGETS = ("auto", "automatic result", "propagated object")


def layer_name(image_name: str) -> str:
    """The uncertainty layer's name for an image layer."""
    return f"{image_name} uncertainty"


class UncertaintyPanel(QGroupBox):
    """Button, method choice, ranked slice list. ``result`` holds the last
    :class:`samed.uncertainty.UncertaintyResult`."""

    def __init__(self, widget: Any) -> None:
        super().__init__("Where is it unsure?")
        from samed.uncertainty import DEFAULT_METHOD, METHODS, PROPAGATED_DEFAULT

        self.widget = widget
        self.result: Any = None
        self.error = ""
        self._thread: threading.Thread | None = None
        self._out: dict[str, Any] = {}
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        self.run_btn = QPushButton("Uncertainty map")
        self.run_btn.setToolTip(
            "Per-voxel uncertainty of the automatic adapter's result or of the propagated object"
        )
        self.method_combo = QComboBox()
        self.method_combo.addItems(["default", *METHODS])
        self.method_combo.setToolTip(
            f"default: {DEFAULT_METHOD} for the automatic result, {PROPAGATED_DEFAULT} for a "
            "propagated object (each ranks its errors best, docs/BENCHMARKS.md)"
        )
        self.target_combo = QComboBox()
        self.target_combo.addItems(list(TARGETS))
        self.target_combo.setToolTip(
            "auto: the automatic result with an automatic adapter, else the current object"
        )
        row.addWidget(self.run_btn)
        row.addWidget(self.method_combo)
        lay.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Of"))
        row.addWidget(self.target_combo, 1)
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
        method = self.method_combo.currentText()
        self.error = ""  # a refused earlier start does not stick to this one
        try:
            ann = w.annotator
            engine = ann.engine
            job = self._job(ann, engine, method)
        except (ValueError, RuntimeError) as exc:
            self.error = str(exc)
            self.status.setText(str(exc))
            return False
        image_name = w._image.name if w._image is not None else "image"
        self._out = {}

        def run() -> None:
            try:
                self._out["result"] = job()
            except Exception as exc:  # noqa: BLE001 - shown in the panel
                self._out["error"] = f"{type(exc).__name__}: {exc}"

        self._image_name = image_name
        self._thread = threading.Thread(target=run, daemon=True, name="samed-uncertainty")
        self.run_btn.setEnabled(False)
        self.status.setText(f"computing the uncertainty map ({method}) ...")
        self._thread.start()
        self._timer.start()
        return True

    def _job(self, ann: Any, engine: Any, method: str) -> Any:
        """The map's computation for the *Of* choice (ValueError when it has nothing to map)."""
        from samed.uncertainty import (
            DEFAULT_METHOD,
            PROPAGATED_DEFAULT,
            automatic_uncertainty,
            propagated_uncertainty,
        )

        target = self.target_combo.currentText()
        adapter = engine.model.adapter
        automatic = adapter is not None and adapter.mode == "automatic"
        if target == "auto":
            target = TARGETS[1] if automatic else TARGETS[2]
        if target == TARGETS[1]:
            if not automatic:
                raise ValueError("the uncertainty map needs an automatic adapter (Adapter menu)")
            method = DEFAULT_METHOD if method == "default" else method
            return lambda: automatic_uncertainty(engine, method)
        method = PROPAGATED_DEFAULT if method == "default" else method
        masks = {z: m for z, m in ann.masks.items() if m.any()}
        prompts = ann.prompts
        seeds = [z for z in prompts if z in masks]
        if not masks or not seeds:
            raise ValueError(
                "no propagated object: prompt a slice and Propagate first"
                + ("" if automatic else " (or choose an automatic adapter)")
            )
        given = {}
        for z in seeds:
            p = prompts[z]
            given[z] = {
                "box": p.box,
                "points": list(p.points) if p.points else None,
                "point_labels": list(p.labels) if p.points else None,
            }
        opts = self.widget.propagate_options
        return lambda: propagated_uncertainty(
            engine,
            masks,
            seeds,
            method,
            prompts=given,
            box_margin=float(opts.get("box_margin", 2.0)),
            max_step_px=opts.get("max_step_px"),
            mask_output=opts.get("mask_output"),
        )

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
        what = "object" if "seeds" in res.extra else "automatic"
        self.status.setText(
            f"{res.method} map of the {what} result in {res.seconds:.1f} s; case score "
            f"{res.score:.4f} (uncertainty per segmented voxel); {len(ranked)} slices listed"
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
    widget.ui.add_panel(panel)
    return panel
