"""NIfTI and FreeSurfer MGH/MGZ through nibabel, with nibabel's own geometry rule.

Geometry (the same affine ``nibabel.load(path).affine`` gives):

* NIfTI: the **sform** when ``sform_code > 0``; else the **qform** when ``qform_code > 0``; else
  the pixdim-only affine (:meth:`nibabel.nifti1.Nifti1Header.get_base_affine`). The header is
  never "corrected": a pixdim that disagrees with the sform, a qform that disagrees with it or a
  sheared sform are read as they are. (MONAI's ``correct_nifti_header_if_necessary`` replaces the
  sform by the qform in that case; that is why NIfTI is not read through MONAI here.)
* MGH/MGZ: the header's vox2ras matrix (``MGHImage.affine``).

Bad input raises :class:`~samed.io.volume.VolumeReadError` naming the file before any voxel is
allocated: RGB/RGBA (structured) and complex voxel types, a non-positive dimension, a header whose
dimensions need more bytes than the file can hold (uncompressed: the file size; gzip: the deflate
limit of about 1032:1), and a singular or non-finite affine.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..registry import NIBABEL_SUFFIXES
from .volume import VolumeReadError

__all__ = ["NIBABEL_SUFFIXES", "nibabel_affine", "load_nibabel"]

#: Suffixes read by :func:`load_nibabel`.

# Deflate cannot compress better than about 1032:1; anything claiming more is a wrong header.
_DEFLATE_MAX_RATIO = 1100
_GZIP_SLACK_BYTES = 1 << 16


def nibabel_affine(img: Any, path: Path) -> tuple[np.ndarray, str]:
    """The affine of a nibabel image by nibabel's precedence, and the field it came from.

    Args:
        img: a loaded ``Nifti1Image``/``Nifti2Image`` or ``MGHImage`` (data not read).
        path: the file, for error messages.

    Returns:
        ``(affine, source)``: the ``(4, 4)`` RAS+ affine for the ``(i, j, k)`` voxel index and
        ``"sform"``, ``"qform"``, ``"pixdim"`` or ``"mgh"``.

    Raises:
        VolumeReadError: if the chosen affine is not finite and invertible.
    """
    header = img.header
    if "sform_code" in header and "qform_code" in header:
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        if sform_code > 0:
            affine, source = header.get_sform(), "sform"
        elif qform_code > 0:
            affine, source = header.get_qform(), "qform"
        else:
            affine, source = header.get_base_affine(), "pixdim"
        what = f"{source} (sform_code {sform_code}, qform_code {qform_code})"
    else:
        affine, source = np.asarray(img.affine), "mgh"
        what = "vox2ras matrix"
    affine = np.asarray(affine, dtype=np.float64)
    if (
        affine.shape != (4, 4)
        or not np.all(np.isfinite(affine))
        or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    ):
        raise VolumeReadError(
            f"{path}: its {what} is not a finite, invertible affine:\n"
            f"{np.array2string(affine, precision=5)}"
        )
    return affine, source


def _check_header(img: Any, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header, refused before any voxel is read when they cannot be."""
    header = img.header
    shape = tuple(int(d) for d in header.get_data_shape())
    dtype = np.dtype(header.get_data_dtype())
    if dtype.fields is not None:
        raise VolumeReadError(
            f"{path} is a colour image (voxel type {dtype.descr}, shape {shape}); only "
            "single-channel greyscale volumes are supported -- convert it to greyscale first"
        )
    if dtype.kind == "c":
        raise VolumeReadError(
            f"{path} holds complex voxels ({dtype.name}, shape {shape}); only real-valued "
            "volumes are supported -- store the magnitude (or phase) as a real image"
        )
    if not shape or any(d <= 0 for d in shape):
        raise VolumeReadError(f"{path}: header dimensions {shape} must all be positive")
    n_bytes = int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    size = path.stat().st_size
    if path.name.lower().endswith((".gz", ".mgz")):
        limit = size * _DEFLATE_MAX_RATIO + _GZIP_SLACK_BYTES
        if offset + n_bytes > limit:
            raise VolumeReadError(
                f"{path}: header dimensions {shape} ({dtype.name}) need {n_bytes:,} bytes of "
                f"voxels, but a {size:,}-byte gzip file can hold at most about {limit:,}; the "
                "header's dimensions are wrong (nothing was allocated)"
            )
    elif offset + n_bytes > size:
        raise VolumeReadError(
            f"{path}: header dimensions {shape} ({dtype.name}) need {n_bytes:,} bytes of voxels "
            f"from offset {offset}, but the file has {size:,} bytes; the file is truncated or "
            "its header's dimensions are wrong (nothing was allocated)"
        )
    return shape, dtype


def load_nibabel(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a NIfTI (``.nii``/``.nii.gz``) or MGH (``.mgh``/``.mgz``) file with nibabel.

    Args:
        path: the file.

    Returns:
        ``(data, affine, meta)``: the voxels in the file's ``(i, j, k[, ...])`` order (scaled by
        ``scl_slope``/``scl_inter`` as nibabel does), the affine of :func:`nibabel_affine`, and
        ``meta`` with ``reader``, ``affine_source`` and, for NIfTI, ``sform_code``/``qform_code``.

    Raises:
        VolumeReadError: unreadable file or a header refused by the checks in the module policy.
    """
    import nibabel as nib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(path), mmap=False)  # never keep a view of the input file
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
        raise VolumeReadError(f"cannot read {path} with nibabel: {exc}") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image | nib.MGHImage):
        raise VolumeReadError(
            f"{path} was read by nibabel as {type(img).__name__}; expected NIfTI or MGH"
        )
    shape, _ = _check_header(img, path)
    affine, source = nibabel_affine(img, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001
        raise VolumeReadError(
            f"cannot read the voxels of {path} (header shape {shape}): {exc}"
        ) from exc
    meta: dict[str, Any] = {"reader": "nibabel", "affine_source": source}
    header = img.header
    if "sform_code" in header:
        meta["sform_code"] = int(header["sform_code"])
        meta["qform_code"] = int(header["qform_code"])
    return np.asarray(data), affine, meta
