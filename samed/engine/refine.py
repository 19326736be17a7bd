"""A corrective click on one slice (issue #17): :func:`refine_slice` and the edits behind it.

A click re-predicts its slice from everything known about it (its box, or the current mask's box;
all its points; its current low-resolution logits as SAM's mask prompt), then enforces the
click's meaning with the least change that honours it:

* a **negative** click never grows the mask and removes only the region it lies in: of the
  decoder's answers (with the mask prompt, and each output without it) the one that takes the
  click out with the smallest removal connected to the click; where none does, the lobe of the
  mask the click lies in (cut at a neck narrower than the click's depth), SAM's region at the
  click, or a disc as deep as the click;
* a **positive** click never wipes the rest of the slice: the previous mask is kept and the
  clicked region added: what the decoder adds with the mask prompt, where at least one of its
  other answers (the single and each multimask output without the mask prompt) adds it too;
  where none contains the click, SAM's smallest region for the click alone, else the pixels the
  mask-prompted logits rate at least as likely as the click, connected to it, within the box and
  1.5x the click's distance from the mask (``_logit_region``; before session 11 a 2 px disc).
  A positive click beyond the object's end is predicted from the neighbouring slice and tapered
  to no more than that slice's area (:func:`tapered`).

The logits remembered for an edited slice agree with its final mask, so a re-propagation's mask
prompt carries the edit (:func:`samed.engine.interactive.repropagate`).

Conventions as in :mod:`samed.engine.session`: slice masks (Y, X) bool, points (x, y) and boxes
(x0, y0, x1, y1) in slice pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .hollow import hole_of, is_hollow, ring_around, ring_in_box, wall_thickness
from .preprocess import _dilate, mask_bbox

if TYPE_CHECKING:  # pragma: no cover
    from .session import Prediction, Session

__all__ = ["MASK_LOGIT", "mask_to_logits", "refine_slice"]

#: magnitude of the logits a binary mask is turned into when no decoder logits are known
MASK_LOGIT = 8.0

#: a negative click reads as "the wall around this core" only this close to the core's centre
#: (its distance from the mask's edge, as a share of the centre's): a click at the centre of
#: what a box returned, not at a leak that a loose box let in (docs/BENCHMARKS.md, session 9)
WALL_CLICK_DEPTH = 0.8

#: a negative click off the core removes only within this many times its depth (its distance to
#: the mask's edge) of the click: on a slice the user prompted positively (box or positive point)
#: and on one propagation reached (wider there: a propagated leak can be a whole lobe); measured
#: on bench/bench_interactive.py (docs/BENCHMARKS.md, sessions 9 and 11)
PROMPTED_REMOVAL_REACH = 1.5
UNPROMPTED_REMOVAL_REACH = 2.5


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
    object_box: np.ndarray | list[float] | None = None,
    object_wall: float | None = None,
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
            A hollow ``prior_mask`` (:func:`samed.engine.hollow.is_hollow`) also tells a negative
            click at the core of this slice's mask that the object is a wall around that core.
        object_box: the box the user drew for this object on another slice (XYXY px; used when
            this slice has none): a negative click at the core of a mask it encloses with room
            to spare means the wall around it (see below).
        object_wall: the wall thickness (px) the object's box slice says it has
            (:func:`samed.engine.hollow.box_wall`; used when this slice has no box and no hollow
            neighbour): a negative click at the core of this slice's mask, when that mask is one
            blob, then gives a wall that thick around it.

    Returns:
        A :class:`~samed.engine.Prediction`. A negative click's mask is a subset of ``prev_mask``
        that excludes the click; a positive click's mask is a superset of ``prev_mask`` that
        contains the click. One exception resolves an ambiguous box: a negative click at the core
        of the mask on a slice with a ``box`` (at least half as deep inside as the component's
        centre) gives the best of SAM's multimask outputs for the box and all points that honours
        every point, when one does. Before that, a hollow object is recognised (the myocardial
        ring around the LV cavity a box returns; :mod:`samed.engine.hollow`): when the clicked
        core is (nearly) the whole mask, its neighbour's mask is hollow, the slice takes a wall
        as thick as the neighbour's around the core; else when the slice's box (or
        ``object_box``) encloses the core with room on every side, the box's inscribed ellipse
        without the core; else, given ``object_wall``, a wall that thick around the core. A
        positive click on a hollow mask never fills its hole unless it lies in it; a negative
        click in a wall's outer part thins it near the click (what lies as far from the core as
        the click, or farther). A negative click off the core removes only pixels within 1.5x
        its depth (distance to the mask's edge) of it on a slice with a box or positive points,
        within 2.5x on any other slice.
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
        else:  # past the object's end it tapers: no larger than the slice it extends
            full = full_logits(session, pred.low_res_logits)
            mask = tapered(mask, full, int(prior.sum()), (cx, cy))
        return Prediction(mask, pred.score, _logits_for(session, mask, pred.low_res_logits))
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
    if not positive and _at_core(prev, cx, cy, WALL_CLICK_DEPTH):
        wall = _wall_around(
            prev, cx, cy, box if box is not None else object_box, prior_mask, object_wall
        )
        if wall is not None and _honours(wall, points, point_labels):
            return Prediction(wall, 1.0, mask_to_logits(wall, session))
    if not positive and prev[cy, cx] and is_hollow(prev):
        # a negative click on a wall: the wall is not there; take it away around the click, as
        # deep as the click lies in it (the decoder answers walls with what fills them), but
        # keep the 1 px lining of its core, so that it stays a wall
        from scipy.ndimage import distance_transform_edt

        depth = float(distance_transform_edt(np.pad(prev, 1))[1:-1, 1:-1][cy, cx])
        hole = hole_of(prev)
        lining = _dilate(hole, 1) & prev  # kept: the wall stays closed around its core
        cut = _disc((h, w), (cx, cy), max(1.5, depth)) & ~lining
        from_core = distance_transform_edt(~hole)
        if from_core[cy, cx] > depth:
            # in the wall's outer part: the wall is thinner here; what lies as far from the core
            # as the click, or farther, goes too, along the wall near the click
            reach = 2.0 * wall_thickness(prev) + depth
            cut |= (from_core >= from_core[cy, cx] - 0.5) & _disc((h, w), (cx, cy), reach)
        mask = prev & ~cut
        if mask[cy, cx]:  # the click is on the lining itself
            mask[cy, cx] = False
        return Prediction(mask, 1.0, mask_to_logits(mask, session))
    if not positive and box is not None and _at_core(prev, cx, cy, WALL_CLICK_DEPTH):
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
        add = _agreed_addition(session, z, prev, pred.mask, eff_box, points, point_labels, cx, cy)
        if not add.any():  # no answer contains the click: SAM's region at the click
            add = _smallest_containing(session, z, cx, cy, positive_only=True, fallback=False)
        if not add.any():  # nor any region of SAM's for the click alone: what the logits say
            add = _logit_region(session, pred.low_res_logits, prev, eff_box, cx, cy)
        if is_hollow(prev):  # a click on the wall never fills the core it surrounds
            hole = hole_of(prev)
            if not hole[cy, cx]:
                add = add & ~hole
        mask = prev | add
        mask[cy, cx] = True
    else:
        mask = _least_removal(session, z, prev, pred.mask, eff_box, points, point_labels, cx, cy)
        if not _at_core(prev, cx, cy, WALL_CLICK_DEPTH):  # a leak: remove only near the click
            prompted = box is not None or bool(point_labels.any())
            reach = PROMPTED_REMOVAL_REACH if prompted else UNPROMPTED_REMOVAL_REACH
            mask = _bounded_removal(prev, mask, cx, cy, reach)
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
            # of a part (as far from its edge as the part's own centre) removes the disc as deep
            # as the click, or the whole part when that disc covers most of it (a compact blob)
            from scipy.ndimage import distance_transform_edt

            dist = distance_transform_edt(np.pad(part, 1))[1:-1, 1:-1]
            if dist[cy, cx] >= 0.5 * dist.max():
                disc = _disc((h, w), (cx, cy), float(dist[cy, cx])) & part
                mask = mask & ~(part if disc.sum() >= 0.6 * part.sum() else disc)
        if mask[cy, cx]:
            mask = mask & ~_disc((h, w), (cx, cy), 3.0)
    logits = pred.low_res_logits if positive else _logits_for(session, mask, pred.low_res_logits)
    return Prediction(mask, pred.score, logits)


def _decoder_answers(
    session: Session,
    z: int,
    box: np.ndarray | list[float] | None,
    points: np.ndarray,
    point_labels: np.ndarray,
) -> list[np.ndarray]:
    """The decoder's (Y, X) bool answers for the prompts without a mask prompt: the single
    output, then each multimask output (none for a single-output model)."""
    preds = session.predict_outputs(z, box=box, points=points, point_labels=point_labels)
    return [p.mask for p in (preds if len(preds) > 2 else preds[:1])]


def _agreed_addition(
    session: Session,
    z: int,
    prev: np.ndarray,
    first: np.ndarray,
    box: np.ndarray,
    points: np.ndarray,
    point_labels: np.ndarray,
    cx: int,
    cy: int,
) -> np.ndarray:
    """A positive click's addition to ``prev``: the pixels outside ``prev`` that at least two of
    the decoder's answers containing the click add (``first``, the answer with the mask prompt,
    must be one of them when it contains the click; the others are the single and each multimask
    output without the mask prompt), connected to the click. One answer alone tends to spill into
    a neighbour (a lesion's surroundings, a kidney's hilum); where two agree is the miss the click
    points at. With a single answer containing the click, its addition; with none, empty (the
    caller falls back to SAM's region at the click).

    Measured on ``bench/bench_interactive.py`` (41 structures, 6 held-out sets, base LiteMedSAM)
    against ``first``'s whole component: final Dice 0.706 -> 0.710, AUC 0.688 -> 0.692, clicks
    not losing > 0.01 96.6 % -> 97.1 % (docs/BENCHMARKS.md, session 7)."""
    answers = [first, *_decoder_answers(session, z, box, points, point_labels)]
    answers = [a for a in answers if a[cy, cx]]
    if not answers:
        return np.zeros_like(prev)
    votes = np.sum([a & ~prev for a in answers], axis=0)
    add = votes >= min(2, len(answers))
    if first[cy, cx]:
        add &= first
    add[cy, cx] = True
    return _component_at(add, cx, cy)


def _logits_for(session: Session, mask: np.ndarray, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (the decoder's low-res answer) made to agree with the final ``mask`` where an
    edit (a removed lobe, an added region) changed it: there the logits of the mask itself, so a
    re-propagation's mask prompt carries the edit rather than the decoder's unedited answer."""
    own = mask_to_logits(mask, session).to(logits.device, logits.dtype)
    lo = logits.reshape(own.shape)
    return torch.where((lo > 0) != (own > 0), own, lo).reshape(logits.shape)


def _least_removal(
    session: Session,
    z: int,
    prev: np.ndarray,
    first: np.ndarray,
    box: np.ndarray,
    points: np.ndarray,
    point_labels: np.ndarray,
    cx: int,
    cy: int,
) -> np.ndarray:
    """A negative click's mask: of the decoder's answers (``first``, with the mask prompt; the
    single and each multimask output without it) the one that removes the clicked pixel from
    ``prev`` with the least change, only the removed region connected to the click taken away
    (a negative click corrects the leak it lies in, not far-away parts). ``prev`` itself (the
    click still inside) when no answer removes the click."""
    best: np.ndarray | None = None
    for cand in [first, *_decoder_answers(session, z, box, points, point_labels)]:
        if cand[cy, cx]:
            continue
        removed = _component_at(prev & ~cand | _disc(prev.shape, (cx, cy), 0.5) & prev, cx, cy)
        if best is None or int(removed.sum()) < int(best.sum()):
            best = removed
    if best is not None and prev[cy, cx]:
        lobe = _lobe_at(prev, cx, cy)
        if lobe.any() and int(lobe.sum()) < int(best.sum()):
            best = lobe
    return prev.copy() if best is None else prev & ~best


def _bounded_removal(
    prev: np.ndarray, mask: np.ndarray, cx: int, cy: int, reach: float = 1.5
) -> np.ndarray:
    """``mask`` (a negative click's answer) with the removal kept near the click: a click off
    the core of the object marks a leak there, not the object; only the removed pixels within
    ``reach`` x the click's depth in ``prev`` (its distance to the mask's edge) go. (A loose
    box's answers remove most of the object for a click in its leak: docs/BENCHMARKS.md,
    session 9; on propagated slices too: session 11.)"""
    from scipy.ndimage import distance_transform_edt

    removed = prev & ~mask
    depth = float(distance_transform_edt(np.pad(prev, 1))[1:-1, 1:-1][cy, cx])
    return prev & ~(removed & _disc(prev.shape, (cx, cy), max(reach * depth, 2.0)))


def _lobe_at(mask: np.ndarray, cx: int, cy: int) -> np.ndarray:
    """The lobe of ``mask`` around (cx, cy): its component cut at necks narrower than the
    click's own depth (a morphological opening by a disc of ~0.7x the click's distance to the
    edge, the opened core at the click grown back within the mask). The whole component when
    it has no such neck (or the click is at its rim)."""
    from scipy import ndimage

    part = _component_at(mask, cx, cy)
    if not part.any():
        return part
    ys, xs = np.nonzero(part)
    pad = 2
    y0, x0 = max(ys.min() - pad, 0), max(xs.min() - pad, 0)
    y1, x1 = min(ys.max() + pad + 1, mask.shape[0]), min(xs.max() + pad + 1, mask.shape[1])
    crop = part[y0:y1, x0:x1]
    depth = float(ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1][cy - y0, cx - x0])
    r = 0.7 * depth
    if r < 2.0:
        return part
    disc = _disc((2 * int(r) + 1, 2 * int(r) + 1), (int(r), int(r)), r)
    core = _component_at(ndimage.binary_opening(crop, structure=disc), cx - x0, cy - y0)
    if not core.any():
        return part
    lobe = ndimage.binary_dilation(core, structure=disc) & crop
    out = np.zeros_like(part)
    out[y0:y1, x0:x1] = lobe
    return out


