"""DICOM series: find them in a folder, check their geometry, read them into a :class:`Volume`.

Policy (each case raises :class:`~samed.io.volume.VolumeReadError` naming the files and the
measured values, and nothing is read further):

* Folders are searched recursively. Files that are not DICOM (no ``DICM`` preamble and no
  readable DICOM header) and ``DICOMDIR`` files are ignored (listed in ``meta["ignored_files"]``);
  a file *with* the ``DICM`` marker whose header cannot be parsed is an error (it may be a slice
  of the series).
* Several series in one folder: :func:`list_series` lists them; loading needs ``series_uid``
  unless exactly one series holds images.
* Slices are sorted by their position along the slice normal (``row x column`` direction cosines),
  so ``z`` increases along the normal. ITK and dcm2niix use the same order.
* Mixed orientations, different rows/columns/pixel spacing, gantry tilt (slices shifted in-plane),
  a missing slice (a gap), non-uniform spacing and several slices at one position (4D series or
  duplicates) are errors: resampling would silently move voxels, which is the failure this
  package exists to prevent.
* A single slice loads as ``Z = 1``; its slice step is ``SpacingBetweenSlices``, else
  ``SliceThickness``, else 1 mm. A lone 2D image without patient geometry (X-ray, secondary
  capture) gets an axis-aligned affine from its pixel spacing (``meta["geometry"] = "assumed"``).
* Multi-frame (enhanced) image objects are not supported (error).
* Pixels are decoded by MONAI's ``PydicomReader`` (pydicom with pylibjpeg: JPEG baseline/lossless,
  JPEG-LS, JPEG 2000 and RLE) and rescaled with each slice's own slope/intercept (CT in HU).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.uid
from pydicom.dataset import Dataset

from .volume import LPS_TO_RAS, Volume, VolumeReadError

__all__ = ["SeriesInfo", "list_series", "scan_folder", "load_dicom_series", "read_header"]

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Tolerances for the geometry checks (mm unless stated).
_POS_TOL_MM = 0.01
_POS_TOL_REL = 0.01
_IOP_TOL = 1e-4


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder.

    Attributes:
        series_uid: SeriesInstanceUID.
        modality: e.g. ``"CT"``, ``"MR"``, ``"SEG"``, ``"RTSTRUCT"``.
        description: SeriesDescription (``""`` if absent).
        n_files: number of files of the series.
        folder: the deepest folder that holds all of its files.
        paths: the files, sorted by name.
        study_uid: StudyInstanceUID.
        series_number: SeriesNumber (``None`` if absent).
        is_image: whether the files carry image planes (position, orientation, pixels).
    """

    series_uid: str
    modality: str
    description: str
    n_files: int
    folder: Path
    paths: tuple[Path, ...]
    study_uid: str = ""
    series_number: int | None = None
    is_image: bool = True

    def __str__(self) -> str:
        kind = "" if self.is_image else ", not an image series"
        return (
            f"{self.series_uid} ({self.modality or '?'}, {self.description!r}, "
            f"{self.n_files} files{kind})"
        )


