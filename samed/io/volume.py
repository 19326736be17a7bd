"""The :class:`Volume` container, geometry helpers and atomic writes.

Conventions (used by every reader and writer in :mod:`samed.io`):

* ``Volume.array`` is indexed ``array[z, y, x]``. ``x`` is the file's first voxel axis (NIfTI ``i``,
  DICOM columns), ``y`` the second (NIfTI ``j``, DICOM rows), ``z`` the third (NIfTI ``k``, the
  DICOM slice order, sorted along the slice normal).
* ``Volume.affine`` is a 4x4 float64 matrix in RAS+ world millimetres (nibabel's convention) that
  maps the voxel index ``(x, y, z)`` -- the array index *reversed* -- to world:
  ``world = affine @ [x, y, z, 1]`` is the centre of ``array[z, y, x]``. In other words
  ``nibabel.Nifti1Image(volume.array.T, volume.affine)`` is the same image.
* Readers never reorient: the voxel order is the file's own. :func:`reorient` gives an exact
  (flip/transpose only) copy in another orientation when one is needed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..paths import TMP_PREFIX

__all__ = [
    "VolumeReadError",
    "GeometryError",
    "Volume",
    "atomic_write",
    "reorient",
    "check_same_grid",
    "align_to",
    "LPS_TO_RAS",
    "AFFINE_TOLERANCE_MM",
]

#: Largest difference (mm) between two affines' entries for them to count as the same grid.
AFFINE_TOLERANCE_MM = 1e-4

#: Multiplying an LPS affine on the left by this gives the RAS affine (and vice versa).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeReadError(ValueError):
    """An input cannot be read as a volume; the message names the file and what is wrong."""


class GeometryError(ValueError):
    """Two voxel grids that must match do not; the message gives both shapes and affines."""


@dataclass
class Volume:
    """A 3D image or label map on a voxel grid in world space.

    Attributes:
        array: ``(Z, Y, X)`` array. Images are float32 (CT in Hounsfield units after the DICOM
            rescale slope/intercept); label maps are integer.
        affine: ``(4, 4)`` float64, RAS+ millimetres; maps the voxel index ``(x, y, z)`` (the
            array index reversed) to the world position of the centre of ``array[z, y, x]``.
        source: the file or folder the volume was read from (``None`` when built in memory).
        modality: DICOM modality such as ``"CT"`` or ``"MR"`` (``""`` when unknown).
        meta: source metadata. DICOM series carry ``StudyInstanceUID``, ``SeriesInstanceUID``,
            ``FrameOfReferenceUID``, ``PatientID``, ``sop_instance_uids`` and ``files`` (both in
            ``z`` order), ``SeriesDescription`` and ``reader``; every reader records ``reader`` and
            ``original_orientation``.
    """

    array: np.ndarray
    affine: np.ndarray
    source: Path | None = None
    modality: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3D (Z, Y, X); got shape {self.array.shape}")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4; got shape {affine.shape}")
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError(f"Volume.affine must be finite and invertible; got\n{affine}")
        self.affine = affine
        if self.source is not None:
            self.source = Path(self.source)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)`` voxel counts."""
        z, y, x = self.array.shape
        return int(z), int(y), int(x)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size ``(sz, sy, sx)`` in mm, matching the array axes."""
        sx, sy, sz = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return float(sz), float(sy), float(sx)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3: ``|det(affine[:3, :3])|`` (correct for sheared grids,
        where the product of :attr:`spacing` overestimates it). Divide by 1000 for ml."""
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def orientation(self) -> str:
        """Axis codes of the ``(x, y, z)`` voxel axes, e.g. ``"RAS"``, ``"LPS"`` (nibabel)."""
        return "".join(nib.aff2axcodes(self.affine))

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume with the same geometry, source and metadata but a new array.

        Args:
            array: ``(Z, Y, X)`` array of exactly :attr:`shape`.

        Raises:
            GeometryError: if the shape differs.
        """
        array = np.asarray(array)
        if array.shape != self.shape:
            raise GeometryError(
                f"array shape {array.shape} does not match the volume's shape "
                f"{self.shape} (Z, Y, X)"
            )
        return Volume(array, self.affine.copy(), self.source, self.modality, dict(self.meta))

    def to_nifti(self) -> nib.Nifti1Image:
        """The volume as an in-memory nibabel image (data ``array.T``, same affine)."""
        img = nib.Nifti1Image(np.asarray(self.array).T, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img


def check_same_grid(a: Volume, b: Volume, what: str = "label map") -> None:
    """Raise unless two volumes share shape and affine (within :data:`AFFINE_TOLERANCE_MM`).

    Args:
        a: the volume being checked (e.g. a label map).
        b: the reference volume.
        what: how to call ``a`` in the error message.

    Raises:
        GeometryError: naming both shapes and affines.
    """
    same_shape = a.shape == b.shape
    diff = float(np.max(np.abs(a.affine - b.affine)))
    if same_shape and diff <= AFFINE_TOLERANCE_MM:
        return
    raise GeometryError(
        f"{what} {a.source or '(in memory)'} is not on the grid of {b.source or '(in memory)'}: "
        f"shape {a.shape} vs {b.shape} (Z, Y, X); largest affine difference {diff:.6g} mm "
        f"(allowed {AFFINE_TOLERANCE_MM}); affine\n{np.array2string(a.affine, precision=5)}\n"
        f"vs\n{np.array2string(b.affine, precision=5)}"
    )


def align_to(volume: Volume, reference: Volume, what: str = "label map") -> Volume:
    """Put a volume on a reference grid when both hold the same voxel centres in another order.

    Only flips and transposes are used (:func:`reorient`), so no value is interpolated; a grid
    that differs by more than voxel order is rejected.

    Raises:
        GeometryError: if the grids differ after reorientation (see :func:`check_same_grid`).
    """
    if volume.orientation != reference.orientation:
        volume = reorient(volume, reference.orientation)
    check_same_grid(volume, reference, what)
    return volume


def reorient(volume: Volume, axcodes: str = "RAS") -> Volume:
    """Exact copy of a volume in another voxel orientation (flips and transposes only).

    The world position of every voxel is unchanged; only the array order and affine change.

    Args:
        volume: input volume.
        axcodes: target codes of the ``(x, y, z)`` axes, three letters from ``R/L``, ``A/P``,
            ``S/I``, e.g. ``"RAS"`` or ``"LPS"``.

    Returns:
        A new volume whose :attr:`Volume.orientation` is ``axcodes``; ``meta`` is copied and
        records ``reoriented_from``.

    Raises:
        ValueError: if ``axcodes`` is not a valid orientation.
    """
    codes = tuple(axcodes.upper())
    pairs = (("L", "R"), ("P", "A"), ("I", "S"))
    groups = sorted(i for c in codes for i, p in enumerate(pairs) if c in p)
    if len(codes) != 3 or groups != [0, 1, 2]:
        raise ValueError(f"axcodes {axcodes!r} must name one of R/L, A/P, S/I each, e.g. 'RAS'")
    start = nib.orientations.io_orientation(volume.affine)
    target = nib.orientations.axcodes2ornt(codes, labels=pairs)
    transform = nib.orientations.ornt_transform(start, target)
    data_xyz = np.asarray(volume.array).T
    new_xyz = nib.orientations.apply_orientation(data_xyz, transform)
    inv = nib.orientations.inv_ornt_aff(transform, data_xyz.shape)
    meta = dict(volume.meta)
    meta["reoriented_from"] = volume.orientation
    # sop_instance_uids/files follow z; keep them only when z was not flipped or moved.
    if not (transform[2, 0] == 2 and transform[2, 1] == 1):
        for key in ("sop_instance_uids", "files"):
            meta.pop(key, None)
    return Volume(
        np.ascontiguousarray(new_xyz.T),
        volume.affine @ inv,
        volume.source,
        volume.modality,
        meta,
    )


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path beside ``path``, rename it on success.

    The temporary name ends with ``path``'s own name (so ``.nii.gz`` or ``.dcm`` extensions that
    writers look at are kept). If the body raises, the temporary file is removed and ``path`` is
    left untouched.

    Args:
        path: final destination; its folder must exist.

    Yields:
        The temporary path to write to.

    Raises:
        FileNotFoundError: if the destination folder does not exist.
    """
    final = Path(path)
    if not final.parent.is_dir():
        raise FileNotFoundError(f"output folder {final.parent} does not exist (writing {final})")
    tmp = final.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{final.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to the temporary file for {final}")
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