def _at_core(mask: np.ndarray, cx: int, cy: int, share: float = 0.5) -> bool:
    """Whether (cx, cy) lies in the core of its component of ``mask``: at least ``share`` as far
    from the component's edge as the component's own centre (and >= 2 px)."""
    from scipy.ndimage import distance_transform_edt

    part = _component_at(mask, cx, cy)
    if not part.any():
        return False
    dist = distance_transform_edt(np.pad(part, 1))[1:-1, 1:-1]
    return float(dist[cy, cx]) >= max(share * float(dist.max()), 2.0)


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
    h, w = session.shape[1:]
    xy = np.clip(np.round(points).astype(int), 0, [w - 1, h - 1])
    best = None
    preds = session.predict_outputs(z, box=box, points=points, point_labels=point_labels)
    for p in preds[1:] if len(preds) > 2 else []:
        inside = p.mask[xy[:, 1], xy[:, 0]]
        if (
            int(p.mask.sum()) >= min_area
            and np.all(inside == (point_labels == 1))
            and (best is None or p.score > best.score)
        ):
            best = p
    return best


def _smallest_containing(
    session: Session, z: int, cx: int, cy: int, positive_only: bool, fallback: bool = True
) -> np.ndarray:
    """The smallest of SAM's multimask outputs for a single positive point at (cx, cy) that
    contains it (when none does, a 2 px disc, or an empty mask when not ``fallback``)."""
    h, w = session.shape[1:]
    best = None
    preds = session.predict_outputs(z, points=[[cx, cy]], point_labels=[1])
    for p in preds[1:]:
        m = p.mask
        if m[cy, cx] and (best is None or m.sum() < best.sum()):
            best = m
    if best is not None:
        return best
    return _disc((h, w), (cx, cy), 2.0) if fallback else np.zeros((h, w), bool)


