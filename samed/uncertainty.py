"""Where is the model unsure: per-voxel uncertainty maps for automatic and propagated results.

The maths is numpy only (:func:`entropy_map`, :func:`margin_map`, :func:`disagreement_map`,
:func:`case_score`, :func:`rank_slices`, :func:`roc_auc`); :func:`automatic_uncertainty` runs an
automatic adapter through a :class:`samed.engine.Session` (torch, imported when called).

Methods (``method=``), measured on ACDC ``val`` by ``bench/bench_uncertainty.py``:

``entropy``  normalised Shannon entropy of the softmax of one pass, in [0, 1] (free: the
             automatic pass already computes the probabilities).
``margin``   1 - (p_top1 - p_top2) of one pass, in [0, 1] (free).
``flip``     members = the pass on the slice and on its left-right mirror (2 encoder passes);
             the map is :func:`disagreement_map` of the members' probabilities (0 exactly
             where they agree).

Arrays are (Z, Y, X) on the volume's own slice grid (axial ``array[z]``), float32 in [0, 1].
An adapter that records a training spacing / orientation is run as
:meth:`samed.engine.Session.automatic` runs it (canvas at that spacing, slices flipped to its
orientation, :mod:`samed.engine.canvas`), so its labels are the same; ``flip`` then mirrors the
canvas. Post-processing uses the session's orientation (:meth:`samed.engine.Session.postprocess`).

:func:`propagated_uncertainty` does the same for one box-prompted object carried through the
volume (:meth:`samed.engine.Session.propagate`, the plugin's *Propagate*): each slice's object
probability is recomputed from the prompt propagation gave it, and the two-class (object /
background) probabilities go through the same maps; default ``margin``
(:data:`PROPAGATED_DEFAULT`, measured by ``bench/bench_uncertainty_propagated.py``).

Python::

    from samed.uncertainty import automatic_uncertainty
    res = automatic_uncertainty(session)            # session over a model with an automatic adapter
    res.labels, res.uncertainty, res.score, res.ranked_slices(5)
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "UncertaintyResult",
    "entropy_map",
    "margin_map",
    "disagreement_map",
    "slice_scores",
    "case_score",
    "rank_slices",
    "roc_auc",
    "foreground_band",
    "automatic_uncertainty",
    "propagated_uncertainty",
    "PROPAGATED_DEFAULT",
]

METHODS = ("entropy", "margin", "flip")
#: chosen from bench/bench_uncertainty.py (docs/BENCHMARKS.md "Uncertainty"; ACDC val, 8 volumes,
#: voxel "is wrong" AUROC over every voxel: flip 0.957, entropy 0.879, margin 0.827; cost 1.9-2.1x
#: against 1.0x for entropy): flip ranks errors best; entropy is the free alternative
DEFAULT_METHOD = "flip"


def _check_probs(probs: np.ndarray, what: str = "probs") -> np.ndarray:
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim < 2 or p.shape[0] < 2:
        raise ValueError(f"{what} must be (C, ...) class probabilities with C >= 2; got {p.shape}")
    return p


def entropy_map(probs: np.ndarray) -> np.ndarray:
    """Normalised Shannon entropy over classes.

    Args:
        probs: (C, ...) class probabilities (summing to 1 over axis 0), C >= 2.

    Returns:
        (...) float32 in [0, 1]: 0 = one class has probability 1, 1 = uniform.
    """
    p = _check_probs(probs)
    h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(0)
    return np.clip(h / np.log(p.shape[0]), 0.0, 1.0).astype(np.float32)


def margin_map(probs: np.ndarray) -> np.ndarray:
    """1 - (largest - second largest class probability); (C, ...) -> (...) float32 in [0, 1]."""
    p = _check_probs(probs)
    top2 = np.partition(p, p.shape[0] - 2, axis=0)[-2:]
    return np.clip(1.0 - (top2[1] - top2[0]), 0.0, 1.0).astype(np.float32)


def disagreement_map(member_probs: np.ndarray) -> np.ndarray:
    """Disagreement of ensemble / test-time-augmentation members.

    The mean total-variation distance of each member's class probabilities to the members'
    mean, scaled to [0, 1] (1 = members are one-hot on different classes), plus, where the
    members' argmax labels differ, the normalised entropy of the mean (so a split vote always
    ranks above a soft agreement). It is exactly 0 wherever all members give the same
    probabilities, and 0 for a single member.

    Args:
        member_probs: (M, C, ...) probabilities of M members (M >= 1, C >= 2).

    Returns:
        (...) float32 in [0, 1].
    """
    mp = np.asarray(member_probs, dtype=np.float32)
    if mp.ndim < 3 or mp.shape[1] < 2:
        raise ValueError(f"member_probs must be (M, C, ...) with C >= 2; got {mp.shape}")
    m = mp.shape[0]
    if m == 1:
        return np.zeros(mp.shape[2:], np.float32)
    mean = mp.mean(0)
    tv = 0.5 * np.abs(mp - mean[None]).sum(1).mean(0)  # in [0, 1 - 1/M]
    tv = tv / (1.0 - 1.0 / m)
    labels = mp.argmax(1)
    split = (labels != labels[0][None]).any(0)
    out = 0.5 * tv + 0.5 * np.where(split, entropy_map(mean), 0.0)
    out[(mp == mp[:1]).all((0, 1))] = 0.0  # identical members: exactly 0 (no float residue)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def foreground_band(labels: np.ndarray, px: int = 5) -> np.ndarray:
    """Voxels within ``px`` pixels (in-plane, per slice) of any foreground label: (Z, Y, X) bool."""
    from scipy.ndimage import binary_dilation

    fg = np.asarray(labels) > 0
    if px <= 0 or not fg.any():
        return fg
    st = np.zeros((1, 3, 3), bool)
    st[0] = True
    return binary_dilation(fg, structure=st, iterations=px)


def slice_scores(uncertainty: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Per-slice review score: summed uncertainty of slice z (in voxels), (Z, Y, X) -> (Z,).

    A sum (not a mean) so that a slice with a large unsure region ranks above a slice with a
    few unsure pixels; ``labels`` is accepted for symmetry and unused."""
    u = np.asarray(uncertainty, dtype=np.float32)
    if u.ndim != 3:
        raise ValueError(f"uncertainty must be (Z, Y, X); got shape {u.shape}")
    return u.reshape(u.shape[0], -1).sum(1, dtype=np.float64)


