"""The model for interactive work (box + corrective clicks): the shipped click-aware adapter when
one is marked as the interactive default, else the base model. Torch is imported only when a
model is built."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DEFAULT", "interactive_adapter_name", "interactive_model"]

#: ``adapter=DEFAULT``: the adapter :func:`samed.registry.interactive_adapter` names (none: base)
DEFAULT = "default"


def interactive_adapter_name() -> str | None:
    """Name of the adapter marked ``"interactive_default": true`` in its metadata.json (see
    :func:`samed.registry.interactive_adapter`), or None when none is found (base model)."""
    from ..registry import interactive_adapter

    info = interactive_adapter()
    return info.name if info is not None else None


def interactive_model(
    kind: str = "litemedsam",
    *,
    adapter: str | os.PathLike | None = DEFAULT,
    device: str = "auto",
    checkpoint: str | os.PathLike | None = None,
) -> Any:
    """A :class:`samed.model.SamModel` for :class:`samed.engine.Session` +
    :class:`samed.annotation.Annotator` interactive work.

    Args:
        kind: model kind (the click-aware default exists for ``litemedsam`` only; other kinds get
            no default adapter).
        adapter: ``"default"`` (the interactive default adapter if one is shipped for ``kind``,
            else none), None (the base model), or an adapter name / folder.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        checkpoint: checkpoint for kinds without bundled weights.
    """
    from ..model import load_model
    from ..registry import interactive_adapter

    if adapter == DEFAULT:
        info = interactive_adapter()
        adapter = info.name if info is not None and info.base_model == kind else None
    return load_model(kind, checkpoint, adapter=adapter, device=device)
