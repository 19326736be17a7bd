"""Corrections that refine and re-propagation that respects what is already good (issue #17).

Two pieces, both GUI-free and driven by :class:`samed.engine.Session`:

* :func:`refine_slice` (:mod:`samed.engine.refine`): a click on a slice re-predicts it from
  everything known about it, with the least change that honours the click: a negative click never
  grows the mask and removes only the region it lies in, a positive click never wipes the rest of
  the slice.
* :func:`repropagate`: from a corrected slice, walk outward only as far as the change reaches:
  stop before the next keyframe (a slice the user prompted; never overwritten) or once the new
  masks agree with the existing ones on consecutive slices; between two keyframes the new
  prediction is blended with the existing one (signed-distance interpolation weighted by the
  distance to each keyframe) rather than replacing it. Beyond the object's current end it extends
  the object with the usual stop rules of :meth:`Session.propagate`.

Conventions as in :mod:`samed.engine.session`: volumes (Z, Y, X), slice masks (Y, X) bool, points
(x, y) and boxes (x0, y0, x1, y1) in slice pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np

from .hollow import box_wall, hole_of, hollow_step, is_hollow, ring_around, wall_thickness
from .preprocess import mask_bbox
from .refine import _logits_for, full_logits, mask_to_logits, refine_slice, tapered

if TYPE_CHECKING:  # pragma: no cover
    from .session import PropagationStep, Session

__all__ = [
    "InteractiveMixin",
    "mask_digest",
    "mask_to_logits",
    "refine_slice",
    "repropagate",
    "sdf_blend",
    "simulated_click",
]

#: a corrected wall's thickness is carried to the neighbouring walls while it differs from
#: theirs by more than this share (or 0.5 px)
WALL_AGREE = 0.1

#: past the object's end, a positive click's extension goes on only while each new slice's mask
#: lies within this many px of the click's (x, y) (the click says where the object is; a mask
#: that has moved off it is a neighbouring structure the box now covers). Measured on the 41
#: structures of bench/bench_interactive.py (session 12): extensions that kept their click within
#: 1 px had precision 0.42-1.0, those off it by 2.2-12.7 px precision 0.00-0.16
EXTENSION_CLICK_REACH = 1.0


def simulated_click(
    pred: np.ndarray, truth: np.ndarray
) -> tuple[int, tuple[float, float], bool] | None:
    """The corrective click a simulated user makes (issue #17's protocol, as in
    ``bench/bench_interactive.py`` and ``samed demo``): on the largest 3D connected component
    (6-connected) of ``pred XOR truth``, the slice where that component is largest, the point
    farthest from the component's boundary there (Euclidean distance transform); positive on a
    miss (truth there), negative on a leak.

    Args:
        pred, truth: (Z, Y, X) bool volumes of the same shape.

    Returns:
        (z, (x, y), positive) in slice pixels, or None when ``pred`` equals ``truth``.
    """
    from scipy import ndimage

    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(
            f"pred {pred.shape} and truth {truth.shape} must be (Z, Y, X) of one shape"
        )
    err = pred ^ truth
    if not err.any():
        return None
    lab, _ = ndimage.label(err)
    comp = lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    z = int(np.argmax(comp.sum(axis=(1, 2))))
    dist = ndimage.distance_transform_edt(np.pad(comp[z], 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), comp[z].shape)
    return z, (float(x), float(y)), bool(truth[z, y, x])


def sdf_blend(a: np.ndarray, b: np.ndarray, weight_a: float) -> np.ndarray:
    """Shape interpolation of two (Y, X) masks: ``weight_a * sdf(a) + (1 - weight_a) * sdf(b) > 0``
    (signed distance, positive inside)."""
    from scipy.ndimage import distance_transform_edt as edt

    def sdf(m: np.ndarray) -> np.ndarray:
        if not m.any():
            return -np.full(m.shape, 1e3, dtype=np.float64)
        return edt(m) - edt(~m)

    wa = float(np.clip(weight_a, 0.0, 1.0))
    if wa >= 1.0:
        return a.copy()
    if wa <= 0.0:
        return b.copy()
    return (wa * sdf(a) + (1.0 - wa) * sdf(b)) > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = int((a | b).sum())
    return 1.0 if u == 0 else int((a & b).sum()) / u


def repropagate(
    session: Session,
    z: int,
    masks: Mapping[int, np.ndarray],
    keyframes: set[int] | frozenset[int],
    *,
    direction: str = "both",
    box_margin: float = 2.0,
    use_mask_prompt: bool = True,
    min_area: int = 10,
    min_score: float = 0.0,
    max_intensity_shift: float | None = 0.2,
    max_distance: int | None = None,
    mask_output: int | None = None,
    max_step_px: int | None = None,
    min_slice_iou: float = 0.0,
    agree_iou: float = 0.95,
    agree_slices: int = 2,
    change_growth: float = 1.1,
) -> Iterator[PropagationStep]:
    """Propagate the object from slice z outward, only as far as the change reaches.

    Each direction walks slice by slice like :meth:`Session.propagate` (previous mask's box +
    ``box_margin``, its low-res logits as mask prompt when ``use_mask_prompt``, ``max_step_px``)
    and never yields a keyframe (so never overwrites one). Inside the existing object only the
    change is carried: what the new prediction adds (removes) within a few px of what the previous
    slice's correction added (removed). The walk stops when that change dies out (< ``min_area``
    px), when it grows away from the click (more than ``change_growth`` x the previous slice's
    change + max(``min_area``, 5 % of the existing mask): a leak spreading, not the correction
    fading), after ``agree_slices`` consecutive slices with IoU >= ``agree_iou`` to the existing
    mask, or at the volume's end / ``max_distance``. Beyond the object's end it extends the object
    only for a correction that added something at or beyond that end (not for one carried through
    the object, nor one that only removed), with :meth:`Session.propagate`'s stop rules and the
    walk stopping where the mask would grow past ``change_growth`` x the previous slice's area +
    ``min_area``, and a mask larger than the previous slice's tapered to that area by raising
    the logit threshold (:func:`samed.engine.refine.tapered`; an object tapers at its ends).
    After a positive click, that extension also stops at the first slice whose mask is more than
    :data:`EXTENSION_CLICK_REACH` px from the click's (x, y) (:meth:`last_click`): the click says
    where the object is, and a mask off it is a neighbour the box has reached. If slice z's mask is empty (a negative click removed it), the existing masks on the side
    away from the object's keyframes are cleared up to the next one.
    A hollow mask (a wall around a core, :func:`samed.engine.hollow.is_hollow`) is carried as
    its core and its wall's thickness (:func:`samed.engine.hollow.hollow_step`) and replaces the
    existing mask of each slice it reaches, until it agrees with it or the core ends.

    Args:
        z: the corrected (or first prompted) slice.
        masks: slice -> (Y, X) bool mask of the current object (slice z's is the start).
        keyframes: the slices the user prompted.
        change_growth: how much a carried change (or an extension past the end) may grow from
            one slice to the next before the walk stops (1.1 = 10 %; must be >= 1).

    Yields:
        :class:`~samed.engine.PropagationStep`; a step with an empty mask or ``stopped=True``
        removes that slice's mask.
    """
    from .preprocess import _dilate
    from .session import PropagationStep

    z = session._check_z(z)
    dirs = {"both": (1, -1), "forward": (1,), "backward": (-1,)}
    if direction not in dirs:
        raise ValueError(f"direction={direction!r} must be one of {sorted(dirs)}")
    if not float(change_growth) >= 1.0:
        raise ValueError(f"change_growth={change_growth} must be a number >= 1")
    if not 0.0 < float(agree_iou) <= 1.0 or int(agree_slices) < 1:
        raise ValueError(
            f"agree_iou={agree_iou} must be in (0, 1] and agree_slices={agree_slices} >= 1"
        )
    nz = session.shape[0]
    start = np.asarray(masks.get(z, np.zeros(session.shape[1:], bool)), dtype=bool)
    limit = max_distance if max_distance is not None else nz
    total = sum(min(limit, (nz - 1 - z) if d > 0 else z) for d in dirs[direction])
    done = 0
    empty = np.zeros(session.shape[1:], dtype=bool)

    def has(k: int) -> bool:
        m = masks.get(k)
        return m is not None and bool(np.asarray(m).any())

    def run_to_clear(zz: int, d: int) -> Iterator[int]:
        """Existing, non-keyframe slices from zz on in direction d, up to the object's gap."""
        while 0 <= zz < nz and zz not in keyframes and has(zz):
            yield zz
            zz += d

    if not start.any():
        # a negative click emptied slice z: the side that no longer reaches a prompted slice
        # with a mask (the object's own keyframes lie on the other side) was a leak; clear it
        def anchored(d: int) -> bool:
            k = z + d
            while 0 <= k < nz and has(k):
                if k in keyframes:
                    return True
                k += d
            return False

        for d in dirs[direction]:
            if anchored(-d) and not anchored(d):
                for k in run_to_clear(z + d, d):
                    done += 1
                    yield PropagationStep(
                        k, empty, d, 0.0, done, total, stopped=True, reason="area"
                    )
        return
    ref_mean = float(session.image[z][start].mean())
    change = session.last_change(z, start)
    click = session.last_click(z, start)
    anchor = None if click is None or not click[2] else (int(round(click[0])), int(round(click[1])))
    if change is None:  # unknown change (e.g. a new box): only add what touches it
        grow0, shrink0 = start.copy(), np.zeros_like(start)
    else:
        grow0, shrink0 = change[1] & ~change[0], change[0] & ~change[1]
    reach = max(int(round(box_margin)) + 2, 3)
    for d in dirs[direction]:
        prev, prev_logits = start, session.known_logits(z, start)
        if use_mask_prompt and prev_logits is None:
            prev_logits = mask_to_logits(start, session)
        grow, shrink = grow0, shrink0
        last = int(grow0.sum()) + int(shrink0.sum())
        zz, steps, agree, crossed = z, 0, 0, False
        while True:
            zz += d
            steps += 1
            if zz < 0 or zz >= nz or steps > limit or zz in keyframes:
                break
            todo = [
                k
                for k in range(zz, zz + d * session.batch_size, d)
                if 0 <= k < nz and not session.is_embedded(k)
            ]
            if todo:
                session.embed(todo)
            existing = np.asarray(masks[zz], dtype=bool) if has(zz) else None
            hollow = is_hollow(prev, min_area)
            if hollow and existing is not None and is_hollow(existing, min_area):
                # the next slice is a wall already: carry the corrected wall's thickness around
                # its own core while the two differ (a click that thinned or thickened the wall)
                t_new, t_old = wall_thickness(prev), wall_thickness(existing)
                if abs(t_new - t_old) <= max(0.5, WALL_AGREE * t_old):
                    break
                # only near where the previous slice changed, as for other objects
                new, grow, shrink, size = _carried(
                    existing, ring_around(hole_of(existing), t_new), grow, shrink, reach
                )
                if size < min_area or int(new.sum()) < min_area:
                    break
                if size > change_growth * last + max(min_area, 0.05 * int(existing.sum())):
                    break
                last = size
                done += 1
                logits = mask_to_logits(new, session)
                session.remember_logits(zz, new, logits)
                yield PropagationStep(zz, new, d, 1.0, done, total)
                prev, prev_logits = new, logits
                continue
            if existing is None and (crossed or not grow0.any()) and not hollow:
                # only a correction at or beyond the object's end extends it: one that only
                # removed, or whose change was carried through the object to its end, does not
                # (a wall goes on as long as its core does)
                break
            crossed = crossed or existing is not None
            if hollow:  # a wall around a core: carry both (hollow.py)
                new = hollow_step(
                    session,
                    zz,
                    prev,
                    box_margin=box_margin,
                    max_step_px=max_step_px,
                    min_area=min_area,
                )
                done += 1
                core = int(hole_of(new).sum())
                if existing is None and core > change_growth * int(hole_of(prev).sum()) + min_area:
                    new = empty  # past the object's end a core tapers; a growing one has leaked
                if not new.any():
                    if existing is None:
                        yield PropagationStep(
                            zz, empty, d, 0.0, done, total, stopped=True, reason="area"
                        )
                    break  # the core has ended: the rest stays as it was
                logits = mask_to_logits(new, session)
                session.remember_logits(zz, new, logits)
                yield PropagationStep(zz, new, d, 1.0, done, total)
                agree = (
                    agree + 1 if existing is not None and _iou(new, existing) >= agree_iou else 0
                )
                if agree >= agree_slices:
                    break
                prev, prev_logits = new, logits
                continue
            # inside the existing object the box covers it too: only the change should differ
            pred = session.predict_full(
                zz,
                box=mask_bbox(prev if existing is None else prev | existing, box_margin),
                mask_input=prev_logits if use_mask_prompt else None,
                mask_output=mask_output,
            )
            new = pred.mask
            if max_step_px is not None:
                new = new & _dilate(prev if existing is None else prev | existing, int(max_step_px))
            done += 1
            if existing is None:  # beyond the object's current end: extend it
                step_pred = type(pred)(new, pred.score, pred.low_res_logits)
                reason = session._stop_reason(
                    zz,
                    step_pred,
                    prev,
                    ref_mean,
                    min_area,
                    min_score,
                    max_intensity_shift,
                    min_slice_iou,
                )
                if not reason and int(new.sum()) > change_growth * int(prev.sum()) + min_area:
                    reason = "growth"  # past the object's end it tapers; a growing mask leaks
                if not reason and anchor is not None and not _near(new, anchor):
                    reason = "click"  # moved off the positive click: another structure
                if not reason and int(new.sum()) > int(prev.sum()):
                    # no larger than the slice before: what the decoder is least sure of goes
                    new = tapered(new, full_logits(session, pred.low_res_logits), int(prev.sum()))
                    logits = _logits_for(session, new, pred.low_res_logits)
                    pred = type(pred)(new, pred.score, logits)
                if reason:
                    yield PropagationStep(
                        zz, empty, d, pred.score, done, total, stopped=True, reason=reason
                    )
                    break
                grow, shrink = new, ~new
            else:
                # carry only the change: what the prediction adds (removes) within a few px of
                # what the previous slice's correction added (removed)
                new, grow, shrink, size = _carried(existing, new, grow, shrink, reach)
                if size < min_area or not new.any():
                    break  # the change has died out (or would wipe the slice): keep the rest
                if size > change_growth * last + max(min_area, 0.05 * int(existing.sum())):
                    break  # the change grows away from the click: a leak, not the correction
                last = size
            session.remember_logits(zz, new, pred.low_res_logits)
            yield PropagationStep(zz, new, d, pred.score, done, total)
            if existing is not None and _iou(new, existing) >= agree_iou:
                agree += 1
                if agree >= agree_slices:
                    break
            else:
                agree = 0
            prev, prev_logits = new, pred.low_res_logits
    if session.cache_dir is not None:
        session.save_cache()


def _near(mask: np.ndarray, xy: tuple[int, int], reach: float = EXTENSION_CLICK_REACH) -> bool:
    """Whether (Y, X) ``mask`` has a pixel within ``reach`` px of pixel ``xy`` = (x, y)."""
    x, y = xy
    r = int(np.ceil(reach))
    ys, xs = np.nonzero(mask[max(y - r, 0) : y + r + 1, max(x - r, 0) : x + r + 1])
    ys, xs = ys + max(y - r, 0), xs + max(x - r, 0)
    return bool(((xs - x) ** 2 + (ys - y) ** 2 <= reach * reach).any())


def _carried(
    existing: np.ndarray, cand: np.ndarray, grow: np.ndarray, shrink: np.ndarray, reach: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(new mask, grow, shrink, size) of carrying a correction onto a slice: ``existing`` (Y, X)
    with what ``cand`` adds (removes) within ``reach`` px of what the previous slice's
    correction added (``grow``) or removed (``shrink``); size = grown + shrunk pixels."""
    from .preprocess import _dilate

    grow = (cand & ~existing) & _dilate(grow, reach)
    shrink = (existing & ~cand) & _dilate(shrink, reach)
    return (existing | grow) & ~shrink, grow, shrink, int(grow.sum()) + int(shrink.sum())


def mask_digest(mask: np.ndarray) -> bytes:
    """16-byte digest of a bool mask (keys the logits a session remembers)."""
    return hashlib.blake2b(
        np.packbits(np.asarray(mask, dtype=bool)).tobytes(), digest_size=16
    ).digest()


_mask_digest = mask_digest


class InteractiveMixin:
    """:class:`~samed.engine.Session` methods for corrective clicks (see the module docstring)."""

    def refine(
        self,
        z: int,
        *,
        box: np.ndarray | list[float] | None = None,
        points: np.ndarray | list,
        point_labels: np.ndarray | list,
        prev_mask: np.ndarray | None = None,
        prior_mask: np.ndarray | None = None,
        object_box: np.ndarray | list[float] | None = None,
        object_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """Refine slice z after a click (the last of ``points``), given its previous (Y, X) mask:
        see :func:`samed.engine.interactive.refine_slice`. Returns the (Y, X) bool mask (a
        negative click's is inside ``prev_mask``, except where it reveals a hollow object; a
        positive click's contains it).

        ``object_box`` with ``object_mask``: the box and current (Y, X) mask of the object's
        nearest box slice (another slice; used when slice z has no box): the wall thickness
        that box says the object has (:func:`samed.engine.hollow.box_wall`) lets a negative
        click at the core of slice z's mask give a wall. ``object_box`` alone: the box's own
        ellipse on slice z (:func:`refine_slice`)."""
        z = self._check_z(z)  # type: ignore[attr-defined]
        object_wall = None
        if object_mask is not None:
            if object_box is not None:
                object_wall = box_wall(object_box, np.asarray(object_mask, dtype=bool))
            object_box = None
        pred = refine_slice(
            self,
            z,
            box=box,
            points=np.asarray(points),
            point_labels=np.asarray(point_labels),
            prev_mask=prev_mask,
            prior_mask=prior_mask,
            object_box=object_box,
            object_wall=object_wall,
        )
        self.remember_logits(z, pred.mask, pred.low_res_logits)  # type: ignore[attr-defined]
        prev = np.zeros(self.shape[1:], bool) if prev_mask is None else np.asarray(prev_mask, bool)
        pts, labs = np.asarray(points, dtype=float).reshape(-1, 2), np.asarray(point_labels)
        click = (float(pts[-1, 0]), float(pts[-1, 1]), bool(labs[-1] > 0)) if len(pts) else None
        self._change = (z, _mask_digest(pred.mask), prev, pred.mask, click)
        return pred.mask

    def last_change(self, z: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(mask before, mask after) of the last :meth:`refine` if it gave slice z ``mask``."""
        c = getattr(self, "_change", None)
        if c is None or c[0] != int(z) or c[1] != _mask_digest(mask):
            return None
        return c[2], c[3]

    def last_click(self, z: int, mask: np.ndarray) -> tuple[float, float, bool] | None:
        """(x, y, positive) of the click of the last :meth:`refine` if it gave slice z ``mask``
        (x, y in slice pixels), else None."""
        c = getattr(self, "_change", None)
        if c is None or c[0] != int(z) or c[1] != _mask_digest(mask):
            return None
        return c[4]

    def repropagate(
        self, z: int, masks: dict[int, np.ndarray], keyframes: Iterable[int], **kwargs: object
    ) -> Iterator[PropagationStep]:
        """Propagate from slice z only as far as the change reaches, never over ``keyframes``
        (the prompted slices): see :func:`samed.engine.interactive.repropagate`."""
        return repropagate(self, z, masks, frozenset(int(k) for k in keyframes), **kwargs)  # type: ignore[arg-type]
