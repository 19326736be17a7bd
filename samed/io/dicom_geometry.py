"""Geometry of a DICOM series from its headers: slice order, checks and the affine.

See :mod:`samed.io.dicom` for the policy; every failed check raises
:class:`~samed.io.volume.VolumeReadError` naming the files and the measured values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from .volume import LPS_TO_RAS, VolumeReadError

__all__ = ["series_geometry"]

# Tolerances for the geometry checks (mm unless stated).
_POS_TOL_MM = 0.01
_POS_TOL_REL = 0.01
_IOP_TOL = 1e-4


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeReadError(
            f"{path}: {keyword} is missing or invalid ({value!r}); need {n} numbers"
        )
    return arr


def _fmt_files(paths: Iterable[Path], limit: int = 4) -> str:
    names = [p.name for p in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def series_geometry(
    items: Sequence[tuple[Path, Dataset]],
) -> tuple[list[tuple[Path, Dataset]], np.ndarray]:
    """Check a series' geometry from headers and return the slices in ``z`` order and the affine.

    Args:
        items: ``(path, header)`` for every file of one series.

    Returns:
        ``(ordered, affine)``: slices sorted along the normal, and the ``(4, 4)`` RAS affine for the
        ``(x, y, z)`` voxel index (``x`` = column, ``y`` = row, ``z`` = slice).

    Raises:
        VolumeReadError: for multi-frame or colour images, missing geometry, mixed orientations or
            sizes, gantry tilt, gaps, non-uniform spacing and duplicate positions (4D).
    """
    first_path = items[0][0]
    for path, ds in items:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise VolumeReadError(
                f"{path} is a multi-frame DICOM object ({frames} frames); multi-frame (enhanced) "
                "images are not supported -- export the series as single-frame slices"
            )
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise VolumeReadError(
                f"{path} is a colour image (SamplesPerPixel={ds.SamplesPerPixel}); only greyscale "
                "CT/MR slices are supported"
            )
    has = [k in items[0][1] for k in ("ImageOrientationPatient", "ImagePositionPatient")]
    if len(items) == 1 and not any(has):
        return list(items), _assumed_geometry(*items[0])
    iops = [_floats(ds, "ImageOrientationPatient", 6, p) for p, ds in items]
    ipps = [_floats(ds, "ImagePositionPatient", 3, p) for p, ds in items]
    spacings = [_floats(ds, "PixelSpacing", 2, p) for p, ds in items]
    sizes = [(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for _, ds in items]

    groups: dict[tuple[float, ...], list[Path]] = {}
    for (path, _), iop in zip(items, iops, strict=True):
        key = next(
            (k for k in groups if np.allclose(k, iop, atol=_IOP_TOL)), tuple(np.round(iop, 6))
        )
        groups.setdefault(key, []).append(path)
    if len(groups) > 1:
        desc = "; ".join(
            f"{list(k)} in {len(v)} files ({_fmt_files(v, 2)})" for k, v in groups.items()
        )
        raise VolumeReadError(
            f"mixed slice orientations in one series ({first_path.parent}): {desc}; "
            "a volume needs one ImageOrientationPatient"
        )
    for name, values in (("Rows/Columns", sizes), ("PixelSpacing", [tuple(s) for s in spacings])):
        distinct = {tuple(np.round(v, 6)) for v in values}
        if len(distinct) > 1:
            raise VolumeReadError(
                f"slices of the series in {first_path.parent} differ in {name}: {sorted(distinct)}"
            )
    row, col = iops[0][:3], iops[0][3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(row @ col) > 1e-3
    ):
        raise VolumeReadError(
            f"{first_path}: ImageOrientationPatient {list(iops[0])} is not two orthonormal vectors"
        )
    normal = np.cross(row, col)
    pos = np.array([ipp @ normal for ipp in ipps])
    inst = [int(ds.get("InstanceNumber", 0) or 0) for _, ds in items]
    order = sorted(range(len(items)), key=lambda i: (pos[i], inst[i]))
    ordered = [items[i] for i in order]
    pos = pos[order]
    ipp_sorted = np.array([ipps[i] for i in order])
    paths = [p for p, _ in ordered]

    col_sp, row_sp = (
        spacings[0][1],
        spacings[0][0],
    )  # PixelSpacing = (between rows, between columns)
    if len(ordered) == 1:
        ds0 = ordered[0][1]
        step_len = float(ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0)
        step = normal * abs(step_len)
    else:
        steps = np.diff(pos)
        same = np.flatnonzero(steps < _POS_TOL_MM)
        if same.size:
            i = int(same[0])
            tpos = ordered[i][1].get("NumberOfTemporalPositions")
            hint = f" (NumberOfTemporalPositions={tpos})" if tpos else ""
            raise VolumeReadError(
                f"{same.size} pair(s) of slices share a position in "
                f"{first_path.parent}, e.g. {paths[i].name} and {paths[i + 1].name} at "
                f"{pos[i]:.3f} mm along the normal: a 4D series (time points, echoes){hint} or "
                "duplicate slices; 4D series are not supported -- split them into 3D series"
            )
        median = float(np.median(steps))
        tol = max(_POS_TOL_MM, _POS_TOL_REL * median)
        shifts = [
            float(np.linalg.norm(d - (d @ normal) * normal)) for d in np.diff(ipp_sorted, axis=0)
        ]
        worst = int(np.argmax(shifts))
        if shifts[worst] > tol:
            angle = math.degrees(math.atan2(shifts[worst], steps[worst]))
            tilt = ordered[0][1].get("GantryDetectorTilt")
            raise VolumeReadError(
                f"gantry tilt or sheared slices in {first_path.parent}: consecutive slices "
                f"{paths[worst].name} -> {paths[worst + 1].name} are shifted "
                f"{shifts[worst]:.3f} mm "
                f"in-plane for {steps[worst]:.3f} mm along the normal ({angle:.2f} degrees; "
                f"GantryDetectorTilt={tilt}); tilted series are not supported (resample them first)"
            )
        mean = (pos[-1] - pos[0]) / (len(pos) - 1)
        deviation = np.abs(pos - (pos[0] + mean * np.arange(len(pos))))
        if float(deviation.max()) > tol:
            gaps = [i for i, s in enumerate(steps) if s > 1.5 * median]
            if gaps:
                i = gaps[0]
                missing = round(steps[i] / median) - 1
                raise VolumeReadError(
                    f"missing slice(s) in {first_path.parent}: {steps[i]:.3f} mm between "
                    f"{paths[i].name} and {paths[i + 1].name} where the other slices are "
                    f"{median:.3f} mm apart (about {missing} slice(s) missing; "
                    f"{len(gaps)} gap(s) in all)"
                )
            found = sorted({round(float(s), 3) for s in steps})
            raise VolumeReadError(
                f"non-uniform slice spacing in {first_path.parent}: spacings {found} mm between "
                f"consecutive slices (largest deviation from a regular grid "
                f"{float(deviation.max()):.3f} mm, allowed {tol:.3f} mm)"
            )
        step = (ipp_sorted[-1] - ipp_sorted[0]) / (len(pos) - 1)
    lps = np.eye(4)
    lps[:3, 0] = row * col_sp
    lps[:3, 1] = col * row_sp
    lps[:3, 2] = step
    lps[:3, 3] = ipp_sorted[0]
    return ordered, LPS_TO_RAS @ lps


def _assumed_geometry(path: Path, ds: Dataset) -> np.ndarray:
    """Affine of a lone 2D image without patient geometry (X-ray, secondary capture).

    Rows/columns are laid along the LPS axes from the origin, with PixelSpacing (or
    ImagerPixelSpacing, else 1 mm) -- positions are not known, only sizes.
    """
    spacing = np.ones(2)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds:
            spacing = _floats(ds, keyword, 2, path)
            break
    lps = np.diag([spacing[1], spacing[0], 1.0, 1.0])
    return LPS_TO_RAS @ lps
