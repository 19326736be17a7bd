"""``python -m samed.train ...``: the same arguments as ``samed finetune``."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
