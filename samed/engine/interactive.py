"""Corrections that refine and re-propagation that respects what is already good (issue #17).

Two pieces, both GUI-free and driven by :class:`samed.engine.Session`:

* :func:`refine_slice`: a click on a slice re-predicts it from everything known about it (its box,
  or the current mask's box; all its points; its current low-resolution logits as SAM's mask
  prompt), then enforces the click's meaning: a negative click never grows the mask (the result
  lies inside the previous mask and excludes the click), a positive click never wipes the rest of
  the slice (the previous mask is kept and the clicked region added).
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
import torch
import torch.nn.functional as F

from .preprocess import mask_bbox

if TYPE_CHECKING:  # pragma: no cover
    from .session import Prediction, PropagationStep, Session

__all__ = [
    "InteractiveMixin",
    "mask_digest",
    "mask_to_logits",
    "refine_slice",
    "repropagate",
    "sdf_blend",
    "simulated_click",
]

#: magnitude of the logits a binary mask is turned into when no decoder logits are known
MASK_LOGIT = 8.0


def mask_to_logits(mask: np.ndarray, session: Session) -> torch.Tensor:
    """(L, L) float32 low-resolution logits (+-:data:`MASK_LOGIT`) of a (Y, X) bool mask, on the
    model's padded input frame (the inverse of :func:`samed.model.sam.upscale_logits`)."""
    geo = session.geometry
    low = session.model.low_res_size
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=geo.resized_hw, mode="bilinear", align_corners=False)
    pad = torch.zeros(1, 1, geo.image_size, geo.image_size)
    pad[..., : geo.resized_hw[0], : geo.resized_hw[1]] = m
    small = F.interpolate(pad, size=(low, low), mode="bilinear", align_corners=False)[0, 0]
    return (small * 2.0 - 1.0) * MASK_LOGIT


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


def _disc(shape: tuple[int, int], xy: tuple[float, float], r: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx - xy[0]) ** 2 + (yy - xy[1]) ** 2 <= r * r


def _component_at(mask: np.ndarray, x: int, y: int) -> np.ndarray:
    """The 8-connected component of ``mask`` containing pixel (x, y) (empty if none)."""
    from scipy import ndimage

    if not mask[y, x]:
        return np.zeros_like(mask)
    lab, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return lab == lab[y, x]


