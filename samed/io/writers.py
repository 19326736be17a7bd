"""Write arrays on a reference grid as NIfTI (atomically; inputs are never modified)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ..registry import NIFTI_SUFFIXES
from .volume import GeometryError, Volume, atomic_write

__all__ = ["save_nifti", "nifti_dtype"]

_NIFTI_SUFFIXES = NIFTI_SUFFIXES


def nifti_dtype(array: np.ndarray) -> np.dtype:
    """The on-disk dtype for an array: bool -> uint8, 64-bit ints -> the smallest int that fits
    (uint8/int16/int32), float64 -> float32; other dtypes are kept."""
    a = np.asarray(array)
    if a.dtype == bool:
        return np.dtype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize == 8:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        for candidate in (np.uint8, np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                return np.dtype(candidate)
        return a.dtype
    if a.dtype == np.float64 or a.dtype == np.float16:
        return np.dtype(np.float32)
    return a.dtype


def save_nifti(array: np.ndarray, reference: Volume, path: str | os.PathLike) -> Path:
    """Write a ``(Z, Y, X)`` array as NIfTI on exactly the reference's grid and affine.

    The file's data is ``array.T`` (``(x, y, z)``) and its **sform is exactly**
    ``reference.affine`` (shear included), with the code of the reference's affine when it was
    read from NIfTI (its sform_code, else qform_code, else 1 = scanner). The qform gets the same
    affine and code; NIfTI's qform cannot hold a shear, so for a sheared affine it is nibabel's
    nearest rotation-and-zoom, and ``pixdim`` holds the affine's column lengths. So nibabel (sform
    first), MONAI (pixdim agrees with the sform) and samed reload exactly ``reference.affine``
    (within float32 rounding, far below 1e-4 mm).
    The write is atomic.

    Args:
        array: ``(Z, Y, X)`` array with ``reference.shape``; integer arrays (label maps) keep an
            integer dtype (see :func:`nifti_dtype`).
        reference: the volume whose grid the array lies on.
        path: destination ending in ``.nii`` or ``.nii.gz``.

    Returns:
        The written path.

    Raises:
        GeometryError: if the array's shape differs from the reference's.
        ValueError: if the path does not end in ``.nii``/``.nii.gz``.
    """
    out = Path(path)
    if not out.name.lower().endswith(_NIFTI_SUFFIXES):
        raise ValueError(f"NIfTI output {out} must end in .nii or .nii.gz")
    data = np.asarray(array)
    if data.shape != reference.shape:
        raise GeometryError(
            f"array of shape {data.shape} cannot be written on the grid of {reference.source}: "
            f"its shape is {reference.shape} (Z, Y, X)"
        )
    data = data.astype(nifti_dtype(data), copy=False)
    codes = [int(reference.meta.get(k) or 0) for k in ("sform_code", "qform_code")]
    code = next((c for c in codes if 0 < c <= 5), 1)  # the space the source's affine was in
    img = nib.Nifti1Image(np.asarray(data.T), reference.affine)
    img.set_qform(reference.affine, code=code)
    img.set_sform(reference.affine, code=code)
    img.header.set_xyzt_units("mm", "sec")
    if np.issubdtype(data.dtype, np.integer):
        img.header["scl_slope"] = 1.0
        img.header["scl_inter"] = 0.0
    with atomic_write(out) as tmp:
        nib.save(img, str(tmp))
    return out
