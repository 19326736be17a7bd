"""DICOM series: find them in a folder, check their geometry, read them into a :class:`Volume`.

Policy (each case raises :class:`~samed.io.volume.VolumeReadError` naming the files and the
measured values, and nothing is read further):

* Folders are searched recursively and files are recognised by content, never by name: hidden or
  temporary names (``.tmp-x``) are read like any other (a note names them). Files that are not
  DICOM (no ``DICM`` preamble and no readable DICOM header) and ``DICOMDIR`` files are ignored
  (listed in ``meta["ignored_files"]``); a file *with* the ``DICM`` marker whose header cannot be
  parsed is an error (it may be a slice of the series).
* Files are grouped by SeriesInstanceUID. Where it is blank, they are grouped by a key of
  (PatientID, StudyInstanceUID, StudyDate, SeriesDate/Time, Modality, SeriesNumber,
  SeriesDescription, FrameOfReferenceUID, localizer or not), and the series gets a UID derived from
  that key (stable when files are copied; a note says so). Orientation and size are not part of
  the key, so a blank-UID series that mixes them fails the geometry checks instead of being split.
* Several series in one folder: :func:`list_series` lists them; loading needs ``series_uid``
  unless exactly one series holds images. When the only other image series are localizers
  (``ImageType`` contains ``LOCALIZER``), the one non-localizer series is loaded and a note names
  the skipped ones. Notes are in ``meta["notes"]`` (``samed convert`` prints them).
* Non-image objects (SEG, RTSTRUCT, RTDOSE, RTPLAN, SR, ...) are never read as images.
* An empty or non-numeric RescaleSlope/RescaleIntercept, and a RescaleSlope of 0, are errors.
* Slices that share one SOPInstanceUID load (note ``duplicate SOPInstanceUID``), but such a series
  cannot be referenced by a DICOM SEG (:func:`samed.io.save_dicom_seg` refuses it).
* Slices are sorted by their position along the slice normal (``row x column`` direction cosines),
  so ``z`` increases along the normal. ITK and dcm2niix use the same order.
* Mixed orientations, different rows/columns/pixel spacing, gantry tilt (slices shifted in-plane),
  a missing slice (a gap), non-uniform spacing and several slices at one position (4D series or
  duplicates) are errors: resampling would silently move voxels, which is the failure this
  package exists to prevent.
* A single slice loads as ``Z = 1``; its slice step is ``SpacingBetweenSlices``, else
  ``SliceThickness``, else 1 mm. A lone 2D image with neither ImagePositionPatient nor
  ImageOrientationPatient (X-ray, secondary capture) gets an axis-aligned affine from its pixel
  spacing (``meta["geometry"] = "assumed"``); one with only one of the two is an error.
* Multi-frame (enhanced) image objects are not supported (error).
* Pixels are decoded by MONAI's ``PydicomReader`` (pydicom with pylibjpeg: JPEG baseline/lossless,
  JPEG-LS, JPEG 2000 and RLE) and rescaled with each slice's own slope/intercept (CT in HU).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.uid
from pydicom.dataset import Dataset

from .dicom_geometry import _fmt_files, series_geometry
from .volume import Volume, VolumeReadError

__all__ = [
    "SeriesInfo",
    "list_series",
    "scan_folder",
    "load_dicom_series",
    "read_header",
    "refuse_non_image",
]

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTRECORD", "SR", "KO", "PR", "REG", "DOC"}
)
# RT Dose, RT Plan, RT Structure Set, Segmentation (the modality may be blank or wrong).
_NON_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.481.2",
        "1.2.840.10008.5.1.4.1.1.481.5",
        "1.2.840.10008.5.1.4.1.1.481.3",
        "1.2.840.10008.5.1.4.1.1.66.4",
    }
)


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
        uid_derived: the files' SeriesInstanceUID is blank; ``series_uid`` was derived from the
            grouping key (see the module policy).
        is_localizer: every file's ImageType contains ``LOCALIZER`` (a scout).
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
    uid_derived: bool = False
    is_localizer: bool = False

    def __str__(self) -> str:
        kind = "" if self.is_image else ", not an image series"
        kind += ", localizer" if self.is_localizer else ""
        kind += ", SeriesInstanceUID blank (derived)" if self.uid_derived else ""
        number = f", SeriesNumber {self.series_number}" if self.series_number is not None else ""
        return (
            f"{self.series_uid} ({self.modality or '?'}, {self.description!r}{number}, "
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


def _is_localizer(ds: Dataset) -> bool:
    return any("LOCALIZER" in str(v).upper() for v in (ds.get("ImageType") or []))


def _series_key(ds: Dataset) -> str:
    """The SeriesInstanceUID, or for a blank one a UID derived from what tells series apart."""
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid
    # Orientation and size are deliberately not in the key: a series that mixes them must fail
    # the geometry checks, not be split silently. A scout differs by its ImageType.
    fields = [
        "samed: blank SeriesInstanceUID",
        *(
            str(ds.get(k, "") or "")
            for k in (
                "PatientID",
                "StudyInstanceUID",
                "StudyDate",
                "SeriesDate",
                "SeriesTime",
                "Modality",
                "SeriesNumber",
                "SeriesDescription",
                "FrameOfReferenceUID",
            )
        ),
        "localizer" if _is_localizer(ds) else "",
    ]
    return str(pydicom.uid.generate_uid(entropy_srcs=fields))


def scan_folder(
    folder: str | os.PathLike,
) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[Path]]:
    """Read the headers of every DICOM file under ``folder`` (recursively), grouped by series.

    Args:
        folder: folder to search.

    Files are recognised by content, whatever their name (hidden and temporary names included).

    Returns:
        ``(series, ignored)``: SeriesInstanceUID (derived when blank, see the module policy) ->
        list of ``(path, header)`` sorted by path, and the files that were skipped as non-DICOM
        (or DICOMDIR).

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
            if not path.is_file():
                continue
            ds = read_header(path)
            if ds is None or "SeriesInstanceUID" not in ds:
                ignored.append(path)
                continue
            media = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
            if ds.get("SOPClassUID", media) == _DICOMDIR_CLASS or media == _DICOMDIR_CLASS:
                ignored.append(path)
                continue
            series.setdefault(_series_key(ds), []).append((path, ds))
    return series, ignored


