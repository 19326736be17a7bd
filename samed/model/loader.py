"""One entry point for a ready-to-use model: build, optimise for inference, attach an adapter.

The command line, the batch job, the napari plugin, the demo and the benchmarks all load their
model through :func:`load_model`, so they get the same weights, the same CPU set-up and the same
adapter handling.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..registry import DEFAULT_MODEL
from .sam import SamModel

__all__ = ["load_model"]


def load_model(
    kind: str | SamModel = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    optimize: bool = True,
    *,
    merge: bool = False,
    backend: str = "torch",
    precision: str = "fp32",
) -> SamModel:
    """A model in eval mode, ready for :class:`samed.engine.Session`.

    Steps, in this order: resolve the adapter (so a wrong name fails before minutes of
    loading), build the model (:func:`samed.model.build_model`: strict, weights-only
    checkpoint loading), :func:`samed.engine.optimize_for_inference` when ``optimize``, then
    :func:`samed.lora.load_adapter` (base kind and checkpoint SHA-256 checked).

    The adapter is **not merged** by default: the LoRA update runs as its own low-rank branch,
    so outputs are exactly those of the adapter as trained and saved, it can be swapped or
    removed later (:func:`samed.lora.remove_adapter`), and ``model.adapter.merged`` is False.
    ``merge=True`` folds it into the qkv weights (same outputs within float rounding, a little
    faster; ``samed evaluate`` does this).

    Args:
        kind: a model kind of :data:`samed.registry.MODEL_KINDS`, or an already built
            :class:`SamModel`, used as it is (not rebuilt and not moved; ``checkpoint`` must be
            None and ``device`` left at ``"auto"``).
        checkpoint: ``.pth`` state dict for kinds without bundled weights (see
            :func:`samed.model.build_model`).
        adapter: a shipped or user adapter name (:func:`samed.registry.find_adapters`) or an
            adapter folder path (:func:`samed.registry.resolve_adapter`); None for the base
            model.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        optimize: apply :func:`samed.engine.optimize_for_inference` (CPU: Conv-BN folding,
            Conv+GELU fusion, channels-last; a no-op on CUDA). Irreversible for training:
            pass False for a model that will be fine-tuned.
        merge: fold the adapter into the weights (see above).
        backend: how the image encoder runs on the CPU (:mod:`samed.engine.backends`):
            ``"torch"`` (default), ``"openvino"`` or ``"auto"`` (measured once per machine and
            model, cached; the command-line tools default to it). A backend other than torch
            merges the adapter into the encoder first (``merge`` is then implied).
        precision: ``"fp32"`` (default), ``"bf16"``, ``"int8"`` (OpenVINO) or ``"auto"``. A
            request this machine cannot run (OpenVINO missing, bf16 without native bf16) falls
            back to torch fp32 with a one-line notice. On CUDA both are ignored (with a notice
            for CPU-only requests): the Session's ``amp`` decides there.

    Returns:
        The :class:`SamModel` (eval mode, no gradients on the adapter), with ``model.adapter``
        describing the attached adapter (None without one).

    Raises:
        ValueError: unknown kind, unknown adapter name, missing checkpoint, CUDA requested
            without a GPU, a built model passed with a checkpoint or a device.
        samed.model.CheckpointError: unreadable or mismatching checkpoint.
        samed.lora.AdapterError: adapter for another base model or with mismatching weights.
    """
    from .. import model as _model_pkg  # the package attribute, so build_model stays replaceable
    from ..engine.backends import BACKENDS, CPU_PRECISIONS

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {', '.join(BACKENDS)}")
    if precision not in (*CPU_PRECISIONS, "fp16"):
        raise ValueError(
            f"precision={precision!r} must be one of {', '.join((*CPU_PRECISIONS, 'fp16'))}"
        )

    folder: Path | None = None
    if adapter is not None:
        from ..registry import resolve_adapter

        folder = resolve_adapter(adapter)
    if isinstance(kind, SamModel):
        if checkpoint is not None:
            raise ValueError(
                f"checkpoint={str(checkpoint)!r} given with an already built model; pass a kind"
            )
        if device is not None and str(device) != "auto":
            raise ValueError(
                f"device={str(device)!r} given with an already built model (on {kind.device}); "
                "move the model yourself or pass a kind"
            )
        model = kind
    elif isinstance(kind, str):
        model = _model_pkg.build_model(kind, checkpoint, device=device)
    else:
        raise ValueError(f"kind {kind!r} must be a model kind name or a SamModel")
    if optimize:
        from ..engine import optimize_for_inference

        model = optimize_for_inference(model)
    cpu_backend = (backend, precision) != ("torch", "fp32") and model.device.type == "cpu"
    if folder is not None:
        from ..lora import load_adapter

        dev = model.device
        # a compiled encoder is built with the adapter folded in
        load_adapter(model, folder, merge=merge or (cpu_backend and backend != "torch"))
        # keep every part (automatic decoders, LoRA index buffers) on the model's device
        model.to(dev)
    if (backend, precision) != ("torch", "fp32"):
        from ..engine.backends import set_encoder_backend

        model.eval()
        set_encoder_backend(model, backend, precision)
    return model
