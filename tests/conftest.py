"""Shared fixtures: the real data folder beside the checkout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realdata import SHARED_DATA, shared_path  # noqa: E402

__all__ = ["SHARED_DATA", "shared_path"]


@pytest.fixture
def shared_data() -> Path:
    """The ../shared/data folder (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA
