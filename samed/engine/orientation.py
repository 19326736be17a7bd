"""In-plane orientation: show an automatic adapter its slices the way it was trained on them.

Files store voxels in their own order (``samed.io`` never reorients): BTCV and CHAOS are LAS,
TotalSegmentator's NIfTI CT is RAS (mirrored left-right against BTCV), a DICOM series or the
TotalSegmentator MR is LPS (upside down against BTCV). A 2D automatic head learns where organs
lie on the slice (the liver on one side, the right kidney left of the spine...), so a mirrored
slice swaps or loses classes. An adapter records the orientation of its training volumes
(``preprocessing.orientation``, nibabel axis codes of the (x, y, z) voxel axes, e.g. ``"LAS"``);
:meth:`samed.engine.Session.automatic` then flips the rows and / or columns of each slice to it
before the model and flips the class scores back, so the output stays on the source grid.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "axis_codes",
    "orientation_flips",
    "check_orientation",
    "describe_orientation",
    "OPPOSITE",
]

#: the opposite end of each anatomical axis code
OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def axis_codes(affine: np.ndarray) -> str:
    """Axis codes (``"RAS"``, ``"LPS"``...) of the (x, y, z) voxel axes of a 4x4 affine that maps
    voxel (x, y, z) (the (Z, Y, X) array index reversed) to RAS+ millimetres."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def check_orientation(value: object, where: str) -> str:
    """``value`` as three upper-case axis codes, one per anatomical axis (e.g. ``"LAS"``).

    Raises:
        ValueError: anything else (names ``where`` and what is allowed).
    """
    codes = str(value).upper() if isinstance(value, str) else ""
    axes = sorted({"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}.get(c, -1) for c in codes)
    if len(codes) != 3 or axes != [0, 1, 2]:
        raise ValueError(
            f"{where}: orientation {value!r} must be three axis codes, one of L/R, A/P and S/I "
            "each (nibabel axcodes of the x, y, z voxel axes, e.g. 'LAS')"
        )
    return codes


def orientation_flips(source: str, target: str) -> tuple[bool, bool] | None:
    """Which in-plane axes of a source slice to flip so that it lies as the target's.

    Args:
        source: axis codes of the volume's (x, y, z) voxel axes (:func:`axis_codes`).
        target: the adapter's recorded training orientation (same form).

    Returns:
        ``(flip_rows, flip_columns)`` (rows = the voxel y axis, columns = x), or None when the
        slice's axes are not the target's anatomical axes (another slicing plane or a swapped
        row / column order): flips cannot match those, the slice is used as stored.
    """
    src, tgt = check_orientation(source, "source"), check_orientation(target, "target")
    flips = []
    for i in (1, 0):  # rows (y), columns (x)
        if src[i] == tgt[i]:
            flips.append(False)
        elif src[i] == OPPOSITE[tgt[i]]:
            flips.append(True)
        else:
            return None
    return flips[0], flips[1]


def describe_orientation(source: str | None, target: str | None) -> str:
    """One sentence for ``case.json`` on what the in-plane orientation step did."""
    if target is None:
        return "none: the adapter records no training orientation (slices as stored)"
    if source is None:
        return f"none: the volume's orientation is unknown (adapter trained on {target})"
    flips = orientation_flips(source, target)
    if flips is None:
        return (
            f"none: the volume's in-plane axes ({source}) are not those of the adapter's "
            f"training orientation ({target}); slices used as stored"
        )
    what = [n for n, f in zip(("rows", "columns"), flips, strict=True) if f]
    if not what:
        return f"none needed: the volume is {source}, as the adapter's training data"
    return (
        f"the volume is {source}, the adapter was trained on {target}: "
        f"{' and '.join(what)} flipped for the model, class scores flipped back"
    )
