"""``samed finetune --from-annotations DIR``: train on a folder of annotated image/label pairs
(what the napari *Train adapter* panel exports) with the fast recipe of
:mod:`samed.train.quick`, no YAML to write (one is written beside the adapter)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

__all__ = ["add_annotation_arguments", "run_from_annotations"]


def add_annotation_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--from-annotations`` options of ``samed finetune``."""
    g = p.add_argument_group("training from annotations (no --config)")
    g.add_argument(
        "--from-annotations",
        metavar="DIR",
        default=None,
        help="folder of NAME_image.nii.gz + NAME_label.nii.gz pairs (samed-annotations.json, "
        "as the napari Train adapter panel exports) or imagesTr/ + labelsTr/",
    )
    g.add_argument("--name", default=None, help="adapter name (default: the folder's name)")
    g.add_argument("--mode", choices=("automatic", "prompted"), default="automatic")
    g.add_argument(
        "--minutes",
        type=float,
        default=15.0,
        help="time limit of the whole run, embedding caching included (default 15)",
    )
    g.add_argument(
        "--val-volumes",
        type=int,
        default=None,
        help="volumes held back for validation / early stopping (default 1 with >= 4 pairs)",
    )
    g.add_argument(
        "--snapshot-minutes",
        default="",
        metavar="M1,M2,...",
        help="also keep the best adapter so far at these minutes (OUT/snapshots/min_M)",
    )
    g.add_argument(
        "--adapters-dir",
        default=None,
        help="install the adapter here (default $SAMED_ADAPTER_DIR or "
        "~/.local/share/samed/adapters, which samed searches)",
    )


def run_from_annotations(args: argparse.Namespace) -> int:
    """Run it; 0 on success, 2 on a data or name error."""
    from pathlib import Path

    from .annotations import train_from_annotations
    from .cli import _parse_set

    folder = Path(args.from_annotations)
    name = args.name or folder.resolve().name
    command = "samed " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        res: dict[str, Any] = train_from_annotations(
            folder,
            name,
            mode=args.mode,
            minutes=args.minutes,
            val_volumes=args.val_volumes,
            adapters_dir=args.adapters_dir,
            run_dir=args.out,
            overrides=_parse_set(getattr(args, "set", [])),
            command=command,
            snapshot_minutes=tuple(float(m) for m in args.snapshot_minutes.split(",") if m),
        )
    except ValueError as exc:
        print(f"samed finetune: {exc}", file=sys.stderr)
        return 2
    if not res.get("installed"):
        print("samed finetune: stopped before the first step; no adapter", file=sys.stderr)
        return 2
    print(f"adapter {name!r} installed in {res['installed']} (config {res['yaml']})")
    return 0
