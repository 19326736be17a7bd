"""Evaluation on labeled datasets: per-case, per-class Dice, HD95 and NSD.

Two protocols:

* ``prompt="box"``: every labeled structure on every slice gets its ground-truth bounding box
  (grown by ``box_margin`` px) as the prompt and is scored on its own binary mask (MedSAM's
  protocol); the slices' masks are stacked and scored in 3D per volume.
* ``prompt=None``: prompt-free segmentation with an automatic adapter (argmax over classes).

Scores are 3D per volume (:func:`samed.evaluate.metrics.score_case`). HD95 and NSD use the
volume's voxel spacing in mm (ACDC's release stores 1 mm, so there they are in pixels). A class
absent from a case's ground truth has no Dice (NaN, skipped) for that case.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..datasets import Case, LabeledDataset, load_dataset
from ..postprocess import describe_postprocessing
from .metrics import score_case
from .report import EvalReport, nan_to_none

__all__ = ["EvalOptions", "evaluate", "evaluate_iter"]


def _encoder_label(model: Any, amp: bool | str) -> str:
    from ..engine.backends import encoder_label  # torch: not at import time

    return encoder_label(model, amp)


@dataclass(frozen=True)
class EvalOptions:
    """How :func:`evaluate` / :func:`evaluate_iter` score (their keyword arguments).

    Attributes:
        prompt: ``"box"`` (ground-truth box per structure and slice) or None (automatic).
        limit: evaluate only the first N cases of the split (None: all).
        box_margin: box growth in pixels on each side (default 5).
        intensity: Session intensity mapping (``auto``: CT -> abdomen window, [0,1] data as is).
        nsd_tolerance_mm: NSD boundary tolerance in mm.
        postprocess: automatic mode: ``"adapter"`` (the adapter's recommendation), ``"none"`` or
            ``"largest_component"`` (see :mod:`samed.postprocess`).
        amp: encoder precision on CUDA (see :class:`samed.engine.Session`): True (fp16
            autocast), False (float32), ``"fp16"`` or ``"bf16"``. Ignored on CPU.
        cases: only these case ids of the split (None: all), in dataset order.
    """

    prompt: str | None = "box"
    limit: int | None = None
    box_margin: float = 5.0
    intensity: object = "auto"
    nsd_tolerance_mm: float = 2.0
    postprocess: str = "adapter"
    amp: bool | str = True
    cases: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.prompt not in ("box", None):
            raise ValueError(f"prompt={self.prompt!r} must be 'box' or None (automatic adapter)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1")
        if self.cases is not None:
            if isinstance(self.cases, str) or not self.cases:
                raise ValueError(f"cases={self.cases!r} must be a non-empty list of case ids")
            object.__setattr__(self, "cases", tuple(str(c) for c in self.cases))


def _dataset(data: str | os.PathLike | LabeledDataset) -> LabeledDataset:
    return data if isinstance(data, LabeledDataset) else load_dataset(data)


def _crop_z(vol: Any, z_range: tuple[int, int] | None) -> Any:
    """``vol`` restricted to slices ``z0 <= z < z1`` (the affine's origin moved to slice z0)."""
    if z_range is None:
        return vol
    from dataclasses import replace

    z0, z1 = z_range
    if not 0 <= z0 < z1 <= vol.shape[0]:
        raise ValueError(
            f"z_range {list(z_range)} of {vol.source}: must satisfy 0 <= z0 < z1 <= "
            f"{vol.shape[0]} (its slice count)"
        )
    affine = vol.affine.copy()
    affine[:3, 3] += affine[:3, 2] * z0
    return replace(vol, array=vol.array[z0:z1], affine=affine)


def _predict_case_box(
    session: Any, gt: np.ndarray, classes: list[int], margin: float
) -> np.ndarray:
    from ..engine.preprocess import mask_bbox

    pred = np.zeros((max(classes) + 1, *gt.shape), dtype=bool)
    zs = sorted({int(z) for c in classes for z in np.nonzero((gt == c).any(axis=(1, 2)))[0]})
    session.embed(zs)
    for z in zs:
        for c in classes:
            box = mask_bbox(gt[z] == c, margin)
            if box is not None:
                pred[c, z] = session.predict(z, box=box)
    return pred


def evaluate_iter(
    model: Any,
    data: str | os.PathLike | LabeledDataset,
    split: str | None = None,
    **options: Any,
) -> Iterator[tuple[int, int, Case, list[dict[str, Any]]]]:
    """Evaluate case by case; yields (done, total, case, rows of that case).

    See :func:`evaluate` for the arguments; ``options`` are the fields of :class:`EvalOptions`.
    """
    yield from _iter_cases(model, _dataset(data), split, EvalOptions(**options))


def _iter_cases(
    model: Any, ds: LabeledDataset, split: str | None, opts: EvalOptions
) -> Iterator[tuple[int, int, Case, list[dict[str, Any]]]]:
    from ..engine import Session
    from ..io import load_label_map, load_volume

    cases = ds.split(split)
    if opts.cases is not None:
        cases = ds.select(cases, list(opts.cases))
    if opts.limit is not None:
        cases = cases[: opts.limit]
    classes = sorted(ds.foreground_labels)
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        vol = load_volume(case.image)
        gt_vol = load_label_map(case.label, reference=vol)
        vol, gt_vol = _crop_z(vol, case.z_range), _crop_z(gt_vol, case.z_range)
        gt = ds.remap_labels(gt_vol.array)
        session = Session(model, vol, intensity=opts.intensity, amp=opts.amp)
        if opts.prompt == "box":
            pred = _predict_case_box(session, gt, classes, opts.box_margin)
        else:
            pred = session.automatic(postprocess=opts.postprocess)
        scores = score_case(pred, gt, ds.labels, vol.spacing, opts.nsd_tolerance_mm)
        dt = time.perf_counter() - t0
        rows = [
            {
                "case": case.case_id,
                "label": c,
                "name": ds.labels[c],
                "dice": nan_to_none(s["dice"]),
                "hd95": nan_to_none(s["hd95"]),
                "nsd": nan_to_none(s["nsd"]),
                "seconds": round(dt, 3),
            }
            for c, s in scores.items()
        ]
        yield i + 1, len(cases), case, rows


def evaluate(
    model: Any,
    data: str | os.PathLike | LabeledDataset,
    split: str | None = None,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    **options: Any,
) -> EvalReport:
    """Score a model (with or without adapter) on a labeled split.

    Args:
        model: :class:`samed.model.SamModel`; for ``prompt=None`` it must carry an automatic adapter.
        data: dataset folder (``dataset.json``) or a loaded :class:`LabeledDataset` (e.g. a
            fine-tuning config's cases: :func:`samed.evaluate.data.dataset_from_config`).
        split: split name from ``dataset.json`` ``splits`` (None: all cases).
        progress: called as ``progress(done, total, case_id)`` after each case.
        **options: the fields of :class:`EvalOptions` (``prompt="box"``, ``limit=None``,
            ``box_margin=5.0``, ``intensity="auto"``, ``nsd_tolerance_mm=2.0``,
            ``postprocess="adapter"``, ``amp=True``, ``cases=None``).

    Returns:
        An :class:`EvalReport`.

    Raises:
        ValueError: a bad option value, an unknown split or unreadable data.
    """
    opts = EvalOptions(**options)
    ds = _dataset(data)
    box = opts.prompt == "box"
    settings = {
        "data": ds.source or str(ds.root),
        "split": split,
        "prompt": opts.prompt,
        "box_margin": opts.box_margin if box else None,
        "model": model.kind,
        "checkpoint_sha256": model.checkpoint_sha256,
        "adapter": model.adapter_name,
        "intensity": str(opts.intensity),
        "nsd_tolerance_mm": opts.nsd_tolerance_mm,
        "limit": opts.limit,
        "cases": None if opts.cases is None else list(opts.cases),
        "postprocess": None if box else describe_postprocessing(opts.postprocess, model),
        "precision": _encoder_label(model, opts.amp),
    }
    report = EvalReport(labels=dict(ds.labels), settings=settings)
    for done, total, case, rows in _iter_cases(model, ds, split, opts):
        report.rows.extend(rows)
        if progress is not None:
            progress(done, total, case.case_id)
    return report