def read_header(path: Path) -> Dataset | None:
    """Read a file's DICOM header without pixels.

    Returns:
        The dataset, or ``None`` when the file is not DICOM at all.

    Raises:
        VolumeReadError: when the file has the ``DICM`` marker but its header is unreadable.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            has_marker = fh.read(4) == b"DICM"
    except OSError as exc:
        raise VolumeReadError(f"cannot open {path}: {exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_marker)
            # Touch the elements we need, so that lazily parsed broken values fail here.
            _ = (ds.get("SOPClassUID"), ds.get("SeriesInstanceUID"), ds.get("Modality"))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on garbage input
        if has_marker:
            raise VolumeReadError(f"corrupt DICOM file {path}: header unreadable ({exc})") from exc
        return None
    if not has_marker and not ("SOPClassUID" in ds and "SeriesInstanceUID" in ds):
        return None  # forced parse of a non-DICOM file produced nonsense
    media = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if "SeriesInstanceUID" not in ds and media != _DICOMDIR_CLASS:
        raise VolumeReadError(
            f"corrupt DICOM file {path}: it has the DICM marker but no readable SeriesInstanceUID "
            f"(elements read: {len(ds)})"
        )
    return ds


def scan_folder(
    folder: str | os.PathLike,
) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[Path]]:
    """Read the headers of every DICOM file under ``folder`` (recursively), grouped by series.

    Args:
        folder: folder to search.

    Returns:
        ``(series, ignored)``: SeriesInstanceUID -> list of ``(path, header)`` sorted by path, and
        the files that were skipped as non-DICOM (or DICOMDIR).

    Raises:
        VolumeReadError: if ``folder`` is not a folder, or a DICOM file is corrupt.
    """
    root = Path(folder)
    if not root.is_dir():
        raise VolumeReadError(f"{root} is not a folder")
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    ignored: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.is_file() or name.startswith(".tmp-"):
                continue
            ds = read_header(path)
            if ds is None or "SeriesInstanceUID" not in ds:
                ignored.append(path)
                continue
            media = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
            if ds.get("SOPClassUID", media) == _DICOMDIR_CLASS or media == _DICOMDIR_CLASS:
                ignored.append(path)
                continue
            series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    return series, ignored


def _is_image(ds: Dataset) -> bool:
    return (
        "Rows" in ds
        and "Columns" in ds
        and str(ds.get("Modality", ""))
        not in {
            "SEG",
            "RTSTRUCT",
            "SR",
            "RTPLAN",
            "KO",
            "PR",
        }
    )


def _series_info(uid: str, items: Sequence[tuple[Path, Dataset]]) -> SeriesInfo:
    paths = tuple(sorted(p for p, _ in items))
    first = items[0][1]
    number = first.get("SeriesNumber")
    return SeriesInfo(
        series_uid=uid,
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        n_files=len(items),
        folder=Path(os.path.commonpath([str(p.parent) for p in paths])),
        paths=paths,
        study_uid=str(first.get("StudyInstanceUID", "")),
        series_number=int(number) if number not in (None, "") else None,
        is_image=any(_is_image(ds) for _, ds in items),
    )


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """List the DICOM series under a folder (searched recursively; non-DICOM files ignored).

    Args:
        folder: a folder.

    Returns:
        One :class:`SeriesInfo` per SeriesInstanceUID, image series first, then by series number
        and UID. Empty when the folder holds no DICOM.

    Raises:
        VolumeReadError: if ``folder`` is not a folder or holds a corrupt DICOM file.
    """
    series, _ = scan_folder(folder)
    infos = [_series_info(uid, items) for uid, items in series.items()]
    return sorted(
        infos,
        key=lambda s: (
            not s.is_image,
            s.series_number if s.series_number is not None else 1 << 30,
            s.series_uid,
        ),
    )


def choose_series(
    folder: Path, series_uid: str | None
) -> tuple[str, list[tuple[Path, Dataset]], list[Path]]:
    """Pick one image series in a folder (the only one, or the one named by ``series_uid``)."""
    series, ignored = scan_folder(folder)
    if not series:
        what = f"{len(ignored)} non-DICOM files" if ignored else "no files"
        raise VolumeReadError(f"no DICOM files found in {folder} (searched recursively; {what})")
    infos = {uid: _series_info(uid, items) for uid, items in series.items()}
    if series_uid is not None:
        if series_uid not in series:
            listing = "; ".join(str(i) for i in infos.values())
            raise VolumeReadError(
                f"series {series_uid!r} is not in {folder}; series found: {listing}"
            )
        return series_uid, series[series_uid], ignored
    images = [uid for uid, info in infos.items() if info.is_image]
    if len(images) == 1:
        return images[0], series[images[0]], ignored
    listing = "; ".join(str(i) for i in infos.values())
    if not images:
        raise VolumeReadError(f"no image series in {folder}; found only: {listing}")
    raise VolumeReadError(
        f"{len(images)} image series in {folder}; choose one with series_uid (--series): {listing}"
    )


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
    if len(items) == 1 and not (
        "ImageOrientationPatient" in items[0][1] and "ImagePositionPatient" in items[0][1]
    ):
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


def _read_pixels(reader: Any, path: Path, rows: int, cols: int) -> np.ndarray:
    """Decode one slice with MONAI's ``PydicomReader``; ``(rows, cols)`` float32, rescaled."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, _ = reader.get_data(reader.read(str(path)))
            arr = np.asarray(arr)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        tsuid = ""
        try:
            tsuid = str(
                pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
            )
        except Exception:  # noqa: BLE001
            pass
        raise VolumeReadError(
            f"cannot decode the pixels of {path} (transfer syntax {tsuid or 'unknown'}): {exc}"
        ) from exc
    if arr.shape != (rows, cols):
        raise VolumeReadError(
            f"{path}: decoded pixel array has shape {arr.shape}, expected (Rows, Columns) = "
            f"({rows}, {cols})"
        )
    return arr.astype(np.float32, copy=False)


def load_dicom_series(
    items: Sequence[tuple[Path, Dataset]], source: Path, ignored: Sequence[Path] = ()
) -> Volume:
    """Read one checked series into a float32 :class:`Volume` (``array[z, row, column]``).

    Args:
        items: ``(path, header)`` of every file of the series.
        source: the folder (or file) the user named, recorded as :attr:`Volume.source`.
        ignored: files skipped while scanning (recorded in ``meta``).

    Raises:
        VolumeReadError: see the module policy.
    """
    ordered, affine = series_geometry(items)
    rows, cols = int(ordered[0][1].Rows), int(ordered[0][1].Columns)
    from monai.data import PydicomReader

    # The reader is used directly: LoadImage would instantiate every optional reader per call.
    reader = PydicomReader(swap_ij=False, affine_lps_to_ras=True)
    array = np.empty((len(ordered), rows, cols), dtype=np.float32)
    for k, (path, _) in enumerate(ordered):
        array[k] = _read_pixels(reader, path, rows, cols)
    first = ordered[0][1]
    meta: dict[str, Any] = {
        key: str(first.get(key, ""))
        for key in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "FrameOfReferenceUID",
            "PatientID",
            "SeriesDescription",
            "Manufacturer",
            "StudyDate",
        )
    }
    meta.update(
        sop_instance_uids=[
            str(ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
            for _, ds in ordered
        ],
        files=[str(p) for p, _ in ordered],
        SeriesNumber=first.get("SeriesNumber"),
        ImageOrientationPatient=[
            float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])
        ],
        SliceThickness=float(first.get("SliceThickness") or 0.0) or None,
        transfer_syntaxes=sorted(
            {
                str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
                for _, ds in ordered
            }
        ),
        reader="monai.PydicomReader",
        ignored_files=[str(p) for p in ignored],
    )
    # Anonymisers sometimes blank the study/series UIDs; derive stable ones from the instance UIDs
    # so that a SEG written for this series can still reference it (recorded in derived_uids).
    meta["derived_uids"] = []
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not meta[key]:
            meta[key] = str(
                pydicom.uid.generate_uid(entropy_srcs=[key, *meta["sop_instance_uids"]])
            )
            meta["derived_uids"].append(key)
    meta["geometry"] = "assumed" if "ImagePositionPatient" not in first else "patient"
    vol = Volume(array, affine, source, str(first.get("Modality", "")), meta)
    vol.meta["original_orientation"] = vol.orientation
    return vol
