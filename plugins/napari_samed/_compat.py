"""Work-arounds for running torch inside a napari process.

Triton (installed with CUDA builds of torch) bundles its own LLVM. Loading it *after* an OpenGL
context exists on Mesa's llvmpipe driver (software rendering: Xvfb, remote desktops, VMs) is a
segmentation fault (measured: napari 0.9.2, PyQt6, Mesa llvmpipe, triton from torch 2.14.1). torch
imports triton lazily (``torch._dynamo``, pulled in by torchvision), i.e. when the widget first
builds a model, long after napari created its canvas. samed never uses ``torch.compile``, the only
user of triton, so in a napari process we make ``import triton`` fail cleanly instead
(torch then reports that triton is absent). Set ``SAMED_ALLOW_TRITON=1`` to opt out.
"""

from __future__ import annotations

import os
import sys

__all__ = ["block_triton_after_gl"]


def block_triton_after_gl() -> bool:
    """Make ``import triton`` raise ImportError unless already imported. Returns True if blocked."""
    if os.environ.get("SAMED_ALLOW_TRITON") == "1" or "triton" in sys.modules:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment] - the documented way to block an import
    return True
