"""Prompt engine: sessions with cached embeddings, prediction, propagation, automatic mode."""

from .cpu import optimize_for_inference, tune_cpu_allocator
from .preprocess import SliceGeometry, mask_bbox, prepare_slices, slice_geometry
from .session import Prediction, PropagationStep, Session

__all__ = [
    "Prediction",
    "PropagationStep",
    "Session",
    "SliceGeometry",
    "mask_bbox",
    "optimize_for_inference",
    "prepare_slices",
    "slice_geometry",
    "tune_cpu_allocator",
]
