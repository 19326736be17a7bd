"""DICOM SEG (highdicom) and RTSTRUCT (rt-utils) writers and readers.

A label map ``(Z, Y, X)`` on a DICOM series' grid (as loaded by :func:`samed.io.load_volume`, not
reoriented) maps frame ``z`` to the source file ``reference.meta["files"][z]``. The SEG written has
one BINARY segment per non-zero label value, numbered 1..N in increasing label order; each segment's
TrackingID is ``"samed label <value>"`` so that :func:`read_dicom_seg` restores the original values
(other SEGs: segment number = label value).

Reliability: a SEG is only written for a series whose slices have distinct SOPInstanceUIDs (it
references them by UID); the output is always UTF-8 (``ISO_IR 192``), whatever the source's
SpecificCharacterSet (real files carry empty or odd values); and the written file is read back with
:func:`read_dicom_seg`'s own logic and compared voxel by voxel before it replaces ``path``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..colors import label_color
from .volume import GeometryError, Volume, VolumeReadError, atomic_write, check_same_grid

__all__ = ["save_dicom_seg", "read_dicom_seg", "save_rtstruct", "read_rtstruct", "default_color"]

_TRACKING_RE = re.compile(r"^samed label (-?\d+)$")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("samed")
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "0.0.0"


#: The default segment / ROI colour of a label value; the same function as the QC pictures'
#: (:func:`samed.colors.label_color`), kept under its old name for importers.
default_color = label_color


def _label_array(labels: np.ndarray | Volume, reference: Volume) -> np.ndarray:
    if isinstance(labels, Volume):
        check_same_grid(labels, reference)
        labels = labels.array
    arr = np.asarray(labels)
    if arr.shape != reference.shape:
        raise GeometryError(
            f"label map of shape {arr.shape} is not on the grid of {reference.source}: "
            f"its shape is {reference.shape} (Z, Y, X)"
        )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"label map must be an integer array; got dtype {arr.dtype}")
    return arr


def _source_files(reference: Volume) -> list[Path]:
    files = reference.meta.get("files")
    if not files or len(files) != reference.shape[0]:
        raise ValueError(
            f"reference {reference.source} is not a DICOM series as loaded by load_volume "
            "(its meta has no 'files' in z order, or it was reoriented); DICOM SEG/RTSTRUCT "
            "need the source DICOM slices"
        )
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise VolumeReadError(f"source DICOM files of {reference.source} are gone: {missing[:3]}")
    return paths


def _check_unique_sop_uids(reference: Volume, what: str) -> None:
    """Refuse a series whose slices share SOPInstanceUIDs: a SEG cannot tell them apart."""
    uids = [str(u) for u in reference.meta.get("sop_instance_uids", [])]
    files = [Path(f).name for f in reference.meta.get("files", [])]
    seen: dict[str, int] = {}
    dup = []
    for i, uid in enumerate(uids):
        if uid in seen or not uid:
            dup.append((seen.get(uid), i, uid))
        seen.setdefault(uid, i)
    if not dup:
        return
    first, second, uid = dup[0]
    names = (
        f" (e.g. {files[first]} and {files[second]})"
        if first is not None and len(files) == len(uids)
        else ""
    )
    raise VolumeReadError(
        f"cannot {what}: series {reference.meta.get('SeriesInstanceUID', '?')} in "
        f"{reference.source} has {len(uids)} slices but only {len(set(uids) - {''})} distinct "
        f"SOPInstanceUIDs{names}, SOPInstanceUID {uid!r}; a DICOM SEG references slices by "
        "SOPInstanceUID, so it cannot be placed on this series (the volume itself loads)"
    )


def _fill_sop_class(ds: Any, reference: Volume) -> Any:
    """Anonymisers sometimes blank SOPClassUID/SOPInstanceUID and the study/series UIDs; restore
    them in memory (from the file meta and the UIDs :func:`load_volume` derived), since highdicom
    needs them to reference the source. The files are not touched."""
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(key) and reference.meta.get(key):
            setattr(ds, key, reference.meta[key])
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        if not ds.get("SOPClassUID") and meta.get("MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not ds.get("SOPInstanceUID") and meta.get("MediaStorageSOPInstanceUID"):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def _property_type(name: str) -> tuple[Any, Any]:
    """(category, type) codes: a SNOMED anatomy code when the name matches one, else Tissue."""
    from pydicom.sr.codedict import codes

    keyword = "".join(part.capitalize() for part in re.split(r"[\s_\-]+", name.strip()) if part)
    try:
        code = getattr(codes.SCT, keyword) if keyword else None
    except AttributeError:
        code = None
    if code is not None:
        return codes.SCT.AnatomicalStructure, code
    return codes.SCT.Tissue, codes.SCT.Tissue


def save_dicom_seg(
    labels: np.ndarray | Volume,
    reference: Volume,
    path: str | os.PathLike,
    label_names: dict[int, str] | None = None,
    colors: dict[int, tuple[int, int, int]] | None = None,
    algorithm: str = "samed",
    *,
    algorithm_version: str | None = None,
    series_description: str = "samed segmentation",
    series_number: int = 901,
    manufacturer: str = "samed",
) -> Path:
    """Write a label map as a BINARY DICOM SEG that references the source series (highdicom).

    Args:
        labels: ``(Z, Y, X)`` integer label map on ``reference``'s grid (0 = background).
        reference: the DICOM series volume from :func:`samed.io.load_volume` (not reoriented).
        path: destination file (conventionally ``.dcm``).
        label_names: label value -> segment label (default ``"label <value>"``).
        colors: label value -> RGB 0..255 display colour (default
            :func:`samed.colors.label_color`, the QC pictures' colours).
        algorithm: algorithm name recorded in the segment descriptions.
        algorithm_version: recorded version (default: the samed version).
        series_description: SeriesDescription of the new series.
        series_number: SeriesNumber of the new series.
        manufacturer: Manufacturer of the new object.

    Returns:
        The written path.

    Raises:
        ValueError: if the reference is not a DICOM series, the label map is empty or not integer.
        GeometryError: if the label map is not on the reference grid.
        VolumeReadError: the series' slices share SOPInstanceUIDs, or the written SEG does not
            read back to the same label map (nothing is written then).
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    arr = _label_array(labels, reference)
    files = _source_files(reference)
    _check_unique_sop_uids(reference, "write a DICOM SEG")
    values = [int(v) for v in np.unique(arr) if v != 0]
    if not values:
        raise ValueError("label map is empty (all 0); a DICOM SEG needs at least one segment")
    if min(values) < 0:
        raise ValueError(f"label values must be >= 0 for DICOM SEG; found {min(values)}")
    names = label_names or {}
    cols = colors or {}
    version = algorithm_version or _version()
    algo = hd.AlgorithmIdentificationSequence(
        name=algorithm, version=version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        name = str(names.get(value, f"label {value}"))
        category, prop = _property_type(name)
        rgb = tuple(int(c) for c in (cols[value] if value in cols else label_color(value)))
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise ValueError(f"colour for label {value} must be 3 integers in 0..255; got {rgb}")
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
                tracking_uid=hd.UID(),
                tracking_id=f"samed label {value}",
                display_color=hd.color.CIELabColor.from_rgb(*rgb),
            )
        )
    lut = np.zeros(max(values) + 1, dtype=np.uint16 if len(values) > 255 else np.uint8)
    lut[values] = np.arange(1, len(values) + 1)
    pixels = lut[arr]
    sources = [
        _fill_sop_class(pydicom.dcmread(f, stop_before_pixels=True), reference) for f in files
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=manufacturer,
            manufacturer_model_name="samed",
            software_versions=version,
            device_serial_number="0",
            content_description=f"{algorithm} segmentation"[:64],
            # Sources carry '' or odd SpecificCharacterSet values that highdicom rejects; the
            # output is UTF-8, which encodes any text copied from them.
            specific_character_set="ISO_IR 192",
        )
    seg.SeriesDescription = series_description[:64]
    out = Path(path)
    expected = np.where(arr > 0, arr, 0)
    with atomic_write(out) as tmp:
        seg.save_as(tmp)
        _verify_readback(tmp, reference, expected, out)
    return out


