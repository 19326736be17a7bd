"""The widget's one session object: model, engine sessions and annotators, without Qt.

Everything here is plain Python over :mod:`samed` so that the widget only wires buttons and layers
to these calls (and the logic is testable without a display).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Settings", "PluginSession", "default_cache_dir"]


def default_cache_dir() -> Path | None:
    """Embedding cache folder: ``$SAMED_CACHE_DIR`` (``"none"`` disables), else
    ``~/.cache/samed/embeddings``."""
    env = os.environ.get("SAMED_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "none", "0") else Path(env)
    return Path.home() / ".cache" / "samed" / "embeddings"


def _default_backend() -> str:
    from samed.registry import default_backend

    return default_backend()


@dataclass(frozen=True)
class Settings:
    """What the model and the embeddings depend on.

    Attributes:
        model_kind: a key of :data:`samed.registry.MODEL_KINDS`.
        checkpoint: checkpoint path for models without bundled weights ("" otherwise).
        adapter: adapter name or folder ("" for none).
        intensity: engine intensity spec (``"auto"``, a CT window preset name, ``"percentile"``,
            ``"minmax"``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        backend: CPU encoder backend (``samed.registry.BACKENDS``: ``"auto"`` measures once per
            machine and model, then loads the fastest candidate that matches torch fp32),
            default ``$SAMED_BACKEND`` or ``"torch"``.
        precision: CPU encoder precision (``samed.registry.CPU_PRECISIONS``; ``"auto"`` with
            the torch backend is fp32), default ``$SAMED_PRECISION`` or ``"auto"``.
    """

    model_kind: str = "litemedsam"
    checkpoint: str = ""
    adapter: str = ""
    intensity: str = "auto"
    device: str = "auto"
    backend: str = field(default_factory=lambda: _default_backend())
    precision: str = field(default_factory=lambda: os.environ.get("SAMED_PRECISION", "auto"))

    @property
    def model_key(self) -> tuple[str, ...]:
        return (
            self.model_kind,
            self.checkpoint,
            self.adapter,
            self.device,
            self.backend,
            self.precision,
        )


class PluginSession:
    """Loads models lazily and keeps engine sessions (embedding caches) per image.

    Args:
        model_factory: ``f(settings) -> SamModel``; default loads through
            :func:`samed.load_model` (optimised for inference, adapter attached unmerged). Tests
            pass a tiny random model here.
        cache_dir: on-disk embedding cache (None: memory only).
        max_engines: engine sessions kept in memory (each holds its embeddings: ~4 MB per
            slice for LiteMedSAM).
    """

    def __init__(
        self,
        model_factory: Callable[[Settings], Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_engines: int = 2,
    ) -> None:
        self.settings = Settings()
        self.model_factory = model_factory or _build_model
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_engines = int(max_engines)
        self._model: Any = None
        self._model_key: tuple | None = None
        self._engines: OrderedDict[tuple, Any] = OrderedDict()
        self._annotators: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ settings and model
    def update(self, **changes: Any) -> None:
        """Change settings; a changed model drops the loaded model and its engines."""
        new = Settings(**{**self.settings.__dict__, **changes})
        if new.model_key != self.settings.model_key:
            self._model = None
            self._model_key = None
            self._engines.clear()
            self._annotators.clear()
        self.settings = new

    @property
    def model_loaded(self) -> bool:
        """Whether the model for the current settings is loaded."""
        return self._model is not None and self._model_key == self.settings.model_key

    def model(self) -> Any:
        """The model for the current settings (built on first use; seconds)."""
        if self._model is None or self._model_key != self.settings.model_key:
            settings = self.settings
            self.set_model(settings, self.model_factory(settings))
        return self._model

    def build_model(self, settings: Settings) -> Any:
        """Build the model for ``settings`` without keeping it (thread-safe: for a worker; hand
        the result to :meth:`set_model` on the GUI thread)."""
        return self.model_factory(settings)

    def set_model(self, settings: Settings, model: Any) -> bool:
        """Keep ``model`` if it was built for the current settings; returns whether it was kept
        (False when the settings changed while it was loading)."""
        if settings.model_key != self.settings.model_key:
            return False
        self._model, self._model_key = model, settings.model_key
        return True

    # ------------------------------------------------------------------ engines and annotators
    def engine(
        self,
        image: np.ndarray,
        modality: str = "",
        spacing: Any = None,
        orientation: str | None = None,
    ) -> Any:
        """The :class:`samed.engine.Session` for an image array under the current settings.

        ``spacing``: the in-plane (row, column) pixel spacing in mm when known, so that an
        automatic adapter with a recorded training spacing resamples to it. ``orientation``:
        the axis codes of the volume's (x, y, z) voxel axes (e.g. ``"RAS"``, from the file's
        affine) when known, so that an automatic adapter sees its slices as it was trained
        (:mod:`samed.engine.orientation`); None: slices as stored.

        Sessions are keyed by the array's identity, the model and the intensity mapping; the
        embeddings live in the session (and in :attr:`cache_dir` when set).
        """
        from samed.engine import Session

        key = (id(image), self.settings.model_key, self.settings.intensity, orientation)
        eng = self._engines.get(key)
        if eng is not None and eng.shape == tuple(image.shape[-3:]):
            self._engines.move_to_end(key)
            return eng
        model = self.model()
        batch = 8 if model.device.type == "cuda" else 2
        eng = Session(
            model,
            np.asarray(image),
            intensity=self.settings.intensity,
            modality=modality,
            spacing=spacing,
            orientation=orientation,
            batch_size=batch,
            cache_dir=self.cache_dir,
        )
        self._engines[key] = eng
        while len(self._engines) > self.max_engines:
            _key, dropped = self._engines.popitem(last=False)
            for k in [k for k in self._annotators if k[0] == id(dropped)]:
                del self._annotators[k]
        return eng

    def engine_for(self, image: np.ndarray, reference: Any = None) -> Any:
        """:meth:`engine` for a layer's (Z, Y, X) array and the :class:`samed.io.Volume` it was
        read from (``layer.metadata["samed_volume"]``, or None): its in-plane spacing, modality
        and, when it holds the layer's voxels (same shape: samed's reader keeps the file's voxel
        order), its orientation, so that the plugin's automatic result is ``samed segment``'s."""
        from samed.engine.preprocess import inplane_spacing

        affine = getattr(reference, "affine", None)
        spacing = None if affine is None else inplane_spacing(affine)
        same = affine is not None and tuple(reference.shape) == tuple(np.shape(image))
        orientation = reference.orientation if same else None
        modality = str(getattr(reference, "modality", "") or "")
        return self.engine(image, modality, spacing, orientation)

    def annotator(self, engine: Any, labels: np.ndarray) -> Any:
        """The :class:`samed.annotation.Annotator` for an engine and a label array (one per pair,
        so undo history survives switching layers back and forth)."""
        from samed.annotation import Annotator

        key = (id(engine), id(labels))
        ann = self._annotators.get(key)
        if ann is None or ann.labels is not labels:
            ann = Annotator(engine, labels)
            self._annotators[key] = ann
        return ann

    def save_cache(self, engine: Any) -> None:
        """Write an engine's embeddings to the disk cache (no-op without a cache folder)."""
        if engine is not None and engine.cache_dir is not None:
            engine.save_cache()


def _build_model(settings: Settings) -> Any:
    from samed.model import load_model
    from samed.registry import MODEL_KINDS

    spec = MODEL_KINDS.get(settings.model_kind)
    if spec is None:
        raise ValueError(
            f"unknown model {settings.model_kind!r}; choose one of {sorted(MODEL_KINDS)}"
        )
    if not spec.bundled and not settings.checkpoint:
        raise ValueError(f"{settings.model_kind} needs a checkpoint file ({spec.description})")
    from samed.registry import cpu_request

    backend, precision = cpu_request(settings.backend, settings.precision)
    return load_model(
        settings.model_kind,
        settings.checkpoint or None,
        adapter=settings.adapter or None,
        device=settings.device,
        backend=backend,
        precision=precision,
    )
