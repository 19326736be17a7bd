"""Quality-control pictures: a montage of axial slices with the label map overlaid.

A person should see at a glance whether a batch result is plausible. Slices are shown in the
radiological convention when the volume is axial (patient's right on the picture's left,
anterior up), scaled to square millimetres, with each label filled semi-transparently and
outlined.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..colors import label_color

__all__ = ["label_color", "montage", "save_qc_png", "pick_slices"]


def pick_slices(labels: np.ndarray, n: int = 12) -> list[int]:
    """Choose up to ``n`` slice indices: evenly over the labelled z range, or over the whole
    volume when nothing is labelled.

    Args:
        labels: (Z, Y, X) label map.
        n: at most this many slices (>= 1).
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    nz = labels.shape[0]
    present = np.nonzero(labels.reshape(nz, -1).any(axis=1))[0]
    lo, hi = (int(present[0]), int(present[-1])) if present.size else (0, nz - 1)
    count = min(n, hi - lo + 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, count)})


def _display_flips(affine: np.ndarray | None) -> tuple[bool, bool]:
    """(flip rows, flip columns) so that an axial slice shows anterior up, patient right left."""
    if affine is None:
        return False, False
    import nibabel as nib

    codes = nib.aff2axcodes(affine)
    if codes[2] not in ("S", "I"):
        return False, False  # not an axial stack: show the stored order
    return codes[1] == "A", codes[0] == "R"


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def montage(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    affine: np.ndarray | None = None,
    window: tuple[float, float] | None = None,
    slices: list[int] | None = None,
    tile: int = 256,
    columns: int = 4,
    alpha: float = 0.4,
) -> np.ndarray:
    """Compose the QC montage.

    Args:
        image: (Z, Y, X) intensities (any units).
        labels: (Z, Y, X) integer label map on the same grid.
        affine: (4, 4) RAS affine of the voxel index (x, y, z); gives the display orientation and
            pixel aspect. None: stored order, square pixels.
        window: (low, high) intensities mapped to black/white; None: 1st-99th percentile.
        slices: slice indices to show (default :func:`pick_slices`).
        tile: longest side of one tile in pixels.
        columns: tiles per row.
        alpha: opacity of the label fill (outlines are opaque).

    Returns:
        (H, W, 3) uint8 RGB picture.
    """
    from PIL import Image, ImageDraw

    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(
            f"image {image.shape} and labels {labels.shape} must be (Z, Y, X) arrays of one shape"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    zs = pick_slices(labels) if slices is None else [int(z) for z in slices]
    if not zs or min(zs) < 0 or max(zs) >= image.shape[0]:
        raise ValueError(f"slices {zs} must be non-empty indices in [0, {image.shape[0] - 1}]")
    if window is None:
        sample = image[zs].astype(np.float32)
        lo, hi = (float(v) for v in np.percentile(sample, (1, 99))) if sample.size else (0.0, 1.0)
    else:
        lo, hi = float(window[0]), float(window[1])
    flip_rows, flip_cols = _display_flips(affine)
    sy, sx = 1.0, 1.0
    if affine is not None:
        sx, sy = (float(v) for v in np.sqrt((np.asarray(affine)[:3, :2] ** 2).sum(axis=0)))
    ny, nx = image.shape[1:]
    h_mm, w_mm = ny * sy, nx * sx
    scale = tile / max(h_mm, w_mm)
    th, tw = max(1, round(h_mm * scale)), max(1, round(w_mm * scale))
    columns = max(1, min(columns, len(zs)))
    rows = (len(zs) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * tw, rows * th), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, z in enumerate(zs):
        gray = np.clip((image[z].astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        rgb = np.repeat((gray * 255.0)[..., None], 3, axis=2)
        lab = labels[z]
        for value in np.unique(lab[lab > 0]):
            m = lab == value
            color = np.asarray(label_color(int(value)), dtype=np.float32)
            rgb[m] = (1.0 - alpha) * rgb[m] + alpha * color
            rgb[_outline(m)] = color
        if flip_rows:
            rgb = rgb[::-1]
        if flip_cols:
            rgb = rgb[:, ::-1]
        img = Image.fromarray(np.ascontiguousarray(rgb.astype(np.uint8))).resize(
            (tw, th), Image.Resampling.BILINEAR
        )
        x0, y0 = (i % columns) * tw, (i // columns) * th
        canvas.paste(img, (x0, y0))
        draw.text((x0 + 3, y0 + 2), f"z={z}", fill=(255, 255, 0))
    return np.asarray(canvas)


def save_qc_png(
    path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, **kwargs: object
) -> Path:
    """Write :func:`montage` as a PNG, atomically (``kwargs`` go to :func:`montage`)."""
    from PIL import Image

    from ..io import atomic_write

    out = Path(path)
    picture = montage(image, labels, **kwargs)  # type: ignore[arg-type]
    with atomic_write(out) as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    return out