def full_logits(session: Session, logits: torch.Tensor) -> np.ndarray:
    """(Y, X) float32 logits on slice pixels of (L, L) low-res decoder ``logits``."""
    low = torch.as_tensor(logits).reshape(1, 1, *logits.shape[-2:]).float()
    return session.geometry.upscale(low)[0, 0].numpy()


def tapered(
    mask: np.ndarray, logits: np.ndarray, cap: int, at: tuple[int, int] | None = None
) -> np.ndarray:
    """``mask`` (Y, X) shrunk to at most ``cap`` pixels by raising the logit threshold: the
    pixels of ``mask`` whose (Y, X) ``logits`` exceed the lowest threshold that leaves <= ``cap``
    (with ``at`` = (x, y): the component at that pixel, which is kept). An object past its end
    tapers: what the decoder is least sure of goes first. ``mask`` itself when it is small
    enough (or ``at``'s pixel would be lost)."""
    mask = np.asarray(mask, dtype=bool)
    if int(mask.sum()) <= cap:
        return mask

    def part(t: float) -> np.ndarray:
        m = mask & (logits > t)
        return _component_at(m, at[0], at[1]) if at is not None else m

    vals = logits[mask]
    lo, hi = float(vals.min()), float(vals.max() if at is None else logits[at[1], at[0]])
    if hi <= lo:
        return mask
    best = None
    for _ in range(20):  # bisection on the threshold: the area falls as it rises
        t = 0.5 * (lo + hi)
        m = part(t)
        if m.any() and int(m.sum()) <= cap:
            best, hi = m, t
        else:
            lo = t
    return mask if best is None else best


