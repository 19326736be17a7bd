"""Real mouse events on the napari canvas (Qt events on the vispy canvas widget), for tests that
draw prompts the way a user does: press, drag, release in the active layer's mode."""

from __future__ import annotations

from typing import Any

import numpy as np


def canvas_widget(viewer: Any) -> Any:
    """The Qt widget that receives the canvas' mouse events."""
    return viewer.window._qt_viewer.canvas.native


def data_to_canvas(viewer: Any, layer: Any, zyx: tuple[float, float, float]) -> tuple[float, float]:
    """Canvas pixel (x, y) of a (z, row, column) position in ``layer``'s data coordinates, through
    the layer's data-to-world transform and the camera's scene-to-canvas transform (so a turned
    camera, e.g. the radiological view, is accounted for)."""
    world = np.asarray(layer.data_to_world(np.asarray(zyx, dtype=float)), dtype=float)
    displayed = list(viewer.dims.displayed)  # (row axis, column axis) on screen
    scene = [world[displayed[1]], world[displayed[0]], 0.0, 1.0]  # vispy: x = column axis
    canvas = viewer.window._qt_viewer.canvas
    tr = canvas.view.scene.transform
    x, y = tr.map(scene)[:2]
    return float(x), float(y)


def _send(widget: Any, kind: Any, pos: tuple[float, float], button: Any, buttons: Any) -> None:
    from qtpy.QtCore import QPointF, Qt
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    local = QPointF(*pos)
    glob = QPointF(widget.mapToGlobal(local.toPoint()))
    ev = QMouseEvent(kind, local, glob, button, buttons, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, ev)


def drag(
    qtbot: Any, viewer: Any, start: tuple[float, float], end: tuple[float, float], steps: int = 6
) -> None:
    """Press the left button at canvas pixel ``start``, move to ``end`` with it held, release."""
    from qtpy.QtCore import QEvent, Qt

    w = canvas_widget(viewer)
    left = Qt.MouseButton.LeftButton
    _send(w, QEvent.Type.MouseButtonPress, start, left, left)
    qtbot.wait(20)
    for t in np.linspace(0.0, 1.0, steps)[1:]:
        p = (start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
        _send(w, QEvent.Type.MouseMove, p, Qt.MouseButton.NoButton, left)
        qtbot.wait(20)  # napari throttles mouse moves
    _send(w, QEvent.Type.MouseButtonRelease, end, left, Qt.MouseButton.NoButton)
    qtbot.wait(20)


def click(qtbot: Any, viewer: Any, pos: tuple[float, float]) -> None:
    """A left click at canvas pixel ``pos``."""
    from qtpy.QtCore import QEvent, Qt

    w = canvas_widget(viewer)
    left = Qt.MouseButton.LeftButton
    _send(w, QEvent.Type.MouseMove, pos, Qt.MouseButton.NoButton, Qt.MouseButton.NoButton)
    qtbot.wait(20)
    _send(w, QEvent.Type.MouseButtonPress, pos, left, left)
    qtbot.wait(10)
    _send(w, QEvent.Type.MouseButtonRelease, pos, left, Qt.MouseButton.NoButton)
    qtbot.wait(20)
