"""``samed segment``: the command line over :func:`samed.batch.segment_batch`, with progress bars."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..registry import BACKENDS, POSTPROCESS_CHOICES, PRECISIONS, default_backend
from .run import FORMATS, segment_batch
from .summary import ProgressEvent

__all__ = ["add_parser", "run_segment"]


# ---------------------------------------------------------------------------------- the CLI
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``segment`` on an argparse sub-parser collection; sets ``func=run_segment``."""
    from ..registry import CT_WINDOWS, DEFAULT_MODEL, MODEL_KINDS

    p = subparsers.add_parser(
        "segment",
        help="segment many cases headlessly (prompted or automatic), resumable",
        description=(
            "Segment every case in INPUT (DICOM folders searched recursively, every series a "
            "case; NIfTI/NRRD/MHA files or folders of them) into OUT/<case id>/ with a summary "
            "in OUT/summary.csv and summary.json. A finished case is skipped unless "
            "--overwrite; a bad case is reported and the batch goes on (exit code 1)."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files and folders")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    p.add_argument(
        "--adapter",
        metavar="NAME|PATH",
        help="adapter; an automatic one selects automatic mode (see `samed adapters`)",
    )
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts file (JSON or CSV, see docs/BATCH.md): prompted mode",
    )
    p.add_argument(
        "--format",
        default="nifti,dicom-seg",
        metavar="FMT",
        help=f"comma-separated, from {', '.join(FORMATS)} (default: both; "
        "DICOM SEG only for DICOM inputs)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda[:N]")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="slices per encoder batch (default 16 on CUDA, 2 on CPU)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo cases already finished")
    p.add_argument(
        "--window",
        default="auto",
        metavar="W",
        help=f"intensity: auto, minmax, percentile, {', '.join(CT_WINDOWS)}, LOW,HIGH in HU, "
        "window:LOW:HIGH or percentile:LO:HI (see samed.intensity)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=sorted(MODEL_KINDS),
        help=f"base model (default {DEFAULT_MODEL})",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint for models not bundled")
    p.add_argument(
        "--min-slice-iou",
        type=float,
        default=0.7,
        metavar="T",
        help="prompted mode: stop propagating where a slice's mask overlaps the previous one "
        "with IoU < T (default 0.7; 0 disables)",
    )
    p.add_argument(
        "--postprocess",
        default="adapter",
        choices=list(POSTPROCESS_CHOICES),
        help="automatic mode: clean-up of the label map (default: what the adapter recommends, "
        "e.g. the largest 3D connected component per class)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=list(PRECISIONS),
        help="encoder precision: on CUDA autocast (auto = fp16, measured closest to fp32 and "
        "fastest); on the CPU auto = fp32, or measured once per machine and model with --backend "
        "auto, "
        "fp32, bf16 (native-bf16 CPUs), int8 (OpenVINO)",
    )
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=default_backend(),
        help="CPU image-encoder backend: torch (default; $SAMED_BACKEND overrides), auto "
        "(fastest candidate that matches torch fp32, measured on first use and cached), "
        "openvino (pip install 'samed[openvino]')",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep slice embeddings here (a rerun with other prompts then costs only the decoder)",
    )
    p.add_argument("--no-qc", action="store_true", help="do not write qc.png montages")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_segment)
    return p


def run_segment(args: argparse.Namespace) -> int:
    """Run ``samed segment`` from parsed arguments; prints the summary table.

    Returns:
        0 when every case succeeded or was skipped, 1 when any case failed.
    """
    from ..engine import tune_cpu_allocator

    if args.device in ("cpu",) or (args.device == "auto" and not _cuda_available()):
        tune_cpu_allocator()
    bars = _Bars(disabled=bool(getattr(args, "quiet", False)))
    try:
        summary = segment_batch(
            args.inputs,
            args.out,
            adapter=args.adapter,
            prompts=args.prompts,
            formats=args.format,
            device=args.device,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            window=args.window,
            model=args.model,
            checkpoint=args.checkpoint,
            qc=not args.no_qc,
            cache_dir=getattr(args, "cache_dir", None),
            min_slice_iou=getattr(args, "min_slice_iou", 0.7),
            postprocess=getattr(args, "postprocess", "adapter"),
            precision=getattr(args, "precision", "auto"),
            backend=getattr(args, "backend", "torch"),
            progress=bars,
        )
    finally:
        bars.close()
    print(summary.table())
    for w in summary.warnings:
        print(f"samed segment: warning: {w}", file=sys.stderr)
    print(
        f"{summary.count('ok')} segmented, {summary.count('skipped')} skipped (finished earlier), "
        f"{summary.count('error')} failed in {summary.seconds:.1f} s; summary: "
        f"{Path(args.out) / 'summary.csv'}"
    )
    return summary.exit_code


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class _Bars:
    """Two tqdm bars: cases overall, and slices of the current case."""

    def __init__(self, disabled: bool = False) -> None:
        self.disabled = disabled
        self.overall: Any = None
        self.case: Any = None

    def __call__(self, ev: ProgressEvent) -> None:
        if self.disabled:
            return
        from tqdm import tqdm

        if self.overall is None:
            self.overall = tqdm(total=ev.n_cases, desc="cases", unit="case", position=0)
        if ev.stage == "start":
            if self.case is not None:
                self.case.close()
            self.case = tqdm(total=0, desc=ev.case_id[:32], unit="slice", position=1, leave=False)
        elif self.case is not None and ev.stage == "segment" and ev.total:
            self.case.total = ev.total
            self.case.n = ev.done
            self.case.refresh()
        elif self.case is not None and ev.stage in ("load", "write"):
            self.case.set_postfix_str(ev.stage)
        if ev.stage == "end" and ev.result is not None:
            self.overall.update(1)
            self.overall.set_postfix_str(f"{ev.case_id[:24]}: {ev.result.status}")

    def close(self) -> None:
        for bar in (self.case, self.overall):
            if bar is not None:
                bar.close()
