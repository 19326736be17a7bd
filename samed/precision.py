"""Encoder precision on CUDA: the ``amp`` argument of :class:`samed.engine.Session` and the
``--precision`` option of the command-line tools (importable without torch).

Measured on an H100 (``bench/results/precision-cuda.json``, 6 ACDC val volumes, GT box + 5 px):
fp16 autocast changes the embeddings by 0.55 % (relative L2, worst volume) and Dice by at most
0.0007; bf16 by 5.9 % and MYO Dice by 0.0037; fp16 is also the faster of the two (2.49 vs 2.86
ms per slice at batch 32, fp32 4.22). Hence ``amp=True`` means fp16.
"""

from __future__ import annotations

from typing import Any

from .registry import PRECISIONS

#: Encoder precisions a Session accepts for ``amp`` besides True (``DEFAULT_AMP``) and False.
AMP_CHOICES = ("fp16", "bf16")
#: What ``amp=True`` means on CUDA.
DEFAULT_AMP = "fp16"
# PRECISIONS (``--precision`` values of the CLIs and the ``amp`` each stands for) lives in the
# torch-free samed.registry and is re-exported here.
__all__ = [
    "AMP_CHOICES",
    "DEFAULT_AMP",
    "PRECISIONS",
    "amp_from_precision",
    "check_amp",
    "encoder_precision",
]


def check_amp(amp: Any) -> bool | str:
    """Return ``amp`` if it is True, False, ``"fp16"`` or ``"bf16"``; ValueError otherwise."""
    if isinstance(amp, bool) or amp in AMP_CHOICES:
        return amp
    raise ValueError(f"amp={amp!r} must be True, False or one of {', '.join(AMP_CHOICES)}")


def amp_from_precision(precision: str) -> bool | str:
    """Map a ``--precision`` value (``auto``, ``fp32``, ``fp16``, ``bf16``) to ``Session(amp=...)``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def encoder_precision(device: Any, amp: bool | str) -> str:
    """``"fp32"``, ``"fp16"`` or ``"bf16"``: what the encoder runs in on ``device`` (a
    ``torch.device`` or a string such as ``"cuda:0"``) for this ``amp`` (autocast on CUDA only;
    CPU always float32, as bf16 is about 40x slower on this kind of CPU). ``"bf16"`` on a GPU
    without bfloat16 support runs (and reports) ``"fp16"``."""
    amp = check_amp(amp)
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind != "cuda" or amp is False:
        return "fp32"
    name = DEFAULT_AMP if amp is True else str(amp)
    if name == "bf16":
        import torch

        if not torch.cuda.is_bf16_supported():
            return "fp16"
    return name