def _verify_readback(tmp: Path, reference: Volume, expected: np.ndarray, out: Path) -> None:
    """Read a just-written SEG back as :func:`read_dicom_seg` does; raise unless it matches."""
    try:
        labels, _ = _seg_labels(_segread(tmp), reference, tmp)
    except (VolumeReadError, GeometryError) as exc:
        raise VolumeReadError(
            f"the DICOM SEG written for {out} does not read back on series "
            f"{reference.meta.get('SeriesInstanceUID', '?')} ({exc}); nothing was written"
        ) from exc
    if labels.shape != expected.shape or not np.array_equal(labels, expected):
        n = int(np.count_nonzero(labels != expected)) if labels.shape == expected.shape else -1
        raise VolumeReadError(
            f"the DICOM SEG written for {out} reads back differently ({n} voxels differ, shape "
            f"{labels.shape} vs {expected.shape}); nothing was written"
        )


def _referenced_series(ds: Any) -> str | None:
    for item in ds.get("ReferencedSeriesSequence", []) or []:
        uid = item.get("SeriesInstanceUID")
        if uid:
            return str(uid)
    return None


def _load_reference(reference_dir: str | os.PathLike, series_uid: str | None) -> Volume:
    from .dicom import list_series
    from .readers import load_volume

    ref = Path(reference_dir)
    if series_uid and ref.is_dir() and series_uid not in {s.series_uid for s in list_series(ref)}:
        series_uid = None  # fall back to the only image series; the UID check below explains
    return load_volume(ref, series_uid=series_uid)