def refine_slice(
    session: Session,
    z: int,
    *,
    box: np.ndarray | list[float] | None,
    points: np.ndarray,
    point_labels: np.ndarray,
    prev_mask: np.ndarray | None,
    prior_mask: np.ndarray | None = None,
    box_margin: float = 2.0,
) -> Prediction:
    """Refine slice z after a click (the last of ``points``) given the slice's previous mask.

    Args:
        session: the engine session.
        z: slice index.
        box: the slice's box prompt (XYXY px) or None (then the previous mask's box grown by
            ``box_margin`` px is used; a positive click outside it widens it).
        points: (N, 2) XY px of all the slice's points, the new click last.
        point_labels: (N,) 1 positive / 0 negative.
        prev_mask: (Y, X) bool mask of the slice before the click (None or empty: no mask yet,
            then this is an ordinary prediction from the prompts).
        prior_mask: when ``prev_mask`` is empty, a neighbouring slice's (Y, X) mask: a positive
            click beyond the object's current end is then predicted like a propagation step from
            it (its box, widened to the click, and its logits) so that it extends the object.

    Returns:
        A :class:`~samed.engine.Prediction`. A negative click's mask is a subset of ``prev_mask``
        that excludes the click; a positive click's mask is a superset of ``prev_mask`` that
        contains the click. One exception resolves an ambiguous box: a negative click at the core
        of the mask on a slice with a ``box`` (at least half as deep inside as the component's
        centre) gives the best of SAM's multimask outputs for the box and all points that honours
        every point (e.g. the myocardial ring instead of the LV cavity), when one does.
    """
    from .results import Prediction

    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    point_labels = np.asarray(point_labels, dtype=np.int64).reshape(-1)
    if points.shape[0] == 0 or points.shape[0] != point_labels.shape[0]:
        raise ValueError(
            f"need one label per point and at least one point; got {points.shape[0]} "
            f"points and {point_labels.shape[0]} labels"
        )
    h, w = session.shape[1:]
    cx = int(np.clip(round(points[-1, 0]), 0, w - 1))
    cy = int(np.clip(round(points[-1, 1]), 0, h - 1))
    positive = bool(point_labels[-1])
    prev = None if prev_mask is None else np.asarray(prev_mask, dtype=bool)
    if prev is not None and not prev.any():
        prev = None
    if prev is None and positive and box is None and prior_mask is not None and np.any(prior_mask):
        prior = np.asarray(prior_mask, dtype=bool)
        pos = points[point_labels == 1]
        pb = mask_bbox(prior, box_margin)
        eb = np.clip(
            [
                min(pb[0], pos[:, 0].min() - box_margin),
                min(pb[1], pos[:, 1].min() - box_margin),
                max(pb[2], pos[:, 0].max() + box_margin),
                max(pb[3], pos[:, 1].max() + box_margin),
            ],
            0,
            [w - 1, h - 1, w - 1, h - 1],
        )
        pred = session.predict_full(
            z,
            box=eb,
            points=points,
            point_labels=point_labels,
            mask_input=mask_to_logits(prior, session),
        )
        mask = _component_at(pred.mask, cx, cy)
        if not mask.any():
            mask = _smallest_containing(session, z, cx, cy, positive_only=True)
        return Prediction(mask, pred.score, pred.low_res_logits)
    if prev is None:
        if box is None and not point_labels.any():
            # only negative clicks on an empty slice: nothing to remove
            return Prediction(
                np.zeros((h, w), bool), 0.0, mask_to_logits(np.zeros((h, w)), session)
            )
        pred = session.predict_full(z, box=box, points=points, point_labels=point_labels)
        mask = pred.mask
        if positive and not mask[cy, cx]:
            mask = mask | _smallest_containing(session, z, cx, cy, positive_only=True)
        return Prediction(mask, pred.score, pred.low_res_logits)
    if not positive and box is not None and _at_core(prev, cx, cy):
        # a negative click at the centre of a box slice's mask: the box meant another object
        # (e.g. the myocardial ring around the LV cavity it returned); the slice takes the best
        # of SAM's outputs that honours every click, even where that is not inside the old mask
        other = _consistent_output(session, z, box, points, point_labels)
        if other is not None:
            return other
    eff_box = np.asarray(box, dtype=np.float64) if box is not None else mask_bbox(prev, box_margin)
    pos = points[point_labels == 1]
    if pos.size:  # a positive click outside the box widens it
        eff_box = np.array(
            [
                min(eff_box[0], pos[:, 0].min() - box_margin),
                min(eff_box[1], pos[:, 1].min() - box_margin),
                max(eff_box[2], pos[:, 0].max() + box_margin),
                max(eff_box[3], pos[:, 1].max() + box_margin),
            ]
        )
        eff_box = np.clip(eff_box, 0, [w - 1, h - 1, w - 1, h - 1])
    logits = session.known_logits(z, prev)
    if logits is None:
        logits = mask_to_logits(prev, session)
    pred = session.predict_full(
        z, box=eff_box, points=points, point_labels=point_labels, mask_input=logits
    )
    if positive:
        add = _component_at(pred.mask, cx, cy)
        if not add.any():  # the decoder ignored the click: ask without the mask prompt
            p2 = session.predict_full(z, box=eff_box, points=points, point_labels=point_labels)
            add = _component_at(p2.mask, cx, cy)
        if not add.any():
            add = _smallest_containing(session, z, cx, cy, positive_only=True)
        mask = prev | add
        mask[cy, cx] = True
    else:
        mask = prev & pred.mask
        if mask[cy, cx]:  # the leak is still there: try without the mask prompt
            mask = (
                prev
                & session.predict_full(
                    z, box=eff_box, points=points, point_labels=point_labels
                ).mask
            )
        if mask[cy, cx]:  # remove the region the click lies in, as SAM sees it, if it is a part
            region = _smallest_containing(session, z, cx, cy, positive_only=True) & prev
            if region.any() and region.sum() < 0.5 * prev.sum():
                mask = prev & ~region
        part = _component_at(prev, cx, cy)
        if (
            box is None
            and not point_labels.any()
            and part.any()
            and int((part & ~mask).sum()) < 0.25 * int(part.sum())
        ):
            # a slice without positive prompts that the decoder only nicks: a click at the centre
            # of a part (as far from its edge as the part's own centre) removes that part
            from scipy.ndimage import distance_transform_edt

            dist = distance_transform_edt(np.pad(part, 1))[1:-1, 1:-1]
            if dist[cy, cx] >= 0.5 * dist.max():
                mask = mask & ~part
        if mask[cy, cx]:
            mask = mask & ~_disc((h, w), (cx, cy), 3.0)
    return Prediction(mask, pred.score, pred.low_res_logits)


def _at_core(mask: np.ndarray, cx: int, cy: int) -> bool:
    """Whether (cx, cy) lies in the core of its component of ``mask``: at least half as far from
    the component's edge as the component's own centre (and >= 2 px)."""
    from scipy.ndimage import distance_transform_edt

    part = _component_at(mask, cx, cy)
    if not part.any():
        return False
    dist = distance_transform_edt(np.pad(part, 1))[1:-1, 1:-1]
    return float(dist[cy, cx]) >= max(0.5 * float(dist.max()), 2.0)


