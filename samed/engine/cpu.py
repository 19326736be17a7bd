"""CPU speed settings that need no rebuild.

The encoder allocates and frees large activations every forward; with glibc's defaults each one
is a fresh mmap and the kernel page-faults it in (~400k faults per LiteMedSAM forward measured
here). Keeping freed memory in the heap removes that cost: the effect of
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` set at run time through mallopt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from ..model import SamModel

__all__ = ["ConvGELU", "fuse_conv_gelu", "optimize_for_inference", "tune_cpu_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def tune_cpu_allocator() -> bool:
    """Ask glibc to keep freed memory (no mmap per allocation, no trimming). Idempotent.

    Skipped (returns False) off Linux/glibc or when ``SAMED_NO_MALLOC_TUNING=1``. Costs memory
    that stays reserved by the process after large inferences; gains ~40% encoder speed here.
    """
    global _done
    if _done:
        return True
    if os.environ.get("SAMED_NO_MALLOC_TUNING") == "1" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok


class ConvGELU(nn.Module):
    """``GELU(conv(x))`` (exact erf GELU) as one oneDNN convolution with a GELU post-op on CPU,
    so the (B, C, H, W) activation is not written and read back between the two; the same
    numbers within float rounding. Everything else runs the two steps: other devices, gradients,
    inputs that are not (B, C, H, W) float32, padding modes other than zeros and string padding
    (``"same"``/``"valid"``)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if (
            x.device.type != "cpu"
            or torch.is_grad_enabled()
            or x.dtype != torch.float32
            or x.dim() != 4
            or c.padding_mode != "zeros"
            or isinstance(c.padding, str)
        ):
            return F.gelu(c(x))
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            c.weight,
            c.bias,
            list(c.padding),
            list(c.stride),
            list(c.dilation),
            c.groups,
            "gelu",
            [],
            "none",
        )


def fuse_conv_gelu(encoder: object) -> int:
    """Merge TinyViT's convolution + exact-GELU pairs (MBConv, PatchMerging, PatchEmbed) into
    :class:`ConvGELU` modules after Conv-BN folding; returns how many were merged (0 when the
    oneDNN fused operator is missing or the encoder is not a folded TinyViT). Inference only.

    Measured here on LiteMedSAM (11 pairs, the largest on 256 x 256 x 256 activations):
    0.736 -> 0.697 s per slice, embeddings equal within 2e-6.
    """
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    ):
        return 0

    def exact_gelu(m: object) -> bool:
        return isinstance(m, nn.GELU) and m.approximate == "none"

    def plain_conv(m: object) -> bool:
        return type(m) is nn.Conv2d

    n = 0
    for mod in encoder.modules():  # type: ignore[attr-defined]
        kind = type(mod).__name__
        if kind == "MBConv":
            for conv, act in (("conv1", "act1"), ("conv2", "act2")):
                if plain_conv(getattr(mod, conv)) and exact_gelu(getattr(mod, act)):
                    setattr(mod, conv, ConvGELU(getattr(mod, conv)))
                    setattr(mod, act, nn.Identity())
                    n += 1
        elif kind == "PatchMerging":
            if plain_conv(mod.conv1) and plain_conv(mod.conv2) and exact_gelu(mod.act):
                mod.conv1, mod.conv2, mod.act = (
                    ConvGELU(mod.conv1),
                    ConvGELU(mod.conv2),
                    nn.Identity(),
                )
                n += 2
        elif kind == "PatchEmbed":
            seq = list(mod.seq)
            if len(seq) == 3 and plain_conv(seq[0]) and exact_gelu(seq[1]):
                mod.seq = nn.Sequential(ConvGELU(seq[0]), nn.Identity(), seq[2])
                n += 1
    return n


def optimize_for_inference(model: SamModel) -> SamModel:
    """Inference-only speed-ups for a :class:`samed.model.SamModel`; returns it.

    On CPU: the allocator setting above, Conv-BN folding (``fuse_for_inference``), convolution +
    GELU merged into one oneDNN call (:func:`fuse_conv_gelu`) and channels-last convolution
    weights. Measured here on a 2-core machine (``bench/bench_engine.py``, docs/BENCHMARKS.md):
    1.72 -> 0.72 s per 256x256 slice against the default set-up; embeddings equal within 2e-6.
    Irreversible for training: call it only on models used for inference.
    On CUDA nothing is changed (mixed precision is applied per call by the engine).
    """
    if model.device.type != "cpu":
        return model
    tune_cpu_allocator()
    model.fuse_for_inference()
    fuse_conv_gelu(model.image_encoder)
    return model.to(memory_format=torch.channels_last)
