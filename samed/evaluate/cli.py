"""``samed evaluate``: the command line over :func:`samed.evaluate.evaluate`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..cli_options import add_encoder_options
from ..datasets import load_dataset
from ..precision import amp_from_precision
from ..registry import POSTPROCESS_CHOICES
from .run import evaluate

__all__ = ["add_parser", "run_evaluate"]


def add_parser(subparsers: Any) -> None:
    """Register ``samed evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="score a model/adapter on a labeled dataset split (Dice, HD95, NSD)",
        description="Evaluate on an MSD-style dataset (dataset.json with training entries and "
        "optional splits) or on the cases of a fine-tuning config (--config, with its splits "
        "and class mapping). Prints per-class means and a last line mean_dice=0.XXXX.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", default=None, help="dataset folder with dataset.json")
    src.add_argument(
        "--config",
        default=None,
        help="fine-tuning config (configs/*.yaml): score its data.cases / data.root with its "
        "splits and data.labels (e.g. --config configs/abdomen-ct.yaml --split val)",
    )
    p.add_argument(
        "--split", default=None, help="split name from dataset.json or the config (default: all)"
    )
    p.add_argument(
        "--cases",
        default=None,
        help="comma-separated case ids: only these cases of the split (e.g. btcv_0034,btcv_0037)",
    )
    p.add_argument(
        "--prompt",
        choices=["box", "none"],
        default=None,
        help="box: ground-truth box per structure and slice; none: automatic adapter "
        "(default: box without adapter or with a prompted adapter, none with an "
        "automatic adapter)",
    )
    p.add_argument("--adapter", default=None, help="adapter name or folder")
    p.add_argument("--model", default="litemedsam", help="model kind (default litemedsam)")
    p.add_argument("--checkpoint", default=None, help="checkpoint path (SAM / MedSAM kinds)")
    p.add_argument("--limit", type=int, default=None, help="only the first N cases")
    p.add_argument("--box-margin", type=float, default=5.0, help="box margin in px (default 5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--postprocess",
        choices=list(POSTPROCESS_CHOICES),
        default="adapter",
        help="automatic mode: label-map clean-up (default: what the adapter recommends)",
    )
    add_encoder_options(p)
    p.add_argument("--out", default=None, help="write JSON here (and CSV beside it)")
    p.add_argument("--csv", default=None, help="write the per-case CSV here")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: Any) -> int:
    """``samed evaluate`` entry point; returns the exit code."""
    from tqdm import tqdm

    from ..model import load_model
    from ..registry import cpu_request

    if args.config is not None:
        from .data import dataset_from_config

        ds = dataset_from_config(args.config)
    else:
        ds = load_dataset(args.data)
    ids = None
    if args.cases is not None:
        ids = [c.strip() for c in args.cases.split(",") if c.strip()]
        if not ids:
            raise ValueError(f"--cases {args.cases!r}: give comma-separated case ids")
        ds.select(ds.split(args.split), ids)  # unknown ids / split: refused before loading
    else:
        ds.split(args.split)
    backend, precision = cpu_request(
        getattr(args, "backend", "torch"), getattr(args, "precision", "auto")
    )
    # merged: evaluation never switches adapters, and a merged LoRA costs nothing per slice
    model = load_model(
        args.model,
        args.checkpoint,
        adapter=args.adapter,
        device=args.device,
        merge=True,
        backend=backend,
        precision=precision,
    )
    prompt = {"box": "box", "none": None}.get(args.prompt or "", "auto")
    if model.adapter is not None:
        folder, mode = model.adapter.path, model.adapter.mode
        if prompt == "auto":
            prompt = None if mode == "automatic" else "box"
        elif prompt is None and mode != "automatic":
            raise ValueError(f"--prompt none needs an automatic adapter; {folder} is {mode}")
    elif prompt == "auto":
        prompt = "box"
    elif prompt is None:
        raise ValueError("--prompt none needs --adapter with an automatic adapter")
    bar = tqdm(total=None, desc="evaluate", unit="case", file=sys.stderr, disable=None)

    def progress(done: int, total: int, case_id: str) -> None:
        bar.total = total
        bar.set_postfix_str(case_id)
        bar.update(1)

    report = evaluate(
        model,
        ds,
        args.split,
        prompt=prompt,
        limit=args.limit,
        box_margin=args.box_margin,
        postprocess=args.postprocess,
        progress=progress,
        amp=amp_from_precision(args.precision),
        cases=ids,
    )
    bar.close()
    print(report.case_table())
    print()
    print(report.table())
    if args.out:
        report.to_json(args.out)
        report.to_csv(args.csv or Path(args.out).with_suffix(".csv"))
    elif args.csv:
        report.to_csv(args.csv)
    print(f"mean_dice={report.mean_dice:.4f}")
    return 0