def _check_seg_geometry(seg: Any, reference: Volume, path: Path) -> None:
    """Check that every SEG frame lies exactly on a slice of the reference grid.

    highdicom places frames by their referenced source instance; some writers omit
    SpatialLocationsPreserved, so the frame positions are verified here instead of trusted.

    Raises:
        GeometryError: orientation, pixel spacing, size or a frame position that does not match.
    """
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    frames = seg.get("PerFrameFunctionalGroupsSequence", []) or []

    def item(group: Any, seq: str, keyword: str) -> Any:
        for source in (group, shared):
            if source is not None and seq in source and keyword in source.get(seq)[0]:
                return source.get(seq)[0].get(keyword)
        return None

    ref_iop = np.asarray(reference.meta.get("ImageOrientationPatient", []), dtype=float)
    _, sy, sx = reference.spacing
    if (int(seg.Rows), int(seg.Columns)) != reference.shape[1:]:
        raise GeometryError(
            f"{path}: frames are {seg.Rows}x{seg.Columns}, the reference slices "
            f"{reference.shape[1]}x{reference.shape[2]} (rows x columns)"
        )
    inv = np.linalg.inv(reference.affine)
    for i, group in enumerate(frames):
        iop = item(group, "PlaneOrientationSequence", "ImageOrientationPatient")
        ps = item(group, "PixelMeasuresSequence", "PixelSpacing")
        ipp = item(group, "PlanePositionSequence", "ImagePositionPatient")
        if (
            iop is not None
            and ref_iop.size == 6
            and not np.allclose(np.asarray(iop, dtype=float), ref_iop, atol=1e-4)
        ):
            raise GeometryError(
                f"{path}: frame {i + 1} orientation {list(iop)} differs from the reference "
                f"series' {ref_iop.tolist()}"
            )
        if ps is not None and not np.allclose(np.asarray(ps, dtype=float), [sy, sx], atol=1e-4):
            raise GeometryError(
                f"{path}: frame {i + 1} pixel spacing {list(ps)} differs from the reference's "
                f"{[sy, sx]} mm"
            )
        if ipp is None:
            continue
        lps = np.asarray(ipp, dtype=float)
        ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
        x, y, z = (inv @ ras)[:3]
        off_mm = np.hypot(x * sx, y * sy)
        if off_mm > 0.01 or abs(z - round(z)) > 0.01 or not 0 <= round(z) < reference.shape[0]:
            raise GeometryError(
                f"{path}: frame {i + 1} at ImagePositionPatient {lps.tolist()} is not on a "
                "slice of "
                f"the reference grid (voxel position x={x:.4f}, y={y:.4f}, z={z:.4f}; reference "
                f"shape {reference.shape} (Z, Y, X), affine\n"
                f"{np.array2string(reference.affine, precision=4)})"
            )


