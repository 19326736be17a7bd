"""Command-line options shared by ``samed segment``, ``samed evaluate`` and ``samed demo``
(torch-free, so ``--help`` stays fast)."""

from __future__ import annotations

import argparse

from .registry import BACKENDS, PRECISIONS, default_backend

__all__ = ["add_encoder_options"]


def add_encoder_options(p: argparse.ArgumentParser) -> None:
    """Add ``--precision`` and ``--backend`` (the image encoder's precision and CPU backend,
    :mod:`samed.engine.backends`) to a sub-command's parser."""
    p.add_argument(
        "--precision",
        default="auto",
        choices=list(PRECISIONS),
        help="encoder precision: on CUDA autocast (auto = fp16, measured closest to fp32 and "
        "fastest); on the CPU auto = fp32, or measured once per machine and model with "
        "--backend auto (never int8 unless asked for); fp32, bf16 (native-bf16 CPUs), int8 "
        "(OpenVINO, NNCF quantisation on first use: minutes), mixed (torch bf16 with the "
        "convolutions in fp32, native-bf16 CPUs)",
    )
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=default_backend(),
        help="CPU image-encoder backend: torch (default; $SAMED_BACKEND overrides), auto "
        "(fastest candidate that matches torch fp32, measured on first use per model and "
        "adapter, 1-3 min, then cached), "
        "openvino (pip install 'samed[openvino]')",
    )
