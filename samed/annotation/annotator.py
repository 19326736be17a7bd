"""The annotator: the current object (prompts, masks, propagation) with undo/redo.

A front end (the napari widget, a notebook, a test) keeps one :class:`Annotator` per image and
label map. It holds

* the *current object*: per-slice prompts (one box and any number of positive/negative points)
  and the per-slice masks predicted from them or propagated through the volume; nothing in the
  label map changes until the object is accepted;
* a :class:`LabelEditor` that writes masks into the label map **in place** under one label and,
  by default, never over voxels that carry another label;
* one history of steps (prompt changes, propagations, clears, accepts, automatic fills) that
  :meth:`Annotator.undo` / :meth:`Annotator.redo` walk. Label edits are stored as the changed
  voxels' indices with their old and new values, so undo restores the label map exactly.

Conventions: arrays are ``(Z, Y, X)``; slice masks are ``(Y, X)`` bool; a point is ``(x, y)`` and a
box ``(x0, y0, x1, y1)`` in pixels of slice ``z`` (x = column, y = row), as in
:class:`samed.engine.Session`. Nothing here imports torch, napari or Qt; the engine session is
passed in (any object with ``predict`` and ``propagate`` of the same signatures works).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .editor import LabelEdit, LabelEditor
from .history import History, Undoable

__all__ = ["SlicePrompts", "Annotator", "HistoryStep"]


@dataclass(frozen=True)
class SlicePrompts:
    """The prompts of the current object on one slice.

    Attributes:
        box: (x0, y0, x1, y1) in slice pixels, or None.
        points: ((x, y), ...) in slice pixels.
        labels: (1 | 0, ...) one per point: 1 positive (object), 0 negative (background).
    """

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.points) != len(self.labels):
            raise ValueError(
                f"{len(self.points)} points but {len(self.labels)} point labels; give one each"
            )
        if any(v not in (0, 1) for v in self.labels):
            raise ValueError(f"point labels {self.labels} must be 1 (positive) or 0 (negative)")

    @property
    def empty(self) -> bool:
        return self.box is None and not self.points


@dataclass
class _State:
    """Snapshot of the current object (arrays are never mutated once stored, so snapshots
    share them)."""

    prompts: dict[int, SlicePrompts] = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(dict(self.prompts), dict(self.masks))


@dataclass(frozen=True)
class HistoryStep:
    """One undoable step.

    Attributes:
        description: e.g. ``"box on slice 40"``, ``"propagate from slice 40"``, ``"accept label 5"``.
        before: the object before the step.
        after: the object after the step.
        edit: the label-map change made by the step (accept / automatic), or None.
    """

    description: str
    before: _State
    after: _State
    edit: LabelEdit | None = None


class Annotator(Undoable[HistoryStep]):
    """Interactive segmentation state for one volume and one label map.

    Args:
        engine: a :class:`samed.engine.Session` over the image (or any object with its
            ``predict(z, box=, points=, point_labels=)`` and ``propagate(z, mask, ...)``).
        labels: (Z, Y, X) integer label map edited in place (same Z, Y, X as the engine's volume).
        max_history: steps kept for undo.
    """

    def __init__(self, engine: Any, labels: np.ndarray, max_history: int = 100) -> None:
        self.engine = engine
        self.editor = LabelEditor(labels, max_history=max_history)
        shape = tuple(getattr(engine, "shape", labels.shape))
        if shape != labels.shape:
            raise ValueError(
                f"label map shape {labels.shape} does not match the image shape {shape} (Z, Y, X)"
            )
        self.shape: tuple[int, int, int] = labels.shape  # type: ignore[assignment]
        self._state = _State()
        self._history: History[HistoryStep] = History(max_history)
        #: slices refined by a point click since their last propagation: propagating from one of
        #: them carries only the correction (``engine.repropagate``); any other propagation
        #: (the first one, the *Propagate* button again) recomputes as before
        self._refined: set[int] = set()

    # ------------------------------------------------------------------ state access
    @property
    def labels(self) -> np.ndarray:
        return self.editor.labels

    @property
    def prompts(self) -> dict[int, SlicePrompts]:
        """Slice index -> prompts of the current object (a copy)."""
        return dict(self._state.prompts)

    @property
    def masks(self) -> dict[int, np.ndarray]:
        """Slice index -> (Y, X) bool mask of the current object (a copy of the dict)."""
        return dict(self._state.masks)

    def object_mask(self) -> np.ndarray:
        """(Z, Y, X) bool mask of the current (not yet accepted) object."""
        out = np.zeros(self.shape, dtype=bool)
        for z, m in self._state.masks.items():
            out[z] = m
        return out

    def seed_slice(self, preferred: int | None = None) -> int | None:
        """The slice propagation starts from: ``preferred`` if the object has a mask there, else
        the prompted slice with the largest mask, else None."""
        masks = self._state.masks
        if preferred is not None and preferred in masks and masks[preferred].any():
            return int(preferred)
        prompted = [z for z in self._state.prompts if z in masks and masks[z].any()]
        if not prompted:
            return None
        return int(max(prompted, key=lambda z: int(masks[z].sum())))

    # ------------------------------------------------------------------ history
    def _record(self, description: str, before: _State, edit: LabelEdit | None = None) -> None:
        self._history.push(HistoryStep(description, before, self._state.copy(), edit))

    @property
    def history(self) -> list[str]:
        """Descriptions of the undoable steps, oldest first."""
        return [s.description for s in self._history.steps]

    # Undoable: undo() / redo() walk every kind of step (prompt, propagation, clear, label edit)
    def _revert_step(self, step: HistoryStep) -> None:
        if step.edit is not None:
            self.editor.revert(step.edit)
        self._state = step.before.copy()

    def _apply_step(self, step: HistoryStep) -> None:
        if step.edit is not None:
            self.editor.apply(step.edit)
        self._state = step.after.copy()

    # ------------------------------------------------------------------ prompts
    def _check_z(self, z: int) -> int:
        if not isinstance(z, int | np.integer) or not 0 <= int(z) < self.shape[0]:
            raise ValueError(f"slice index z={z!r} must be an integer in [0, {self.shape[0] - 1}]")
        return int(z)

    def predict(
        self, z: int, prompts: SlicePrompts, previous: np.ndarray | None = None
    ) -> np.ndarray:
        """Mask of the object on slice z for ``prompts`` (no state change).

        ``previous``: the slice's (Y, X) mask before the last point of ``prompts`` was added; an
        engine with ``refine`` (:meth:`samed.engine.Session.refine`) then refines it instead of
        predicting from the prompts alone."""
        if previous is not None and prompts.points and hasattr(self.engine, "refine"):
            return np.asarray(
                self.engine.refine(
                    int(z),
                    box=None if prompts.box is None else list(prompts.box),
                    points=np.asarray(prompts.points, dtype=np.float64),
                    point_labels=np.asarray(prompts.labels, dtype=np.int64),
                    prev_mask=previous,
                    prior_mask=self._neighbour_mask(int(z)),
                    **self._object_wall(int(z), prompts),
                ),
                dtype=bool,
            )
        kwargs: dict[str, Any] = {}
        if prompts.box is not None:
            kwargs["box"] = list(prompts.box)
        if prompts.points:
            kwargs["points"] = np.asarray(prompts.points, dtype=np.float64)
            kwargs["point_labels"] = np.asarray(prompts.labels, dtype=np.int64)
        return np.asarray(self.engine.predict(int(z), **kwargs), dtype=bool)

    def _neighbour_mask(self, z: int) -> np.ndarray | None:
        """The larger non-empty object mask of slices z - 1 and z + 1 (None if both empty)."""
        near = [
            m for k in (z - 1, z + 1) if (m := self._state.masks.get(k)) is not None and m.any()
        ]
        return max(near, key=lambda m: int(m.sum())) if near else None

    def _object_wall(self, z: int, prompts: SlicePrompts) -> dict[str, Any]:
        """For a click on slice z without a box: the nearest box slice's box and mask, as
        ``{"object_box": ..., "object_mask": ...}`` (what that box says of the object's wall:
        :func:`samed.engine.hollow.box_wall`); ``{}`` when there is none or the engine does
        not take them."""
        if prompts.box is not None:
            return {}
        try:
            if "object_mask" not in inspect.signature(self.engine.refine).parameters:
                return {}
        except (TypeError, ValueError):
            return {}
        boxed = [k for k, p in self._state.prompts.items() if p.box is not None and k != z]
        if not boxed:
            return {}
        k = min(boxed, key=lambda k: (abs(k - z), k))
        mask = self._state.masks.get(k)
        if mask is None:
            return {}
        return {"object_box": list(self._state.prompts[k].box), "object_mask": mask}

    def set_prompts(self, z: int, prompts: SlicePrompts, mask: np.ndarray | None = None):
        """Replace the prompts of slice z and predict its mask (one undoable step).

        Args:
            z: slice index.
            prompts: the slice's complete prompts; empty prompts remove the slice's mask.
            mask: the prediction if the caller already has it (e.g. computed in a worker).

        Returns:
            The (Y, X) bool mask of slice z (None when the prompts are empty).
        """
        z = self._check_z(z)
        if self._state.prompts.get(z, SlicePrompts()) == prompts and (
            prompts.empty or z in self._state.masks
        ):
            return self._state.masks.get(z)
        if not prompts.empty and mask is None:
            old = self._state.prompts.get(z, SlicePrompts())
            clicked = (
                prompts.box == old.box
                and prompts.points[:-1] == old.points
                and (len(prompts.points) == len(old.points) + 1)
            )  # one more point: refine the slice's current mask
            prev = self._state.masks.get(z, np.zeros(self.shape[1:], bool)) if clicked else None
            if clicked:
                self._refined.add(z)
            else:
                self._refined.discard(z)
            mask = self.predict(z, prompts, prev)
        before = self._state.copy()
        if prompts.empty:
            self._state.prompts.pop(z, None)
            self._state.masks.pop(z, None)
            what = f"clear prompts on slice {z}"
        else:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != self.shape[1:]:
                raise ValueError(f"mask shape {mask.shape} must equal {self.shape[1:]}")
            self._state.prompts[z] = prompts
            self._state.masks[z] = mask
            n_pos = sum(prompts.labels)
            parts = ["box"] if prompts.box is not None else []
            if prompts.points:
                parts.append(f"{n_pos}+/{len(prompts.labels) - n_pos}- points")
            kind = " + ".join(parts)
            what = f"{kind} on slice {z}"
        self._record(what, before)
        return mask

    def add_box(self, z: int, box: Sequence[float]) -> np.ndarray:
        """Set the box of slice z (keeping its points) and predict; returns the mask."""
        b = tuple(float(v) for v in box)
        if len(b) != 4:
            raise ValueError(f"box {box!r} must be (x0, y0, x1, y1)")
        old = self._state.prompts.get(int(z), SlicePrompts())
        return self.set_prompts(z, SlicePrompts(b, old.points, old.labels))  # type: ignore[arg-type]

    def add_point(self, z: int, xy: Sequence[float], positive: bool = True) -> np.ndarray:
        """Add a positive or negative point on slice z and predict; returns the mask."""
        old = self._state.prompts.get(int(z), SlicePrompts())
        p = (float(xy[0]), float(xy[1]))
        new = SlicePrompts(old.box, (*old.points, p), (*old.labels, 1 if positive else 0))
        return self.set_prompts(z, new)

    def click(
        self,
        z: int,
        xy: Sequence[float],
        positive: bool = True,
        *,
        propagate: bool = True,
        **kwargs: Any,
    ) -> np.ndarray:
        """A corrective click: :meth:`add_point` then (if ``propagate``) ``propagate(z,
        **kwargs)``, recorded as ONE undoable step. Returns slice z's mask."""
        start = self._history.pushed
        mask = self.add_point(z, xy, positive)
        if propagate and (self.seed_slice(z) is not None or int(z) in self._state.prompts):
            self.propagate(int(z), **kwargs)
        self._history.merge_last(  # the click and its re-propagation: one undo step
            self._history.pushed - start,
            lambda s: HistoryStep(f"{s[0].description} + re-propagate", s[0].before, s[-1].after),
        )
        return self._state.masks.get(int(z), mask)

    def clear_object(self) -> bool:
        """Drop the current object's prompts and masks (undoable). Returns False if empty."""
        if not self._state.prompts and not self._state.masks:
            return False
        before = self._state.copy()
        self._state = _State()
        self._record("clear object", before)
        return True

    # ------------------------------------------------------------------ propagation
    def propagate_iter(
        self, z: int | None = None, direction: str = "both", **kwargs: Any
    ) -> Iterator[Any]:
        """Carry the current object through the volume from slice z, step by step.

        Unprompted slices of the object in the chosen direction(s) are recomputed; prompted
        slices keep the user's masks. From a slice that a point click refined since its last
        propagation (:meth:`add_point`, :meth:`click`), only the correction is carried, as far
        as it reaches and never over a prompted slice (:func:`samed.engine.interactive.
        repropagate`). The whole run is one undoable step, recorded when the
        generator finishes *or is closed early* (a stop button), keeping the slices reached.

        Args:
            z: the seed slice (default :meth:`seed_slice`).
            direction: ``"both"``, ``"forward"`` (+z) or ``"backward"`` (-z).
            **kwargs: passed to the engine's ``propagate`` (``box_margin``, ``use_mask_prompt``,
                ``min_area``, ...).

        Yields:
            The engine's :class:`~samed.engine.PropagationStep` objects.

        Raises:
            ValueError: when there is no object mask to start from.
        """
        seed = self.seed_slice(z)
        correction = (
            z is not None
            and int(z) in self._refined
            and bool(self._state.prompts.get(int(z), SlicePrompts()).points)  # click not undone
            and hasattr(self.engine, "repropagate")
        )
        if correction:
            seed = int(z)  # a corrected slice, even one a negative click emptied
        if seed is None:
            raise ValueError(
                "nothing to propagate: place a box or points on a slice first"
                + (f" (slice {z} has no object mask)" if z is not None else "")
            )
        before = self._state.copy()
        masks = self._state.masks
        prompted = set(self._state.prompts)
        self._refined.discard(seed)
        if correction:  # after a click: only as far as the change reaches
            steps = self.engine.repropagate(seed, masks, prompted, direction=direction, **kwargs)
            yield from self._apply_steps(steps, prompted, seed, direction, before)
            return
        sides = {"both": (1, -1), "forward": (1,), "backward": (-1,)}[direction]
        # each side runs up to the next prompted slice (a keyframe): beyond it is its domain
        ends = {
            d: min(
                (k for k in prompted if (k - seed) * d > 0),
                key=lambda k: abs(k - seed),
                default=None,
            )
            for d in sides
        }
        for k in list(masks):
            d = 1 if k > seed else -1
            if k != seed and d in ends and k not in prompted:
                if ends[d] is None or (ends[d] - k) * d > 0:
                    del masks[k]
        seed_mask = masks[seed]

        # a hollow mask goes on as a wall (engine.hollow), where the engine knows walls
        walls = (
            {"walls": True} if hasattr(self.engine, "repropagate") and "walls" not in kwargs else {}
        )

        def steps() -> Iterator[Any]:
            for d in sides:
                run = self.engine.propagate(
                    seed,
                    seed_mask,
                    direction="forward" if d > 0 else "backward",
                    **walls,
                    **kwargs,
                )
                for step in run:
                    if step.z == ends[d]:
                        run.close()
                        break
                    yield step

        yield from self._apply_steps(steps(), prompted, seed, direction, before)

    def _apply_steps(
        self, steps: Iterator[Any], keyframes: set[int], seed: int, direction: str, before: Any
    ) -> Iterator[Any]:
        """Write propagation steps into the object's masks (never over a keyframe; a stopped or
        empty step removes its slice) and record the whole run as one undoable step."""
        masks = self._state.masks
        n = 0
        try:
            for step in steps:
                if step.z not in keyframes:
                    if step.stopped or not step.mask.any():
                        masks.pop(step.z, None)
                    else:
                        masks[step.z] = np.asarray(step.mask, dtype=bool)
                n += 1
                yield step
        finally:
            self._record(f"propagate from slice {seed} ({direction}, {n} slices)", before)

    def propagate(self, z: int | None = None, direction: str = "both", **kwargs: Any) -> int:
        """Run :meth:`propagate_iter` to the end; returns the number of slices with a mask."""
        for _ in self.propagate_iter(z, direction, **kwargs):
            pass
        return sum(1 for m in self._state.masks.values() if m.any())

    # ------------------------------------------------------------------ label map
    def accept(
        self, label: int, *, preserve: bool = True, replace: bool = False
    ) -> LabelEdit | None:
        """Write the current object into the label map under ``label``, then start a new object.

        Args:
            label: the active label (>= 1).
            preserve: never overwrite voxels of other labels (default).
            replace: on the object's slices, clear voxels of ``label`` outside the object.

        Returns:
            The label edit (None when the object was empty; nothing is recorded then).
        """
        if not any(m.any() for m in self._state.masks.values()):
            return None
        before = self._state.copy()
        edit = self._paint_object(label, preserve=preserve, replace=replace)
        self._state = _State()
        self._record(f"accept label {label}", before, edit)
        return edit

    def _paint_object(self, label: int, *, preserve: bool, replace: bool) -> LabelEdit | None:
        masks = self._state.masks
        zs = sorted(masks)
        if not replace:
            return self.editor.paint(
                self.object_mask(),
                label,
                preserve=preserve,
                record=False,
                description=f"accept label {label}",
            )
        edits = [
            self.editor.paint(masks[z], label, z=z, preserve=preserve, replace=True, record=False)
            for z in zs
        ]
        edits = [e for e in edits if e is not None]
        if not edits:
            return None
        return LabelEdit(
            np.concatenate([e.index for e in edits]),
            np.concatenate([e.before for e in edits]),
            np.concatenate([e.after for e in edits]),
            f"accept label {label} (replace)",
        )

    def fill(self, label_map: np.ndarray, *, preserve: bool = True, description: str = "automatic"):
        """Write a whole (Z, Y, X) label map (e.g. :meth:`samed.engine.Session.automatic`) as one
        undoable step; with ``preserve`` only background voxels change. Returns the edit."""
        edit = self.editor.fill(label_map, preserve=preserve, record=False, description=description)
        return self._record_edit(description, edit)

    def erase_label(self, label: int) -> LabelEdit | None:
        """Remove ``label`` from the whole label map (undoable)."""
        return self._record_edit(f"erase label {label}", self.editor.erase(label, record=False))

    def _record_edit(self, description: str, edit: LabelEdit | None) -> LabelEdit | None:
        """Record a label edit that leaves the current object as it is (nothing when None)."""
        if edit is not None:
            self._record(description, self._state.copy(), edit)
        return edit
