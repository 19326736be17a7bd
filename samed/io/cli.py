"""``samed convert INPUT OUTPUT [--reference SERIES_DIR] [--series UID]``.

* image (DICOM series folder, NIfTI, FreeSurfer MGZ/MGH, NRRD, MHA, MedSAM npz) -> NIfTI on the
  same grid;
* DICOM SEG or RTSTRUCT (with ``--reference`` = its image series) -> NIfTI label map;
* NIfTI written from DICOM stores the rows bottom-up, as dcm2niix does (an axial LPS series is
  written LAS), so outputs share the grid of dcm2niix / TotalSegmentator files; other inputs keep
  their voxel order. ``--orientation RAS`` (any three axis codes) or ``native`` overrides this.
  Reordering voxels is exact (flips/transposes, world positions unchanged);
* label map -> DICOM SEG when OUTPUT ends in ``.dcm`` (with ``--reference`` = the image series).
  A label map stored in another voxel order of the same grid (e.g. LAS vs the series' LPS) is
  flipped onto the series' order; any other grid difference is an error.

Exit codes: 0 written, 2 bad input (one line on stderr, nothing written). Notes on what was read
(a blank SeriesInstanceUID, a skipped localizer, slices with hidden names) go to stderr as
``samed convert: note: ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..registry import NIFTI_SUFFIXES, VOLUME_SUFFIXES

if TYPE_CHECKING:  # the readers (pydicom, nibabel, MONAI) load only when a conversion runs
    from .volume import Volume

__all__ = ["add_parser", "run_convert", "convert"]

_NIFTI = NIFTI_SUFFIXES


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``convert`` sub-command on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "convert",
        help="convert DICOM/NIfTI/MGZ/NRRD/MHA/npz/SEG/RTSTRUCT to NIfTI, or a label map to DICOM "
        "SEG",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "input", help="DICOM folder or file, .nii/.nii.gz, .mgz/.mgh, .nrrd, .mha/.mhd, .npz"
    )
    parser.add_argument("output", help="output .nii/.nii.gz, or .dcm for a DICOM SEG")
    parser.add_argument(
        "--reference",
        metavar="SERIES_DIR",
        default=None,
        help="DICOM image series a SEG/RTSTRUCT input or a .dcm output refers to",
    )
    parser.add_argument(
        "--series",
        metavar="UID",
        default=None,
        help="SeriesInstanceUID to use when a folder holds several series",
    )
    parser.add_argument(
        "--orientation",
        metavar="CODES",
        default=None,
        help="voxel order of a NIfTI output: 'native', or axis codes such as RAS/LPS "
        "(default: dcm2niix's for DICOM inputs, native otherwise)",
    )
    parser.set_defaults(func=run_convert)
    return parser


def _compact(array: np.ndarray, stored_dtype: str) -> np.ndarray:
    """Give an image back an integer dtype when it was stored as one (or is integral HU)."""
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return array
    if not np.array_equal(array, np.round(array)):
        return array
    lo, hi = float(array.min()), float(array.max())
    try:
        stored = np.dtype(stored_dtype)
    except TypeError:
        stored = np.dtype(np.float32)
    candidates = [stored] if np.issubdtype(stored, np.integer) else []
    candidates.append(np.dtype(np.int16))
    for dt in candidates:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return array.astype(dt)
    return array


def _dicom_kind(path: Path) -> str:
    from .dicom import read_header

    if not path.is_file() or path.name.lower().endswith(VOLUME_SUFFIXES):
        return ""
    ds = read_header(path)
    return str(ds.get("Modality", "")) if ds is not None else ""


def _nifti_order(vol: Volume, orientation: str | None, from_dicom: bool) -> Volume:
    from .volume import reorient

    if orientation is None:
        if not from_dicom:
            return vol
        codes = vol.orientation
        flipped = {"A": "P", "P": "A", "R": "L", "L": "R", "S": "I", "I": "S"}[codes[1]]
        return reorient(vol, codes[0] + flipped + codes[2])  # dcm2niix: rows bottom-up
    if orientation.lower() == "native":
        return vol
    return reorient(vol, orientation)


def convert(
    input_path: str | Path,
    output_path: str | Path,
    reference: str | Path | None = None,
    series_uid: str | None = None,
    orientation: str | None = None,
    notes: list[str] | None = None,
) -> Path:
    """The ``convert`` command as a function (see the module docstring).

    Args:
        notes: when given, the notes of the volumes read (``meta["notes"]``) are appended to it.

    Returns:
        The written path.

    Raises:
        VolumeReadError, GeometryError, ValueError: bad input; nothing is written.
    """
    from .readers import load_label_map, load_volume
    from .seg import read_dicom_seg, read_rtstruct, save_dicom_seg
    from .volume import align_to
    from .writers import save_nifti

    src, out = Path(input_path), Path(output_path)
    if not src.exists():
        raise ValueError(f"input {src} does not exist")
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"output {out} is the input; inputs are never overwritten")
    if not out.parent.is_dir():
        raise ValueError(f"output folder {out.parent} does not exist")
    name = out.name.lower()
    if name.endswith(".dcm"):
        if reference is None:
            raise ValueError("writing a DICOM SEG (.dcm output) needs --reference SERIES_DIR")
        ref = load_volume(reference, series_uid=series_uid)
        _notes(ref, notes)
        labels = align_to(load_label_map(src), ref)
        save_dicom_seg(labels.array, ref, out, label_names=labels.meta.get("label_names"))
        return out
    if not name.endswith(_NIFTI):
        raise ValueError(f"output {out} must end in .nii, .nii.gz or .dcm (DICOM SEG)")
    kind = _dicom_kind(src)
    if kind in ("SEG", "RTSTRUCT"):
        if reference is None:
            raise ValueError(f"{src} is a DICOM {kind}: give its image series with --reference")
        reader = read_dicom_seg if kind == "SEG" else read_rtstruct
        labels = _nifti_order(reader(src, reference), orientation, True)
        _notes(labels, notes)
        save_nifti(labels.array, labels, out)
        return out
    vol = load_volume(src, series_uid=series_uid)
    _notes(vol, notes)
    vol = _nifti_order(vol, orientation, src.is_dir() or kind != "")
    save_nifti(_compact(vol.array, str(vol.meta.get("stored_dtype", ""))), vol, out)
    return out


def _notes(vol: Volume, notes: list[str] | None) -> None:
    if notes is not None:
        notes.extend(str(n) for n in vol.meta.get("notes", []))


def run_convert(args: argparse.Namespace) -> int:
    """Run ``samed convert`` from parsed arguments; returns the exit code (0 ok, 2 bad input)."""
    from .volume import GeometryError, VolumeReadError

    notes: list[str] = []
    try:
        out = convert(
            args.input,
            args.output,
            args.reference,
            getattr(args, "series", None),
            getattr(args, "orientation", None),
            notes,
        )
    except (VolumeReadError, GeometryError, ValueError, FileNotFoundError) as exc:
        message = " ".join(str(exc).split())
        print(f"samed convert: error: {message}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"samed convert: note: {note}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m samed.io.cli INPUT OUTPUT ...``)."""
    parser = argparse.ArgumentParser(prog="samed")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
