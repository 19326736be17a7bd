"""``samed finetune-interactive``: train the click-aware adapter
(:func:`samed.train.interactive.train_interactive`). Light imports only (``--help`` loads no torch)."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "build", "run"]


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=None, help="YAML config (configs/interactive/click-adapter.yaml)"
    )
    p.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (YAML value), e.g. --set iterations=50",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``samed finetune-interactive`` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "finetune-interactive",
        help="train the click-aware adapter with simulated interactive sessions (YAML config)",
        description="Frozen encoder, cached base embeddings; decoder LoRA trained on simulated "
        "box/point + corrective-click sessions. Writes OUT/metrics.json and OUT/<name>/.",
    )
    _options(p)
    p.set_defaults(func=run)
    return p


def build() -> argparse.ArgumentParser:
    """The stand-alone parser of ``python -m samed.train.interactive``."""
    p = argparse.ArgumentParser(prog="python -m samed.train.interactive", description=__doc__)
    _options(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the training as the parsed arguments say; prints the metrics summary."""
    import yaml

    from .interactive import load_interactive_config, train_interactive

    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item!r} must be KEY=VALUE (e.g. iterations=50)")
        k, v = item.split("=", 1)
        overrides[k.strip()] = yaml.safe_load(v)
    try:
        cfg = load_interactive_config(args.config, **overrides)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"samed finetune-interactive: {exc}") from None
    out = args.out or f"runs/{cfg.name}"
    m = train_interactive(cfg, out)
    print(
        json.dumps(
            {
                k: m[k]
                for k in (
                    "adapter",
                    "best_step",
                    "steps_run",
                    "seconds",
                    "validation_base",
                    "validation_best",
                )
            },
            indent=1,
        )
    )
    return 0
