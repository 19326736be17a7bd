"""Volumes in and out: readers, writers and geometry checks.

Axis order everywhere is ``array[z, y, x]`` with a RAS+ ``affine`` for the index ``(x, y, z)``;
see :mod:`samed.io.volume` for the exact conventions and :mod:`samed.io.dicom` for the DICOM
bad-input policy.
"""

from .dicom import SeriesInfo, list_series
from .readers import load_label_map, load_volume
from .seg import read_dicom_seg, read_rtstruct, save_dicom_seg, save_rtstruct
from .volume import (
    GeometryError,
    Volume,
    VolumeReadError,
    align_to,
    atomic_write,
    check_same_grid,
    reorient,
)
from .writers import save_nifti

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
