"""LoRA on the mask decoder's Linear layers (the click-aware adapter, issue #17).

An adapter may leave the image encoder untouched (``target_modules: ""``) and instead carry
low-rank updates of the mask decoder's attention and MLP projections plus a few small decoder
parameters in full (the output tokens, the IoU head). Its embeddings are then exactly the base
model's, so a session's embedding cache stays valid and a click costs what it cost before.

:class:`LoRALinear` exposes the effective ``weight`` (base + scaling * B @ A) and ``bias`` like
an ``nn.Linear``, so code that reads a projection's weights directly (the exact token-side
decoder of :mod:`samed.model.fast_decoder`) sees the adapted layer. Wrapping, the saved keys and
the loader's checks live in :mod:`samed.lora` (:func:`apply_decoder_lora` is called from
:func:`samed.lora.apply_lora`).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DECODER_FIELDS", "LoRALinear", "apply_decoder_lora", "decoder_full_parameters"]

#: the :class:`samed.lora.LoraConfig` fields of a decoder-side adapter (in adapter_config.json)
DECODER_FIELDS = ("decoder_r", "decoder_alpha", "decoder_target_modules", "decoder_full_parameters")


class LoRALinear(nn.Module):
    """``y = x (W + scaling * B A)^T + b`` around a frozen ``nn.Linear``.

    ``lora_A`` (r x in) starts Kaiming-uniform, ``lora_B`` (out x r) at zero, so a fresh layer
    equals the base one. ``weight`` / ``bias`` / ``in_features`` / ``out_features`` read like
    the wrapped Linear's.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"decoder LoRA rank r={r} must be >= 1")
        self.base = base
        self.scaling = float(alpha) / int(r)
        self.lora_A = nn.Linear(base.in_features, int(r), bias=False)
        self.lora_B = nn.Linear(int(r), base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight.device, base.weight.dtype)
        self.lora_B.to(base.weight.device, base.weight.dtype)
        for prm in self.base.parameters():
            prm.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """(out, in) effective weight."""
        return self.base.weight + (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


def apply_decoder_lora(decoder: nn.Module, r: int, alpha: float, target_modules: str) -> list[str]:
    """Wrap every ``nn.Linear`` of ``decoder`` whose path (relative to the decoder, e.g.
    ``transformer.layers.0.self_attn.q_proj``) fully matches ``target_modules`` in a
    :class:`LoRALinear`, in place. Returns the wrapped paths (prefixed ``mask_decoder.``).

    Raises:
        ValueError: the expression matches no Linear layer.
    """
    names = [
        n
        for n, m in decoder.named_modules()
        if isinstance(m, nn.Linear) and re.fullmatch(target_modules, n)
    ]
    if not names:
        raise ValueError(
            f"decoder_target_modules={target_modules!r} matches no Linear layer of the mask decoder"
        )
    for n in names:
        parent, attr = _parent(decoder, n)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), r, alpha))
    return [f"mask_decoder.{n}" for n in names]


def decoder_full_parameters(decoder: nn.Module, pattern: str) -> dict[str, nn.Parameter]:
    """The decoder parameters (paths relative to the decoder) trained and saved in full: those
    whose path fully matches ``pattern`` ("" for none), LoRA matrices and wrapped base weights
    excluded."""
    if not pattern:
        return {}
    return {
        n: p
        for n, p in decoder.named_parameters()
        if re.fullmatch(pattern, n) and ".lora_" not in n and ".base." not in n
    }