def _consistent_output(
    session: Session,
    z: int,
    box: np.ndarray | list[float],
    points: np.ndarray,
    point_labels: np.ndarray,
    min_area: int = 10,
) -> Prediction | None:
    """The highest-scoring of SAM's multimask outputs for ``box`` + ``points`` (no mask prompt)
    that contains every positive point, excludes every negative one and has >= ``min_area``
    pixels; None when none does (or the model has a single output)."""
    n = int(getattr(session.model, "num_mask_outputs", 1) or 1)
    h, w = session.shape[1:]
    xy = np.clip(np.round(points).astype(int), 0, [w - 1, h - 1])
    best = None
    for k in range(n if n > 1 else 0):
        try:
            p = session.predict_full(
                z, box=box, points=points, point_labels=point_labels, mask_output=k
            )
        except ValueError:
            break
        inside = p.mask[xy[:, 1], xy[:, 0]]
        if (
            int(p.mask.sum()) >= min_area
            and np.all(inside == (point_labels == 1))
            and (best is None or p.score > best.score)
        ):
            best = p
    return best


def _smallest_containing(
    session: Session, z: int, cx: int, cy: int, positive_only: bool
) -> np.ndarray:
    """The smallest of SAM's multimask outputs for a single positive point at (cx, cy) that
    contains it (a 2 px disc when none does)."""
    h, w = session.shape[1:]
    best = None
    n = int(getattr(session.model, "num_mask_outputs", 1) or 1)
    for k in range(n):
        try:
            m = session.predict_full(z, points=[[cx, cy]], point_labels=[1], mask_output=k).mask
        except ValueError:
            break
        if m[cy, cx] and (best is None or m.sum() < best.sum()):
            best = m
    return best if best is not None else _disc((h, w), (cx, cy), 2.0)


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
) -> Iterator[PropagationStep]:
    """Propagate the object from slice z outward, only as far as the change reaches.

    Each direction walks slice by slice like :meth:`Session.propagate` (previous mask's box +
    ``box_margin``, its low-res logits as mask prompt when ``use_mask_prompt``, ``max_step_px``)
    and stops: before a keyframe (never yielded, so never overwritten); after ``agree_slices``
    consecutive slices whose new mask has IoU >= ``agree_iou`` with the existing one; at a stop rule
    of :meth:`Session.propagate` (when the existing object continues there, only the ``"area"``
    rule ends it: the object vanished, and the existing masks up to the next keyframe are
    cleared); or at the volume's end / ``max_distance``. Where a keyframe lies further on within the
    existing object, the new mask is blended with the existing one (:func:`sdf_blend`, weighted by
    the distance to the two keyframes). If slice z's mask is empty (a negative click removed it),
    the existing masks on the side away from the object are cleared up to the next keyframe.

    Args:
        z: the corrected (or first prompted) slice.
        masks: slice -> (Y, X) bool mask of the current object (slice z's is the start).
        keyframes: the slices the user prompted.

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
        zz, steps, agree = z, 0, 0
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
                if reason:
                    yield PropagationStep(
                        zz, empty, d, pred.score, done, total, stopped=True, reason=reason
                    )
                    break
                grow, shrink = new, ~new
            else:
                # carry only the change: what the prediction adds (removes) within a few px of
                # what the previous slice's correction added (removed)
                grow = (new & ~existing) & _dilate(grow, reach)
                shrink = (existing & ~new) & _dilate(shrink, reach)
                new = (existing | grow) & ~shrink
                if int(grow.sum()) + int(shrink.sum()) < min_area or not new.any():
                    break  # the change has died out (or would wipe the slice): keep the rest
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
    ) -> np.ndarray:
        """Refine slice z after a click (the last of ``points``), given its previous (Y, X) mask:
        see :func:`samed.engine.interactive.refine_slice`. Returns the (Y, X) bool mask (a
        negative click's is inside ``prev_mask``; a positive click's contains it)."""
        z = self._check_z(z)  # type: ignore[attr-defined]
        pred = refine_slice(
            self,
            z,
            box=box,
            points=np.asarray(points),
            point_labels=np.asarray(point_labels),
            prev_mask=prev_mask,
            prior_mask=prior_mask,
        )
        self.remember_logits(z, pred.mask, pred.low_res_logits)  # type: ignore[attr-defined]
        prev = np.zeros(self.shape[1:], bool) if prev_mask is None else np.asarray(prev_mask, bool)
        self._change = (z, _mask_digest(pred.mask), prev, pred.mask)
        return pred.mask

    def last_change(self, z: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(mask before, mask after) of the last :meth:`refine` if it gave slice z ``mask``."""
        c = getattr(self, "_change", None)
        if c is None or c[0] != int(z) or c[1] != _mask_digest(mask):
            return None
        return c[2], c[3]

    def repropagate(
        self, z: int, masks: dict[int, np.ndarray], keyframes: Iterable[int], **kwargs: object
    ) -> Iterator[PropagationStep]:
        """Propagate from slice z only as far as the change reaches, never over ``keyframes``
        (the prompted slices): see :func:`samed.engine.interactive.repropagate`."""
        return repropagate(self, z, masks, frozenset(int(k) for k in keyframes), **kwargs)  # type: ignore[arg-type]
