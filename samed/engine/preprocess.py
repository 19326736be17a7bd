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
    "CanvasGrid",
    "canvas_grid",
    "to_canvas",
    "from_canvas",
    "inplane_spacing",
    "body_center",
    "choose_intensity",
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

    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K, L, L) low-res decoder logits -> (B, K, H, W) float32 logits on the slice grid
        (:func:`samed.model.sam.upscale_logits`: bilinear, padding cropped)."""
        from ..model.sam import upscale_logits

        return upscale_logits(logits, self.resized_hw, self.original_hw, self.image_size)


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


# --------------------------------------------------------------------------- in-plane spacing
@dataclass(frozen=True)
class CanvasGrid:
    """How a (H, W) slice with pixel spacing ``spacing`` maps onto a square canvas of ``canvas``
    pixels at the adapter's training spacing ``target`` (and back).

    The slice is resampled (bilinear) to ``resampled_hw`` = round(H * sy / ty), round(W * sx / tx),
    then the canvas is the window ``[offset_y, offset_y + canvas) x [offset_x, offset_x + canvas)``
    of the resampled slice (negative offsets pad with zeros, larger extents crop).

    Attributes:
        source_hw: (H, W) of the slice.
        spacing: (sy, sx) source pixel spacing in mm (rows, columns).
        target: (ty, tx) training spacing in mm.
        resampled_hw: (h, w) after resampling.
        offset: (oy, ox) of the canvas in resampled pixels.
        canvas: side of the square canvas (the model's input size, so no further resize).
    """

    source_hw: tuple[int, int]
    spacing: tuple[float, float]
    target: tuple[float, float]
    resampled_hw: tuple[int, int]
    offset: tuple[int, int]
    canvas: int

    @property
    def identity_resample(self) -> bool:
        """True when resampling leaves the slice as it is (already at the target spacing)."""
        return self.resampled_hw == self.source_hw


def _pair(value: object, what: str) -> tuple[float, float]:
    try:
        vals = [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]
    except (TypeError, ValueError):
        vals = []
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or not all(np.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"{what} {value!r} must be one or two positive finite numbers (mm)")
    return vals[0], vals[1]


def canvas_grid(
    hw: tuple[int, int],
    spacing: object,
    target: object,
    canvas: int,
    center: tuple[float, float] | None = None,
) -> CanvasGrid:
    """The :class:`CanvasGrid` of a (H, W) slice.

    Args:
        hw: (H, W) slice shape.
        spacing: source (sy, sx) pixel spacing in mm (or one number).
        target: training (ty, tx) spacing in mm (or one number).
        canvas: canvas side in pixels (the model input size S).
        center: (y, x) in SOURCE pixels to centre the canvas on when the resampled slice is
            larger than the canvas (e.g. the body's centre); None = the slice centre. A slice
            that fits is always centred.

    Raises:
        ValueError: non-positive spacings, shape or canvas.
    """
    h, w = int(hw[0]), int(hw[1])
    if h < 1 or w < 1 or canvas < 1:
        raise ValueError(f"slice shape {hw} and canvas {canvas} must be positive")
    sp, tg = _pair(spacing, "spacing"), _pair(target, "target spacing")
    same = [abs(s - t) <= 1e-3 * t for s, t in zip(sp, tg, strict=True)]
    rh = h if same[0] else max(1, int(round(h * sp[0] / tg[0])))
    rw = w if same[1] else max(1, int(round(w * sp[1] / tg[1])))
    offs = []
    for n, src, c in ((rh, h, 0), (rw, w, 1)):
        if n <= canvas:
            offs.append(-((canvas - n) // 2))
        else:
            mid = n / 2.0 if center is None else (float(center[c]) + 0.5) * n / src
            offs.append(int(np.clip(round(mid - canvas / 2.0), 0, n - canvas)))
    return CanvasGrid((h, w), sp, tg, (rh, rw), (offs[0], offs[1]), int(canvas))


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def to_canvas(
    slices: np.ndarray | torch.Tensor, grid: CanvasGrid, mode: str = "bilinear"
) -> torch.Tensor:
    """Resample (B, H, W) slices onto the canvas: (B, S, S) float32 (``mode="nearest"`` for
    label maps; outside the slice the canvas is 0)."""
    x = torch.as_tensor(np.asarray(slices) if not torch.is_tensor(slices) else slices)
    if x.ndim != 3 or tuple(x.shape[1:]) != grid.source_hw:
        raise ValueError(
            f"slices must be (B, {grid.source_hw[0]}, {grid.source_hw[1]}); got {tuple(x.shape)}"
        )
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode={mode!r} must be 'bilinear' or 'nearest'")
    x = _resize(x.float()[:, None], grid.resampled_hw, mode)[:, 0]
    s, (oy, ox), (rh, rw) = grid.canvas, grid.offset, grid.resampled_hw
    out = x.new_zeros((x.shape[0], s, s))
    ys, ye = max(oy, 0), min(oy + s, rh)
    xs, xe = max(ox, 0), min(ox + s, rw)
    out[:, ys - oy : ye - oy, xs - ox : xe - ox] = x[:, ys:ye, xs:xe]
    return out


def from_canvas(
    maps: torch.Tensor, grid: CanvasGrid, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """Map (B, K, S, S) class scores (logits or probabilities) on the canvas back to the source
    grid: (B, K, H, W), bilinear (the exact inverse geometry of :func:`to_canvas`; argmax it).

    Args:
        maps: per-class scores on the canvas.
        grid: the slice's :class:`CanvasGrid`.
        fill: (K,) scores for resampled pixels the canvas cropped away (default: class 0 wins).
    """
    b, k, s, _ = maps.shape
    if s != grid.canvas:
        raise ValueError(f"maps side {s} differs from the canvas {grid.canvas}")
    (oy, ox), (rh, rw) = grid.offset, grid.resampled_hw
    if fill is None:
        fill = torch.full((k,), -1e4, dtype=maps.dtype, device=maps.device)
        fill[0] = 1e4
    full = fill.to(maps)[None, :, None, None].expand(b, k, rh, rw).clone()
    ys, ye = max(oy, 0), min(oy + s, rh)
    xs, xe = max(ox, 0), min(ox + s, rw)
    full[:, :, ys:ye, xs:xe] = maps[:, :, ys - oy : ye - oy, xs - ox : xe - ox]
    return _resize(full, grid.source_hw, "bilinear")


def inplane_spacing(affine: np.ndarray) -> tuple[float, float]:
    """(sy, sx) in mm of the rows and columns of a (Z, Y, X) array whose 4x4 ``affine`` maps
    voxel (x, y, z) to world millimetres (:class:`samed.io.Volume`)."""
    a = np.asarray(affine, dtype=np.float64)
    return float(np.linalg.norm(a[:3, 1])), float(np.linalg.norm(a[:3, 0]))


def body_center(image: np.ndarray, threshold: float = 0.05) -> tuple[float, float] | None:
    """(y, x) source-pixel centre of the bounding box of voxels above ``threshold`` (a [0, 1]
    intensity-mapped (Z, Y, X) volume: the body against air), or None when nothing is."""
    proj = np.asarray(image).max(axis=0) > threshold
    ys, xs = np.nonzero(proj)
    if ys.size == 0:
        return None
    return (float(ys.min() + ys.max()) / 2.0, float(xs.min() + xs.max()) / 2.0)


def choose_intensity(
    intensity: object, model: object, array: np.ndarray, modality: str
) -> tuple[object, dict]:
    """The intensity spec a :class:`samed.engine.Session` applies, and the record of why.

    ``"auto"``: the model's adapter's recorded ``preprocessing.intensity`` when it has one that
    is not itself ``auto`` (it always wins), else :func:`samed.intensity.decide_intensity` on
    the (Z, Y, X) ``array`` and the DICOM ``modality``. Any other spec is used as given.

    Returns:
        (the spec to apply, a JSON-able record: ``intensity_source`` (``adapter``, ``auto`` or
        ``argument``), ``intensity`` (its setting), ``reason``, ``modality``).

    Raises:
        ValueError: a spec outside the grammar, or an adapter recording one.
    """
    from ..intensity import decide_intensity

    if callable(intensity):
        return intensity, {"intensity_source": "argument (a function)"}
    spec = parse_intensity(intensity)
    if spec.kind != "auto":
        return spec, {"intensity_source": "argument", "intensity": spec.setting()}
    adapter = model.adapter
    recorded = getattr(adapter, "intensity", None) if adapter is not None else None
    if recorded is not None:
        try:
            rec = parse_intensity(recorded)
        except ValueError as exc:
            raise ValueError(
                f"adapter {adapter.name!r} records preprocessing.intensity {recorded!r}: {exc}"
            ) from exc
        if rec.kind != "auto":
            reason = f"the adapter {adapter.name!r} was trained with it (its metadata.json)"
            return rec, {
                "intensity_source": "adapter",
                "intensity": rec.setting(),
                "reason": reason,
            }
    chosen, reason = decide_intensity(array, modality)
    return chosen, {
        "intensity_source": "auto",
        "intensity": chosen.setting(),
        "modality": modality or "",
        "reason": reason,
    }


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """Binary dilation of a (Y, X) mask by ``px`` pixels (square structuring element)."""
    if px <= 0:
        return mask
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=px)


def check_volume_array(array: object) -> np.ndarray:
    """A volume as a (Z, Y, X) real-valued array ((Y, X) becomes one slice).

    Raises:
        ValueError: another number of dimensions, an empty axis, or a non-real dtype.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or min(array.shape) < 1:
        raise ValueError(f"volume must be a (Z, Y, X) array; got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"volume dtype {array.dtype} is not a real number type")
    return array
