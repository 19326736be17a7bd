"""What a :class:`samed.engine.Session` returns: one prompt's :class:`Prediction` on a slice and
the :class:`PropagationStep` records that :meth:`~samed.engine.Session.propagate` yields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Prediction", "PropagationStep"]


@dataclass(frozen=True)
class Prediction:
    """One prompt's result on one slice.

    Attributes:
        mask: (Y, X) bool on the slice grid.
        score: the decoder's predicted IoU for the mask.
        low_res_logits: (L, L) float32 logits (can be fed back as a mask prompt).
    """

    mask: np.ndarray
    score: float
    low_res_logits: torch.Tensor


@dataclass(frozen=True)
class PropagationStep:
    """One slice reached by :meth:`Session.propagate`.

    Attributes:
        z: slice index.
        mask: (Y, X) bool mask of the object on slice z (empty on the step that stopped).
        direction: +1 (increasing z) or -1.
        score: predicted IoU.
        done: number of slices processed so far (for progress bars).
        total: upper bound of slices that may be processed.
        stopped: True on the step where a stop rule ended this direction (its mask is not
            kept); ``reason`` says which.
        reason: why it stopped: ``"area"`` (fewer than ``min_area`` pixels), ``"score"``
            (predicted IoU below ``min_score``), ``"intensity"`` (mean intensity moved more than
            ``max_intensity_shift``), ``"overlap"`` (IoU with the previous slice's mask below
            ``min_slice_iou``); ``""`` when not stopped.
    """

    z: int
    mask: np.ndarray
    direction: int
    score: float
    done: int
    total: int
    stopped: bool = False
    reason: str = ""
