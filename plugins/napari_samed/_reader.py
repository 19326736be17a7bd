"""napari reader: DICOM series folders and files, NIfTI, MGZ/MGH, NRRD, MetaImage via ``samed.io``.

Layers are displayed in voxel order ``(z, y, x)`` with ``scale = spacing`` (mm), so distances and
aspect ratios are right; the full geometry (affine, DICOM UIDs) rides along in
``layer.metadata["samed_volume"]`` (a :class:`samed.io.Volume` sharing the layer's array), which
the writer and the widget use to put results back on the source grid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samed.registry import ITK_SUFFIXES, NIBABEL_SUFFIXES

__all__ = ["get_reader", "read_volume", "volume_layer_data", "SUFFIXES"]

SUFFIXES = (*NIBABEL_SUFFIXES, *ITK_SUFFIXES, ".dcm")
#: Abdomen window (level 40, width 400 HU) used as the initial display of a CT.
_CT_DISPLAY = (-160.0, 240.0)
_MAX_LABEL_VALUES = 256

LayerData = tuple[Any, dict[str, Any], str]


def _single_path(path: str | Sequence[str]) -> Path | None:
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        return Path(os.fspath(path))
    except TypeError:
        return None


def _folder_has_dicom(folder: Path, limit: int = 64) -> bool:
    """Whether one of the first ``limit`` files under ``folder`` is a DICOM image (cheap check)."""
    from samed.io.dicom import read_header

    seen = 0
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            seen += 1
            if seen > limit:
                return False
            try:
                ds = read_header(Path(root) / name)
            except ValueError:
                continue
            if ds is not None and ds.get("Modality") not in ("SEG", "RTSTRUCT", "SR"):
                return True
    return False


def get_reader(path: str | Sequence[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return :func:`read_volume` if ``path`` looks readable by ``samed.io``, else None.

    Never raises: napari then offers the path to other readers.
    """
    p = _single_path(path)
    if p is None:
        return None
    try:
        if p.is_dir():
            return read_volume if _folder_has_dicom(p) else None
        if not p.is_file() or not p.name.lower().endswith(SUFFIXES):
            return None
        if p.name.lower().endswith(".dcm"):
            from samed.io.dicom import read_header

            ds = read_header(p)
            if ds is None or ds.get("Modality") in ("SEG", "RTSTRUCT", "SR"):
                return None
    except (OSError, ValueError):
        return None
    return read_volume


def _looks_like_labels(volume: Any) -> bool:
    stored = str(volume.meta.get("stored_dtype", ""))
    try:
        integer = np.issubdtype(np.dtype(stored), np.integer)
    except TypeError:
        integer = False
    if not integer or volume.modality in ("CT", "MR", "PT"):
        return False
    a = volume.array
    if a.size == 0 or float(a.min()) < 0:
        return False
    return np.unique(a[:: max(1, a.shape[0] // 16)]).size <= _MAX_LABEL_VALUES


def volume_layer_data(volume: Any, name: str | None = None) -> LayerData:
    """A napari layer-data tuple for a :class:`samed.io.Volume` (image or labels)."""
    name = name or _layer_name(volume.source)
    meta = {"samed_volume": volume, "samed_source": str(volume.source or "")}
    kwargs: dict[str, Any] = {"name": name, "scale": tuple(volume.spacing), "metadata": meta}
    if _looks_like_labels(volume):
        from samed.io.readers import as_label_array

        labels = as_label_array(volume.array, str(volume.source))
        meta["samed_volume"] = volume.with_array(labels)
        return labels, kwargs, "labels"
    kwargs["colormap"] = "gray"
    a = volume.array
    if volume.modality == "CT" or (a.size and float(a.min()) < -500):
        kwargs["contrast_limits"] = _CT_DISPLAY
    return a, kwargs, "image"


def _layer_name(source: Any) -> str:
    if not source:
        return "volume"
    name = Path(source).name
    for suffix in (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_volume(path: str | Sequence[str]) -> list[LayerData]:
    """Read one volume with :func:`samed.io.load_volume`.

    Returns:
        ``[(array (Z, Y, X), layer kwargs, "image" | "labels")]``.

    Raises:
        ValueError: the file cannot be read (``samed.io.VolumeReadError`` names file and cause).
    """
    from samed.io import load_volume

    p = _single_path(path)
    if p is None:
        raise ValueError(f"samed reads one volume at a time; got {path!r}")
    return [volume_layer_data(load_volume(p))]
