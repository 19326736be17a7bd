"""GUI-free annotation state: a label editor and an interactive object with undo/redo.

* :mod:`samed.annotation.history`: :class:`History`, the bounded undo/redo stacks, and
  :class:`Undoable`, the ``undo``/``redo``/``can_undo``/``can_redo``/``max_history`` surface;
* :mod:`samed.annotation.editor`: :class:`LabelEditor`, in-place label edits stored as
  :class:`LabelEdit` sparse differences (exact undo);
* :mod:`samed.annotation.annotator`: :class:`Annotator`, the current object's
  :class:`SlicePrompts` and masks, propagation, accept, and one history of
  :class:`HistoryStep` objects;
* :mod:`samed.annotation.defaults`: :func:`interactive_model`, the model for box + click work
  (the click-aware adapter marked as the interactive default, else the base model).

Nothing here imports torch, napari or Qt.
"""

from .annotator import Annotator, HistoryStep, SlicePrompts
from .defaults import interactive_adapter_name, interactive_model
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
    "interactive_adapter_name",
    "interactive_model",
]
