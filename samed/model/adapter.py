"""What adapter a :class:`samed.model.SamModel` carries: one declared attribute,
``SamModel.adapter: AdapterState | None``, set by :func:`samed.lora.apply_lora`,
:func:`samed.lora.load_adapter`, :func:`samed.lora.merge_adapter` / ``unmerge_adapter`` and
cleared by :func:`samed.lora.remove_adapter` (PEFT keeps the same facts in ``peft_config`` and
``active_adapter``). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the LoraConfig class lives in samed.lora, which imports the model
    from ..lora import LoraConfig

__all__ = ["AdapterState"]


@dataclass
class AdapterState:
    """The adapter attached to a model.

    Attributes:
        name: the adapter folder's name (``"unsaved"`` after :func:`samed.lora.apply_lora`).
        config: the :class:`samed.lora.LoraConfig` it was applied with (rank, mode, classes...).
        targets: module paths of the wrapped ``qkv`` layers.
        path: the folder it was loaded from (None for an unsaved adapter).
        digest: hex SHA-256 of ``adapter_model.safetensors`` ("" for an unsaved adapter); part of
            the engine's embedding cache key.
        labels: class index -> name (automatic: 0 is background; prompted: informational).
        postprocessing: the ``"postprocessing"`` recommendation of metadata.json (e.g.
            ``{"largest_component": [1, 2]}``; ``{}`` for none), see :mod:`samed.postprocess`.
        intensity: the intensity mapping recorded under metadata.json's ``preprocessing``
            (None when absent). :class:`samed.engine.Session` applies it in place of
            ``intensity="auto"``'s own decision.
        spacing: the in-plane (row, column) training spacing in mm recorded under
            ``preprocessing.spacing`` (None: trained on native grids). ``Session.automatic``
            resamples each slice to it and maps the result back to the source grid.
        orientation: axis codes of the training volumes' (x, y, z) voxel axes recorded under
            ``preprocessing.orientation`` (e.g. ``"LAS"``; None: not recorded). With a
            training spacing, ``Session.automatic`` flips slices to it
            (:mod:`samed.engine.orientation`).
        merged: whether the LoRA update is folded into the base weights
            (:func:`samed.lora.merge_adapter`).
    """

    name: str
    config: LoraConfig
    targets: tuple[str, ...] = ()
    path: Path | None = None
    digest: str = ""
    labels: dict[int, str] = field(default_factory=dict)
    postprocessing: dict[str, Any] = field(default_factory=dict)
    intensity: Any = None
    spacing: tuple[float, float] | None = None
    orientation: str | None = None
    merged: bool = False

    @property
    def mode(self) -> str:
        """``"prompted"`` or ``"automatic"`` (from the config)."""
        return self.config.mode

    @property
    def num_classes(self) -> int:
        """Output classes incl. background (automatic adapters; 0 for prompted ones)."""
        return int(self.config.num_classes)
