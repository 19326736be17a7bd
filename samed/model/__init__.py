"""SAM-family models: builders with strict, weights-only loading."""

from .build import (
    CheckpointError,
    build_model,
    build_tiny_model,
    file_sha256,
    load_state_dict_strict,
    resolve_device,
)
from .sam import SamModel, upscale_logits

__all__ = [
    "CheckpointError",
    "SamModel",
    "build_model",
    "build_tiny_model",
    "file_sha256",
    "load_state_dict_strict",
    "resolve_device",
    "upscale_logits",
]
