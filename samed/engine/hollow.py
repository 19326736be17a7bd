"""Hollow objects (a wall around a core): the myocardium around the LV cavity, a vessel wall,
a cyst's rim (issue #17: "where a box is ambiguous, the first click must resolve it").

SAM answers a box around a ring with what fills it: on ACDC the box around the myocardium gives
the LV cavity (per-slice Dice of the best decoder answer against the myocardium 0.06-0.27 on the
benchmark's 5 held-out patients, `docs/BENCHMARKS.md` session 8). A negative click at the
centre of that answer says "not this, but something in this box": the object is the box's
inscribed ellipse without the rejected core (Dice 0.86 on the same slices with tight boxes).
Propagation carries a hollow mask as its two parts: the core, which SAM finds well from the
hole's box (LV Dice 0.94), and the wall's thickness, which varies little between neighbouring
slices (the core grown by the previous slice's thickness, minus the core: Dice 0.80).

Conventions as in :mod:`samed.engine.session`: slice masks (Y, X) bool, boxes (x0, y0, x1, y1)
in slice pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .preprocess import _dilate, mask_bbox

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

__all__ = [
    "hole_of",
    "is_hollow",
    "wall_thickness",
    "ring_in_box",
    "ring_around",
    "box_wall",
    "hollow_step",
]

#: IoU (with the previous slice's core) a multimask answer must gain over the single answer to be
#: taken as the next core (measured on ACDC: docs/BENCHMARKS.md, session 8)
CORE_PREFERENCE = 0.1

#: a mask is hollow when its enclosed holes make up at least this share of the filled shape
HOLLOW_FRACTION = 0.15


def hole_of(mask: np.ndarray) -> np.ndarray:
    """(Y, X) bool: the pixels the mask encloses without covering them (its filled holes)."""
    mask = np.asarray(mask, dtype=bool)
    return ndimage.binary_fill_holes(mask) & ~mask


def is_hollow(mask: np.ndarray, min_area: int = 10) -> bool:
    """Whether a (Y, X) mask is a wall around a core: its holes cover >= ``min_area`` px and
    >= :data:`HOLLOW_FRACTION` of the filled shape."""
    hole = hole_of(mask)
    n = int(hole.sum())
    return n >= min_area and n >= HOLLOW_FRACTION * (n + int(np.count_nonzero(mask)))


def wall_thickness(mask: np.ndarray) -> float:
    """Mean thickness (px) of a hollow (Y, X) mask: the difference of the equivalent radii of its
    filled shape and its hole (for a mask without a hole: its equivalent radius)."""
    mask = np.asarray(mask, dtype=bool)
    hole = int(hole_of(mask).sum())
    filled = hole + int(mask.sum())
    return float(np.sqrt(filled / np.pi) - np.sqrt(hole / np.pi))


def _disc(r: float) -> np.ndarray:
    k = max(int(round(r)), 1)
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    return xx * xx + yy * yy <= r * r + 0.5


def ring_in_box(box: np.ndarray | list[float], core: np.ndarray, band: float = 2.0) -> np.ndarray:
    """The wall a box means around a rejected ``core``: the box's inscribed ellipse without the
    core, or an empty mask when the core does not sit inside the box with at least ``band`` px
    free on every side (then the box does not enclose a wall around it).

    Args:
        box: (4,) XYXY slice pixels.
        core: (Y, X) bool, the region the negative click rejected.
    """
    core = np.asarray(core, dtype=bool)
    out = np.zeros_like(core)
    if not core.any():
        return out
    x0, y0, x1, y1 = (float(v) for v in box)
    cb = mask_bbox(core, 0)
    if cb[0] - x0 < band or cb[1] - y0 < band or x1 - cb[2] < band or y1 - cb[3] < band:
        return out
    h, w = core.shape
    yy, xx = np.ogrid[:h, :w]
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    rx, ry = (x1 - x0) / 2.0 + 0.5, (y1 - y0) / 2.0 + 0.5
    ellipse = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    return ellipse & ~core


def ring_around(core: np.ndarray, thickness: float) -> np.ndarray:
    """A wall of ``thickness`` px around a (Y, X) ``core`` (the core grown by a disc, minus it)."""
    core = np.asarray(core, dtype=bool)
    if not core.any() or thickness < 0.5:
        return np.zeros_like(core)
    return ndimage.binary_dilation(core, structure=_disc(thickness)) & ~core


def box_wall(
    box: np.ndarray | list[float] | None,
    mask: np.ndarray,
    band: float = 2.0,
    min_area: int = 10,
    *,
    unresolved: bool = False,
) -> float | None:
    """The wall thickness (px) a box slice says its object has, or None when it says nothing.

    A hollow ``mask`` (the user resolved the box to a wall: a negative click at the core of its
    answer, :func:`ring_in_box`) gives its own :func:`wall_thickness`. With ``unresolved``, a
    mask that is one blob which the ``box`` encloses with >= ``band`` px free on every side
    (the core SAM returns for a box around a wall, but also a correct answer to a loose box)
    gives the thickness of :func:`ring_in_box`. Otherwise None.

    Args:
        box: (4,) XYXY slice pixels of the box slice, or None (then None).
        mask: (Y, X) bool, that slice's current mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if box is None or int(mask.sum()) < min_area:
        return None
    if is_hollow(mask, min_area):
        return wall_thickness(mask)
    if not unresolved:
        return None
    _, n = ndimage.label(mask)
    if n != 1:
        return None
    ring = ring_in_box(box, mask, band)
    return wall_thickness(ring) if int(ring.sum()) >= min_area else None


