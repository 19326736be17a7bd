"""Label colours: one RGB colour per label value, for QC pictures, DICOM SEG and RTSTRUCT.

Torch-free and dependency-free, so that :mod:`samed.io.seg`, :mod:`samed.batch.qc` and the
napari plugin can all import it.
"""

from __future__ import annotations

__all__ = ["label_color"]

# Distinct colours (RGB 0-255) for labels 1, 2, ... (cycled); label 0 is never drawn.
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
)


def label_color(value: int) -> tuple[int, int, int]:
    """RGB (0-255) colour of label ``value`` (>= 1) in QC pictures, DICOM SEG and RTSTRUCT
    (label values cycle through 15 distinct colours)."""
    if value < 1:
        raise ValueError(f"label value {value} has no colour; labels are >= 1 (0 is background)")
    return _PALETTE[(value - 1) % len(_PALETTE)]
