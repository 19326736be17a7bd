"""Post-processing of automatic (multi-class) label maps.

An automatic adapter predicts every slice on its own, so a structure that is one connected
object in 3D (a cardiac ventricle, the liver) can pick up small islands on slices where it is
absent (apical/basal slices, neighbouring organs with similar contrast). Keeping the largest
3D connected component per class removes them. Whether it helps is a property of the task, so an
adapter records it in ``metadata.json`` under ``"postprocessing"`` (chosen on its validation
split, with the measured effect), and :meth:`samed.engine.Session.automatic` applies what the
adapter recommends unless told otherwise.

A 2D head also confuses mirror-image organs (the right and the left kidney look alike; their
side is all that tells them apart): ``"lateral_pairs": [[right, left], ...]`` relabels the union
of each pair by the side of the body's midline each voxel lies on (:func:`assign_sides`), before
the largest component is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .registry import POSTPROCESS_CHOICES

__all__ = [
    "assign_sides",
    "keep_largest_component",
    "choose_largest_component",
    "apply_postprocessing",
    "describe_postprocessing",
    "POSTPROCESS_CHOICES",
]

# POSTPROCESS_CHOICES (the values accepted for ``postprocess`` arguments) lives in the
# torch-free samed.registry, so that every command line draws on the same tuple.


def keep_largest_component(
    labels: np.ndarray, classes: Iterable[int] | None = None, connectivity: int | None = None
) -> np.ndarray:
    """Keep, for each listed class, only its largest connected component (MONAI
    ``KeepLargestConnectedComponent``); removed voxels become background (0).

    Args:
        labels: (Z, Y, X) (or (Y, X)) integer label map.
        classes: class values to clean (default: every non-zero value present).
        connectivity: neighbourhood in 3D: 1 = faces (6), 2 = edges (18), 3 = corners (26);
            None = full (26 in 3D).

    Returns:
        A new label map of the same shape and dtype.
    """
    import torch
    from monai.transforms import KeepLargestConnectedComponent

    arr = np.asarray(labels)
    if arr.ndim not in (2, 3) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"labels must be a 2D or 3D integer label map; got {arr.ndim}D {arr.dtype}"
        )
    present = [int(c) for c in np.unique(arr) if c != 0]
    wanted = present if classes is None else [int(c) for c in classes if int(c) in present]
    if connectivity is not None and not 1 <= connectivity <= arr.ndim:
        raise ValueError(f"connectivity={connectivity} must be in [1, {arr.ndim}] or None")
    if not wanted:
        return arr.copy()
    tf = KeepLargestConnectedComponent(
        applied_labels=wanted, is_onehot=False, independent=True, connectivity=connectivity
    )
    out = tf(torch.as_tensor(arr.astype(np.int32))[None])
    return np.asarray(out[0]).astype(arr.dtype, copy=False)


def choose_largest_component(
    cases: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: Mapping[int, str],
    where: str = "held-back validation volumes",
) -> dict[str, Any]:
    """Decide the largest-component clean-up on validation volumes, class by class.

    A class is cleaned when keeping its largest 3D component raises its mean Dice over the
    volumes (strictly: a class it leaves unchanged or lowers is left alone).

    Args:
        cases: ``[(pred, gt)]``: each volume's raw (Z, Y, X) integer prediction and its ground
            truth (same shape).
        labels: foreground value -> class name.
        where: what the volumes are (the key of the measurements).

    Returns:
        The metadata.json ``"postprocessing"`` record: ``{"largest_component": [values] or
        False, "measured": {where: {"none": {name: Dice, "mean"}, "largest_component": {...},
        "chosen": {...}}}, "note"}`` (means over volumes per class, ignoring volumes without
        the class; ``"mean"`` over classes).
    """
    from .evaluate.metrics import dice

    if not cases:
        raise ValueError("cases must hold at least one (pred, gt) volume")
    fg = {int(k): str(v) for k, v in labels.items() if int(k)}
    scores: dict[str, dict[int, list[float]]] = {"none": {}, "largest_component": {}}
    for pred, gt in cases:
        pred, gt = np.asarray(pred), np.asarray(gt)
        for kind, p in (("none", pred), ("largest_component", keep_largest_component(pred))):
            for k in fg:
                scores[kind].setdefault(k, []).append(dice(p == k, gt == k))

    def mean(v: list[float]) -> float:
        v = [x for x in v if x == x]
        return float(np.mean(v)) if v else float("nan")

    per = {kind: {k: mean(v) for k, v in d.items()} for kind, d in scores.items()}
    chosen = [k for k in fg if per["largest_component"][k] > per["none"][k]]
    measured: dict[str, dict[str, float]] = {}
    for kind, d in (
        ("none", per["none"]),
        ("largest_component", per["largest_component"]),
        ("chosen", {k: per["largest_component" if k in chosen else "none"][k] for k in fg}),
    ):
        row = {fg[k]: round(v, 4) for k, v in d.items()}
        row["mean"] = round(mean(list(d.values())), 4)
        measured[kind] = row
    return {
        "largest_component": chosen or False,
        "measured": {f"{where} ({len(cases)})": measured},
        "note": (
            "Keep the largest 3D connected component of the listed classes (samed.postprocess); "
            "chosen class by class where it raised the mean Dice of the "
            f"{where}; applied by Session.automatic, samed segment/evaluate and the napari "
            "plugin unless --postprocess none."
            if chosen
            else f"No clean-up: keeping the largest component did not raise Dice on the {where}."
        ),
    }


def assign_sides(
    labels: np.ndarray,
    pairs: Iterable[Iterable[int]],
    orientation: str | None = None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """Relabel each (right, left) class pair by the side of the body's midline.

    Args:
        labels: (Z, Y, X) integer label map (voxel x axis = the array's last axis).
        pairs: ``[[right_class, left_class], ...]`` (patient right / left, e.g. kidneys).
        orientation: axis codes of the volume's (x, y, z) voxel axes (``"LAS"``...); only
            the x code is used (``L``: x grows toward the patient's left). None: ``"L"`` (the
            orientation automatic adapters are shown, :mod:`samed.engine.orientation`).
        image: the intensity-mapped (Z, Y, X) volume in [0, 1]: the midline is the x centre
            of the body's bounding box (:func:`samed.engine.preprocess.body_center`). None: the
            x centre of the bounding box of every labelled voxel.

    Returns:
        A new label map: every voxel of a pair's union gets the pair's right class on the
        patient's right of the midline and its left class on the left (voxels of other
        classes are unchanged). A volume whose x axis is not left-right (``orientation`` with
        ``A``/``P``/``S``/``I`` first) is returned unchanged.
    """
    arr = np.asarray(labels)
    code = (orientation or "L")[0].upper()
    if code not in "LR":
        return arr.copy()
    mid = None
    if image is not None:
        from .engine.preprocess import body_center

        c = body_center(image)
        mid = None if c is None else c[1]
    if mid is None:
        xs = np.nonzero(arr.reshape(-1, arr.shape[-1]).any(axis=0))[0]
        if xs.size == 0:
            return arr.copy()
        mid = (xs.min() + xs.max()) / 2.0
    x = np.arange(arr.shape[-1])
    right_side = (x < mid) if code == "L" else (x > mid)
    out = arr.copy()
    for pair in pairs:
        r, left = (int(v) for v in pair)
        union = (arr == r) | (arr == left)
        out[union] = np.where(np.broadcast_to(right_side, arr.shape)[union], r, left)
    return out


def _check_pairs(value: Any) -> list[list[int]]:
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p)
        for p in value
    )
    if not ok:
        raise ValueError(
            f"post-processing lateral_pairs={value!r} must be a list of [right, left] class ids"
        )
    return [list(p) for p in value]


def adapter_postprocessing(model: Any) -> dict[str, Any]:
    """The post-processing the model's adapter recommends (``{}`` for none or no model)."""
    adapter = model.adapter if model is not None else None
    return dict(adapter.postprocessing) if adapter is not None else {}


