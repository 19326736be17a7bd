"""Evaluation on labeled datasets: per-case, per-class Dice, HD95 and NSD (MONAI metrics).

Two protocols:

* ``prompt="box"``: every labeled structure on every slice gets its ground-truth bounding box
  (grown by ``box_margin`` px) as the prompt and is scored on its own binary mask (MedSAM's
  protocol); the slices' masks are stacked and scored in 3D per volume.
* ``prompt=None``: prompt-free segmentation with an automatic adapter (argmax over classes).

Scores are 3D per volume. HD95 and NSD use the volume's voxel spacing in mm (ACDC's release
stores 1 mm, so there they are in pixels). A class absent from both ground truth and prediction
in a case is skipped (NaN) for that case.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import Case, LabeledDataset, load_dataset
from ..postprocess import describe_postprocessing
from ..precision import PRECISIONS, amp_from_precision, encoder_precision

__all__ = ["EvalReport", "evaluate", "evaluate_iter", "score_case", "add_parser", "run_evaluate"]


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


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
        {class: {"dice", "hd95" (mm, NaN if either mask is empty), "nsd"}} for each foreground class.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
    out: dict[int, dict[str, float]] = {}
    for c in sorted(k for k in labels if k != 0):
        p = pred[c] if pred.ndim == 4 else pred == c
        g = gt == c
        if not p.any() and not g.any():
            out[c] = {"dice": math.nan, "hd95": math.nan, "nsd": math.nan}
            continue
        # one-hot (B=1, C=2: background, class) as MONAI expects; metrics read channel 1
        pt = torch.from_numpy(np.stack([~p, p])[None].astype(np.float32))
        gtt = torch.from_numpy(np.stack([~g, g])[None].astype(np.float32))
        dice = float(compute_dice(pt, gtt, include_background=False)[0, 0])
        if p.any() and g.any():
            hd = float(
                compute_hausdorff_distance(
                    pt, gtt, include_background=False, percentile=95, spacing=list(spacing)
                )[0, 0]
            )
            nsd = float(
                compute_surface_dice(
                    pt, gtt, class_thresholds=[nsd_tolerance_mm], include_background=False,
                    spacing=list(spacing),
                )[0, 0]
            )
        else:
            hd, nsd = math.nan, 0.0
        out[c] = {"dice": dice, "hd95": hd, "nsd": nsd}
    return out


@dataclass
class EvalReport:
    """Evaluation results.

    Attributes:
        rows: one dict per (case, class): case, label, name, dice, hd95, nsd, seconds.
        labels: class value -> name.
        settings: protocol, model, adapter, split, data folder.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def per_class(self) -> dict[str, dict[str, float | None]]:
        """Mean of each metric per class name over cases (NaN entries skipped)."""
        out: dict[str, dict[str, float | None]] = {}
        for c, name in sorted(self.labels.items()):
            if c == 0:
                continue
            rows = [r for r in self.rows if r["label"] == c]
            stats: dict[str, float | None] = {}
            for m in ("dice", "hd95", "nsd"):
                vals = [r[m] for r in rows if r[m] is not None and math.isfinite(r[m])]
                stats[m] = float(np.mean(vals)) if vals else None
            stats["n"] = len([r for r in rows if r["dice"] is not None])
            out[name] = stats
        return out

    @property
    def mean_dice(self) -> float:
        """Mean over classes of the per-class mean Dice."""
        vals = [s["dice"] for s in self.per_class().values() if s["dice"] is not None]
        return float(np.mean(vals)) if vals else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "labels": {str(k): v for k, v in self.labels.items()},
            "per_class": self.per_class(),
            "mean_dice": _nan_to_none(self.mean_dice),
            "cases": self.rows,
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=_nan_to_none) + "\n")
        os.replace(tmp, path)
        return path

    def to_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        cols = ["case", "label", "name", "dice", "hd95", "nsd", "seconds"]
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        os.replace(tmp, path)
        return path

    def case_table(self) -> str:
        """Human-readable 3D Dice per volume: one line per case, one column per class (label
        value), and the case's mean over the classes that have a Dice ("-": class absent from
        both label and prediction; a class only predicted counts with Dice 0)."""
        classes = [(c, n) for c, n in sorted(self.labels.items()) if c != 0]
        width = max([len("case"), *(len(str(r["case"])) for r in self.rows)]) + 2
        lines = [f"{'case':<{width}}" + "".join(f"{n[:9]:>10}" for _, n in classes) + f"{'mean':>10}"]
        cases: dict[str, dict[int, float | None]] = {}
        for r in self.rows:
            cases.setdefault(str(r["case"]), {})[int(r["label"])] = r["dice"]
        for case, d in cases.items():
            vals = [d.get(c) for c, _ in classes]
            ok = [v for v in vals if v is not None and math.isfinite(v)]
            cells = "".join(f"{v:>10.4f}" if v is not None and math.isfinite(v) else f"{'-':>10}" for v in vals)
            mean = f"{float(np.mean(ok)):>10.4f}" if ok else f"{'-':>10}"
            lines.append(f"{case:<{width}}{cells}{mean}")
        return "\n".join(lines)

    def table(self) -> str:
        """Human-readable per-class table (mean over volumes of the per-volume 3D Dice, HD95
        and NSD; ``n`` volumes)."""
        lines = [f"{'class':<16}{'n':>4}{'dice':>9}{'hd95':>9}{'nsd':>8}"]
        for name, s in self.per_class().items():
            def f(v: float | None, w: int) -> str:
                return f"{v:>{w}.4f}" if v is not None else f"{'-':>{w}}"
            lines.append(f"{name:<16}{s['n']:>4}{f(s['dice'], 9)}{f(s['hd95'], 9)}{f(s['nsd'], 8)}")
        return "\n".join(lines)


