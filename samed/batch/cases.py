"""Find the cases among ``samed segment``'s inputs and give each a stable, unique id."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..registry import ITK_SUFFIXES, NIBABEL_SUFFIXES, strip_volume_suffix

__all__ = ["CaseInput", "IMAGE_SUFFIXES", "discover_cases", "check_output_location"]

#: File suffixes taken as image volumes when a folder is searched (DICOM is found by content).
# image files a batch picks up in a folder (MedSAM .npz is an explicit input only)
IMAGE_SUFFIXES = (*NIBABEL_SUFFIXES, *ITK_SUFFIXES)


@dataclass(frozen=True)
class CaseInput:
    """One case found among the inputs.

    Attributes:
        case_id: stable, unique, file-system safe id (the output folder name; prompts refer to it).
        path: the image file, or the folder searched for the DICOM series.
        series_uid: SeriesInstanceUID for DICOM cases, else None.
        error: set when the input could not even be listed (the case then fails with it).
    """

    case_id: str
    path: Path
    series_uid: str | None = None
    error: str = ""

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
    parts = [_sanitize(patient, 32), _sanitize(info.description or info.modality or "series", 32)]
    base = "_".join(p for p in parts if p) or "series"
    # Anonymised series may carry an empty SeriesInstanceUID: then their file names (which stay
    # the same when the archive is copied or moved) tell them apart.
    key = info.series_uid or "|".join(sorted(Path(f).name for f in info.paths))
    return f"{base}_{_short_hash(key)}"


def discover_cases(inputs: Sequence[str | os.PathLike]) -> list[CaseInput]:
    """Turn the command line's inputs into cases.

    * an image file (NIfTI, NRRD, MHA/MHD; any other file is tried as an image too): one case,
      id = file name without its suffix;
    * a folder: searched recursively; every image file is a case, and every DICOM image series
      found under it is a case with id ``<PatientID>_<SeriesDescription>_<8 hex of
      sha1(SeriesInstanceUID)>`` (sanitized to ``[A-Za-z0-9._-]``).

    Ids that collide (two ``ct.nii.gz`` in different folders) all get ``_<8 hex of sha1(path)>``
    appended, so an id does not depend on the order of the inputs. An input that cannot be
    listed (missing path, corrupt DICOM under a folder) becomes a case that fails with that error.

    Args:
        inputs: files and folders.

    Returns:
        The cases, in input order (folders: files by path, then DICOM series).
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
            found.append(CaseInput(_sanitize(_file_stem(p)) or "case", p.resolve()))
            continue
        p = p.resolve()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and _is_image_file(q)):
            found.append(CaseInput(_sanitize(_file_stem(f)) or "case", f))
        try:
            series = [s for s in list_series(p) if s.is_image]
        except VolumeReadError as exc:
            found.append(CaseInput(_sanitize(p.name) or "folder", p, error=str(exc)))
            continue
        for info in series:
            found.append(CaseInput(_dicom_case_id(info), p, series_uid=info.series_uid))
    counts: dict[str, int] = {}
    for c in found:
        counts[c.case_id] = counts.get(c.case_id, 0) + 1
    out = []
    seen: set[tuple[Path, str | None]] = set()
    for c in found:
        key = (c.path, c.series_uid)
        if key in seen and not c.error:
            continue  # the same file or series named twice (e.g. a file and its folder)
        seen.add(key)
        if counts[c.case_id] > 1:
            tag = f"{c.path}|{c.series_uid or ''}"
            c = CaseInput(f"{c.case_id}_{_short_hash(tag)}", c.path, c.series_uid, c.error)
        out.append(c)
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