def case_score(uncertainty: np.ndarray, labels: np.ndarray) -> float:
    """Case-level uncertainty: summed uncertainty / number of predicted foreground voxels.

    Roughly "the share of the segmentation that is in doubt"; 0 when the map is 0 and the
    volume's (empty) segmentation is certain; an empty segmentation with uncertain voxels
    scores their sum (as if one voxel were foreground).

    Args:
        uncertainty: (Z, Y, X) map in [0, 1].
        labels: (Z, Y, X) predicted labels (0 = background).
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    lab = np.asarray(labels)
    if u.shape != lab.shape:
        raise ValueError(f"uncertainty {u.shape} and labels {lab.shape} must have one shape")
    return float(u.sum() / max(1, int((lab > 0).sum())))


def rank_slices(uncertainty: np.ndarray, k: int | None = None) -> list[tuple[int, float]]:
    """Slices to review first: ``[(z, score), ...]`` by decreasing :func:`slice_scores`
    (slices scoring 0 are left out); at most ``k``."""
    s = slice_scores(uncertainty)
    order = [int(z) for z in np.argsort(-s, kind="stable") if s[z] > 0]
    return [(z, float(s[z])) for z in order[: k if k is not None else len(order)]]


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (ties count half);
    NaN when one class is absent. Rank-based (Mann-Whitney U), any shape, flattened."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(positives, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and positives {y.shape} must have one size")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


@dataclass
class UncertaintyResult:
    """An automatic segmentation with its uncertainty.

    Attributes:
        labels: (Z, Y, X) int16, post-processed as asked (identical to
            :meth:`samed.engine.Session.automatic` with the same ``postprocess``).
        uncertainty: (Z, Y, X) float32 in [0, 1] (slices not segmented stay 0).
        method: one of :data:`METHODS`.
        score: :func:`case_score` of the map and the labels.
        seconds: wall time of the whole call.
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    method: str
    score: float
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def finish(
        cls,
        labels: np.ndarray,
        uncertainty: np.ndarray,
        method: str,
        t0: float,
        extra: dict[str, Any],
    ) -> UncertaintyResult:
        """The result of a call that started at ``time.perf_counter() == t0``: its
        :func:`case_score` and wall time filled in."""
        return cls(
            labels=labels,
            uncertainty=uncertainty,
            method=method,
            score=case_score(uncertainty, labels),
            seconds=_time.perf_counter() - t0,
            extra=extra,
        )

    def ranked_slices(self, k: int | None = None) -> list[tuple[int, float]]:
        """:func:`rank_slices` of the map."""
        return rank_slices(self.uncertainty, k)


