"""Read any supported input into a :class:`~samed.io.volume.Volume`.

Formats: NIfTI (``.nii``, ``.nii.gz``) and FreeSurfer MGH (``.mgh``, ``.mgz``) through nibabel with
nibabel's sform/qform precedence (:mod:`samed.io.nifti`), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``; MONAI ``ITKReader``), DICOM series folders and single DICOM files
(:mod:`samed.io.dicom`), and the MedSAM ``.npz`` format (``imgs``/``gts`` ``(D, H, W)``,
``spacing`` ``(x, y, z)``, ``origin`` ``(x, y, z)`` and ``direction`` (3x3 row-major, SimpleITK's
LPS convention)).

Policy: the voxel order is the file's own (nothing is reoriented); a 2D image loads as ``Z = 1``;
a 4D image (more than one volume along a 4th axis) is an error; colour (RGB) and complex voxels are
errors; NaN or infinite voxels are an error unless ``nonfinite="zero"`` is asked for; label maps
must be integer-valued. Every error is a :class:`VolumeReadError` naming the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..registry import ITK_SUFFIXES, READABLE_SUFFIXES
from .dicom import choose_series, load_dicom_series, read_header, refuse_non_image
from .nifti import NIBABEL_SUFFIXES, load_nibabel
from .volume import LPS_TO_RAS, Volume, VolumeReadError, check_same_grid

__all__ = ["load_volume", "load_label_map", "detect_format", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = READABLE_SUFFIXES
_NONFINITE = ("error", "zero")


def detect_format(path: str | os.PathLike) -> str:
    """Name an input's format: ``"dicom_folder"``, ``"dicom"``, ``"nifti"`` (NIfTI or MGH, read by
    nibabel), ``"itk"``, ``"npz"``.

    Raises:
        VolumeReadError: if the path does not exist or the format is not supported.
    """
    p = Path(path)
    if p.is_dir():
        return "dicom_folder"
    if not p.exists():
        raise VolumeReadError(f"{p} does not exist")
    name = p.name.lower()
    if name.endswith(NIBABEL_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(".npz"):
        return "npz"
    if read_header(p) is not None:
        return "dicom"
    raise VolumeReadError(
        f"{p}: unsupported format; expected a DICOM folder or file, or one of "
        f"{', '.join(SUPPORTED_SUFFIXES)}"
    )


def _to_zyx(data: np.ndarray, path: Path) -> np.ndarray:
    """``(x, y[, z[, t...]])`` reader output -> ``(z, y, x)``; rejects real 4D, colour, complex."""
    data = np.asarray(data)
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        what = "complex" if data.dtype.kind == "c" else "colour or non-numeric"
        raise VolumeReadError(
            f"{path} holds {what} voxels (dtype {data.dtype}, shape {data.shape}); only "
            "real-valued single-channel volumes are supported"
        )
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise VolumeReadError(
            f"{path} is {data.ndim}D with shape {data.shape} (x, y, z, ...); only 3D volumes are "
            "supported -- split a 4D image into 3D volumes first"
        )
    return np.ascontiguousarray(data.T)


def _itk_data_file(path: Path) -> Path | None:
    """The file holding the voxels of a NRRD/MetaImage header (``None`` when it is not one file)."""
    if path.name.lower().endswith((".nrrd", ".mha")):
        return path
    try:
        with open(path, "rb") as fh:
            text = fh.read(8192).decode("latin-1")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=" if path.name.lower().endswith(".mhd") else ":")
        key, value = key.strip().lower(), value.strip()
        if sep and key in ("elementdatafile", "data file", "datafile"):
            if value.upper() == "LOCAL":
                return path
            if value.upper() == "LIST" or "%" in value or " " in value:
                return None  # slice lists / patterns: not checked
            return path.parent / value
    return None


def _check_itk_header(path: Path) -> None:
    """Refuse, before ITK allocates anything, a NRRD/MetaImage with several components per voxel
    (colour/vector) or whose dimensions need more bytes than its data can hold (raw data: the file
    size; compressed: deflate's ~1032:1 limit)."""
    data_file = _itk_data_file(path)
    try:
        import itk

        io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
        io.SetFileName(str(path))
        io.ReadImageInformation()
        dims = tuple(int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions()))
        n_bytes = int(io.GetImageSizeInBytes())
        components = int(io.GetNumberOfComponents())
    except Exception:  # noqa: BLE001 - unreadable headers are reported by the reader itself
        return
    if components != 1:
        raise VolumeReadError(
            f"{path} has {components} components per voxel (colour or vector image, dimensions "
            f"{dims}); only single-channel greyscale volumes are supported"
        )
    if data_file is None or not data_file.is_file():
        return
    size = data_file.stat().st_size
    limit = size * 1100 + (1 << 16)
    if n_bytes > limit:
        raise VolumeReadError(
            f"{path}: header dimensions {dims} need {n_bytes:,} bytes of voxels, but its data "
            f"({data_file.name}, {size:,} bytes) can hold at most about {limit:,} even "
            "compressed; the header's dimensions are wrong (nothing was allocated)"
        )


