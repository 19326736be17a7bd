"""GUI-free annotation state: a label editor and an interactive object with undo/redo.

* :mod:`samed.annotation.history`: :class:`History`, the bounded undo/redo stacks, and
  :class:`Undoable`, the ``undo``/``redo``/``can_undo``/``can_redo``/``max_history`` surface;
* :mod:`samed.annotation.editor`: :class:`LabelEditor`, in-place label edits stored as
  :class:`LabelEdit` sparse differences (exact undo);
* :mod:`samed.annotation.annotator`: :class:`Annotator`, the current object's
  :class:`SlicePrompts` and masks, propagation, accept, and one history of
  :class:`HistoryStep` objects.

Nothing here imports torch, napari or Qt.
"""

from .annotator import Annotator, HistoryStep, SlicePrompts
from .editor import LabelEdit, LabelEditor
from .history import History, Undoable

__all__ = [
    "LabelEdit",
    "LabelEditor",
    "SlicePrompts",
    "Annotator",
    "HistoryStep",
    "History",
    "Undoable",
]
