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

from samed.registry import ITK_SUFFIXES, NIBABEL_SUFFIXES, strip_volume_suffix

__all__ = ["get_reader", "read_volume", "volume_layer_data", "adopt_layer", "SUFFIXES"]

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

    Never raises: napari then offers the path to other readers. A folder without DICOM images
    goes to napari's builtins reader (image stacks), because samed is napari's preferred reader
    for folders (see :mod:`napari_samed._prefs`).
    """
    p = _single_path(path)
    if p is None:
        return None
    try:
        if p.is_dir():
            return read_volume if _folder_has_dicom(p) else _builtins_reader(path)
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


#: Image stacks napari's builtins reader reads from a folder.
_STACK_SUFFIXES = (
    ".png",
    ".tif",
    ".tiff",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".npy",
    ".csv",
    ".zarr",
)


def _builtins_reader(path: str | Sequence[str]) -> Callable[[Any], Any] | None:
    """napari's builtins reader for a folder of images it can stack, else None."""
    p = _single_path(path)
    try:
        names = [q.name.lower() for q in p.iterdir()] if p is not None else []
    except OSError:
        return None
    if not any(n.endswith(_STACK_SUFFIXES) for n in names):
        return None
    try:
        from napari_builtins.io import napari_get_reader
    except ImportError:
        return None
    try:
        return napari_get_reader(path)
    except Exception:  # noqa: BLE001 - a reader that cannot decide means "not mine"
        return None


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
    return strip_volume_suffix(name) if name.lower().endswith(SUFFIXES) else name


def adopt_layer(layer: Any) -> str | None:
    """Re-read with samed an image layer that another reader opened (napari's builtins).

    ``viewer.open(path)`` in a script uses napari's builtins reader unless it names a plugin;
    such a layer has no spacing, orientation or DICOM references, so prompts in mm, the
    radiological view and DICOM SEG export would be wrong. The layer's file is read again with
    :func:`samed.io.load_volume` and the layer takes samed's array (z, y, x), voxel spacing
    (mm) as its scale, and the source volume in its metadata; nothing else changes.

    Returns:
        the path re-read, or None when the layer already came from samed, has no file source,
        or samed cannot read the file (then the layer is left as it is).
    """
    if layer is None or "samed_volume" in (layer.metadata or {}):
        return None
    path = getattr(getattr(layer, "source", None), "path", None)
    if not path:
        return None
    p = Path(path)
    if not (p.is_dir() or p.name.lower().endswith(SUFFIXES)):
        return None
    from samed.io import load_volume

    try:
        data, kwargs, kind = volume_layer_data(load_volume(p), layer.name)
    except (OSError, ValueError):
        return None
    if kind != "image":
        return None
    layer.data = data
    layer.scale = kwargs["scale"]
    layer.metadata = {**(layer.metadata or {}), **kwargs["metadata"]}
    if "contrast_limits" in kwargs:
        layer.contrast_limits = kwargs["contrast_limits"]
    else:
        layer.reset_contrast_limits()
    return str(p)


def read_volume(path: str | Sequence[str]) -> list[LayerData]:
    """Read one volume with :func:`samed.io.load_volume`.

    Returns:
        ``[(array (Z, Y, X), layer kwargs, "image" | "labels")]``.

    Raises:
        ValueError: the file cannot be read (``samed.io.VolumeReadError`` names file and cause).
            The message is also shown as a napari error notification in full: napari's own
            notice for a failed reader is generic and cut short.
    """
    from samed.io import load_volume

    p = _single_path(path)
    try:
        if p is None:
            raise ValueError(f"samed reads one volume at a time; got {path!r}")
        return [volume_layer_data(load_volume(p))]
    except (OSError, ValueError) as exc:
        _notify_error(f"samed could not read {p.name if p else path}: {exc}")
        raise


def _notify_error(message: str) -> None:
    try:
        from napari.utils.notifications import show_error
    except ImportError:  # used without napari (npe2 alone): the exception carries the message
        return
    show_error(message)
