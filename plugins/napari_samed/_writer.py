"""napari writer: a Labels layer to NIfTI on the source grid, or to DICOM SEG for DICOM sources.

The source geometry is the :class:`samed.io.Volume` in ``layer.metadata["samed_volume"]`` (set by
the reader and carried by the widget's label layers). Without it, a NIfTI is still written with a
diagonal affine built from the layer's scale and translate, and DICOM SEG is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_labels", "save_labels", "reference_volume"]


def reference_volume(metadata: dict[str, Any] | None) -> Any | None:
    """The source :class:`samed.io.Volume` recorded in layer metadata, or None."""
    if not metadata:
        return None
    ref = metadata.get("samed_volume")
    return ref if hasattr(ref, "affine") and hasattr(ref, "array") else None


def _fallback_reference(shape: tuple[int, ...], attributes: dict[str, Any]) -> Any:
    from samed.io import Volume

    scale = attributes.get("scale")
    translate = attributes.get("translate")
    scale = [float(v) for v in (scale if scale is not None else (1.0, 1.0, 1.0))][-3:]
    translate = [float(v) for v in (translate if translate is not None else (0.0,) * 3)][-3:]
    affine = np.eye(4)
    affine[:3, :3] = np.diag(scale[::-1])  # (z, y, x) layer axes -> (x, y, z) voxel index
    affine[:3, 3] = translate[::-1]
    return Volume(np.zeros(shape, np.uint8), affine)


def save_labels(
    path: str | Path,
    labels: np.ndarray,
    reference: Any | None,
    label_names: dict[int, str] | None = None,
    attributes: dict[str, Any] | None = None,
    *,
    label_concepts: dict[int, str] | None = None,
    colors: dict[int, tuple[int, int, int]] | None = None,
    algorithm_types: dict[int, str] | None = None,
    algorithm: str = "samed",
) -> list[str]:
    """Write a (Z, Y, X) label map next to its source.

    Args:
        path: ``.nii``/``.nii.gz`` (NIfTI on the reference grid) or ``.dcm`` (DICOM SEG; the
            reference must be a DICOM series).
        labels: (Z, Y, X) integer array with the reference's shape.
        reference: the source volume (None: a diagonal affine from ``attributes``' scale).
        label_names: label value -> name for DICOM SEG segments.
        attributes: napari layer attributes (scale, translate) for the fallback geometry.
        label_concepts / colors / algorithm_types / algorithm: DICOM SEG segment metadata (see
            :func:`samed.io.save_dicom_seg`); ignored for NIfTI.

    Returns:
        ``[path]`` written.

    Raises:
        ValueError: unsupported extension, a shape that does not match the source, or DICOM SEG
            requested for a source that is not DICOM.
    """
    from samed import io as sio

    out = Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels to write must be (Z, Y, X); got shape {labels.shape}")
    name = out.name.lower()
    if name.endswith(".dcm"):
        if reference is None or not reference.meta.get("SeriesInstanceUID"):
            raise ValueError(
                f"cannot write DICOM SEG {out}: the labels' source is not a DICOM series "
                "(save as .nii.gz instead)"
            )
        present = [int(v) for v in np.unique(labels) if v != 0]
        names = {v: (label_names or {}).get(v, f"label {v}") for v in present}
        sio.save_dicom_seg(
            labels,
            reference,
            out,
            label_names=names,
            colors={int(k): v for k, v in (colors or {}).items()},
            algorithm=algorithm,
            label_concepts={int(k): v for k, v in (label_concepts or {}).items() if v},
            algorithm_types={int(k): v for k, v in (algorithm_types or {}).items()},
        )
        return [str(out)]
    if not name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{out}: samed writes labels as .nii, .nii.gz or .dcm (DICOM SEG)")
    if reference is None:
        reference = _fallback_reference(labels.shape, attributes or {})
    sio.save_nifti(labels, reference, out)
    return [str(out)]


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels layers (see :func:`save_labels`)."""
    meta = attributes.get("metadata") or {}
    return save_labels(
        path, np.asarray(data), reference_volume(meta), **seg_options(meta), attributes=attributes
    )


def seg_options(meta: dict[str, Any]) -> dict[str, Any]:
    """DICOM SEG keyword arguments of :func:`save_labels` from a labels layer's metadata (set by
    the widget's label table, see :mod:`napari_samed._labeltable`)."""
    return {
        "label_names": meta.get("samed_label_names"),
        "label_concepts": meta.get("samed_label_concepts"),
        "colors": meta.get("samed_label_colors"),
        "algorithm_types": meta.get("samed_label_algorithm"),
        "algorithm": str(meta.get("samed_algorithm", "samed")),
    }