def _predict_case_box(session: Any, gt: np.ndarray, classes: list[int], margin: float) -> np.ndarray:
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
    *,
    prompt: str | None = "box",
    limit: int | None = None,
    box_margin: float = 5.0,
    intensity: object = "auto",
    nsd_tolerance_mm: float = 2.0,
    postprocess: str = "adapter",
    amp: bool | str = True,
) -> Iterator[tuple[int, int, Case, list[dict[str, Any]]]]:
    """Evaluate case by case; yields (done, total, case, rows of that case).

    See :func:`evaluate` for the arguments.
    """
    from ..engine import Session
    from ..io import load_label_map, load_volume

    if prompt not in ("box", None):
        raise ValueError(f"prompt={prompt!r} must be 'box' or None (automatic adapter)")
    ds = data if isinstance(data, LabeledDataset) else load_dataset(data)
    cases = ds.split(split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit={limit} must be >= 1")
        cases = cases[:limit]
    classes = sorted(ds.foreground_labels)
    for i, case in enumerate(cases):
        t0 = time.perf_counter()
        vol = load_volume(case.image)
        gt_vol = load_label_map(case.label, reference=vol)
        gt = np.asarray(gt_vol.array).astype(np.int64)
        session = Session(model, vol, intensity=intensity, amp=amp)
        if prompt == "box":
            pred = _predict_case_box(session, gt, classes, box_margin)
        else:
            pred = session.automatic(postprocess=postprocess)
        scores = score_case(pred, gt, ds.labels, vol.spacing, nsd_tolerance_mm)
        dt = time.perf_counter() - t0
        rows = [
            {
                "case": case.case_id,
                "label": c,
                "name": ds.labels[c],
                "dice": _nan_to_none(s["dice"]),
                "hd95": _nan_to_none(s["hd95"]),
                "nsd": _nan_to_none(s["nsd"]),
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
    prompt: str | None = "box",
    limit: int | None = None,
    box_margin: float = 5.0,
    intensity: object = "auto",
    nsd_tolerance_mm: float = 2.0,
    postprocess: str = "adapter",
    progress: Callable[[int, int, str], None] | None = None,
    amp: bool | str = True,
) -> EvalReport:
    """Score a model (with or without adapter) on a labeled split.

    Args:
        model: :class:`samed.model.SamModel`; for ``prompt=None`` it must carry an automatic adapter.
        data: dataset folder (``dataset.json``) or a loaded :class:`LabeledDataset`.
        split: split name from ``dataset.json`` ``splits`` (None: all cases).
        prompt: ``"box"`` (ground-truth box per structure and slice) or None (automatic).
        limit: evaluate only the first N cases of the split.
        box_margin: box growth in pixels on each side (default 5).
        intensity: Session intensity mapping (``auto``: CT -> abdomen window, [0,1] data as is).
        nsd_tolerance_mm: NSD boundary tolerance in mm.
        postprocess: automatic mode: ``"adapter"`` (the adapter's recommendation), ``"none"`` or
            ``"largest_component"`` (see :mod:`samed.postprocess`).
        progress: called as ``progress(done, total, case_id)`` after each case.
        amp: encoder precision on CUDA (see :class:`samed.engine.Session`): True (fp16
            autocast), False (float32), ``"fp16"`` or ``"bf16"``. Ignored on CPU.

    Returns:
        An :class:`EvalReport`.
    """
    ds = data if isinstance(data, LabeledDataset) else load_dataset(data)
    report = EvalReport(
        labels=dict(ds.labels),
        settings={
            "data": str(ds.root),
            "split": split,
            "prompt": prompt,
            "box_margin": box_margin if prompt == "box" else None,
            "model": model.kind,
            "checkpoint_sha256": model.checkpoint_sha256,
            "adapter": getattr(model, "adapter_name", None),
            "intensity": str(intensity),
            "nsd_tolerance_mm": nsd_tolerance_mm,
            "limit": limit,
            "postprocess": None if prompt == "box" else describe_postprocessing(postprocess, model),
            "precision": encoder_precision(model.device, amp),
        },
    )
    for done, total, case, rows in evaluate_iter(
        model, ds, split, prompt=prompt, limit=limit, box_margin=box_margin,
        intensity=intensity, nsd_tolerance_mm=nsd_tolerance_mm, postprocess=postprocess, amp=amp,
    ):
        report.rows.extend(rows)
        if progress is not None:
            progress(done, total, case.case_id)
    return report


# ---------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> None:
    """Register ``samed evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="score a model/adapter on a labeled dataset split (Dice, HD95, NSD)",
        description="Evaluate on an MSD-style dataset (dataset.json with training entries and "
        "optional splits). Prints per-class means and a last line mean_dice=0.XXXX.",
    )
    p.add_argument("--data", required=True, help="dataset folder with dataset.json")
    p.add_argument("--split", default=None, help="split name from dataset.json (default: all)")
    p.add_argument("--prompt", choices=["box", "none"], default=None,
                   help="box: ground-truth box per structure and slice; none: automatic adapter "
                   "(default: box without adapter or with a prompted adapter, none with an "
                   "automatic adapter)")
    p.add_argument("--adapter", default=None, help="adapter name or folder")
    p.add_argument("--model", default="litemedsam", help="model kind (default litemedsam)")
    p.add_argument("--checkpoint", default=None, help="checkpoint path (SAM / MedSAM kinds)")
    p.add_argument("--limit", type=int, default=None, help="only the first N cases")
    p.add_argument("--box-margin", type=float, default=5.0, help="box margin in px (default 5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--postprocess", choices=["adapter", "none", "largest_component"], default="adapter",
                   help="automatic mode: label-map clean-up (default: what the adapter recommends)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="encoder precision on CUDA (auto = fp16 autocast; CPU always fp32)")
    p.add_argument("--out", default=None, help="write JSON here (and CSV beside it)")
    p.add_argument("--csv", default=None, help="write the per-case CSV here")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: Any) -> int:
    """``samed evaluate`` entry point; returns the exit code."""
    from tqdm import tqdm

    from ..engine import optimize_for_inference
    from ..lora import load_adapter, read_adapter_config
    from ..model import build_model
    from ..registry import resolve_adapter

    model = optimize_for_inference(build_model(args.model, args.checkpoint, device=args.device))
    prompt = {"box": "box", "none": None}.get(args.prompt or "", "auto")
    if args.adapter:
        folder = resolve_adapter(args.adapter)
        mode = read_adapter_config(folder)["mode"]
        load_adapter(model, folder, merge=True)
        if prompt == "auto":
            prompt = None if mode == "automatic" else "box"
        elif prompt is None and mode != "automatic":
            raise ValueError(f"--prompt none needs an automatic adapter; {folder} is {mode}")
    elif prompt == "auto":
        prompt = "box"
    elif prompt is None:
        raise ValueError("--prompt none needs --adapter with an automatic adapter")
    ds = load_dataset(args.data)
    bar = tqdm(total=None, desc="evaluate", unit="case", file=sys.stderr, disable=None)

    def progress(done: int, total: int, case_id: str) -> None:
        bar.total = total
        bar.set_postfix_str(case_id)
        bar.update(1)

    report = evaluate(
        model, ds, args.split, prompt=prompt, limit=args.limit, box_margin=args.box_margin,
        postprocess=args.postprocess, progress=progress, amp=amp_from_precision(args.precision),
    )
    bar.close()
    print(report.case_table())
    print()
    print(report.table())
    if args.out:
        report.to_json(args.out)
        report.to_csv(args.csv or Path(args.out).with_suffix(".csv"))
    elif args.csv:
        report.to_csv(args.csv)
    print(f"mean_dice={report.mean_dice:.4f}")
    return 0
