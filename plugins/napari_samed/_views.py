"""Prompt and preview layers of the samed widget and the radiological view (mixed into
:class:`napari_samed._widget.SamedWidget`): creating them on the image's grid, writing the
annotator's state into them, emptying them when another image is chosen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.layers import Labels, Points, Shapes

from samed.annotation import SlicePrompts

from ._layers import prompt_layer_data, radiological_orientation2d
from ._writer import reference_volume

__all__ = ["LayersMixin", "PREVIEW", "POSITIVE", "NEGATIVE", "BOXES", "OWN_LAYERS"]

PREVIEW = "samed preview"
POSITIVE = "samed positive"
NEGATIVE = "samed negative"
BOXES = "samed boxes"
#: The layers this widget makes (never offered as image or labels to segment).
OWN_LAYERS = (PREVIEW, POSITIVE, NEGATIVE, BOXES)


class LayersMixin:
    """Layer methods of the widget (it provides ``viewer``, ``ui``, ``_image``, ``_labels``,
    ``_layers``, ``_annotator``, ``_syncing``, ``_status`` and ``_on_prompt_data``)."""

    def _ensure_prompt_layers(self) -> None:
        image = self._image
        shape = tuple(np.shape(image.data))
        common = {"scale": image.scale, "translate": image.translate}
        lay = self._layers
        if PREVIEW not in self.viewer.layers or self.viewer.layers[PREVIEW].data.shape != shape:
            if PREVIEW in self.viewer.layers:
                self.viewer.layers.remove(PREVIEW)
            lay[PREVIEW] = self.viewer.add_labels(
                np.zeros(shape, np.uint8), name=PREVIEW, opacity=0.6, **common
            )
            _set_preview_colour(lay[PREVIEW])
        else:
            lay[PREVIEW] = self.viewer.layers[PREVIEW]
            lay[PREVIEW].scale, lay[PREVIEW].translate = image.scale, image.translate
        specs = (
            (POSITIVE, Points, {"face_color": "lime", "size": 4, "ndim": 3}),
            (NEGATIVE, Points, {"face_color": "red", "size": 4, "ndim": 3}),
            (
                BOXES,
                Shapes,
                {"edge_color": "yellow", "face_color": "transparent", "edge_width": 1, "ndim": 3},
            ),
        )
        for name, kind, kw in specs:
            if name in self.viewer.layers:
                layer = self.viewer.layers[name]
                layer.scale, layer.translate = image.scale, image.translate
            else:
                layer = kind(name=name, **kw, **common)
                self.viewer.add_layer(layer)
                layer.events.data.connect(self._on_prompt_data)
                if name == BOXES:  # ready to draw the first box
                    layer.mode = "add_rectangle"
            lay[name] = layer
        if self._labels is not None:
            self.ui.labels_combo.setCurrentText(self._labels.name)

    def _clear_prompt_layers(self) -> None:
        """Empty the prompt layers and the preview (prompts belong to the image they were drawn
        on; another image starts without them)."""
        lay = self._layers
        self._syncing = True
        try:
            for name in (POSITIVE, NEGATIVE):
                if name in lay and name in self.viewer.layers and len(lay[name].data):
                    lay[name].data = np.empty((0, 3))
            if BOXES in lay and BOXES in self.viewer.layers and len(lay[BOXES].data):
                lay[BOXES].selected_data = set(range(len(lay[BOXES].data)))
                lay[BOXES].remove_selected()
        finally:
            self._syncing = False
        if PREVIEW in lay and PREVIEW in self.viewer.layers:
            lay[PREVIEW].data[:] = 0
            lay[PREVIEW].refresh()

    # ------------------------------------------------------------------ layer <-> state sync
    def _sync_layers(self) -> None:
        """Rewrite the prompt layers and the preview from the annotator's state."""
        ann = self._annotator
        lay = self._layers
        if ann is None or not lay:
            return
        pos, neg, rects = prompt_layer_data(ann.prompts)
        self._syncing = True
        try:
            lay[POSITIVE].data = pos
            lay[NEGATIVE].data = neg
            boxes = lay[BOXES]
            if len(boxes.data):
                boxes.selected_data = set(range(len(boxes.data)))
                boxes.remove_selected()
            if rects:
                boxes.add_rectangles(rects)
        finally:
            self._syncing = False
        preview = lay[PREVIEW]
        preview.data[:] = 0
        for z, m in ann.masks.items():
            preview.data[z][m] = 1
        preview.refresh()

    def _is_click(self, ann: Any, z: int, new: SlicePrompts) -> bool:
        """Whether ``new`` adds one point to slice z of an object that spans other slices,
        with *Re-propagate after a click* on."""
        if not self.ui.repropagate_check.isChecked():
            return False
        old = ann.prompts.get(z, SlicePrompts())
        one_more = (
            new.box == old.box
            and len(new.points) == len(old.points) + 1
            and new.points[:-1] == old.points
        )
        return one_more and any(k != z and m.any() for k, m in ann.masks.items())

    def _show_keyframes(self) -> None:
        ann = self._annotator
        keys = sorted(ann.prompts) if ann is not None else []
        text = ", ".join(str(k) for k in keys) if keys else "none"
        self.ui.keyframes.setText(f"Keyframes (prompted slices): {text}")

    def _show_mask(self, z: int, mask: np.ndarray | None) -> None:
        preview = self._layers[PREVIEW]
        preview.data[z] = 0 if mask is None else np.asarray(mask, dtype=np.uint8)
        preview.refresh()

    def _auto_intensity(self) -> str:
        """What ``"auto"`` means for the chosen image (as :func:`samed.engine.preprocess.
        resolve_intensity` decides it): ``"abdomen"`` for CT, ``"minmax"`` for data already in
        [0, 1], else ``"percentile"`` (MR)."""
        image = self._image
        if image is None:
            return "abdomen"
        ref = reference_volume(image.metadata)
        a = np.asarray(image.data)
        lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 0.0)
        if str(getattr(ref, "modality", "") or "").upper() == "CT" or lo < -500:
            return "abdomen"
        return "minmax" if lo >= 0.0 and hi <= 1.0 else "percentile"

    def _on_image_intensity(self) -> None:
        """Say in the window combo what ``auto`` is for this image, and show the image with the
        contrast the model will see."""
        auto = self._auto_intensity()
        text = {"abdomen": "auto (CT: abdomen)", "percentile": "auto (MR: percentile 0.5-99.5)"}
        self.ui.window_combo.setItemText(0, text.get(auto, "auto (0-1 data: unchanged)"))
        self._on_window()

    def _display_limits(self, name: str) -> tuple[float, float] | None:
        """Display contrast limits for an intensity choice on the chosen image (None: keep)."""
        from samed.registry import CT_WINDOWS

        if name == "auto":
            name = self._auto_intensity()
        preset = CT_WINDOWS.get(name)
        if preset is not None:
            return (preset.low, preset.high)
        a = np.asarray(self._image.data)
        sample = a[:: max(1, a.shape[0] // 16)] if a.ndim == 3 else a
        if name == "percentile":
            lo, hi = np.nanpercentile(sample, (0.5, 99.5))
        else:  # min-max
            lo, hi = np.nanmin(a), np.nanmax(a)
        return (float(lo), float(hi)) if hi > lo else None

    def _apply_view(self, *_: Any) -> None:
        """Orient the 2D view: radiological for an axial volume whose geometry is known, shown
        in its own axial plane (rows vertical, columns horizontal). Only the camera turns: layer
        data and world coordinates stay as they are. Otherwise, what this widget turned earlier
        is turned back (a camera or overlay set by the user or another plugin is left alone)."""
        orient = None
        ref = reference_volume(self._image.metadata) if self._image is not None else None
        ndim = self.viewer.dims.ndim
        axial_plane = ndim >= 2 and tuple(self.viewer.dims.order[-2:]) == (ndim - 2, ndim - 1)
        if ref is not None and self.ui.radiological_check.isChecked() and axial_plane:
            orient = radiological_orientation2d(ref.orientation)
        camera = viewer_camera(self.viewer)
        if not hasattr(camera, "orientation2d"):  # napari < 0.6: no camera orientation
            self.ui.radiological_check.setEnabled(False)
            self.ui.radiological_check.setToolTip("needs napari >= 0.6 (camera orientation)")
            return
        overlay = viewer_text_overlay(self.viewer)
        if orient is not None:
            camera.orientation2d = orient
            overlay.text = "radiological view: anterior up, patient's right on the left"
            overlay.visible = True
            self._view_turned = True
            self._status(f"view: radiological ({ref.orientation} volume)")
        elif self._view_turned:
            camera.orientation2d = ("down", "right")
            overlay.visible = False
            self._view_turned = False


def viewer_camera(viewer: Any) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def viewer_text_overlay(viewer: Any) -> Any:
    """The canvas text overlay (``viewer.canvas.overlays.text`` from napari 0.9)."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    text = getattr(overlays, "text", None)
    return text if text is not None else viewer.text_overlay


def _set_preview_colour(layer: Labels) -> None:
    try:
        from napari.utils.colormaps import DirectLabelColormap

        layer.colormap = DirectLabelColormap(
            color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: (1.0, 0.85, 0.0, 1.0)}
        )
    except (ImportError, TypeError, ValueError):  # older napari: keep the default colours
        pass
