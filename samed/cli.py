"""The ``samed`` command: keyword calls into the Python API.

Sub-commands live beside the code they drive (each module exposes ``add_parser``). Those modules
import only light packages at module level (argparse, numpy at most; never torch, MONAI, pydicom
or nibabel): the heavy imports happen inside the function that runs the command, so ``samed
--help`` and every ``samed COMMAND --help`` answer without loading torch, and ``samed info`` pays
for torch only (tests/test_cli_startup.py checks which modules each one imports).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from typing import Any

from . import __version__
from .registry import MODEL_KINDS, find_adapters

__all__ = ["main", "build_parser"]

# command -> module exposing add_parser(subparsers)
_COMMANDS = {
    "segment": "samed.batch.cli",
    "convert": "samed.io.cli",
    "finetune": "samed.train.cli",
    "finetune-interactive": "samed.train.interactive_cli",
    "evaluate": "samed.evaluate.cli",
    "demo": "samed.demo",
}


# `samed info` reports these distributions' versions from their metadata (no import: importing
# MONAI alone takes ~4.7 s, it loads every submodule, torchvision included)
_INFO_PACKAGES = ("monai", "nibabel", "pydicom", "highdicom", "SimpleITK", "safetensors")


def _info(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import torch  # for CUDA and the thread count

    info: dict[str, Any] = {
        "samed": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
    }
    for dist in _INFO_PACKAGES:
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "not installed"
    info["models"] = {k: s.description for k, s in MODEL_KINDS.items()}
    info["adapters"] = [
        {"name": a.name, "mode": a.mode, "base_model": a.base_model, "path": str(a.path)}
        | ({"unusable": a.problem} if a.problem else {})
        for a in find_adapters(include_unusable=True)
    ]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for k, v in info.items():
        if k == "models":
            print("models:")
            for name, desc in v.items():
                print(f"  {name:<14} {desc}")
        elif k == "adapters":
            print("adapters:" + ("" if v else " none found"))
            for a in v:
                if "unusable" in a:
                    print(f"  {a['name']:<28} UNUSABLE: {a['unusable']} ({a['path']})")
                    continue
                print(f"  {a['name']:<28} {a['mode']:<10} {a['base_model']:<12} {a['path']}")
        else:
            print(f"{k}: {v}")
    return 0


def _adapters(args: argparse.Namespace) -> int:
    adapters = find_adapters(include_unusable=True)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": a.name,
                        "mode": a.mode,
                        "base_model": a.base_model,
                        "path": str(a.path),
                        "labels": a.labels,
                        "description": a.description,
                        "interactive_default": a.interactive_default,
                    }
                    | ({"unusable": a.problem} if a.problem else {})
                    for a in adapters
                ],
                indent=2,
            )
        )
        return 0
    if not adapters:
        print("no adapters found (searched $SAMED_ADAPTERS, ./adapters and the shipped adapters/)")
        return 0
    print(f"{'name':<28}{'mode':<11}{'base':<12}labels")
    for a in adapters:
        if a.problem:
            print(f"{a.name:<28}UNUSABLE: {a.problem} ({a.path})")
            continue
        labels = ", ".join(f"{k}:{v}" for k, v in sorted(a.labels.items()) if k != 0)
        tag = "  [interactive default]" if a.interactive_default else ""
        print(f"{a.name:<28}{a.mode:<11}{a.base_model:<12}{labels}{tag}")
        if a.description:
            print(f"{'':<28}{a.description}")
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``only`` imports just that sub-command's module."""
    parser = argparse.ArgumentParser(
        prog="samed",
        description="Medical image segmentation with Segment Anything and LoRA adapters.",
    )
    parser.add_argument("--version", action="version", version=f"samed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, device, models and adapters found")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)
    p = sub.add_parser("adapters", help="list adapters (`samed adapters list`)")
    p.add_argument("action", nargs="?", choices=["list"], default="list")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_adapters)
    for name, module in _COMMANDS.items():
        if only is not None and only != name:
            sub.add_parser(name, help=f"(see samed {name} --help)")
            continue
        try:
            importlib.import_module(module).add_parser(sub)
        except ImportError as exc:  # a front end whose optional dependency is missing
            sub.add_parser(name, help=f"unavailable: {exc}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (2 for bad input, 1 for failures)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in _COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"samed {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"samed {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
