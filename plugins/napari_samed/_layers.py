"""Conversions between napari prompt layers and :class:`samed.annotation.SlicePrompts`.

Prompt layers are made with the image layer's scale and translate, but positions are always read
through world coordinates (``data_to_world`` then the image's ``world_to_data``) so that a layer
with other transforms still maps correctly. Image data coordinates are ``(z, y, x)``; the engine
wants ``(x, y)`` = (column, row) on slice ``z``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from samed.annotation import SlicePrompts

__all__ = [
    "to_image_coords",
    "prompts_from_layers",
    "prompt_layer_data",
    "box_vertices",
    "radiological_orientation2d",
]


def radiological_orientation2d(orientation: str) -> tuple[str, str] | None:
    """napari ``camera.orientation2d`` (vertical, horizontal) that shows axial slices of a volume
    as radiologists read them: anterior up, the patient's right on the screen's left.

    Args:
        orientation: the volume's axis codes for its voxel axes (x, y, z), e.g. ``"RAS"``,
            ``"LPS"`` (:attr:`samed.io.Volume.orientation`). The layer shows ``x`` (columns)
            horizontally and ``y`` (rows) vertically.

    Returns:
        e.g. ``("up", "left")`` for RAS, ``("down", "right")`` for LPS; None when the slices
        are not axial (z is not S/I) or the codes are not three axis letters.
    """
    codes = str(orientation).upper()
    if len(codes) != 3 or codes[2] not in "SI" or codes[0] not in "LR" or codes[1] not in "AP":
        return None
    return ("up" if codes[1] == "A" else "down", "right" if codes[0] == "L" else "left")


def to_image_coords(layer: Any, image: Any, coords: np.ndarray) -> np.ndarray:
    """(N, D) positions in ``layer``'s data coordinates -> (N, 3) (z, y, x) image data coords."""
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    out = np.empty((coords.shape[0], 3))
    for i, c in enumerate(coords):
        world = np.asarray(layer.data_to_world(c), dtype=np.float64)
        out[i] = np.asarray(image.world_to_data(world), dtype=np.float64)[-3:]
    return out


def _slice_index(z: float, depth: int) -> int | None:
    k = int(np.floor(z + 0.5))
    return k if 0 <= k < depth else None


def prompts_from_layers(
    image: Any, positive: Any, negative: Any, boxes: Any, shape: tuple[int, int, int]
) -> dict[int, SlicePrompts]:
    """Collect the prompts of every slice from the three prompt layers.

    Args:
        image: the image layer (its data grid defines slices and pixels).
        positive / negative: Points layers (None allowed).
        boxes: Shapes layer with rectangles (None allowed); if a slice holds several rectangles the
            last one is used (one object per slice).
        shape: (Z, Y, X) of the image.

    Returns:
        Slice index -> prompts, with points as (x, y) and boxes as (x0, y0, x1, y1) pixels.
    """
    depth = shape[0]
    pts: dict[int, list[tuple[float, float]]] = {}
    labs: dict[int, list[int]] = {}
    for layer, lab in ((positive, 1), (negative, 0)):
        if layer is None or len(layer.data) == 0:
            continue
        for z, y, x in to_image_coords(layer, image, layer.data):
            k = _slice_index(z, depth)
            if k is None:
                continue
            pts.setdefault(k, []).append((float(x), float(y)))
            labs.setdefault(k, []).append(lab)
    box_of: dict[int, tuple[float, float, float, float]] = {}
    if boxes is not None:
        for verts in boxes.data:
            v = to_image_coords(boxes, image, verts)
            k = _slice_index(float(v[:, 0].mean()), depth)
            if k is None:
                continue
            box_of[k] = (
                float(v[:, 2].min()),
                float(v[:, 1].min()),
                float(v[:, 2].max()),
                float(v[:, 1].max()),
            )
    out = {}
    for k in sorted(set(pts) | set(box_of)):
        out[k] = SlicePrompts(box_of.get(k), tuple(pts.get(k, ())), tuple(labs.get(k, ())))
    return out


def box_vertices(z: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """(4, 3) rectangle vertices (z, y, x) for an (x0, y0, x1, y1) box on slice z."""
    x0, y0, x1, y1 = box
    return np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], dtype=np.float64)


def prompt_layer_data(
    prompts: dict[int, SlicePrompts],
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Layer data (image data coordinates) for prompts: positive (N, 3), negative (M, 3) points
    and a list of (4, 3) rectangles."""
    pos, neg, rects = [], [], []
    for z, p in sorted(prompts.items()):
        for (x, y), lab in zip(p.points, p.labels, strict=True):
            (pos if lab == 1 else neg).append((z, y, x))
        if p.box is not None:
            rects.append(box_vertices(z, p.box))
    return (
        np.asarray(pos, dtype=np.float64).reshape(-1, 3),
        np.asarray(neg, dtype=np.float64).reshape(-1, 3),
        rects,
    )