def hollow_step(
    session: Session,
    z: int,
    prev: np.ndarray,
    *,
    box_margin: float = 2.0,
    max_step_px: int | None = None,
    min_area: int = 10,
) -> np.ndarray:
    """Slice z's mask of a hollow object whose mask on the neighbouring slice is ``prev``: the
    core found there from the box of ``prev``'s hole (of SAM's answers, the one whose component
    overlapping the old hole most is most like it, the single answer preferred by
    :data:`CORE_PREFERENCE`: a core changes little from slice to slice),
    with a wall as thick as ``prev``'s around it. Empty when the
    core has ended (fewer than ``min_area`` px: e.g. the cardiac apex, where the cavity closes).

    Args:
        prev: (Y, X) bool hollow mask of the neighbouring slice (:func:`is_hollow`).
        max_step_px: keep the core inside the old hole grown by this many px (None: no limit),
            as :meth:`Session.propagate` does with whole masks.
    """
    prev = np.asarray(prev, dtype=bool)
    hole = hole_of(prev)
    empty = np.zeros_like(prev)
    if int(hole.sum()) < min_area:
        return empty
    best, best_iou = empty, -1.0
    answers = session.predict_outputs(z, box=mask_bbox(hole, box_margin))
    for k, answer in enumerate(answers):
        cand = answer.mask if max_step_px is None else answer.mask & _dilate(hole, int(max_step_px))
        lab, n = ndimage.label(cand)
        if n == 0:
            continue
        overlap = np.bincount(lab[hole], minlength=n + 1)
        overlap[0] = 0
        if overlap.max() == 0:
            continue
        cand = lab == int(np.argmax(overlap))
        iou = float((cand & hole).sum()) / float((cand | hole).sum())
        if k > 0:  # SAM's single answer wins unless another is clearly closer to the old core
            iou -= CORE_PREFERENCE
        if iou > best_iou:
            best, best_iou = cand, iou
    core = best
    if int(core.sum()) < min_area:
        return empty
    # the wall is not clipped to the old shape: a clipped wall opens, and an open wall no longer
    # tells the next slice where its core is
    ring = ring_around(core, wall_thickness(prev))
    return ring if int(ring.sum()) >= min_area else empty
