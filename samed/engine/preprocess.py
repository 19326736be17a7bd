"""Slice pre-processing that reproduces LiteMedSAM's own, and its exact inverse.

LiteMedSAM (CVPR24_LiteMedSAM_infer.py): a (H, W) slice is repeated to 3 channels, resized so
that its longest side is S (= 256), min-max normalised to [0, 1] after the resize, padded
bottom/right with zeros to S x S; prompts are scaled by S / max(H, W); low-resolution logits are
cropped to the unpadded region and resized bilinearly back to (H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..intensity import parse_intensity

__all__ = [
    "SliceGeometry",
    "slice_geometry",
    "prepare_slices",
    "box_to_model",
    "points_to_model",
    "resolve_intensity",
    "mask_bbox",
]


@dataclass(frozen=True)
class SliceGeometry:
    """How a (H, W) slice maps into the S x S model input.

    Attributes:
        original_hw: (H, W) of the slice in pixels.
        resized_hw: (h, w) after resizing the longest side to S (before padding).
        scale: S / max(H, W) (model pixels per slice pixel).
        image_size: S.
    """

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    scale: float
    image_size: int


def slice_geometry(hw: tuple[int, int], image_size: int) -> SliceGeometry:
    """Geometry of LiteMedSAM's ``resize_longest_side`` for a (H, W) slice."""
    h, w = int(hw[0]), int(hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"slice shape {hw} must be positive")
    scale = image_size / max(h, w)
    return SliceGeometry((h, w), (int(h * scale + 0.5), int(w * scale + 0.5)), scale, image_size)


def prepare_slices(slices: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """Model input for a stack of slices.

    Args:
        slices: (B, H, W) float intensities (already windowed / scaled; any range).
        image_size: S.

    Returns:
        (B, 3, S, S) float32 in [0, 1]: each slice resized (longest side S, bilinear with
        antialiasing when shrinking, like OpenCV's INTER_AREA), min-max normalised per slice after
        resizing, zero-padded bottom/right, repeated to 3 channels.
    """
    x = torch.as_tensor(np.asarray(slices) if not torch.is_tensor(slices) else slices)
    if x.ndim != 3:
        raise ValueError(f"slices must be (B, H, W); got shape {tuple(x.shape)}")
    x = x.float()
    geo = slice_geometry(tuple(x.shape[1:]), image_size)
    x = x[:, None]
    if geo.resized_hw != geo.original_hw:
        x = F.interpolate(
            x,
            size=geo.resized_hw,
            mode="bilinear",
            align_corners=False,
            antialias=geo.scale < 1.0,
        )
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-8)
    out = x.new_zeros((x.shape[0], 1, image_size, image_size))
    out[:, :, : geo.resized_hw[0], : geo.resized_hw[1]] = x
    return out.expand(-1, 3, -1, -1).contiguous()


def box_to_model(box: np.ndarray | list[float], geo: SliceGeometry) -> np.ndarray:
    """(4,) XYXY box in slice pixels -> model-input pixels. Validates order and bounds."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        raise ValueError(f"box {box!r} must be 4 finite numbers (x0, y0, x1, y1) in pixels")
    if b[2] < b[0] or b[3] < b[1]:
        raise ValueError(f"box {box!r} must have x1 >= x0 and y1 >= y0")
    h, w = geo.original_hw
    b = np.clip(b, 0, [w - 1, h - 1, w - 1, h - 1])
    return (b * geo.scale).astype(np.float32)


def points_to_model(
    points: np.ndarray | list, labels: np.ndarray | list, geo: SliceGeometry
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) XY points in slice pixels + (N,) labels (1 positive, 0 negative) -> model pixels."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    if p.shape[0] != lab.shape[0] or p.shape[0] == 0:
        raise ValueError(
            f"points ({p.shape[0]}) and point_labels ({lab.shape[0]}) must be non-empty and of equal length"
        )
    if not np.all(np.isin(lab, (0, 1))):
        raise ValueError(f"point_labels {lab.tolist()} must be 1 (positive) or 0 (negative)")
    h, w = geo.original_hw
    if np.any(p < 0) or np.any(p[:, 0] > w - 1) or np.any(p[:, 1] > h - 1):
        raise ValueError(f"points {p.tolist()} must lie inside the slice (x < {w}, y < {h})")
    return (p * geo.scale).astype(np.float32), lab


def mask_bbox(mask: np.ndarray, margin: float = 0.0) -> np.ndarray | None:
    """XYXY bounding box (pixels) of a (H, W) mask, grown by ``margin`` px and clipped; None if
    the mask is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    h, w = mask.shape
    return np.array(
        [
            max(xs.min() - margin, 0),
            max(ys.min() - margin, 0),
            min(xs.max() + margin, w - 1),
            min(ys.max() + margin, h - 1),
        ],
        dtype=np.float64,
    )


def resolve_intensity(
    spec: object, array: np.ndarray, modality: str = ""
) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """Turn an intensity spec into (description, function mapping (Z, Y, X) -> float32).

    The grammar is :func:`samed.intensity.parse_intensity`'s (``"auto"``, ``"minmax"`` / None,
    ``"percentile"``, a :data:`samed.registry.CT_WINDOWS` name or ``"ct:NAME"``,
    ``("window", low, high)``, ``("percentile", lo, hi)``, ``"window:LOW:HIGH"``, an
    :class:`samed.intensity.IntensitySpec`...); a callable is used as it is.

    Args:
        spec: the intensity mapping.
        array: the (Z, Y, X) volume (decides ``auto``).
        modality: DICOM modality if known (``"CT"`` makes ``auto`` the abdomen window).

    Returns:
        (:attr:`samed.intensity.IntensitySpec.name` of the resolved spec, its ``apply``).

    Raises:
        ValueError: a spec outside the grammar (named, with the allowed forms).
    """
    if callable(spec):
        return getattr(spec, "__name__", "custom"), spec  # type: ignore[return-value]
    resolved = parse_intensity(spec).resolve(array, modality)
    return resolved.name, resolved.apply