def automatic_uncertainty(
    session: Any,
    method: str = DEFAULT_METHOD,
    *,
    slices: Iterable[int] | None = None,
    postprocess: str | dict | None = "adapter",
    progress: Callable[[int, int], None] | None = None,
    keep_maps: bool = False,
) -> UncertaintyResult:
    """Automatic segmentation plus a per-voxel uncertainty map.

    Args:
        session: a :class:`samed.engine.Session` whose model carries an automatic adapter
            (its embedding cache is used and filled).
        method: one of :data:`METHODS` (``flip`` costs a second encoder pass per slice).
        slices: slice indices (default: all).
        postprocess: as :meth:`samed.engine.Session.automatic`.
        progress: ``progress(done, total)`` after each batch.
        keep_maps: also return every method's map this pass can give in ``extra["maps"]``
            (``entropy``, ``margin`` always; ``flip`` and ``flip_entropy`` with ``flip``).

    Returns:
        An :class:`UncertaintyResult`.

    Raises:
        ValueError: unknown method, or the model has no automatic adapter.
    """
    import time

    import torch

    from .engine.canvas import canvas_logits, session_canvas
    from .engine.preprocess import prepare_slices
    from .postprocess import POSTPROCESS_CHOICES

    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    if isinstance(postprocess, str) and postprocess not in POSTPROCESS_CHOICES:
        raise ValueError(
            f"postprocess={postprocess!r} must be one of {POSTPROCESS_CHOICES} or a mapping"
        )
    adapter = session.model.adapter
    if adapter is None or adapter.mode != "automatic":
        raise ValueError(
            "uncertainty of an automatic result needs an automatic adapter; this model has "
            + ("none" if adapter is None else f"a {adapter.mode} adapter")
        )
    t0 = time.perf_counter()
    model = session.model
    zs = [session._check_z(z) for z in (range(session.shape[0]) if slices is None else slices)]
    geo = session.geometry
    session._check_cache()
    grid = session_canvas(session)  # None: the native grid (no adapter spacing, or unknown)
    raw = np.zeros(session.shape, np.int16)
    names = ["entropy", "margin"] + (["flip", "flip_entropy"] if method == "flip" else [])
    maps = {n: np.zeros(session.shape, np.float32) for n in names} if keep_maps else {}
    unc = np.zeros(session.shape, np.float32)

    def probs_of(emb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, _ = model.decode(emb, multimask_output=True)
        full = geo.upscale(logits)
        # labels from the logits, as Session.automatic: near-equal logits can round to equal
        # float32 probabilities, whose argmax would then differ from the automatic pass's
        probs, top = full.softmax(1).cpu().numpy(), full.argmax(1).cpu().numpy()
        return probs, top  # (B, C, Y, X), (B, Y, X)

    done = 0
    with torch.inference_mode():
        for i in range(0, len(zs), session.batch_size):
            batch = zs[i : i + session.batch_size]
            if grid is not None:  # the adapter's spacing / orientation, as Session.automatic
                lg = canvas_logits(session, batch, grid)
                p, top = lg.softmax(1).numpy(), lg.argmax(1).numpy()
                if method == "flip":
                    pf = canvas_logits(session, batch, grid, mirror=True).softmax(1).numpy()
            else:
                missing = [z for z in batch if not session.is_embedded(z)]
                if missing:
                    session._encode(missing)
                p, top = probs_of(torch.cat([session.embedding(z) for z in batch]))
                if method == "flip":
                    x = prepare_slices(
                        np.ascontiguousarray(session.image[batch][..., ::-1]), model.image_size
                    ).to(model.device)
                    pf = probs_of(model.encode(x).float())[0][..., ::-1]
            if method == "flip":
                members = np.stack([p, pf], 1)  # (B, M, C, Y, X)
            for j, z in enumerate(batch):
                pj = p[j]
                raw[z] = top[j].astype(np.int16)
                e = m = None
                if method == "entropy" or keep_maps:
                    e = entropy_map(pj)
                if method == "margin" or keep_maps:
                    m = margin_map(pj)
                if method == "flip":
                    d = disagreement_map(members[j])
                    unc[z] = d
                    if keep_maps:
                        maps["flip"][z] = d
                        maps["flip_entropy"][z] = entropy_map(members[j].mean(0))
                elif method == "entropy":
                    unc[z] = e
                else:
                    unc[z] = m
                if keep_maps:
                    maps["entropy"][z], maps["margin"][z] = e, m
            done += len(batch)
            if progress is not None:
                progress(done, len(zs))
    labels = session.postprocess(raw, postprocess)  # its orientation: lateral pairs
    extra: dict[str, Any] = {"raw_labels": raw}
    if keep_maps:
        extra["maps"] = maps
    return UncertaintyResult.finish(labels, unc, method, t0, extra)


#: default of :func:`propagated_uncertainty`, chosen by ``bench/bench_uncertainty_propagated.py``
#: (docs/BENCHMARKS.md "Uncertainty of propagated objects"; ACDC val[5:9], 12 structures, voxel
#: "is wrong" AUROC over every voxel: margin 0.812, entropy 0.795, flip 0.794; cost 0.48x against
#: 2.46x of embedding + propagation for flip): the decoder's own margin ranks errors best, free
PROPAGATED_DEFAULT = "margin"


def _prompt_probs(
    model: Any,
    emb: Any,
    geo: Any,
    prompt: dict[str, Any],
    mask_output: int | None,
    mirror_width: int | None = None,
) -> np.ndarray:
    """(Y, X) object probability of one slice's box / point prompt (the decoder call of
    :meth:`samed.engine.Session.predict_full` without a mask prompt); ``mirror_width``: the
    embedding is of the left-right mirrored slice (width W), so the prompt is mirrored."""
    import torch

    from .engine.preprocess import box_to_model, points_to_model

    dev = model.device
    box, points = prompt.get("box"), prompt.get("points")
    labels = prompt.get("point_labels")
    if box is None and points is None:
        raise ValueError("a prompt needs a box and/or points")
    if points is not None:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2).copy()
        labels = np.ones(len(points), np.int64) if labels is None else np.asarray(labels)
    if box is not None:
        box = np.asarray(box, dtype=np.float64).copy()
    if mirror_width is not None:
        w1 = mirror_width - 1
        if box is not None:
            box = np.array([w1 - box[2], box[1], w1 - box[0], box[3]])
        if points is not None:
            points[:, 0] = w1 - points[:, 0]
    boxes_t = None if box is None else torch.as_tensor(box_to_model(box, geo), device=dev)[None]
    pts = None
    if points is not None and len(points):
        p, lab = points_to_model(points, labels, geo)
        if box is None:  # SAM pads point-only prompts with a "not a point" entry
            p = np.concatenate([p, np.zeros((1, 2), np.float32)])
            lab = np.concatenate([lab, [-1]])
        pts = (torch.as_tensor(p, device=dev)[None], torch.as_tensor(lab, device=dev)[None])
    if mask_output is None:
        logits, _ = model.decode(emb, boxes=boxes_t, points=pts)
    else:
        logits, _ = model.decode(emb, boxes=boxes_t, points=pts, multimask_output=True)
        logits = logits[:, mask_output : mask_output + 1]
    full = geo.upscale(logits)
    return torch.sigmoid(full[0, 0].float()).cpu().numpy()


