"""Prompts files for batch segmentation: which objects to segment in which case, and where.

A prompts file lists objects. Each object belongs to a case (the case id that
:func:`samed.batch.discover_cases` gives an input), carries a label value and name, and is
prompted on one *key slice* by a box and/or points. The batch job segments the key slice from
the prompt and then propagates the mask through the volume.

Coordinate spaces (``space``):

* ``"voxel"`` (default): ``box = [x0, y0, x1, y1]`` and ``points = [[x, y], ...]`` in pixels of
  the slice ``array[z]`` (x = column, y = row; the Volume's ``(Z, Y, X)`` order reversed), with the
  key slice given as ``slice`` (z index). Points may also be ``[x, y, z]`` (then ``slice`` may be
  left out).
* ``"ras"`` (alias ``"world"``) or ``"lps"``: millimetres in the scanner's world frame (RAS+ as in
  nibabel / 3D Slicer; LPS as in DICOM / ITK). A box is two opposite corners
  ``[x0, y0, z0, x1, y1, z1]``, points are ``[[x, y, z], ...]``. They are mapped to voxels through
  the inverse of the Volume affine (``world = affine @ [x, y, z, 1]``); the key slice is the
  rounded mean z of the mapped coordinates, and every corner/point must fall within half a slice
  of it (an oblique box is an error rather than a silent projection).

JSON: a list of objects, or ``{"prompts": [...]}``, each object with the keys ``case`` (str),
``label`` (int >= 1), ``name`` (str, optional), ``space``, ``slice`` (int), ``box`` and/or
``points`` and ``point_labels`` (1 = object, 0 = background; default all 1).

CSV: a header row with the columns ``case,label,name,space,slice,box,points,point_labels``
(``name``, ``space``, ``slice``, ``points``, ``point_labels`` may be left empty or out); numbers
inside ``box`` are separated by spaces, points by ``;`` (``"120 80; 130 85"``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ObjectPrompt",
    "ResolvedPrompt",
    "PROMPT_SPACES",
    "read_prompts",
    "parse_prompt",
    "prompts_by_case",
    "resolve_prompt",
]

#: Accepted values of ``space`` (``"world"`` is an alias of ``"ras"``).
PROMPT_SPACES = ("voxel", "ras", "world", "lps")
_CSV_COLUMNS = ("case", "label", "name", "space", "slice", "box", "points", "point_labels")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class ObjectPrompt:
    """One object to segment in one case, as written in a prompts file.

    Attributes:
        case: case id (see :func:`samed.batch.discover_cases`).
        label: label value in the output label map (>= 1).
        name: label name (``"label_<value>"`` when not given).
        space: ``"voxel"``, ``"ras"`` or ``"lps"``.
        slice: key slice z (voxel space), or None (taken from the coordinates).
        box: (4,) voxel ``[x0, y0, x1, y1]`` or (6,) world ``[x0, y0, z0, x1, y1, z1]`` mm, or None.
        points: (N, 2) voxel ``[x, y]`` / (N, 3) ``[x, y, z]`` (voxel or mm), or None.
        point_labels: (N,) 1 = object, 0 = background.
        where: the file and entry it came from (for error messages).
    """

    case: str
    label: int
    name: str
    space: str = "voxel"
    slice: int | None = None
    box: tuple[float, ...] | None = None
    points: tuple[tuple[float, ...], ...] | None = None
    point_labels: tuple[int, ...] | None = None
    where: str = ""

    def fingerprint(self) -> dict[str, Any]:
        """The prompt as plain JSON values (used to tell whether a finished case is stale)."""
        return {
            "label": self.label,
            "name": self.name,
            "space": self.space,
            "slice": self.slice,
            "box": list(self.box) if self.box is not None else None,
            "points": [list(p) for p in self.points] if self.points is not None else None,
            "point_labels": list(self.point_labels) if self.point_labels is not None else None,
        }


@dataclass(frozen=True)
class ResolvedPrompt:
    """A prompt mapped onto one volume's voxel grid, ready for :meth:`Session.predict`.

    Attributes:
        z: key slice index.
        box: (4,) XYXY pixels of slice z (x = column), or None.
        points: (N, 2) XY pixels of slice z, or None.
        point_labels: (N,) ints (1 object, 0 background), or None.
    """

    z: int
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None


def _numbers(value: Any, where: str, what: str) -> list[float]:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, list | tuple):
        raise ValueError(f"{where}: {what} {value!r} must be a list of numbers")
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} {value!r} must be a list of numbers") from None
    if not all(np.isfinite(out)):
        raise ValueError(f"{where}: {what} {value!r} must be finite numbers")
    return out


def _int(value: Any, where: str, what: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} {value!r} must be an integer") from None
    if not np.isfinite(f) or f != int(f):
        raise ValueError(f"{where}: {what} {value!r} must be an integer")
    return int(f)


def parse_prompt(entry: dict[str, Any], where: str = "prompt") -> ObjectPrompt:
    """Validate one prompts-file entry (a dict with the keys described in the module docstring).

    Args:
        entry: the entry; empty strings count as absent (CSV cells).
        where: where it came from, e.g. ``"prompts.csv row 3"``, for error messages.

    Returns:
        The :class:`ObjectPrompt`.

    Raises:
        ValueError: naming the entry, the bad value and what is allowed.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: an entry must be an object with keys {list(_CSV_COLUMNS)}")
    e = {k: v for k, v in entry.items() if not (isinstance(v, str) and not v.strip())}
    unknown = sorted(set(e) - set(_CSV_COLUMNS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {list(_CSV_COLUMNS)}")
    for key in ("case", "label"):
        if key not in e:
            raise ValueError(f"{where}: {key!r} is required")
    case = str(e["case"]).strip()
    label = _int(e["label"], where, "label")
    if not 1 <= label <= 32767:
        raise ValueError(f"{where}: label {label} must be in [1, 32767] (0 is background)")
    name = str(e.get("name", f"label_{label}")).strip()
    space = str(e.get("space", "voxel")).strip().lower()
    if space not in PROMPT_SPACES:
        raise ValueError(f"{where}: space {space!r} is not one of {list(PROMPT_SPACES)}")
    space = "ras" if space == "world" else space
    z = _int(e["slice"], where, "slice") if "slice" in e else None
    box = None
    if "box" in e:
        box = _numbers(e["box"], where, "box")
        n = 4 if space == "voxel" else 6
        if len(box) != n:
            form = "[x0, y0, x1, y1]" if n == 4 else "[x0, y0, z0, x1, y1, z1] (mm)"
            raise ValueError(f"{where}: box {e['box']!r} in {space} space must be {form}")
        if space == "voxel" and (box[2] < box[0] or box[3] < box[1]):
            raise ValueError(f"{where}: box {box} must have x1 >= x0 and y1 >= y0")
    points = None
    if "points" in e:
        raw = e["points"]
        if isinstance(raw, str):
            raw = [p for p in raw.split(";") if p.strip()]
        if not isinstance(raw, list | tuple) or not raw:
            raise ValueError(f"{where}: points {e['points']!r} must be a non-empty list of points")
        points = [_numbers(p, where, "point") for p in raw]
        dims = {len(p) for p in points}
        allowed = {2, 3} if space == "voxel" else {3}
        if len(dims) != 1 or not dims <= allowed:
            raise ValueError(
                f"{where}: points {e['points']!r} must all have "
                + ("2 ([x, y]) or 3 ([x, y, z])" if space == "voxel" else "3 ([x, y, z] mm)")
                + " coordinates"
            )
    labels = None
    if "point_labels" in e:
        if points is None:
            raise ValueError(f"{where}: point_labels given without points")
        labels = [
            _int(v, where, "point label")
            for v in _numbers(e["point_labels"], where, "point_labels")
        ]
        if len(labels) != len(points) or not set(labels) <= {0, 1}:
            raise ValueError(
                f"{where}: point_labels {labels} must hold one 1 (object) or 0 (background) per point "
                f"({len(points)} points)"
            )
    if box is None and points is None:
        raise ValueError(f"{where}: give a box or points (or both)")
    if space == "voxel" and z is None and not (points is not None and len(points[0]) == 3):
        raise ValueError(f"{where}: a voxel-space prompt needs 'slice' (the key slice z index)")
    return ObjectPrompt(
        case,
        label,
        name,
        space,
        z,
        _tuple_or_none(box),
        None if points is None else tuple(map(tuple, points)),
        _tuple_or_none(labels),
        where,
    )


def _tuple_or_none(values: Sequence[Any] | None) -> tuple[Any, ...] | None:
    return None if values is None else tuple(values)


def read_prompts(path: str | os.PathLike) -> list[ObjectPrompt]:
    """Read a prompts file (``.json`` or ``.csv``; see the module docstring for the format).

    Args:
        path: the file.

    Returns:
        The objects, in file order (which is also the order in which they are merged).

    Raises:
        ValueError: unreadable file, unknown suffix, or an invalid entry (named with its row).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompts file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"prompts file {p} is not valid JSON: {exc}") from exc
        if isinstance(data, dict) and "prompts" in data:
            data = data["prompts"]
        if not isinstance(data, list):
            raise ValueError(
                f"prompts file {p}: expected a list of objects or {{'prompts': [...]}}"
            )
        prompts = [parse_prompt(e, f"{p.name} entry {i}") for i, e in enumerate(data)]
    elif suffix == ".csv":
        with open(p, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"case", "label"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"prompts file {p}: header {reader.fieldnames} lacks {sorted(missing)}; "
                    f"columns: {list(_CSV_COLUMNS)}"
                )
            prompts = [
                parse_prompt(dict(row), f"{p.name} row {i}")
                for i, row in enumerate(reader, start=2)
            ]
    else:
        raise ValueError(f"prompts file {p}: suffix {suffix!r} is not one of ['.json', '.csv']")
    seen: dict[tuple[str, int], str] = {}
    for pr in prompts:
        prev = seen.setdefault((pr.case, pr.label), pr.name)
        if prev != pr.name:
            raise ValueError(
                f"{pr.where}: label {pr.label} of case {pr.case!r} is named {pr.name!r} here and "
                f"{prev!r} earlier; one label value has one name"
            )
    return prompts


def prompts_by_case(prompts: Sequence[ObjectPrompt]) -> dict[str, list[ObjectPrompt]]:
    """Group prompts by case id, keeping file order within a case."""
    out: dict[str, list[ObjectPrompt]] = {}
    for pr in prompts:
        out.setdefault(pr.case, []).append(pr)
    return out


def _world_to_voxel(coords: np.ndarray, affine: np.ndarray, space: str) -> np.ndarray:
    """(N, 3) world mm -> (N, 3) continuous voxel (x, y, z)."""
    aff = _LPS_TO_RAS @ affine if space == "lps" else affine
    homog = np.c_[coords, np.ones(len(coords))]
    return (np.linalg.inv(aff) @ homog.T).T[:, :3]


def resolve_prompt(
    prompt: ObjectPrompt, shape: tuple[int, int, int], affine: np.ndarray
) -> ResolvedPrompt:
    """Map a prompt onto a volume's voxel grid and check that it lies inside.

    Args:
        prompt: the prompt.
        shape: the volume's ``(Z, Y, X)``.
        affine: (4, 4) RAS affine of the voxel index ``(x, y, z)`` (:attr:`samed.io.Volume.affine`).

    Returns:
        The key slice and the box/points in pixels of that slice.

    Raises:
        ValueError: the key slice or a coordinate falls outside the volume, or world coordinates
            do not lie on one slice.
    """
    nz, ny, nx = shape
    where = f"{prompt.where} (case {prompt.case!r}, label {prompt.label})"
    box = points = None
    if prompt.space == "voxel":
        z = prompt.slice
        if prompt.box is not None:
            box = np.asarray(prompt.box, dtype=np.float64)
        if prompt.points is not None:
            pts = np.asarray(prompt.points, dtype=np.float64)
            if pts.shape[1] == 3:
                zs = np.unique(np.round(pts[:, 2]).astype(int))
                if len(zs) != 1 or (z is not None and zs[0] != z):
                    raise ValueError(
                        f"{where}: points lie on slices {zs.tolist()}"
                        + (f" and slice is {z}" if z is not None else "")
                        + "; all must be on one key slice"
                    )
                z = int(zs[0])
            points = pts[:, :2]
    else:
        coords = []
        if prompt.box is not None:
            b = np.asarray(prompt.box, dtype=np.float64)
            coords += [b[:3], b[3:]]
        if prompt.points is not None:
            coords += list(np.asarray(prompt.points, dtype=np.float64))
        vox = _world_to_voxel(
            np.asarray(coords), np.asarray(affine, dtype=np.float64), prompt.space
        )
        zc = float(np.mean(vox[:, 2]))
        z = int(np.round(zc))
        if np.any(np.abs(vox[:, 2] - z) > 0.5 + 1e-6):
            raise ValueError(
                f"{where}: the {prompt.space.upper()} coordinates map to slices "
                f"{np.round(vox[:, 2], 2).tolist()}; they must lie on one axial slice (within 0.5)"
            )
        k = 0
        if prompt.box is not None:
            c0, c1 = vox[0, :2], vox[1, :2]
            box = np.r_[np.minimum(c0, c1), np.maximum(c0, c1)]
            k = 2
        if prompt.points is not None:
            points = vox[k:, :2]
    if z is None:
        raise ValueError(f"{where}: voxel prompts need a key slice ('slice')")
    if not 0 <= z < nz:
        raise ValueError(f"{where}: key slice {z} is outside the volume's slices [0, {nz - 1}]")
    limits = np.array([nx - 1, ny - 1], dtype=np.float64)
    tol = 0.5
    if box is not None:
        corners = box.reshape(2, 2)
        if np.any(corners < -tol) or np.any(corners > limits + tol):
            raise ValueError(
                f"{where}: box {np.round(box, 2).tolist()} (pixels) is outside slice {z} "
                f"(x in [0, {nx - 1}], y in [0, {ny - 1}])"
            )
        box = np.clip(box, 0, np.r_[limits, limits])
    labels = None
    if points is not None:
        if np.any(points < -tol) or np.any(points > limits + tol):
            raise ValueError(
                f"{where}: points {np.round(points, 2).tolist()} (pixels) are outside slice {z} "
                f"(x in [0, {nx - 1}], y in [0, {ny - 1}])"
            )
        points = np.clip(points, 0, limits)
        labels = np.asarray(prompt.point_labels or [1] * len(points), dtype=np.int64)
    return ResolvedPrompt(z=int(z), box=box, points=points, point_labels=labels)
