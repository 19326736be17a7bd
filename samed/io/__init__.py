"""Volumes in and out: readers, writers and geometry checks.

Axis order everywhere is ``array[z, y, x]`` with a RAS+ ``affine`` for the index ``(x, y, z)``;
see :mod:`samed.io.volume` for the exact conventions and :mod:`samed.io.dicom` for the DICOM
bad-input policy.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# name -> submodule; imported on first use (PEP 562) so that ``samed.io.cli`` (``samed convert
# --help``) and ``import samed.io`` do not load pydicom and nibabel before they are needed
_LAZY = {
    "SeriesInfo": ".dicom",
    "list_series": ".dicom",
    "load_label_map": ".readers",
    "load_volume": ".readers",
    "read_dicom_seg": ".seg",
    "read_rtstruct": ".seg",
    "save_dicom_seg": ".seg",
    "save_rtstruct": ".seg",
    "GeometryError": ".volume",
    "Volume": ".volume",
    "VolumeReadError": ".volume",
    "align_to": ".volume",
    "atomic_write": ".volume",
    "check_same_grid": ".volume",
    "reorient": ".volume",
    "save_nifti": ".writers",
}

__all__ = [
    "Volume",
    "VolumeReadError",
    "GeometryError",
    "SeriesInfo",
    "load_volume",
    "load_label_map",
    "list_series",
    "save_nifti",
    "save_dicom_seg",
    "read_dicom_seg",
    "save_rtstruct",
    "read_rtstruct",
    "atomic_write",
    "check_same_grid",
    "align_to",
    "reorient",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