def _logit_region(
    session: Session,
    logits: torch.Tensor,
    prev: np.ndarray,
    box: np.ndarray,
    cx: int,
    cy: int,
) -> np.ndarray:
    """A positive click's addition where none of the decoder's answers contains the click: the
    pixels outside ``prev`` that the decoder's mask-prompted ``logits`` rate at least as likely
    as the clicked pixel, connected to the click, inside ``box`` and within 1.5x the click's
    distance from ``prev`` (the miss the click points at lies between ``prev`` and the click's
    far side: the simulated user clicks the centre of the miss). Empty when ``prev`` is empty.
    """
    from scipy.ndimage import distance_transform_edt

    if not prev.any():
        return np.zeros_like(prev)
    full = full_logits(session, logits)
    reach = 1.5 * float(distance_transform_edt(~prev)[cy, cx])
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    inside = np.zeros_like(prev)
    inside[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
    near = _disc(prev.shape, (cx, cy), max(reach, 2.0))
    cand = (full >= full[cy, cx]) & ~prev & inside & near
    cand[cy, cx] = True
    return _component_at(cand, cx, cy)


def _wall_around(
    prev: np.ndarray,
    cx: int,
    cy: int,
    box: np.ndarray | list[float] | None,
    prior: np.ndarray | None,
    thickness: float | None = None,
) -> np.ndarray | None:
    """The hollow object a negative click at (cx, cy), the core of ``prev``, points at (see
    :func:`refine_slice`), or None when the slice does not look like one: the clicked component
    must be >= 80 % of the mask; then a wall as thick as a hollow ``prior`` (the neighbour's
    mask) around it, else the ellipse of a ``box`` that encloses it with room on every side,
    else a wall ``thickness`` px thick (the object's box slice's, :func:`~.hollow.box_wall`)."""
    core = _component_at(prev, cx, cy)
    if int(core.sum()) < 0.8 * int(prev.sum()) or is_hollow(prev):
        return None  # not one blob (or already a wall: a click on it corrects the wall)
    if prior is not None and is_hollow(prior):
        wall = ring_around(core, wall_thickness(prior))
    elif box is not None:
        wall = ring_in_box(box, core)
    elif thickness is not None:
        wall = ring_around(core, thickness)
    else:
        return None
    return wall if int(wall.sum()) >= 10 else None


def _honours(mask: np.ndarray, points: np.ndarray, point_labels: np.ndarray) -> bool:
    """Whether a (Y, X) mask contains every positive point and no negative one."""
    h, w = mask.shape
    xy = np.clip(np.round(points).astype(int), 0, [w - 1, h - 1])
    return bool(np.all(mask[xy[:, 1], xy[:, 0]] == (point_labels == 1)))
