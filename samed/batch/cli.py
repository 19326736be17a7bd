"""``samed segment``: the command line over :func:`samed.batch.segment_batch`, with progress bars."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..cli_options import add_encoder_options
from ..registry import POSTPROCESS_CHOICES
from .run import FORMATS, segment_batch
from .summary import ProgressEvent

__all__ = ["add_parser", "run_segment", "dicomweb_source"]


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
    p.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="files and folders (optional with --dicomweb)"
    )
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
    add_encoder_options(p)
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep slice embeddings here (a rerun with other prompts then costs only the decoder)",
    )
    p.add_argument(
        "--uncertainty",
        nargs="?",
        const="flip",
        default=None,
        choices=("entropy", "margin", "flip"),
        help="automatic mode: also write uncertainty.nii.gz per case (on the source grid) and an "
        "'uncertainty' column in summary.csv to sort by (default method: flip, which ranks "
        "errors best and doubles the encoder cost; entropy is free)",
    )
    p.add_argument("--no-qc", action="store_true", help="do not write qc.png montages")
    p.add_argument(
        "--series-filter",
        action="append",
        metavar="KEY=VALUE",
        help="which DICOM series are cases, all rules required (repeatable): "
        "description=REGEX, modality=MR|CT, min-slices=N, image-type=REGEX; non-image objects "
        "and localizers are always skipped (the summary lists what was skipped and why)",
    )
    web = p.add_argument_group("DICOMweb (a PACS) as the source; see docs/PACS.md")
    web.add_argument(
        "--dicomweb", metavar="URL", help="DICOMweb root, e.g. http://pacs:8042/dicom-web"
    )
    web.add_argument(
        "--study", action="append", metavar="UID", help="StudyInstanceUID (repeatable)"
    )
    web.add_argument(
        "--series", action="append", metavar="UID", help="SeriesInstanceUID (repeatable)"
    )
    web.add_argument(
        "--query",
        action="append",
        metavar="KEY=VALUE",
        help="QIDO-RS filter (repeatable): modality=CT, date=YYYYMMDD[-YYYYMMDD], patient=ID, "
        "accession=N, description=TEXT, or a DICOM keyword",
    )
    web.add_argument(
        "--auth-env",
        metavar="VAR",
        help="environment variable holding USER:PASSWORD or 'Bearer TOKEN'",
    )
    web.add_argument(
        "--auth-file", metavar="FILE", help="file holding USER:PASSWORD or 'Bearer TOKEN'"
    )
    web.add_argument("--ca-bundle", metavar="FILE", help="CA certificates for TLS verification")
    web.add_argument(
        "--insecure", action="store_true", help="do not verify the server's TLS certificate"
    )
    web.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="seconds per HTTP request (60)"
    )
    web.add_argument(
        "--upload", action="store_true", help="store each DICOM SEG back on the server (STOW-RS)"
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the cases on a Ray cluster: auto, ray://host:port; without ADDRESS a local "
        "cluster is started",
    )
    p.add_argument(
        "--ray-workers",
        type=int,
        metavar="N",
        help="Ray workers, one model each (default: one per GPU, else one per CPU)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_segment)
    return p


def run_segment(args: argparse.Namespace) -> int:
    """Run ``samed segment`` from parsed arguments; prints the summary table.

    Returns:
        0 when every case succeeded or was skipped, else the largest code of the failed cases
        (:data:`samed.batch.summary.EXIT_CODES`: 1 a case failed, 3 study/series not on the
        DICOMweb server, 4 server unreachable/timeout/incomplete/store refused, 5 credentials
        refused). Bad options raise ValueError (``samed`` exits 2).
    """
    from ..engine import tune_cpu_allocator

    source = dicomweb_source(args)
    if not args.inputs and source is None:
        raise ValueError("give INPUT files/folders, or a DICOMweb source (--dicomweb)")

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
            series_filter=getattr(args, "series_filter", None),
            dicomweb=source,
            upload=bool(getattr(args, "upload", False)),
            ray=getattr(args, "ray", None),
            ray_workers=getattr(args, "ray_workers", None),
            uncertainty=getattr(args, "uncertainty", None),
        )
    finally:
        bars.close()
    print(summary.table())
    for sk in summary.skipped_series:
        print(f"skipped series {sk.series_uid} ({sk.modality}, {sk.description!r}): {sk.reason}")
    for w in summary.warnings:
        print(f"samed segment: warning: {w}", file=sys.stderr)
    print(
        f"{summary.count('ok')} segmented, {summary.count('skipped')} skipped (finished earlier), "
        f"{summary.count('error')} failed in {summary.seconds:.1f} s; summary: "
        f"{Path(args.out) / 'summary.csv'}"
    )
    return summary.exit_code


def dicomweb_source(args: argparse.Namespace) -> Any:
    """The :class:`samed.batch.dicomweb.DicomwebSource` the options name, or None.

    Raises:
        ValueError: DICOMweb options without --dicomweb, or bad credentials/query options.
    """
    url = getattr(args, "dicomweb", None)
    web_opts = [
        o
        for o in ("study", "series", "query", "auth_env", "auth_file", "ca_bundle", "upload")
        if getattr(args, o, None)
    ]
    if url is None:
        if web_opts:
            raise ValueError(f"--{web_opts[0].replace('_', '-')} needs --dicomweb URL")
        return None
    from .dicomweb import DicomwebSource, parse_query, read_credentials

    if args.insecure and args.ca_bundle:
        raise ValueError("--insecure and --ca-bundle contradict each other")
    verify: bool | str = False if args.insecure else (args.ca_bundle or True)
    if args.insecure:
        print("samed segment: warning: TLS verification is off (--insecure)", file=sys.stderr)
    return DicomwebSource(
        url,
        studies=tuple(args.study or ()),
        series=tuple(args.series or ()),
        query=parse_query(args.query),
        credentials=read_credentials(args.auth_env, args.auth_file),
        verify=verify,
        timeout=float(args.timeout),
    )


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
