"""``python -m samed.train ...``: the same arguments as ``samed finetune``."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":  # importing the module (e.g. walking samed's submodules) runs nothing
    raise SystemExit(main())
