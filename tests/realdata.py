"""Where the real data lives (../shared/data beside the checkout) and a skip helper.

Import as ``from realdata import shared_path`` (pytest puts tests/ on sys.path; the name avoids
the unrelated ``tests`` package some dependencies install into site-packages).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SAMED_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data; skips the test with a clear reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(
            f"real data not available: {p} is absent (expected ../shared/data beside the checkout)"
        )
    return p