def _sop_class(ds: Dataset) -> str:
    media = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
    return str(ds.get("SOPClassUID") or media or "")


def _is_image(ds: Dataset) -> bool:
    return (
        "Rows" in ds
        and "Columns" in ds
        and str(ds.get("Modality", "")) not in _NON_IMAGE_MODALITIES
        and _sop_class(ds) not in _NON_IMAGE_SOP_CLASSES
    )


def refuse_non_image(path: Path, ds: Dataset) -> None:
    """Raise unless a DICOM header is an image (not SEG, RTSTRUCT, RTDOSE, RTPLAN, SR, ...).

    Raises:
        VolumeReadError: naming the file, its Modality and SOP class.
    """
    if _is_image(ds):
        return
    uid = _sop_class(ds)
    name = getattr(pydicom.uid.UID(uid), "name", uid) if uid else "unknown"
    raise VolumeReadError(
        f"{path} is not an image: Modality {str(ds.get('Modality', '')) or '(blank)'}, SOP class "
        f"{name} ({uid or 'none'}); non-image objects (dose grids, plans, structure sets, "
        "segmentations, reports) are not read as image volumes"
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
        uid_derived=not str(first.get("SeriesInstanceUID", "") or "").strip(),
        is_localizer=all(_is_localizer(ds) for _, ds in items),
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


def _item_notes(info: SeriesInfo) -> list[str]:
    notes = []
    if info.uid_derived:
        notes.append(
            f"SeriesInstanceUID is blank in the {info.n_files} files of this series; they were "
            "grouped by SeriesNumber, SeriesDescription, Modality, study and localizer flag, and "
            f"the series UID {info.series_uid} was derived from them"
        )
    hidden = [p for p in info.paths if p.name.startswith(".")]
    if hidden:
        notes.append(
            f"{len(hidden)} slice(s) with hidden or temporary names were read as DICOM by "
            f"content: {_fmt_files(hidden)}"
        )
    return notes


def choose_series(
    folder: Path, series_uid: str | None
) -> tuple[str, list[tuple[Path, Dataset]], list[Path], list[str]]:
    """Pick one image series in a folder (the only one, the only non-localizer one, or the one
    named by ``series_uid``).

    Returns:
        ``(series_uid, items, ignored, notes)``: the chosen UID (derived when blank), its
        ``(path, header)`` list, the non-DICOM files skipped, and notes for the user.

    Raises:
        VolumeReadError: no DICOM, no image series, an unknown ``series_uid``, or several image
            series to choose from.
    """
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
        return series_uid, series[series_uid], ignored, _item_notes(infos[series_uid])
    images = [uid for uid, info in infos.items() if info.is_image]
    if len(images) == 1:
        return images[0], series[images[0]], ignored, _item_notes(infos[images[0]])
    main = [uid for uid in images if not infos[uid].is_localizer]
    if len(main) == 1 and len(images) > 1:
        skipped = [str(infos[uid]) for uid in images if uid != main[0]]
        notes = [f"skipped {len(skipped)} localizer (scout) series: {'; '.join(skipped)}"]
        return main[0], series[main[0]], ignored, notes + _item_notes(infos[main[0]])
    listing = "; ".join(str(i) for i in infos.values())
    if not images:
        raise VolumeReadError(f"no image series in {folder}; found only: {listing}")
    raise VolumeReadError(
        f"{len(images)} image series in {folder}; choose one with series_uid (--series): {listing}"
    )


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


def _check_rescale(path: Path, ds: Dataset) -> None:
    """Refuse an empty, non-numeric or zero RescaleSlope and an empty/non-numeric intercept."""
    for keyword, tag in (("RescaleSlope", "(0028,1053)"), ("RescaleIntercept", "(0028,1052)")):
        if keyword not in ds:
            continue
        raw = ds[keyword].value
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if raw is None or str(raw).strip() == "" or not math.isfinite(value):
            what = "empty" if raw is None or str(raw).strip() == "" else "not a number"
            raise VolumeReadError(
                f"{path}: {keyword} {tag} is present but {what} ({raw!r}); the stored pixel "
                "values cannot be converted to real units"
            )
        if keyword == "RescaleSlope" and value == 0:
            raise VolumeReadError(
                f"{path}: RescaleSlope {tag} is 0, which would make every voxel "
                f"{float(ds.get('RescaleIntercept') or 0):g}; the header is broken"
            )


def load_dicom_series(
    items: Sequence[tuple[Path, Dataset]],
    source: Path,
    ignored: Sequence[Path] = (),
    *,
    series_key: str | None = None,
    notes: Sequence[str] = (),
) -> Volume:
    """Read one checked series into a float32 :class:`Volume` (``array[z, row, column]``).

    Args:
        items: ``(path, header)`` of every file of the series.
        source: the folder (or file) the user named, recorded as :attr:`Volume.source`.
        ignored: files skipped while scanning (recorded in ``meta``).
        series_key: the series' key from :func:`scan_folder`; used as the SeriesInstanceUID when
            the files' own is blank.
        notes: notes from choosing the series, copied into ``meta["notes"]``.

    Raises:
        VolumeReadError: see the module policy.
    """
    ordered, affine = series_geometry(items)
    for path, ds in ordered:
        _check_rescale(path, ds)
    rows, cols = int(ordered[0][1].Rows), int(ordered[0][1].Columns)
    from monai.data import PydicomReader

    # The reader is used directly: LoadImage would instantiate every optional reader per call.
    reader = PydicomReader(swap_ij=False, affine_lps_to_ras=True)
    # The first slice is decoded before the volume is allocated, so a header with absurd
    # Rows/Columns fails on its pixel data, not on a huge allocation.
    first_slice = _read_pixels(reader, ordered[0][0], rows, cols)
    array = np.empty((len(ordered), rows, cols), dtype=np.float32)
    array[0] = first_slice
    for k, (path, _) in enumerate(ordered[1:], start=1):
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
            if key == "SeriesInstanceUID" and series_key:
                meta[key] = series_key  # the key list_series shows for this blank-UID series
            else:
                meta[key] = str(
                    pydicom.uid.generate_uid(entropy_srcs=[key, *meta["sop_instance_uids"]])
                )
            meta["derived_uids"].append(key)
    meta["notes"] = list(notes)
    uids = meta["sop_instance_uids"]
    shared = len(uids) - len(set(uids))
    meta["duplicate_sop_instance_uids"] = shared
    if shared:
        meta["notes"].append(
            f"duplicate SOPInstanceUID: {len(uids)} slices carry only {len(set(uids))} distinct "
            "SOPInstanceUIDs; the volume is read by position, but a DICOM SEG cannot reference "
            "this series"
        )
    meta["geometry"] = "assumed" if "ImagePositionPatient" not in first else "patient"
    vol = Volume(array, affine, source, str(first.get("Modality", "")), meta)
    vol.meta["original_orientation"] = vol.orientation
    return vol
