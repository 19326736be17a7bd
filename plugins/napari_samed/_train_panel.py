"""The *Train adapter* panel of the samed widget: accepted Labels layers (or a folder of exported
image/label pairs) -> an adapter in the user adapter folder, trained in a background thread.

The chosen layers are exported as an annotations folder (:func:`samed.train.annotations.
export_pair`: ``<user data>/samed/annotations/<name>/``, reusable by ``samed finetune
--from-annotations``), then :func:`samed.train.annotations.train_from_annotations` runs the fast
decoder recipe (:mod:`samed.train.quick`). Progress (caching, then training time), the last loss
and the validation Dice of the held-back volume are shown live; *Stop* ends training after the
current step and keeps the best adapter so far. The adapter lands in
:func:`samed.registry.user_adapter_dir` and appears in the widget's adapter menu.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
)

__all__ = ["TrainPanel", "attach_train_panel", "annotations_root"]


def annotations_root() -> Path:
    """Where the panel exports annotations: beside the user adapter folder."""
    from samed.registry import user_adapter_dir

    return user_adapter_dir().parent / "annotations"


def _volume_of(layer: Image) -> Any:
    """The :class:`samed.io.Volume` behind an Image layer (a diagonal affine from the layer's
    scale when it was not read by samed)."""
    from samed.io import Volume

    from ._writer import reference_volume

    ref = reference_volume(layer.metadata)
    data = np.asarray(layer.data, dtype=np.float32)
    if ref is not None and tuple(ref.array.shape) == data.shape:
        return ref
    scale = [float(s) for s in layer.scale][-3:]
    aff = np.diag([scale[2], scale[1], scale[0], 1.0])
    return Volume(data, aff)


class TrainPanel(QGroupBox):
    """The panel (a QGroupBox added to the widget's layout by :func:`attach_train_panel`).

    Args:
        widget: the :class:`napari_samed._widget.SamedWidget` (its viewer, adapter menu).
        train_options: extra keyword arguments for ``train_from_annotations`` (tests: a tiny
            model via ``overrides``; benchmarks: ``snapshot_minutes``).
    """

    def __init__(self, widget: Any, train_options: dict[str, Any] | None = None) -> None:
        super().__init__("Train adapter")
        self.widget = widget
        self.viewer = widget.viewer
        self.train_options: dict[str, Any] = dict(train_options or {})
        self.result: dict[str, Any] | None = None
        self.error = ""
        self.events: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._t0 = 0.0
        self._minutes = 15.0
        lay = QVBoxLayout(self)
        self.layers_list = QListWidget()
        self.layers_list.setToolTip("Accepted Labels layers to learn from (each with its image)")
        self.layers_list.setMaximumHeight(110)
        # A dock shorter than the widget makes Qt squeeze its tallest parts below their minimum
        # (items taller than a cap are cut to it). So the panel has no tall block of fields (a
        # form's rows would overlap, as Mode's text did): one row per line, and the list, which
        # scrolls, is the part that gives; its minimum is two rows, which keeps the panel short.
        self.layers_list.setMinimumHeight(2 * self.fontMetrics().height() + 12)
        lay.addWidget(QLabel("Annotations (Labels layers):"))
        lay.addWidget(self.layers_list)
        row = QHBoxLayout()
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("or a folder of exported image/label pairs")
        self.browse_btn = QPushButton("Folder...")
        row.addWidget(self.folder_edit, 1)
        row.addWidget(self.browse_btn)
        lay.addLayout(row)
        self.name_edit = QLineEdit("my-adapter")
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(["automatic", "prompted"])
        self.minutes_spin = QDoubleSpinBox()
        self.minutes_spin.setRange(0.1, 600.0)
        self.minutes_spin.setValue(15.0)
        self.minutes_spin.setSuffix(" min")
        self.minutes_spin.setToolTip("time to the adapter: embedding caching + training")
        row = QHBoxLayout()
        row.addWidget(QLabel("Name"))
        row.addWidget(self.name_edit, 1)
        row.addWidget(QLabel("Mode"))
        row.addWidget(self.mode_combo)
        lay.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(QLabel("Time limit"))
        row.addWidget(self.minutes_spin, 1)
        lay.addLayout(row)
        row = QHBoxLayout()
        self.train_btn = QPushButton("Train adapter")
        self.stop_btn = QPushButton("Stop (keep best)")
        self.stop_btn.setEnabled(False)
        row.addWidget(self.train_btn)
        row.addWidget(self.stop_btn)
        lay.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        lay.addWidget(self.progress)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.status)
        self.browse_btn.clicked.connect(self._browse)
        self.train_btn.clicked.connect(lambda *_: self.start())
        self.stop_btn.clicked.connect(lambda *_: self.stop())
        self._timer = QTimer(self)
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._drain)
        self.viewer.layers.events.inserted.connect(self.refresh_layers)
        self.viewer.layers.events.removed.connect(self.refresh_layers)
        self.refresh_layers()

    # ------------------------------------------------------------------ inputs
    @property
    def running(self) -> bool:
        """Whether training runs."""
        return self._thread is not None and self._thread.is_alive()

    def refresh_layers(self, *_: Any) -> None:
        """List the viewer's Labels layers that have an Image layer of the same shape."""
        checked = {
            self.layers_list.item(i).text()
            for i in range(self.layers_list.count())
            if self.layers_list.item(i).checkState() == Qt.Checked
        }
        self.layers_list.clear()
        from ._views import OWN_LAYERS

        for ly in self.viewer.layers:
            if isinstance(ly, Labels) and ly.name not in OWN_LAYERS and self._image_for(ly):
                item = QListWidgetItem(ly.name)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked if ly.name in checked else Qt.Unchecked)
                self.layers_list.addItem(item)

    def set_checked(self, names: list[str]) -> None:
        """Check exactly these Labels layers (by name)."""
        for i in range(self.layers_list.count()):
            it = self.layers_list.item(i)
            it.setCheckState(Qt.Checked if it.text() in names else Qt.Unchecked)

    def checked_layers(self) -> list[Labels]:
        """The checked Labels layers."""
        names = [
            self.layers_list.item(i).text()
            for i in range(self.layers_list.count())
            if self.layers_list.item(i).checkState() == Qt.Checked
        ]
        return [self.viewer.layers[n] for n in names if n in self.viewer.layers]

    def _image_for(self, labels: Labels) -> Image | None:
        shape = np.shape(labels.data)
        if len(shape) != 3:
            return None
        imgs = [
            ly
            for ly in self.viewer.layers
            if isinstance(ly, Image) and not ly.rgb and np.shape(ly.data) == shape
        ]
        if not imgs:
            return None
        # prefer the image whose name the labels layer's name starts with (reader naming)
        for ly in imgs:
            if labels.name.startswith(ly.name):
                return ly
        return imgs[0]

    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Folder of image/label pairs")
        if d:
            self.folder_edit.setText(d)

    # ------------------------------------------------------------------ training
    def start(self) -> bool:
        """Check the inputs, then train in a background thread; False (with the reason in the
        status line) when the inputs are not usable."""
        from samed.paths import safe_name

        if self.running:
            self._say("already training; press Stop first")
            return False
        name = self.name_edit.text().strip()
        try:
            safe_name(name, "adapter name")
        except ValueError as exc:
            self._say(str(exc), error=True)
            return False
        layers = self.checked_layers()
        folder_text = self.folder_edit.text().strip()
        if not layers and not folder_text:
            self._say("check at least one Labels layer or choose a folder of pairs", error=True)
            return False
        exports = []
        for ly in layers:
            img = self._image_for(ly)
            lab = np.asarray(ly.data)
            if img is None or not lab.any():
                self._say(f"labels layer {ly.name!r} is empty or has no image", error=True)
                return False
            names = {
                int(k): str(v) for k, v in (ly.metadata.get("samed_label_names") or {}).items()
            }
            exports.append((ly.name, _volume_of(img), lab.copy(), names, str(img.name)))
        folder = Path(folder_text) if folder_text else annotations_root() / name
        self._minutes = float(self.minutes_spin.value())
        mode = self.mode_combo.currentText()
        self._stop.clear()
        self.result, self.error, self.events = None, "", []
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(
            target=self._run, args=(folder, name, mode, exports), daemon=True, name="samed-train"
        )
        self._set_running(True)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self._say("exporting annotations ..." if exports else "reading the folder ...")
        self._thread.start()
        self._timer.start()
        return True

    def _run(self, folder: Path, name: str, mode: str, exports: list) -> None:
        from samed.paths import safe_name
        from samed.train.annotations import export_pair, train_from_annotations

        try:
            for i, (lname, vol, lab, names, src) in enumerate(exports):
                try:
                    pname = safe_name(lname, "annotation name")
                except ValueError:
                    pname = f"volume{i}"
                export_pair(folder, pname, vol, lab, names, source=src)
            opts = dict(self.train_options)
            res = train_from_annotations(
                folder,
                name,
                mode=mode,
                minutes=self._minutes,
                callback=self._queue.put,
                should_stop=self._stop.is_set,
                log=lambda s: self._queue.put({"event": "log", "text": s}),
                command="napari samed Train adapter",
                **opts,
            )
            self._queue.put({"event": "finished", "result": res})
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never a traceback dialog
            self._queue.put({"event": "failed", "error": f"{type(exc).__name__}: {exc}"})

    def stop(self) -> None:
        """Stop after the current step; the best adapter so far is kept and installed."""
        if self.running:
            self._stop.set()
            self._say("stopping: keeping the best adapter so far ...")

    def wait(self, timeout: float | None = None) -> bool:
        """Join the training thread (tests/benchmarks); True when it ended. Events are then
        handled by the next :meth:`_drain` (the Qt timer or a direct call)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def _set_running(self, on: bool) -> None:
        self.train_btn.setEnabled(not on)
        self.stop_btn.setEnabled(on)

    def _say(self, text: str, error: bool = False) -> None:
        self.status.setText(text)
        self.status.setToolTip(text)  # the whole text, also when a short dock cuts the label
        self.status.setStyleSheet("color: #e06c75;" if error else "")

    def _drain(self) -> None:
        last_step = None
        while True:
            try:
                ev = self._queue.get_nowait()
            except queue.Empty:
                break
            kind = ev.get("event")
            if kind in ("step", "log"):
                if kind == "step":
                    last_step = ev
                continue
            self.events.append(ev)
            if kind == "cache":
                frac = ev["done"] / max(ev["total"], 1)
                self.progress.setValue(int(100 * frac))
                self._say(f"caching embeddings {ev['done']}/{ev['total']}")
            elif kind == "val":
                self._last_val = ev
                cls = " ".join(f"{k} {v:.3f}" for k, v in ev["per_class"].items())
                self._val_text = (
                    f"val Dice {ev['mean_dice']:.3f} (best {ev['best']:.3f}) at step "
                    f"{ev['step']}: {cls}"
                )
            elif kind == "finished":
                self._finished(ev["result"])
            elif kind == "failed":
                self.error = ev["error"]
                self._timer.stop()
                self._set_running(False)
                self._say(f"training failed: {ev['error']}", error=True)
        if last_step is not None:
            self.events.append(last_step)
        if last_step is not None and self.stop_btn.isEnabled():
            # still running: a step drained together with the end must not hide its message
            # step and minutes on the bar, so the status needs one line fewer (a short dock cuts
            # the panel's last lines first)
            self.progress.setValue(100 + int(900 * min(1.0, last_step["fraction"])))
            self.progress.setFormat(
                f"step {last_step['step']}   {last_step['minutes']:.1f} min   %p%"
            )
            self._say(f"loss {last_step['loss']:.4f}   " + getattr(self, "_val_text", ""))

    def _finished(self, res: dict[str, Any]) -> None:
        self.result = res
        self._timer.stop()
        self._set_running(False)
        self.progress.setValue(1000)
        self.progress.setFormat("%p%")
        if not res.get("installed"):
            self._say("stopped before the first step: no adapter", error=True)
            return
        name = Path(res["installed"]).name
        self._refresh_adapter_menu(name)
        best = res.get("best_mean_dice")
        self._say(
            f"adapter {name!r} installed ({res['steps']} steps, {res['seconds'] / 60:.1f} min"
            + (f", held-back Dice {best:.3f}" if best is not None and best >= 0 else "")
            + f"{', stopped' if res.get('stopped') else ''}); choose it in the Adapter menu"
        )

    def _refresh_adapter_menu(self, select: str | None = None) -> None:
        """Re-read the adapters: the new one joins the Adapter menu with its label names
        (``ui.refresh_adapters``), so *Automatic* names its labels at once."""
        self.widget.ui.refresh_adapters()
        del select  # selecting would reload the model mid-session; the user chooses


def attach_train_panel(widget: Any, train_options: dict[str, Any] | None = None) -> TrainPanel:
    """Add a :class:`TrainPanel` below the widget's controls (inside its scroll area); return it."""
    panel = TrainPanel(widget, train_options)
    widget.ui.add_panel(panel)
    return panel