def _load_monai(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """NRRD/MetaImage through MONAI's ``ITKReader`` (NIfTI/MGH go through :mod:`.nifti`)."""
    from monai.data import ITKReader

    _check_itk_header(path)

    # The reader is called directly (LoadImage's read step): LoadImage would also instantiate every
    # optional reader on each call, which is slow and noisy.
    reader: Any = ITKReader(affine_lps_to_ras=True, reverse_indexing=False)
    name = "monai.ITKReader"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data, meta = reader.get_data(reader.read(str(path)))
    except Exception as exc:  # noqa: BLE001 - readers raise many types on bad files
        raise VolumeReadError(f"cannot read {path} with {name}: {exc}") from exc
    affine = np.asarray(meta["affine"], dtype=np.float64)
    data = np.asarray(data)
    if affine.shape != (4, 4):
        raise VolumeReadError(f"{path}: unsupported affine of shape {affine.shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeReadError(f"{path}: its affine is not finite and invertible:\n{affine}")
    return _to_zyx(data, path), affine, name


def _load_npz(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            if key not in files:
                raise VolumeReadError(
                    f"{path}: MedSAM npz has no {key!r} array (found {sorted(files)}); "
                    "expected 'imgs' (image) and 'gts' (labels)"
                )
            data = np.asarray(npz[key])
            spacing = (
                np.asarray(npz["spacing"], dtype=np.float64) if "spacing" in files else np.ones(3)
            )
            origin = (
                np.asarray(npz["origin"], dtype=np.float64) if "origin" in files else np.zeros(3)
            )
            direction = (
                np.asarray(npz["direction"], dtype=np.float64)
                if "direction" in files
                else np.eye(3)
            )
    except VolumeReadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise VolumeReadError(f"cannot read {path} as a MedSAM npz: {exc}") from exc
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise VolumeReadError(f"{path}: {key!r} must be (D, H, W); got shape {data.shape}")
    if spacing.shape != (3,) or origin.shape != (3,) or direction.size != 9:
        raise VolumeReadError(
            f"{path}: spacing {spacing.shape} and origin {origin.shape} must have 3 values and "
            f"direction {direction.shape} 9"
        )
    if np.any(spacing <= 0):
        raise VolumeReadError(f"{path}: spacing {spacing.tolist()} must be positive (x, y, z) mm")
    lps = np.eye(4)
    lps[:3, :3] = direction.reshape(3, 3) @ np.diag(spacing)
    lps[:3, 3] = origin
    return data, LPS_TO_RAS @ lps


def _check_finite(array: np.ndarray, path: Path, nonfinite: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        return array
    bad = ~np.isfinite(array)
    if not bad.any():
        return array
    n_nan = int(np.isnan(array).sum())
    n_inf = int(bad.sum()) - n_nan
    if nonfinite == "zero":
        array = array.copy()
        array[bad] = 0
        return array
    raise VolumeReadError(
        f"{path} contains {n_nan} NaN and {n_inf} infinite voxels; clean the image or load it "
        "with nonfinite='zero' to replace them by 0"
    )


def _read_any(
    path: str | os.PathLike, series_uid: str | None, npz_key: str
) -> tuple[np.ndarray, np.ndarray, Path, str, dict[str, Any]]:
    """Array in its stored dtype ``(z, y, x)``, affine, source, modality, meta."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt in ("dicom_folder", "dicom"):
        if fmt == "dicom_folder":
            key, items, ignored, notes = choose_series(p, series_uid)
        else:
            ds = read_header(p)
            modality = str(ds.get("Modality", "")) if ds is not None else ""
            if modality in ("SEG", "RTSTRUCT"):
                raise VolumeReadError(
                    f"{p} is a DICOM {modality}; read it against its image series with "
                    "read_dicom_seg / read_rtstruct (CLI: --reference SERIES_DIR)"
                )
            if ds is not None:
                refuse_non_image(p, ds)
            items, ignored = [(p, ds)], []
            vol = load_dicom_series(items, p, ignored)
            return vol.array, vol.affine, p, vol.modality, vol.meta
        vol = load_dicom_series(items, p, ignored, series_key=key, notes=notes)
        return vol.array, vol.affine, p, vol.modality, vol.meta
    if fmt == "npz":
        data, affine = _load_npz(p, npz_key)
        return data, affine, p, "", {"reader": "medsam_npz", "npz_key": npz_key}
    if fmt == "nifti":
        raw, affine, meta = load_nibabel(p)
        return _to_zyx(raw, p), affine, p, "", meta
    data, affine, reader = _load_monai(p)
    return data, affine, p, "", {"reader": reader}


def load_volume(
    path: str | os.PathLike, series_uid: str | None = None, *, nonfinite: str = "error"
) -> Volume:
    """Load an image volume from any supported format.

    Args:
        path: NIfTI, MGH/MGZ, NRRD, MHA/MHD file, MedSAM ``.npz`` (its ``imgs``), a DICOM file or
            a folder holding DICOM series (searched recursively; non-DICOM files ignored).
        series_uid: SeriesInstanceUID to load when the folder holds several image series.
        nonfinite: ``"error"`` (default) rejects NaN/inf voxels; ``"zero"`` replaces them by 0.

    Returns:
        A :class:`Volume` with a float32 ``(Z, Y, X)`` array in the file's voxel order (CT in HU).

    Raises:
        VolumeReadError: unreadable, unsupported, 4D, non-finite, or a DICOM series that fails the
            geometry checks (see :mod:`samed.io.dicom`).
        ValueError: if ``nonfinite`` is not ``"error"`` or ``"zero"``.
    """
    if nonfinite not in _NONFINITE:
        raise ValueError(f"nonfinite={nonfinite!r}; allowed: {_NONFINITE}")
    data, affine, source, modality, meta = _read_any(path, series_uid, "imgs")
    meta.setdefault("stored_dtype", str(np.dtype(data.dtype)))
    data = _check_finite(data.astype(np.float32, copy=False), source, nonfinite)
    vol = Volume(data, affine, source, modality, meta)
    vol.meta.setdefault("original_orientation", vol.orientation)
    return vol


def as_label_array(array: np.ndarray, where: str) -> np.ndarray:
    """Integer copy of a label array: uint8 when values fit 0..255, else int32 (or int64).

    Raises:
        VolumeReadError: when values are not finite integers.
    """
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise VolumeReadError(f"{where}: label map contains NaN or infinite values")
        if not np.array_equal(array, np.round(array)):
            frac = array[array != np.round(array)][:5]
            raise VolumeReadError(
                f"{where}: label map must hold integers; found values such as {frac.tolist()}"
            )
    elif not np.issubdtype(array.dtype, np.integer):
        raise VolumeReadError(f"{where}: label map has unsupported dtype {array.dtype}")
    if array.size == 0:
        return array.astype(np.uint8)
    lo, hi = array.min(), array.max()
    if lo >= 0 and hi <= 255:
        return array.astype(np.uint8)
    if lo >= np.iinfo(np.int32).min and hi <= np.iinfo(np.int32).max:
        return array.astype(np.int32)
    return array.astype(np.int64)


def load_label_map(path: str | os.PathLike, reference: Volume | None = None) -> Volume:
    """Load an integer label map, optionally checking that it lies on a reference grid.

    Args:
        path: any format of :func:`load_volume` (a MedSAM ``.npz`` gives its ``gts``), or a DICOM
            SEG / RTSTRUCT file, which needs a DICOM ``reference`` to resolve against.
        reference: the image the labels belong to.

    Returns:
        A :class:`Volume` with an integer ``(Z, Y, X)`` array (uint8 when labels fit 0..255).

    Raises:
        VolumeReadError: unreadable input or non-integer values.
        GeometryError: when ``reference`` is given and shape or affine differ (1e-4 mm).
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "dicom":
        ds = read_header(p)
        modality = str(ds.get("Modality", "")) if ds is not None else ""
        if modality in ("SEG", "RTSTRUCT"):
            ref_dir = _reference_dir(reference, p)
            from .seg import read_dicom_seg, read_rtstruct

            reader = read_dicom_seg if modality == "SEG" else read_rtstruct
            labels = reader(p, ref_dir)
            if reference is not None:
                check_same_grid(labels, reference)
            return labels
    data, affine, source, modality, meta = _read_any(p, None, "gts")
    labels = Volume(as_label_array(data, str(source)), affine, source, modality, meta)
    labels.meta.setdefault("original_orientation", labels.orientation)
    if reference is not None:
        check_same_grid(labels, reference)
    return labels


def _reference_dir(reference: Volume | None, path: Path) -> Path:
    if reference is None or reference.source is None:
        raise VolumeReadError(
            f"{path} is a DICOM SEG/RTSTRUCT: give the reference image series it belongs to"
        )
    src = Path(reference.source)
    return src if src.is_dir() else src.parent
