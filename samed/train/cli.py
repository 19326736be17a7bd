"""``samed finetune`` (and ``python -m samed.train``): the command line over :func:`samed.train.finetune`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .config import load_config

__all__ = ["add_parser", "run_finetune", "main"]


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--set {it!r} must be KEY=VALUE (e.g. train.iterations=100)")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``samed finetune`` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a LoRA adapter on labeled volumes (YAML config)",
        description="Train LoRA + decoder on labeled data as configs/NAME.yaml says; writes "
        "checkpoint.pt, metrics.json, curve.png and the best adapter to --out.",
    )
    p.add_argument(
        "--config",
        default=None,
        help="YAML fine-tuning config (configs/*.yaml); required unless --from-annotations",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None, help="overrides train.device"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.iterations=100 (repeatable)",
    )
    p.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="also copy the best adapter to DIR/<name> (e.g. adapters)",
    )
    from .cli_annotations import add_annotation_arguments

    add_annotation_arguments(p)
    p.set_defaults(func=run_finetune)
    return p


def run_finetune(args: argparse.Namespace) -> int:
    """``samed finetune``: returns 0 on success, 2 on a configuration or data error."""
    if getattr(args, "from_annotations", None):
        from .cli_annotations import run_from_annotations

        return run_from_annotations(args)
    if not args.config:
        print("samed finetune: give --config YAML or --from-annotations DIR", file=sys.stderr)
        return 2
    from .loop import finetune  # torch: imported only to run the command

    try:
        cfg = load_config(args.config, _parse_set(getattr(args, "set", [])))
    except ValueError as exc:
        print(f"samed finetune: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / cfg.name)
    argv = sys.argv[1:]
    if argv[:1] != ["finetune"]:  # python -m samed.train: arguments come without the verb
        argv = ["finetune", *argv]
    command = "samed " + " ".join(shlex.quote(a) for a in argv)
    export = getattr(args, "export", None)
    if export:
        from .export import check_export

        try:  # refuse a bad destination before training, not after
            check_export(export, cfg.name)
        except ValueError as exc:
            print(f"samed finetune: {exc}", file=sys.stderr)
            return 2
    try:
        res = finetune(cfg, out, resume=args.resume, device=args.device, command=command)
    except ValueError as exc:
        print(f"samed finetune: {exc}", file=sys.stderr)
        return 2
    if export:
        from .export import export_adapter

        try:
            dst = export_adapter(res["adapter"], export, cfg.name)
        except (ValueError, OSError) as exc:
            print(f"samed finetune: export failed: {exc}", file=sys.stderr)
            return 2
        print(f"exported adapter to {dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m samed.train ...`` (same arguments as ``samed finetune``)."""
    parser = argparse.ArgumentParser(prog="samed")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["finetune", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