def propagated_uncertainty(
    session: Any,
    masks: np.ndarray | dict[int, np.ndarray],
    seeds: int | Iterable[int],
    method: str = PROPAGATED_DEFAULT,
    *,
    prompts: dict[int, dict[str, Any]] | None = None,
    box_margin: float = 2.0,
    mask_output: int | None = None,
    max_step_px: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    keep_maps: bool = False,
) -> UncertaintyResult:
    """Per-voxel uncertainty of one propagated (prompted) object.

    Every slice z with the object is decoded again with the prompt propagation gave it: the box
    of the neighbouring slice's mask on the side of the nearest seed, grown by ``box_margin``
    (what :meth:`samed.engine.Session.propagate` does without a mask prompt, so the object
    probability is the one behind the mask); a seed slice uses its ``prompts`` entry (the
    user's box / points), else the box of its own mask. With ``max_step_px`` the map is 0
    outside the previous mask dilated by it (propagation cut the object there by rule). The
    members' two-class probabilities (background, object) give the map as for
    :func:`automatic_uncertainty`: ``entropy`` / ``margin`` of one pass, ``flip`` = the pass on
    the slice and on its mirror (a second encoder pass per slice).

    Args:
        session: the :class:`samed.engine.Session` the object was propagated in (its
            embeddings are used and filled).
        masks: the object: (Z, Y, X) bool, or slice index -> (Y, X) bool (an annotator's
            ``masks``).
        seeds: the prompted slice(s) propagation started from (keyframes).
        method: one of :data:`METHODS`.
        prompts: seed slice -> ``{"box": (x0, y0, x1, y1), "points": [(x, y), ...],
            "point_labels": [1 | 0, ...]}`` in slice pixels.
        box_margin, mask_output, max_step_px: as given to ``Session.propagate``.
        progress: ``progress(done, total)`` after each slice.
        keep_maps: also return every method's map in ``extra["maps"]``.

    Returns:
        An :class:`UncertaintyResult`: ``labels`` = the object (Z, Y, X) int16 {0, 1},
        ``uncertainty`` (Z, Y, X) float32 in [0, 1] (0 on slices without the object),
        ``extra["probability"]`` the recomputed (Z, Y, X) object probability (``flip``:
        ``extra["members"]``, (2, Z, Y, X): it and the mirrored pass's).

    Raises:
        ValueError: unknown method, masks of another shape, no seed with the object.
    """
    import time

    import torch

    from .engine.preprocess import _dilate, mask_bbox, prepare_slices

    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    t0 = time.perf_counter()
    shape = tuple(session.shape)
    if isinstance(masks, dict):
        obj = np.zeros(shape, bool)
        for z, m in masks.items():
            obj[session._check_z(z)] = np.asarray(m, dtype=bool)
    else:
        obj = np.asarray(masks, dtype=bool)
        if obj.shape != shape:
            raise ValueError(f"masks shape {obj.shape} must equal the volume's {shape}")
    seed_list = sorted({session._check_z(z) for z in ([seeds] if np.isscalar(seeds) else seeds)})
    seed_list = [z for z in seed_list if obj[z].any()]
    if not seed_list:
        raise ValueError(f"no seed slice among {seeds!r} holds the object")
    prompts = dict(prompts or {})
    zs = [int(z) for z in np.nonzero(obj.any((1, 2)))[0]]
    plan: dict[int, tuple[dict[str, Any], np.ndarray | None]] = {}
    for z in zs:
        if z in seed_list:
            plan[z] = (prompts.get(z) or {"box": mask_bbox(obj[z], box_margin)}, None)
            continue
        s = min(seed_list, key=lambda k: (abs(k - z), k))
        prev = obj[z - (1 if z > s else -1)]
        if not prev.any():  # a gap (an edited slice): the slice's own box
            prev = obj[z]
        allowed = _dilate(prev, int(max_step_px)) if max_step_px is not None else None
        plan[z] = ({"box": mask_bbox(prev, box_margin)}, allowed)
    model, geo = session.model, session.geometry
    width = shape[2]
    prob = np.zeros(shape, np.float32)
    prob_flip = np.zeros(shape, np.float32) if method == "flip" else None
    unc = np.zeros(shape, np.float32)
    names = ["entropy", "margin"] + (["flip"] if method == "flip" else [])
    maps = {n: np.zeros(shape, np.float32) for n in names} if keep_maps else {}
    bs = session.batch_size
    done = 0
    with torch.inference_mode():
        for i in range(0, len(zs), bs):
            batch = zs[i : i + bs]
            missing = [z for z in batch if not session.is_embedded(z)]
            if missing:
                session._encode(missing)
            flipped = None
            if method == "flip":
                x = prepare_slices(
                    np.ascontiguousarray(session.image[batch][..., ::-1]), model.image_size
                ).to(model.device)
                flipped = model.encode(x).float()
            for j, z in enumerate(batch):
                prompt, allowed = plan[z]
                p = _prompt_probs(model, session.embedding(z), geo, prompt, mask_output)
                two = np.stack([1.0 - p, p])
                prob[z] = p
                e = entropy_map(two) if (method == "entropy" or keep_maps) else None
                m = margin_map(two) if (method == "margin" or keep_maps) else None
                d = None
                if flipped is not None:
                    pf = _prompt_probs(
                        model, flipped[j : j + 1], geo, prompt, mask_output, mirror_width=width
                    )[:, ::-1]
                    prob_flip[z] = pf
                    d = disagreement_map(np.stack([two, np.stack([1.0 - pf, pf])]))
                u = {"entropy": e, "margin": m, "flip": d}[method]
                if allowed is not None:
                    u = np.where(allowed, u, 0.0)
                unc[z] = u
                if keep_maps:
                    for name, v in (("entropy", e), ("margin", m), ("flip", d)):
                        if name in maps:
                            maps[name][z] = v if allowed is None else np.where(allowed, v, 0.0)
                done += 1
                if progress is not None:
                    progress(done, len(zs))
    labels = obj.astype(np.int16)
    extra: dict[str, Any] = {"probability": prob, "seeds": seed_list}
    if prob_flip is not None:
        extra["members"] = np.stack([prob, prob_flip])
    if keep_maps:
        extra["maps"] = maps
    return UncertaintyResult.finish(labels, unc, method, t0, extra)
