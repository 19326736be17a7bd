"""Segmentation metrics: the one Dice of samed, and per-class Dice / HD95 / NSD of a volume.

:func:`dice` is plain numpy (no torch) and holds samed's single empty-mask rule: a structure
absent from the ground truth is not scored (NaN), whatever the prediction holds. Training
validation (:func:`samed.train.validate`), ``samed evaluate`` (:func:`score_case`), ``samed
demo`` and the benchmarks all use it. HD95 and NSD come from MONAI (imported on first use).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["dice", "score_case"]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient ``2 |P & G| / (|P| + |G|)`` of two masks of the same shape.

    Args:
        pred: predicted mask, any shape (e.g. (Z, Y, X) or (Y, X)); nonzero = foreground.
        gt: ground-truth mask, same shape as ``pred``.

    Returns:
        Dice in [0, 1]; NaN when ``gt`` is empty (the structure is absent: not scored, also
        when ``pred`` is empty too).

    Raises:
        ValueError: the shapes differ.
    """
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} and gt shape {g.shape} must be equal")
    n_gt = int(np.count_nonzero(g))
    if n_gt == 0:
        return math.nan
    return 2.0 * float(np.count_nonzero(p & g)) / (float(np.count_nonzero(p)) + n_gt)


def score_case(
    pred: np.ndarray,
    gt: np.ndarray,
    labels: dict[int, str],
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    nsd_tolerance_mm: float = 2.0,
) -> dict[int, dict[str, float]]:
    """Per-class metrics of one volume.

    Args:
        pred: (Z, Y, X) integer label map, or (C, Z, Y, X) bool per-class masks indexed by class
            value (prompted protocol: classes may overlap).
        gt: (Z, Y, X) integer ground truth.
        labels: class value -> name (0 / background is ignored).
        spacing: (sz, sy, sx) voxel size in mm, matching the array axes.
        nsd_tolerance_mm: boundary tolerance of the normalised surface Dice.

    Returns:
        {class: {"dice" (:func:`dice`: NaN when the class is absent from ``gt``), "hd95" (mm,
        NaN if either mask is empty), "nsd"}} for each foreground class.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
    out: dict[int, dict[str, float]] = {}
    for c in sorted(k for k in labels if k != 0):
        p = pred[c] if pred.ndim == 4 else pred == c
        g = gt == c
        if not p.any() and not g.any():
            out[c] = {"dice": math.nan, "hd95": math.nan, "nsd": math.nan}
            continue
        if p.any() and g.any():
            # one-hot (B=1, C=2: background, class) as MONAI expects; metrics read channel 1
            pt = torch.from_numpy(np.stack([~p, p])[None].astype(np.float32))
            gtt = torch.from_numpy(np.stack([~g, g])[None].astype(np.float32))
            hd = float(
                compute_hausdorff_distance(
                    pt, gtt, include_background=False, percentile=95, spacing=list(spacing)
                )[0, 0]
            )
            nsd = float(
                compute_surface_dice(
                    pt,
                    gtt,
                    class_thresholds=[nsd_tolerance_mm],
                    include_background=False,
                    spacing=list(spacing),
                )[0, 0]
            )
        else:
            hd, nsd = math.nan, 0.0
        out[c] = {"dice": dice(p, g), "hd95": hd, "nsd": nsd}
    return out