def read_dicom_seg(path: str | os.PathLike, reference_dir: str | os.PathLike) -> Volume:
    """Read a DICOM SEG as a label map on the grid of the image series it references.

    Args:
        path: the SEG file.
        reference_dir: folder holding the referenced image series (searched recursively; the
            series named in the SEG's ReferencedSeriesSequence is chosen when several are there).

    Returns:
        An integer ``(Z, Y, X)`` :class:`Volume` on the reference grid: segment number -> label
        value (or the value in a ``"samed label <value>"`` TrackingID). ``meta["segments"]`` maps
        each label
        value to its segment number, label and tracking id; ``meta["label_names"]`` value -> label.

    Raises:
        VolumeReadError: not a SEG, no frame references the series, or segments overlap.
    """
    p = Path(path)
    seg = _segread(p)
    reference = _load_reference(reference_dir, _referenced_series(seg))
    labels, segments = _seg_labels(seg, reference, p)
    meta = dict(reference.meta)
    meta.update(
        reader="highdicom.segread",
        segments=segments,
        label_names={v: s["label"] for v, s in segments.items()},
        seg_series_uid=str(seg.SeriesInstanceUID),
        seg_sop_instance_uid=str(seg.SOPInstanceUID),
    )
    return Volume(labels, reference.affine.copy(), p, "SEG", meta)


def _segread(p: Path) -> Any:
    import highdicom as hd

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hd.seg.segread(p)
    except Exception as exc:  # noqa: BLE001
        raise VolumeReadError(f"cannot read {p} as a DICOM SEG: {exc}") from exc


def _seg_labels(
    seg: Any, reference: Volume, p: Path
) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
    """A read SEG's ``(Z, Y, X)`` label array on ``reference`` and its segments by label value."""
    import highdicom as hd

    _check_unique_sop_uids(reference, f"read {p} on its reference")
    uids = list(reference.meta["sop_instance_uids"])
    referenced = {str(u[2]) for u in seg.get_source_image_uids()}
    if not referenced & set(uids):
        raise VolumeReadError(
            f"{p} references none of the {len(uids)} slices of series "
            f"{reference.meta.get('SeriesInstanceUID')} in {reference.source}"
        )
    _check_seg_geometry(seg, reference, p)
    segment_numbers = list(seg.segment_numbers)
    value_of: dict[int, int] = {}
    for number in segment_numbers:
        tracking = seg.get_segment_description(number).get("TrackingID", "")
        m = _TRACKING_RE.match(str(tracking or ""))
        value_of[number] = int(m.group(1)) if m else number
    if len(set(value_of.values())) != len(value_of):
        value_of = {n: n for n in segment_numbers}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY:
                combined = seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=uids,
                    combine_segments=True,
                    relabel=False,
                    ignore_spatial_locations=True,  # checked by _check_seg_geometry
                )
            else:
                stack = (
                    seg.get_pixels_by_source_instance(
                        source_sop_instance_uids=uids,
                        combine_segments=False,
                        rescale_fractional=True,
                        ignore_spatial_locations=True,
                    )
                    > 0.5
                )
                if np.any(stack.sum(axis=-1) > 1):
                    raise ValueError("segments overlap")
                combined = np.where(
                    stack.any(axis=-1), np.asarray(segment_numbers)[stack.argmax(axis=-1)], 0
                )
    except (ValueError, RuntimeError) as exc:
        if "overlap" in str(exc).lower():
            raise VolumeReadError(
                f"{p}: its {len(segment_numbers)} segments overlap, so they cannot be one label "
                "map "
                "(read the segments separately with highdicom)"
            ) from exc
        raise VolumeReadError(
            f"cannot place the frames of {p} on the reference series: {exc}"
        ) from exc
    lut = np.zeros(max(segment_numbers) + 1, dtype=np.int64)
    for number, value in value_of.items():
        lut[number] = value
    from .readers import as_label_array

    labels = as_label_array(lut[np.asarray(combined, dtype=np.int64)], str(p))
    segments = {
        value_of[n]: {
            "segment_number": n,
            "label": str(seg.get_segment_description(n).SegmentLabel),
            "tracking_id": str(seg.get_segment_description(n).get("TrackingID", "") or ""),
        }
        for n in segment_numbers
    }
    return labels, segments


def _rt_series(reference: Volume) -> list[Any]:
    import pydicom

    if reference.shape[1] != reference.shape[2]:
        raise ValueError(
            f"RTSTRUCT support (rt-utils) needs square slices; {reference.source} has "
            f"{reference.shape[1]} rows x {reference.shape[2]} columns"
        )
    return [_fill_sop_class(pydicom.dcmread(f), reference) for f in _source_files(reference)]


