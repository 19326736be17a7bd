"""Find the cases among ``samed segment``'s inputs and give each a stable, unique id."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..paths import WINDOWS_RESERVED, safe_name
from ..registry import ITK_SUFFIXES, NIBABEL_SUFFIXES, strip_volume_suffix
from .series import SeriesFilter, SkippedSeries

__all__ = [
    "CaseInput",
    "IMAGE_SUFFIXES",
    "discover_cases",
    "check_output_location",
    "series_skip_reason",
]

#: File suffixes taken as image volumes when a folder is searched (DICOM is found by content).
# image files a batch picks up in a folder (MedSAM .npz is an explicit input only)
IMAGE_SUFFIXES = (*NIBABEL_SUFFIXES, *ITK_SUFFIXES)
#: Case ids that would name the output folder's own files.
_RESERVED_IDS = ("summary.csv", "summary.json")


@dataclass(frozen=True)
class CaseInput:
    """One case found among the inputs.

    Attributes:
        case_id: stable, unique, file-system safe id (the output folder name; prompts refer to it).
        path: the image file, or the folder searched for the DICOM series.
        series_uid: SeriesInstanceUID for DICOM cases, else None.
        error: set when the input could not even be listed (the case then fails with it).
        files: the files the case is read from (the image file; every slice of a DICOM series),
            for the output check and the resume fingerprint (empty: ``path`` alone).
        remote: for a series on a DICOMweb server (:mod:`samed.batch.dicomweb`), where it is;
            ``path`` is then a placeholder until it is retrieved.
    """

    case_id: str
    path: Path
    series_uid: str | None = None
    error: str = ""
    files: tuple[Path, ...] = ()
    remote: Any = None

    @property
    def is_dicom(self) -> bool:
        return self.series_uid is not None


def _sanitize(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._-")
    return s[:limit].rstrip("._-")


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def _file_stem(path: Path) -> str:
    return strip_volume_suffix(path.name)


def _reserved(case_id: str) -> bool:
    return case_id.lower() in _RESERVED_IDS or case_id.split(".")[0].upper() in WINDOWS_RESERVED


def _is_image_file(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def _dicom_case_id(info: Any) -> str:
    import pydicom

    patient = ""
    try:
        ds = pydicom.dcmread(info.paths[0], stop_before_pixels=True, specific_tags=["PatientID"])
        patient = str(ds.get("PatientID", "") or "")
    except Exception:  # noqa: BLE001 - the id then falls back to the description
        patient = ""
    # Anonymised series may carry an empty SeriesInstanceUID: then their file names (which stay
    # the same when the archive is copied or moved) tell them apart.
    key = info.series_uid or "|".join(sorted(Path(f).name for f in info.paths))
    return _dicom_case_id_from(patient, info.description or info.modality or "series", key)


def _dicom_case_id_from(patient: str, description: str, key: str) -> str:
    """``<PatientID>_<SeriesDescription>_<8 hex of sha1(key)>``, sanitized (DICOMweb: the same)."""
    parts = [_sanitize(patient, 32), _sanitize(description or "series", 32)]
    base = "_".join(p for p in parts if p) or "series"
    return f"{base}_{_short_hash(key)}"


def _image_type(path: Path) -> list[str] | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ImageType"])
    except Exception:  # noqa: BLE001 - unknown; the image-type rule is then not applied
        return None
    return [str(v) for v in (ds.get("ImageType") or [])]


def series_skip_reason(info: Any, series_filter: SeriesFilter) -> str:
    """Why a listed DICOM series (:class:`samed.io.SeriesInfo`) is not a case ("" if it is)."""
    return series_filter.rejects(
        modality=info.modality,
        description=info.description,
        n_files=info.n_files,
        is_image=info.is_image,
        is_localizer=info.is_localizer,
        image_type=_image_type(info.paths[0]) if series_filter.image_type is not None else None,
    )


def discover_cases(
    inputs: Sequence[str | os.PathLike],
    series_filter: SeriesFilter | None = None,
    skipped: list[SkippedSeries] | None = None,
) -> list[CaseInput]:
    """Turn the command line's inputs into cases.

    * an image file (NIfTI, NRRD, MHA/MHD; any other file is tried as an image too): one case,
      id = file name without its suffix;
    * a folder: searched recursively; every image file is a case, and every DICOM image series
      found under it is a case with id ``<PatientID>_<SeriesDescription>_<8 hex of
      sha1(SeriesInstanceUID)>`` (sanitized to ``[A-Za-z0-9._-]``).

    Ids that collide (two ``ct.nii.gz`` in different folders; compared case-insensitively) all
    get ``_<8 hex of sha1(path)>`` appended, so an id does not depend on the order of the inputs;
    ids equal to the summary's files (``summary.csv``, ``summary.json``) get ``_case``. Every id
    passes :func:`samed.paths.safe_name`. An input that cannot be
    listed (missing path, corrupt DICOM under a folder) becomes a case that fails with that error.

    DICOM series that are no image (SEG, RTSTRUCT, PR, SR, KO...), localizers, and series that
    fail ``series_filter`` (:mod:`samed.batch.series`) are not cases; each is appended to
    ``skipped`` with the reason.

    Args:
        inputs: files and folders.
        series_filter: the ``--series-filter`` rules (None: only the fixed ones).
        skipped: list that receives a :class:`SkippedSeries` per series left out (None: dropped).

    Returns:
        The cases, in input order (folders: files by path, then DICOM series).

    Raises:
        ValueError: two inputs that still share an id after the suffixes (named).
    """
    from ..io import VolumeReadError, list_series

    found: list[CaseInput] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            found.append(
                CaseInput(_sanitize(_file_stem(p)) or "missing", p, error=f"{p} does not exist")
            )
            continue
        if p.is_file():
            found.append(
                CaseInput(_sanitize(_file_stem(p)) or "case", p.resolve(), files=(p.resolve(),))
            )
            continue
        p = p.resolve()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and _is_image_file(q)):
            found.append(CaseInput(_sanitize(_file_stem(f)) or "case", f, files=(f,)))
        try:
            listed = list_series(p)
        except VolumeReadError as exc:
            found.append(CaseInput(_sanitize(p.name) or "folder", p, error=str(exc)))
            continue
        series = []
        for info in listed:
            reason = series_skip_reason(info, series_filter or SeriesFilter())
            if not reason:
                series.append(info)
            elif skipped is not None:
                skipped.append(
                    SkippedSeries(
                        str(info.folder),
                        info.series_uid,
                        info.modality,
                        info.description,
                        info.n_files,
                        reason,
                    )
                )
        for info in series:
            files = tuple(sorted(Path(f).resolve() for f in info.paths))
            found.append(
                CaseInput(_dicom_case_id(info), p, series_uid=info.series_uid, files=files)
            )
    # ids that would be the summary's own files get a suffix (summary.csv.nii.gz -> summary.csv_case)
    found = [replace(c, case_id=f"{c.case_id}_case") if _reserved(c.case_id) else c for c in found]
    unique: list[CaseInput] = []
    seen: set[tuple[Path, str | None]] = set()
    for c in found:
        key = (c.path, c.series_uid)
        if key in seen and not c.error:
            continue  # the same file or series named twice (e.g. a file and its folder)
        seen.add(key)
        unique.append(c)
    # ids are compared case-insensitively: CT and ct are one folder on macOS and Windows
    counts: dict[str, int] = {}
    for c in unique:
        counts[c.case_id.lower()] = counts.get(c.case_id.lower(), 0) + 1
    out = []
    for c in unique:
        if counts[c.case_id.lower()] > 1:
            tag = f"{c.path}|{c.series_uid or ''}"
            c = replace(c, case_id=f"{c.case_id}_{_short_hash(tag)}")
        out.append(c)
    ids: dict[str, CaseInput] = {}
    for c in out:
        safe_name(c.case_id, "case id")
        other = ids.setdefault(c.case_id.lower(), c)
        if other is not c:
            raise ValueError(
                f"inputs {other.path} and {c.path} both give case id {c.case_id!r}; rename one"
            )
    return out


def check_output_location(out_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    out = out_dir.expanduser().resolve()
    for raw in inputs:
        p = Path(raw).expanduser().resolve()
        if p.is_dir() and (out == p or p in out.parents):
            raise ValueError(
                f"output folder {out} is inside the input folder {p}; choose an output folder "
                "outside every input folder (inputs are never written to)"
            )
