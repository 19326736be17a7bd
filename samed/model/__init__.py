"""SAM-family models: builders with strict, weights-only loading, and :func:`load_model`."""

from .adapter import AdapterState
from .build import (
    CheckpointError,
    build_model,
    build_tiny_model,
    file_sha256,
    load_state_dict_strict,
    resolve_device,
)
from .loader import load_model
from .sam import SamModel, upscale_logits

__all__ = [
    "AdapterState",
    "CheckpointError",
    "SamModel",
    "build_model",
    "build_tiny_model",
    "file_sha256",
    "load_model",
    "load_state_dict_strict",
    "resolve_device",
    "upscale_logits",
]
