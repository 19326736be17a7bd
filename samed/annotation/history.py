"""Bounded undo/redo stacks, and the undo/redo surface shared by the editor and the annotator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["History", "Undoable"]


class History(Generic[T]):
    """Bounded undo/redo stacks of steps of any kind.

    ``push`` records a new step (the oldest is dropped beyond ``max_history``; the redo stack is
    cleared); ``undo(revert)`` / ``redo(apply)`` move the last step across and call the given
    function on it, returning the step (None when there is nothing to move). ``merge_last``
    folds the last few steps into one (e.g. a click and the re-propagation it triggered), and
    ``pushed`` counts every push so far, to tell how many steps an operation recorded.
    """

    def __init__(self, max_history: int = 100) -> None:
        if int(max_history) < 0:
            raise ValueError(f"max_history={max_history} must be >= 0 (0 keeps no undo)")
        self.max_history = int(max_history)
        self._undo: list[T] = []
        self._redo: list[T] = []
        self.pushed = 0  # steps pushed since creation (dropped ones included)

    def push(self, step: T) -> None:
        self.pushed += 1
        self._undo.append(step)
        del self._undo[: max(0, len(self._undo) - self.max_history)]
        self._redo.clear()

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def steps(self) -> list[T]:
        """The undoable steps, oldest first (a copy)."""
        return list(self._undo)

    def merge_last(self, count: int, combine: Callable[[list[T]], T]) -> T | None:
        """Replace the last ``count`` undoable steps by ``combine(steps)`` (oldest first), so one
        undo reverts them all. ``count`` beyond the kept steps merges what is kept; a count below
        2 (or fewer than 2 kept steps) changes nothing. Returns the merged step, or None.

        Raises:
            ValueError: when ``count`` is negative.
        """
        if int(count) < 0:
            raise ValueError(f"count={count} must be >= 0 (the number of last steps to merge)")
        count = min(int(count), len(self._undo))
        if count < 2:
            return None
        merged = combine(self._undo[-count:])
        del self._undo[-count:]
        self._undo.append(merged)
        return merged

    def undo(self, revert: Callable[[T], object]) -> T | None:
        return self._move(self._undo, self._redo, revert)

    def redo(self, apply: Callable[[T], object]) -> T | None:
        return self._move(self._redo, self._undo, apply)

    @staticmethod
    def _move(src: list[T], dst: list[T], fn: Callable[[T], object]) -> T | None:
        """Pop the last step of ``src``, call ``fn`` on it, push it on ``dst``."""
        if not src:
            return None
        step = src.pop()
        fn(step)
        dst.append(step)
        return step


class Undoable(Generic[T]):
    """Undo/redo for a class that keeps its steps in ``self._history`` (a :class:`History`).

    Subclasses set ``_history`` in ``__init__`` and implement :meth:`_revert_step` and
    :meth:`_apply_step` (what undoing / redoing one step does).
    """

    _history: History[T]

    def _revert_step(self, step: T) -> None:
        raise NotImplementedError

    def _apply_step(self, step: T) -> None:
        raise NotImplementedError

    @property
    def max_history(self) -> int:
        """Steps kept for :meth:`undo` (oldest dropped first)."""
        return self._history.max_history

    @property
    def can_undo(self) -> bool:
        return self._history.can_undo

    @property
    def can_redo(self) -> bool:
        return self._history.can_redo

    def undo(self) -> T | None:
        """Undo the last recorded step; returns it (None when there is nothing to undo)."""
        return self._history.undo(self._revert_step)

    def redo(self) -> T | None:
        """Redo the last undone step; returns it (None when there is nothing to redo)."""
        return self._history.redo(self._apply_step)