def describe_postprocessing(spec: str, model: Any) -> dict[str, Any]:
    """What ``spec`` amounts to for ``model`` (for run records): ``{"choice": spec, "operations":
    {...}}`` with only the operational keys (no notes or measurements)."""
    if spec == "adapter":
        ops = {
            k: v
            for k, v in adapter_postprocessing(model).items()
            if k in ("largest_component", "lateral_pairs") and v
        }
    elif spec == "largest_component":
        ops = {"largest_component": True}
    else:
        ops = {}
    return {"choice": spec, "operations": ops}


def apply_postprocessing(
    labels: np.ndarray,
    spec: str | Mapping[str, Any] | None,
    model: Any = None,
    orientation: str | None = None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """Apply a post-processing spec to a (Z, Y, X) label map.

    Args:
        labels: (Z, Y, X) integer label map.
        spec: ``"adapter"`` (what ``model``'s adapter recommends), ``"none"``/None,
            ``"largest_component"`` (every class), or a mapping like the adapter's
            ``{"lateral_pairs": [[2, 3]], "largest_component": [1, 2, 3]}``.
        model: the model whose adapter is asked when ``spec == "adapter"``.
        orientation: the volume's axis codes, for ``lateral_pairs`` (:func:`assign_sides`).
        image: the intensity-mapped volume, for ``lateral_pairs``' midline.
    """
    if spec is None or spec == "none":
        return labels
    if isinstance(spec, str):
        if spec not in POSTPROCESS_CHOICES:
            raise ValueError(
                f"postprocess={spec!r} must be one of {POSTPROCESS_CHOICES} or a mapping"
            )
        spec = adapter_postprocessing(model) if spec == "adapter" else {"largest_component": True}
    unknown = set(spec) - {"largest_component", "lateral_pairs", "note", "measured"}
    if unknown:
        raise ValueError(
            f"post-processing keys {sorted(unknown)} are not known "
            "(allowed: largest_component, lateral_pairs)"
        )
    if spec.get("lateral_pairs"):
        labels = assign_sides(labels, _check_pairs(spec["lateral_pairs"]), orientation, image)
    lcc = spec.get("largest_component")
    if lcc:
        labels = keep_largest_component(labels, None if lcc is True else lcc)
    return labels
