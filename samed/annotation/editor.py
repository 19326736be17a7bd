"""In-place label-map edits stored as sparse differences, with exact undo/redo.

Conventions: the label map is a (Z, Y, X) integer array; slice masks are (Y, X) bool. Nothing
here imports torch, napari or Qt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .history import History, Undoable

__all__ = ["LabelEdit", "LabelEditor"]


@dataclass(frozen=True)
class LabelEdit:
    """One change of a label map, stored as a sparse difference.

    Attributes:
        index: (N,) int64 flat indices (C order) of the voxels that changed.
        before: (N,) their values before the edit.
        after: (N,) their values after the edit.
        description: what the edit was (for history menus and messages).
    """

    index: np.ndarray
    before: np.ndarray
    after: np.ndarray
    description: str = ""

    @property
    def size(self) -> int:
        """Number of voxels changed."""
        return int(self.index.size)

    def slices(self, shape: Sequence[int]) -> np.ndarray:
        """Sorted unique z indices touched by the edit, for a (Z, Y, X) ``shape``."""
        plane = int(np.prod(shape[1:]))
        return np.unique(self.index // plane)


class LabelEditor(Undoable[LabelEdit]):
    """Writes masks into an integer label map in place, with undo/redo.

    Args:
        labels: (Z, Y, X) integer label map (e.g. a napari Labels layer's ``data``). Modified in
            place; never copied.
        max_history: edits kept for :meth:`undo` (oldest dropped first).

    Raises:
        ValueError: if ``labels`` is not a 3D integer array.
    """

    def __init__(self, labels: np.ndarray, max_history: int = 100) -> None:
        if not isinstance(labels, np.ndarray) or labels.ndim != 3:
            raise ValueError(
                f"labels must be a (Z, Y, X) numpy array; got {type(labels).__name__} "
                f"{getattr(labels, 'shape', '')}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must have an integer dtype; got {labels.dtype}")
        self.labels = labels
        self._history: History[LabelEdit] = History(max_history)

    # ------------------------------------------------------------------ edits
    def _check_label(self, label: int) -> int:
        info = np.iinfo(self.labels.dtype)
        if not isinstance(label, int | np.integer) or not 1 <= int(label) <= info.max:
            raise ValueError(
                f"label {label!r} must be an integer in [1, {info.max}] for a {self.labels.dtype} "
                "label map (0 is background)"
            )
        return int(label)

    def _volume_mask(self, mask: np.ndarray, z: int | None) -> tuple[np.ndarray, int]:
        """Return (mask as bool, flat offset) for a slice mask on z or a whole-volume mask."""
        mask = np.asarray(mask, dtype=bool)
        if z is None:
            if mask.shape != self.labels.shape:
                raise ValueError(
                    f"mask shape {mask.shape} must equal the label map's {self.labels.shape}"
                )
            return mask, 0
        if not 0 <= int(z) < self.labels.shape[0]:
            raise ValueError(f"z={z} is outside the label map (0..{self.labels.shape[0] - 1})")
        if mask.shape != self.labels.shape[1:]:
            raise ValueError(
                f"slice mask shape {mask.shape} must equal the slice shape {self.labels.shape[1:]}"
            )
        return mask, int(z) * int(np.prod(self.labels.shape[1:]))

    def _commit(self, index: np.ndarray, after: np.ndarray, description: str, record: bool):
        flat = self.labels.reshape(-1)  # a view: labels is contiguous or reshape would copy
        before = flat[index].copy()
        changed = before != after
        index, before, after = index[changed], before[changed], after[changed]
        if index.size == 0:
            return None
        flat[index] = after
        edit = LabelEdit(index, before, after.astype(self.labels.dtype), description)
        if record:
            self._push(edit)
        return edit

    def paint(
        self,
        mask: np.ndarray,
        label: int,
        *,
        z: int | None = None,
        preserve: bool = True,
        replace: bool = False,
        description: str = "",
        record: bool = True,
    ) -> LabelEdit | None:
        """Write ``label`` where ``mask`` is true.

        Args:
            mask: (Y, X) bool mask of slice ``z``, or (Z, Y, X) when ``z`` is None.
            label: the label value (>= 1).
            z: slice index for a slice mask; None for a volume mask.
            preserve: only voxels that are background (0) or already ``label`` change, so other
                labels are never overwritten. False: the mask overwrites everything.
            replace: also clear voxels of ``label`` outside the mask (within slice ``z``, or the
                whole volume when ``z`` is None), i.e. the mask *becomes* the label there.
            description: stored with the edit.
            record: push the edit on this editor's undo stack (False when a caller keeps its
                own history, like :class:`Annotator`).

        Returns:
            The :class:`LabelEdit`, or None when no voxel changed.
        """
        label = self._check_label(label)
        mask, offset = self._volume_mask(mask, z)
        region = self.labels[z] if z is not None else self.labels
        if not self.labels.flags.c_contiguous:
            raise ValueError("labels must be C-contiguous to be edited in place")
        write = mask & ((region == 0) | (region == label)) if preserve else mask.copy()
        idx_on = np.flatnonzero(write)
        parts_idx = [idx_on]
        parts_val = [np.full(idx_on.size, label, dtype=self.labels.dtype)]
        if replace:
            idx_off = np.flatnonzero((region == label) & ~mask)
            parts_idx.append(idx_off)
            parts_val.append(np.zeros(idx_off.size, dtype=self.labels.dtype))
        index = np.concatenate(parts_idx).astype(np.int64) + offset
        after = np.concatenate(parts_val)
        return self._commit(index, after, description or f"paint label {label}", record)

    def erase(
        self, label: int, *, z: int | None = None, description: str = "", record: bool = True
    ) -> LabelEdit | None:
        """Set every voxel of ``label`` (on slice ``z``, or everywhere) to 0."""
        label = self._check_label(label)
        region = self.labels[z] if z is not None else self.labels
        offset = 0 if z is None else int(z) * int(np.prod(self.labels.shape[1:]))
        index = np.flatnonzero(region == label).astype(np.int64) + offset
        after = np.zeros(index.size, dtype=self.labels.dtype)
        return self._commit(index, after, description or f"erase label {label}", record)

    def fill(
        self,
        label_map: np.ndarray,
        *,
        preserve: bool = True,
        description: str = "",
        record: bool = True,
    ) -> LabelEdit | None:
        """Write every non-zero voxel of a (Z, Y, X) label map (e.g. an automatic result).

        Args:
            label_map: (Z, Y, X) integer map; 0 voxels leave the label map unchanged.
            preserve: only background voxels (0) of the current label map change.
        """
        new = np.asarray(label_map)
        if new.shape != self.labels.shape:
            raise ValueError(f"label map shape {new.shape} must equal {self.labels.shape}")
        write = new != 0
        if preserve:
            write &= self.labels == 0
        index = np.flatnonzero(write).astype(np.int64)
        after = new.reshape(-1)[index].astype(self.labels.dtype)
        return self._commit(index, after, description or "fill", record)

    # ------------------------------------------------------------------ history
    def apply(self, edit: LabelEdit) -> None:
        """Re-apply an edit (redo)."""
        self.labels.reshape(-1)[edit.index] = edit.after

    def revert(self, edit: LabelEdit) -> None:
        """Undo an edit: the changed voxels get their old values back exactly."""
        self.labels.reshape(-1)[edit.index] = edit.before

    def _push(self, edit: LabelEdit) -> None:
        self._history.push(edit)

    # Undoable: undo() reverts the last recorded edit, redo() re-applies it
    def _revert_step(self, edit: LabelEdit) -> None:
        self.revert(edit)

    def _apply_step(self, edit: LabelEdit) -> None:
        self.apply(edit)