def save_rtstruct(
    labels: np.ndarray | Volume,
    reference: Volume,
    path: str | os.PathLike,
    label_names: dict[int, str] | None = None,
    colors: dict[int, tuple[int, int, int]] | None = None,
) -> Path:
    """Write a label map as an RTSTRUCT (one ROI per label value) with rt-utils.

    Contours are traced on each slice, so the round trip is approximate at boundaries (optional
    feature; DICOM SEG is the exact format).

    Args:
        labels: ``(Z, Y, X)`` integer label map on ``reference``'s grid.
        reference: DICOM series volume from :func:`samed.io.load_volume` (square slices).
        path: destination file.
        label_names: label value -> ROI name (default ``"label <value>"``).
        colors: label value -> RGB colour (default :func:`samed.colors.label_color`).

    Returns:
        The written path.
    """
    from rt_utils import ds_helper
    from rt_utils.rtstruct import RTStruct

    arr = _label_array(labels, reference)
    values = [int(v) for v in np.unique(arr) if v != 0]
    if not values:
        raise ValueError("label map is empty (all 0); an RTSTRUCT needs at least one ROI")
    series = _rt_series(reference)
    rt = RTStruct(series, ds_helper.create_rtstruct_dataset(series))
    names, cols = label_names or {}, colors or {}
    for value in values:
        mask = np.transpose(arr == value, (1, 2, 0))  # rt-utils wants (rows, columns, slices)
        rt.add_roi(
            mask=mask,
            color=list(cols[value] if value in cols else label_color(value)),
            name=str(names.get(value, f"label {value}")),
        )
    out = Path(path)
    with atomic_write(out) as tmp:
        rt.ds.save_as(str(tmp))
    return out


def read_rtstruct(path: str | os.PathLike, reference_dir: str | os.PathLike) -> Volume:
    """Rasterise an RTSTRUCT on its image series: ROI ``i`` (1-based, file order) -> label ``i``.

    Where ROIs overlap (common: BODY contains organs), the later ROI wins; names are in
    ``meta["label_names"]``.

    Raises:
        VolumeReadError: unreadable RTSTRUCT or one that references another series.
    """
    import pydicom
    from rt_utils.rtstruct import RTStruct
    from rt_utils.rtstruct_builder import RTStructBuilder

    p = Path(path)
    try:
        ds = pydicom.dcmread(p)
        RTStructBuilder.validate_rtstruct(ds)
    except Exception as exc:  # noqa: BLE001
        raise VolumeReadError(f"cannot read {p} as an RTSTRUCT: {exc}") from exc
    ref_series = None
    for study in ds.get("RTReferencedStudySequence", []) or []:
        for ser in study.get("RTReferencedSeriesSequence", []) or []:
            ref_series = str(ser.SeriesInstanceUID)
    if ds.get("ReferencedFrameOfReferenceSequence"):
        for fr in ds.ReferencedFrameOfReferenceSequence:
            for study in fr.get("RTReferencedStudySequence", []) or []:
                for ser in study.get("RTReferencedSeriesSequence", []) or []:
                    ref_series = str(ser.SeriesInstanceUID)
    reference = _load_reference(reference_dir, ref_series)
    series = _rt_series(reference)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            RTStructBuilder.validate_rtstruct_series_references(ds, series, False)
    except Exception as exc:  # noqa: BLE001
        raise VolumeReadError(
            f"{p} does not reference the series in {reference_dir}: {exc}"
        ) from exc
    rt = RTStruct(series, ds)
    labels = np.zeros(reference.shape, dtype=np.uint8)
    names: dict[int, str] = {}
    for value, name in enumerate(rt.get_roi_names(), start=1):
        mask = np.transpose(rt.get_roi_mask_by_name(name), (2, 0, 1))  # -> (z, rows, columns)
        labels[mask] = value
        names[value] = str(name)
    meta = dict(reference.meta)
    meta.update(
        reader="rt_utils", label_names=names, rtstruct_sop_instance_uid=str(ds.SOPInstanceUID)
    )
    return Volume(labels, reference.affine.copy(), p, "RTSTRUCT", meta)
