"""Fixtures of the batch tests: a tiny automatic adapter (no prompts needed) and small copies of
real DICOM series."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

SEED = 2  # a tiny random model whose masks are neither empty nor the whole slice here


@pytest.fixture(scope="session")
def tiny_automatic_adapter(tmp_path_factory, make_tiny_model) -> Path:
    """A 3-class automatic LoRA adapter for ``make_tiny_model("tinyvit", seed=SEED)``."""
    from samed.lora import LoraConfig, apply_lora, save_adapter

    model = make_tiny_model("tinyvit", seed=SEED)
    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    folder = tmp_path_factory.mktemp("adapters") / "tiny-auto"
    return save_adapter(model, folder, labels={0: "background", 1: "liver", 2: "spleen"})


def _copy_slices(src: Path, dst: Path, n: int, start: int = 0) -> list[Path]:
    files = sorted(p for p in src.iterdir() if p.is_file())
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    ordered = [f for _, f in sorted(zip(z, files, strict=True))]
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in ordered[start : start + n]:
        shutil.copy(f, dst / f.name)
        out.append(dst / f.name)
    return out


@pytest.fixture(scope="session")
def copy_slices():
    """``copy_slices(src, dst, n, start=0)``: copy ``n`` consecutive slices (by position along
    z) of the DICOM series in ``src`` into ``dst``; returns the copies."""
    return _copy_slices
