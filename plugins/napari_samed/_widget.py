"""The samed dock widget: a thin Qt layer over :class:`~napari_samed._session.PluginSession` and
:class:`samed.annotation.Annotator`.

Slow work (embedding, propagation, automatic mode, embedding one slice on demand) runs in thread
workers with a progress bar and a stop button; clicks on embedded slices run the decoder only,
synchronously. Errors become napari notifications (``show_error``), never traceback dialogs.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QWidget
from superqt.utils import create_worker

from samed.annotation import SlicePrompts

from ._labeltable import ALGORITHM, apply_label_colors
from ._layers import prompts_from_layers
from ._prefs import activate
from ._reader import adopt_layer
from ._session import PluginSession, default_cache_dir
from ._tasks import TaskMixin, _catching, _guarded
from ._ui import build_ui
from ._views import (
    BOXES,
    NEGATIVE,
    OWN_LAYERS,
    POSITIVE,
    PREVIEW,
    LayersMixin,
    viewer_camera,
    viewer_text_overlay,
)
from ._writer import reference_volume, save_labels, seg_options

__all__ = [
    "SamedWidget",
    "PREVIEW",
    "POSITIVE",
    "NEGATIVE",
    "BOXES",
    "KEYS",
    "unwrap",
    "viewer_camera",
    "viewer_text_overlay",
]

log = logging.getLogger(__name__)

_OWN = OWN_LAYERS

#: Keyboard shortcuts (bound on the viewer) -> widget method name.
KEYS = {
    "Shift-A": "accept",
    "Shift-P": "propagate",
    "Shift-X": "stop",
    "Shift-C": "clear_object",
    "Shift-D": "delete_slice",
    "Shift-U": "undo",
    "Shift-R": "redo",
    "Shift-E": "embed",
    "Shift-N": "next_label",
}
#: napari's own undo keys, bound to the widget's undo/redo while the widget is open (one history:
#: the widget's covers prompts, propagation and label edits).
UNDO_KEYS = {"Control-Z": "undo", "Control-Shift-Z": "redo"}


class SamedWidget(LayersMixin, TaskMixin, QWidget):
    """Interactive segmentation dock widget.

    Args:
        napari_viewer: the viewer (injected by napari).
        session: the session object (tests pass one with a tiny model); default loads models
            from :mod:`samed.registry` choices and caches embeddings in
            :func:`~napari_samed._session.default_cache_dir`.
    """

    def __init__(self, napari_viewer: Any, session: PluginSession | None = None) -> None:
        super().__init__()
        # napari hands plugin widgets a PublicOnlyProxy of the viewer, whose layers come back
        # wrapped in new proxies on every access: identity checks (``is``) between them fail.
        # The widget keeps the viewer itself, so its layers are the layers.
        self.viewer = unwrap(napari_viewer)
        self.session = session or PluginSession(cache_dir=default_cache_dir())
        #: Keyword arguments for propagation (see :meth:`samed.engine.Session.propagate`).
        self.propagate_options: dict[str, Any] = {
            "box_margin": 2.0,
            "min_area": 10,
            "max_step_px": 2,
        }
        #: Last measured times (click -> preview in ms, embed / propagate in s).
        self.timings: dict[str, float] = {}
        self.last_error: str = ""
        self._annotator: Any = None
        self._image: Image | None = None
        self._labels: Labels | None = None
        self._layers: dict[str, Any] = {}
        self._worker: Any = None
        self._task = ""
        self._stop = threading.Event()
        self._embedding_now: set[int] = set()
        self._syncing = False
        self._dirty = False
        self._then: Callable[[], Any] | None = None
        self._view_turned = False  # whether this widget set the camera orientation / overlay
        self._choosing = False
        self._model_worker: Any = None
        self._after_model: list[Callable[[], Any]] = []
        activate()  # samed as napari's reader for medical formats (also on plugin activation)
        self.ui = build_ui(self)
        if self.ui.adapter_combo.currentData():  # the preselected interactive default (#17)
            self.session.update(adapter=self.ui.adapter_combo.currentData())
        from ._encoder_controls import attach_encoder_controls  # panels: their own modules
        from ._train_panel import attach_train_panel
        from ._uncertainty_panel import attach_uncertainty_panel

        self.encoder_controls = attach_encoder_controls(self)
        self.uncertainty_panel = attach_uncertainty_panel(self)
        self.train_panel = attach_train_panel(self)
        self._connect()
        self._refresh_choices()
        self._bind_keys()

    # ------------------------------------------------------------------ wiring
    def _connect(self) -> None:
        ui = self.ui
        for name in (
            "embed",
            "stop",
            "accept",
            "propagate",
            "automatic",
            "undo",
            "redo",
            "clear_object",
            "delete_slice",
            "export",
        ):
            getattr(ui, f"{name}_btn").clicked.connect(functools.partial(self._click, name))
        ui.model_combo.currentIndexChanged.connect(self._on_settings)
        ui.adapter_combo.currentIndexChanged.connect(self._on_settings)
        ui.checkpoint_edit.editingFinished.connect(self._on_settings)
        ui.window_combo.currentIndexChanged.connect(self._on_window)
        ui.image_combo.currentIndexChanged.connect(self._on_layer_choice)
        ui.labels_combo.currentIndexChanged.connect(self._on_layer_choice)
        ui.new_labels_btn.clicked.connect(lambda: self.new_labels_layer())
        ui.label_spin.valueChanged.connect(self._on_label_spin)
        ui.preserve_check.toggled.connect(self._on_preserve)
        ui.radiological_check.toggled.connect(self._apply_view)
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)
        self.viewer.dims.events.order.connect(self._apply_view)

    def _click(self, name: str, *_: Any) -> None:
        getattr(self, name)()

    def _bind_keys(self) -> None:
        for key, name in {**KEYS, **UNDO_KEYS}.items():
            self.viewer.bind_key(key, functools.partial(self._key, name), overwrite=True)

    def _key(self, name: str, _viewer: Any) -> None:
        getattr(self, name)()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        self.stop()
        for key in {**KEYS, **UNDO_KEYS}:
            self.viewer.bind_key(key, None, overwrite=True)
        super().closeEvent(event)

    # ------------------------------------------------------------------ messages
    def _error(self, exc: BaseException | str) -> None:
        msg = str(exc) if str(exc) else type(exc).__name__
        self.last_error = msg
        log.debug("samed widget error", exc_info=isinstance(exc, BaseException))
        self.ui.status.setText(f"error: {msg}")
        show_error(f"samed: {msg}")

    def _status(self, text: str) -> None:
        self.ui.status.setText(text)

    # ------------------------------------------------------------------ layer choices
    def _refresh_choices(self, *_: Any) -> None:
        ui = self.ui
        for combo, kind in ((ui.image_combo, Image), (ui.labels_combo, Labels)):
            current = combo.currentText()
            names = [
                ly.name for ly in self.viewer.layers if isinstance(ly, kind) and ly.name not in _OWN
            ]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        self._on_layer_choice()

    def _chosen(self, combo: Any, kind: type) -> Any:
        name = combo.currentText()
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], kind):
            return unwrap(self.viewer.layers[name])
        return None

    def _on_layer_choice(self, *_: Any) -> None:
        if self._choosing:  # adding the prompt layers below re-enters through layer events
            return
        image = self._chosen(self.ui.image_combo, Image)
        labels = self._chosen(self.ui.labels_combo, Labels)
        if image is self._image and labels is self._labels:
            return
        self._choosing = True
        try:
            if self._labels is not None:
                self._labels.events.selected_label.disconnect(self._on_layer_label)
            new_image = image is not self._image
            self._image, self._labels, self._annotator = image, labels, None
            if labels is not None:
                labels.events.selected_label.connect(self._on_layer_label)
                self.ui.label_spin.setValue(int(labels.selected_label))
                labels.preserve_labels = self.ui.preserve_check.isChecked()
                apply_label_colors(labels)
            self.ui.label_table.show_layer(labels, int(self.ui.label_spin.value()))
            if new_image:
                self._clear_prompt_layers()
                adopted = adopt_layer(image)  # a script's viewer.open(path): napari's builtins
                if adopted:
                    show_info(
                        f"samed: re-read {Path(adopted).name} for its geometry (spacing, orientation)"
                    )
                if _is_volume(image):
                    # prompt layers exist as soon as there is an image to draw on; the model
                    # loads in a worker meanwhile
                    self._ensure_prompt_layers()
                    # napari selects an opened layer after its insert events: make the boxes
                    # layer active once that is done, ready for the first box
                    QTimer.singleShot(0, self._select_boxes)
                    depth = int(np.shape(image.data)[0])
                    for spin, value in ((self.ui.range_from, 0), (self.ui.range_to, depth - 1)):
                        spin.setRange(0, depth - 1)
                        spin.setValue(value)
                    self.load_model()
                self._on_image_intensity()
            self._apply_view()
        finally:
            self._choosing = False

    def _select_boxes(self) -> None:
        boxes = self._layers.get(BOXES)
        if boxes is not None and boxes in self.viewer.layers:
            self.viewer.layers.selection.active = boxes
            boxes.mode = "add_rectangle"

    def _on_layer_label(self, *_: Any) -> None:
        if self._labels is not None:
            self.ui.label_spin.setValue(int(self._labels.selected_label))

    def _on_label_spin(self, value: int) -> None:
        if self._labels is not None and int(self._labels.selected_label) != value:
            self._labels.selected_label = value
        if self._labels is not None:
            self.ui.label_table.show_layer(self._labels, value)

    def _on_preserve(self, checked: bool) -> None:
        if self._labels is not None:
            self._labels.preserve_labels = checked

    @_guarded
    def new_labels_layer(self) -> Labels:
        """Add an empty uint16 Labels layer on the chosen image's grid and select it."""
        image = self._require_image()
        shape = tuple(np.shape(image.data))
        ref = reference_volume(image.metadata)
        layer = self.viewer.add_labels(
            np.zeros(shape, dtype=np.uint16),
            name=f"{image.name} labels",
            scale=image.scale,
            translate=image.translate,
            metadata={"samed_volume": ref} if ref is not None else {},
        )
        self.ui.labels_combo.setCurrentText(layer.name)
        self._on_layer_choice()
        return layer

    # ------------------------------------------------------------------ settings
    def _on_settings(self, *_: Any) -> None:
        ui = self.ui
        kind = ui.model_combo.currentData() or ui.model_combo.currentText()
        adapter = ui.adapter_combo.currentData() or ""
        ui.checkpoint_edit.setEnabled(not ui.model_bundled(kind))
        self.session.update(
            model_kind=kind, adapter=adapter, checkpoint=ui.checkpoint_edit.text().strip()
        )
        self._annotator = None

    def _on_window(self, *_: Any) -> None:
        name = self.ui.window_combo.currentData() or "auto"
        if self._image is not None:
            limits = self._display_limits(name)
            if limits is not None:
                self._image.contrast_limits = limits
        if name != self.session.settings.intensity:
            self.session.update(intensity=name)
            self._annotator = None
            self._status(f"intensity '{name}': slices will be embedded again for the model")

    # ------------------------------------------------------------------ session plumbing
    def _require_image(self) -> Image:
        if self._image is None:
            raise ValueError("no image layer: open a volume (File > Open) or a samed sample first")
        return self._image

    @property
    def busy(self) -> bool:
        """Whether a long task (embedding, propagation, automatic) is running."""
        return self._worker is not None

    @property
    def annotator(self) -> Any:
        """The current :class:`samed.annotation.Annotator` (created on demand)."""
        return self._ensure()

    def _ensure(self) -> Any:
        image = self._require_image()
        data = image.data
        if image.rgb or np.ndim(data) not in (2, 3):
            raise ValueError(f"samed segments grey-level 2D/3D images; {image.name!r} is not one")
        if np.ndim(data) == 2:
            raise ValueError(f"{image.name!r} is 2D; samed needs a (Z, Y, X) volume (Z may be 1)")
        if self._labels is None:
            self.new_labels_layer()
            if self._labels is None:
                raise ValueError("could not create a labels layer")
        labels = self._labels
        if tuple(labels.data.shape) != tuple(np.shape(data)):
            raise ValueError(
                f"labels layer {labels.name!r} has shape {labels.data.shape} but image "
                f"{image.name!r} has {np.shape(data)}; choose or create a matching labels layer"
            )
        arr = labels.data
        if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
            labels.data = np.ascontiguousarray(np.asarray(arr))
        # the file's spacing, orientation and modality, as `samed segment` uses them
        engine = self.session.engine_for(image.data, reference_volume(image.metadata))
        ann = self.session.annotator(engine, labels.data)
        missing = any(name not in self.viewer.layers for name in _OWN)
        if ann is not self._annotator or missing:
            self._annotator = ann
            self._ensure_prompt_layers()
            if ann.prompts or ann.masks or ann.can_undo or ann.can_redo:
                self._sync_layers()  # an annotator with a past (switching back): show its state
            # else: a new object; prompts drawn before it existed stay and are read next
        return ann

    def _current_z(self) -> int:
        image = self._require_image()
        depth = np.shape(image.data)[0]
        z = float(image.world_to_data(self.viewer.dims.point)[-3])
        return int(np.clip(np.floor(z + 0.5), 0, depth - 1))

    def _on_prompt_data(self, event: Any = None) -> None:
        action = str(getattr(event, "action", "") or "")
        if self._syncing or action in ("adding", "removing", "changing"):
            return
        if self.busy and self._task in ("propagate", "automatic"):
            self._dirty = True  # applied when the task ends
            return
        self.update_prompts()

    @_guarded
    def update_prompts(self) -> list[int]:
        """Read the prompt layers and re-predict every slice whose prompts changed.

        Returns:
            The slices whose mask was updated now (slices not yet embedded are embedded in a
            worker first and updated when it returns).
        """
        t0 = time.perf_counter()
        self._require_image()
        if not self._model_ready(self.update_prompts):
            self._status("prompts kept; they are applied when the model is ready")
            return []
        ann = self._ensure()
        shape = tuple(np.shape(self._image.data))
        new = prompts_from_layers(
            self._image,
            self._layers[POSITIVE],
            self._layers[NEGATIVE],
            self._layers[BOXES],
            shape,
        )
        old = ann.prompts
        changed = [
            z
            for z in sorted(set(new) | set(old))
            if new.get(z, SlicePrompts()) != old.get(z, SlicePrompts())
        ]
        done = []
        for z in changed:
            p = new.get(z, SlicePrompts())
            if not p.empty and not ann.engine.is_embedded(z):
                self._embed_slice(z)
                continue
            if self._is_click(ann, z, p):
                # a corrective click on a propagated object: refine + re-propagate, one undo step
                ann.click(z, p.points[-1], bool(p.labels[-1]), **self.propagate_options)
                self._sync_layers()
            else:
                self._show_mask(z, ann.set_prompts(z, p))
            done.append(z)
        if done:
            ms = (time.perf_counter() - t0) * 1000.0
            self.timings["click_to_preview_ms"] = ms
            area = sum(int(ann.masks[z].sum()) for z in done if z in ann.masks)
            self._status(f"preview on slice {done[-1]}: {area} px ({ms:.0f} ms)")
        self._update_buttons()
        return done

    def _embed_slice(self, z: int) -> None:
        """Embed one slice in a worker, then apply its prompts (first click on a new slice)."""
        if z in self._embedding_now:
            return
        self._embedding_now.add(z)
        engine = self._annotator.engine
        self._status(f"embedding slice {z} ...")
        worker = create_worker(_catching(lambda: engine.embedding(z)))

        def done(result: Any) -> None:
            self._embedding_now.discard(z)
            if isinstance(result, BaseException):
                self._error(result)
            elif self._annotator is not None and self._annotator.engine is engine:
                self.update_prompts()

        worker.returned.connect(done)
        worker.start()

    # ------------------------------------------------------------------ edits
    def _idle_annotator(self) -> Any:
        if self.busy and self._task != "embed":
            raise RuntimeError(f"busy with {self._task}; press Stop (Shift-X) first")
        if not self._model_ready():
            raise RuntimeError("the model is still loading; try again when it is ready")
        return self._ensure()

    @_guarded
    def accept(self) -> None:
        """Write the current object into the labels layer under the active label."""
        ann = self._idle_annotator()
        label = int(self.ui.label_spin.value())
        edit = ann.accept(label, preserve=self.ui.preserve_check.isChecked())
        if edit is None:
            show_info("samed: nothing to accept (the object is empty)")
            return
        # a person prompted the model: a semi-automatic segment (DICOM SEG algorithm type)
        self._labels.metadata.setdefault(ALGORITHM, {})[label] = "SEMIAUTOMATIC"
        self._labels.refresh()
        self._sync_layers()
        self.ui.label_table.show_layer(self._labels, label)
        self._status(f"accepted {edit.size} voxels as label {label}")
        self._update_buttons()

    @_guarded
    def clear_object(self) -> None:
        """Drop the current object's prompts and preview (undoable)."""
        if self._idle_annotator().clear_object():
            self._sync_layers()
            self._status("object cleared")
        self._update_buttons()

    @_guarded
    def delete_slice(self, z: int | None = None) -> int:
        """Remove the active label from one slice of the labels layer (default: the slice on
        screen), and the current object's prompts there; one undoable step.

        Returns:
            The number of voxels that lost the label.
        """
        ann = self._idle_annotator()
        z = self._current_z() if z is None else int(z)
        label = int(self.ui.label_spin.value())
        if z in ann.prompts:
            ann.set_prompts(z, SlicePrompts())
        edit = ann.editor.erase(label, z=z, record=False)
        # one history for the widget: the annotator records label edits next to prompt steps
        ann._record_edit(f"delete label {label} on slice {z}", edit)
        self._labels.refresh()
        self._sync_layers()
        n = 0 if edit is None else edit.size
        self._status(f"slice {z}: label {label} removed ({n} voxels)")
        self._update_buttons()
        return n

    @_guarded
    def undo(self) -> None:
        """Undo the last prompt step, propagation, clear or accept."""
        self._history("undo")

    @_guarded
    def redo(self) -> None:
        """Redo the last undone step."""
        self._history("redo")

    def _history(self, which: str) -> None:
        ann = self._idle_annotator()
        step = getattr(ann, which)()
        if step is None:
            self._status(f"nothing to {which}")
            return
        if step.edit is not None:
            self._labels.refresh()
        self._sync_layers()
        self._status(f"{which}: {step.description}")
        self._update_buttons()

    def next_label(self) -> None:
        """Make the next label value active (a new object class)."""
        self.ui.label_spin.setValue(self.ui.label_spin.value() + 1)

    @_guarded
    def export(self, path: str | None = None) -> list[str] | None:
        """Save the labels layer: NIfTI on the source grid, or DICOM SEG (``.dcm``) for DICOM.

        Args:
            path: destination; None asks with a file dialog.
        """
        if self._labels is None:
            raise ValueError("no labels layer to export")
        ref = reference_volume(self._labels.metadata)
        if ref is None and self._image is not None:
            ref = reference_volume(self._image.metadata)
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self,
                "Export labels",
                str(self.export_folder(ref) / f"{self._labels.name}.nii.gz"),
                "NIfTI (*.nii.gz *.nii);;DICOM SEG (*.dcm)",
            )
            if not path:
                return None
        self._labels.metadata["samed_algorithm"] = self.algorithm_name()
        out = save_labels(
            path,
            np.asarray(self._labels.data),
            ref,
            **seg_options(self._labels.metadata),
            attributes={"scale": self._labels.scale, "translate": self._labels.translate},
        )
        self._status(f"saved {out[0]}")
        show_info(f"samed: saved {out[0]}")
        return out

    @staticmethod
    def export_folder(ref: Any) -> Path:
        """Where the export dialog opens: beside the source file (a DICOM series: its folder's
        parent, so the SEG does not land among the slices), else the working folder."""
        src = Path(str(getattr(ref, "source", "") or ""))
        if not str(src) or str(src) == ".":
            return Path.cwd()
        return src.parent if src.is_dir() or src.is_file() else Path.cwd()

    def algorithm_name(self) -> str:
        """The algorithm recorded in DICOM SEG: samed, the model and the adapter."""
        st = self.session.settings
        return f"samed {st.model_kind}" + (f" + {st.adapter}" if st.adapter else "")

    def _update_buttons(self) -> None:
        ann = self._annotator
        ui = self.ui
        ui.stop_btn.setEnabled(self.busy)
        ui.undo_btn.setEnabled(ann is not None and ann.can_undo)
        ui.redo_btn.setEnabled(ann is not None and ann.can_redo)
        self._show_keyframes()


def unwrap(obj: Any) -> Any:
    """The object behind napari's ``PublicOnlyProxy`` wrappers (``obj`` itself if not wrapped)."""
    import wrapt

    while isinstance(obj, wrapt.ObjectProxy):
        obj = obj.__wrapped__
    return obj


def _is_volume(layer: Any) -> bool:
    return layer is not None and not layer.rgb and np.ndim(layer.data) == 3
