"""Model-side transforms: canonical orientation, intensity windows, resize to the model input.

Two layers, following MONAI's pattern:

* plain numpy functions the engine calls on ``(Z, Y, X)`` arrays -- :func:`apply_window` (CT window
  in HU -> [0, 1]) and :func:`percentile_scale` (MR, percentiles -> [0, 1]);
* MONAI transforms for dictionary pipelines on channel-first ``MetaTensor`` s in MONAI's spatial
  order ``(C, x, y, z)`` (the transpose of :class:`samed.io.Volume`'s ``(z, y, x)``; build them with
  :func:`to_metatensor`). Each has an array form and a thin dictionary wrapper; the geometric ones
  are invertible, so ``Compose.inverse`` or MONAI's ``Invertd`` put a model output back on the
  source grid.

Canonical frame: :data:`CANONICAL_AXCODES` = ``"LPS"`` -- the DICOM-native order of an axial
slice, so ``array[z]`` shows the patient as a radiologist does (anterior up, patient right on the
image's left), which is how SAM/MedSAM training slices were seen.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    InvertibleTransform,
    MapTransform,
    Orientationd,
    Transform,
)
from monai.utils import TraceKeys, convert_to_dst_type

from samed.registry import CT_WINDOWS, WindowPreset

__all__ = [
    "CANONICAL_AXCODES",
    "apply_window",
    "percentile_scale",
    "resolve_window",
    "to_metatensor",
    "from_metatensor",
    "WindowIntensity",
    "WindowIntensityd",
    "PercentileScale",
    "PercentileScaled",
    "ResizeToModel",
    "ResizeToModeld",
    "canonical_orientation",
    "model_pipeline",
]

CANONICAL_AXCODES = "LPS"


# --------------------------------------------------------------------------- numpy functions
def resolve_window(preset: str | WindowPreset | Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` HU bounds of a window given by name, :class:`WindowPreset` or pair.

    Raises:
        ValueError: unknown name (the known ones are listed) or ``low >= high``.
    """
    if isinstance(preset, str):
        key = preset.lower()
        if key not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {preset!r}; allowed: {sorted(CT_WINDOWS)}")
        low, high = CT_WINDOWS[key].low, CT_WINDOWS[key].high
    elif isinstance(preset, WindowPreset):
        low, high = preset.low, preset.high
    else:
        values = [float(v) for v in preset]
        if len(values) != 2:
            raise ValueError(f"window must be a preset name or (low, high); got {preset!r}")
        low, high = values
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"window low {low} must be finite and below high {high}")
    return float(low), float(high)


def apply_window(array: np.ndarray, preset: str | WindowPreset | Sequence[float]) -> np.ndarray:
    """Map a HU window to [0, 1]: ``clip((array - low) / (high - low), 0, 1)``.

    Args:
        array: image of any shape (typically ``(Z, Y, X)`` or ``(Y, X)``) in HU.
        preset: a name of :data:`samed.registry.CT_WINDOWS` (abdomen, liver, lung, bone, brain,
            mediastinum), a :class:`~samed.registry.WindowPreset`, or ``(low, high)`` in HU.

    Returns:
        float32 array of the same shape with values in [0, 1].
    """
    low, high = resolve_window(preset)
    out = np.asarray(array, dtype=np.float32) - np.float32(low)
    out *= np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def percentile_scale(array: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    """Scale intensities so the ``lo`` and ``hi`` percentiles map to 0 and 1 (clipped).

    Args:
        array: image of any shape (MR, any units). Non-finite voxels are ignored for the
            percentiles and come out as 0.
        lo: lower percentile in [0, 100).
        hi: upper percentile in (lo, 100].

    Returns:
        float32 array of the same shape in [0, 1]; all zeros for a constant image.

    Raises:
        ValueError: if the percentiles are out of range or not increasing.
    """
    if not (0.0 <= lo < hi <= 100.0):
        raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100; got lo={lo}, hi={hi}")
    a = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(a)
    values = a[finite] if not finite.all() else a.ravel()
    if values.size == 0:
        return np.zeros(a.shape, dtype=np.float32)
    p_lo, p_hi = np.percentile(values, [lo, hi])
    if not p_hi > p_lo:
        return np.zeros(a.shape, dtype=np.float32)
    out = (a - np.float32(p_lo)) * np.float32(1.0 / (p_hi - p_lo))
    out = np.clip(out, 0.0, 1.0, out=out)
    out[~finite] = 0.0
    return out


# --------------------------------------------------------------------------- Volume <-> MONAI
def to_metatensor(volume: Any) -> MetaTensor:
    """A :class:`samed.io.Volume` as a channel-first MetaTensor ``(1, x, y, z)`` with its affine."""
    data = torch.from_numpy(np.ascontiguousarray(np.asarray(volume.array).T))[None]
    return MetaTensor(data, affine=torch.as_tensor(volume.affine, dtype=torch.float64))


def from_metatensor(tensor: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(array (Z, Y, X), affine (4, 4))`` from a channel-first ``(1, x, y, z)`` tensor."""
    data = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    if data.ndim != 4 or data.shape[0] != 1:
        raise ValueError(f"expected a (1, x, y, z) tensor; got shape {data.shape}")
    affine = (
        np.asarray(tensor.affine, dtype=np.float64) if isinstance(tensor, MetaTensor) else np.eye(4)
    )
    return np.ascontiguousarray(data[0].T), affine


# --------------------------------------------------------------------------- intensity
class WindowIntensity(Transform):
    """Array form of :func:`apply_window` (numpy or torch in, same type out, float32)."""

    backend = ["numpy", "torch"]

    def __init__(self, preset: str | WindowPreset | Sequence[float] = "abdomen") -> None:
        self.low, self.high = resolve_window(preset)

    def __call__(self, img: Any) -> Any:
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        out, *_ = convert_to_dst_type(
            apply_window(arr, (self.low, self.high)),
            img,
            dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32,
        )
        return out


class PercentileScale(Transform):
    """Array form of :func:`percentile_scale` (percentiles over the whole image)."""

    backend = ["numpy", "torch"]

    def __init__(self, lo: float = 0.5, hi: float = 99.5) -> None:
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError(f"percentiles must satisfy 0 <= lo < hi <= 100; got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def __call__(self, img: Any) -> Any:
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        out, *_ = convert_to_dst_type(
            percentile_scale(arr, self.lo, self.hi),
            img,
            dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32,
        )
        return out


class WindowIntensityd(MapTransform):
    """Dictionary form of :class:`WindowIntensity` (CT)."""

    backend = WindowIntensity.backend

    def __init__(
        self,
        keys: KeysCollection,
        preset: str | WindowPreset | Sequence[float] = "abdomen",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = WindowIntensity(preset)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class PercentileScaled(MapTransform):
    """Dictionary form of :class:`PercentileScale` (MR)."""

    backend = PercentileScale.backend

    def __init__(
        self,
        keys: KeysCollection,
        lo: float = 0.5,
        hi: float = 99.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = PercentileScale(lo, hi)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


# --------------------------------------------------------------------------- resize
_MODES = ("bilinear", "nearest", "bicubic", "area")


class ResizeToModel(InvertibleTransform):
    """Resize the in-plane axes ``(x, y)`` so the longer side is ``size``, then pad to ``size²``.

    Input is channel-first ``(C, x, y[, z])`` (MetaTensor for invertibility); ``z`` is untouched,
    the padding is appended at the high ends of ``x`` and ``y`` (MedSAM's convention), and the
    affine is updated so world positions stay right. :meth:`inverse` crops the padding and resizes
    back to the source size. ``"nearest"`` uses PyTorch's ``nearest-exact`` (half-pixel centres),
    which makes the round trip exact whenever the model input is not smaller than the image
    (upsampling); when the image is larger than the model input, the inverse is the nearest
    resampling of the model-resolution result back onto every source voxel.

    Args:
        size: side of the square model input (e.g. 256 for LiteMedSAM, 1024 for SAM).
        mode: ``"bilinear"`` (images, antialiased when shrinking), ``"nearest"`` (label maps),
            ``"bicubic"`` or ``"area"``.
        pad_value: value of the padded border.
    """

    backend = ["torch"]

    def __init__(self, size: int = 256, mode: str = "bilinear", pad_value: float = 0.0) -> None:
        if int(size) < 1:
            raise ValueError(f"size must be a positive number of pixels; got {size}")
        if mode not in _MODES:
            raise ValueError(f"mode {mode!r} is not one of {_MODES}")
        self.size, self.mode, self.pad_value = int(size), mode, float(pad_value)

    @staticmethod
    def _resize(t: torch.Tensor, out_xy: tuple[int, int], mode: str) -> torch.Tensor:
        """Resize dims 1, 2 of ``(C, x, y, *rest)`` to ``out_xy``."""
        c, x, y, *rest = t.shape
        moved = t.permute(0, *range(3, t.ndim), 1, 2).reshape(-1, 1, x, y)
        is_float = moved.is_floating_point()
        work = moved if is_float and moved.dtype != torch.float16 else moved.float()
        if mode == "nearest":
            out = F.interpolate(work, size=out_xy, mode="nearest-exact")
        elif mode == "area":
            out = F.interpolate(work, size=out_xy, mode="area")
        else:
            shrink = out_xy[0] < x or out_xy[1] < y
            out = F.interpolate(work, size=out_xy, mode=mode, align_corners=False, antialias=shrink)
        if not is_float:
            out = out.round() if mode != "nearest" else out
            out = out.to(moved.dtype)
        out = out.reshape(c, *rest, *out_xy)
        return out.permute(0, t.ndim - 2, t.ndim - 1, *range(1, t.ndim - 2))

    @staticmethod
    def _scaled_affine(affine: torch.Tensor, fx: float, fy: float) -> torch.Tensor:
        """Affine of a grid whose voxel ``i'`` sits at source index ``(i' + 0.5) * f - 0.5``."""
        m = torch.eye(affine.shape[0], dtype=affine.dtype)
        m[0, 0], m[1, 1] = fx, fy
        m[0, -1], m[1, -1] = (fx - 1) / 2, (fy - 1) / 2
        return affine @ m

    def __call__(self, img: Any) -> Any:
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        if t.ndim < 3:
            raise ValueError(f"expected channel-first (C, x, y[, z]); got shape {tuple(t.shape)}")
        x, y = int(t.shape[1]), int(t.shape[2])
        scale = self.size / max(x, y)
        nx, ny = max(1, min(self.size, round(x * scale))), max(1, min(self.size, round(y * scale)))
        raw = t.as_tensor() if isinstance(t, MetaTensor) else t
        out = self._resize(raw, (nx, ny), self.mode)
        out = (
            F.pad(
                out.movedim((1, 2), (-2, -1)),
                (0, self.size - ny, 0, self.size - nx),
                value=self.pad_value,
            )
            .movedim((-2, -1), (1, 2))
            .contiguous()
        )
        if not isinstance(t, MetaTensor):
            return out if isinstance(img, torch.Tensor) else out.numpy()
        result = MetaTensor(out, meta=t.meta, applied_operations=list(t.applied_operations))
        original_affine = t.affine.clone()
        result.affine = self._scaled_affine(original_affine, x / nx, y / ny)
        self.push_transform(
            result,
            orig_size=(x, y),
            extra_info={"resized": (nx, ny), "mode": self.mode, "affine": original_affine},
        )
        return result

    def inverse(self, data: Any) -> Any:
        """Crop the padding and resize back to the source ``(x, y)``; restores the affine."""
        if not isinstance(data, MetaTensor):
            raise ValueError(
                "ResizeToModel.inverse needs the MetaTensor returned by the forward call"
            )
        # Read the trace without popping it from the caller's tensor (MONAI would mutate it).
        info = self.get_most_recent_transform(data, check=True, pop=False)
        x, y = (int(v) for v in info[TraceKeys.ORIG_SIZE])
        extra = info[TraceKeys.EXTRA_INFO]
        nx, ny = (int(v) for v in extra["resized"])
        mode = str(extra.get("mode", self.mode))
        mode = mode if mode in _MODES else "nearest"
        raw = data.as_tensor()[:, :nx, :ny]
        out = self._resize(raw, (x, y), mode)
        result = MetaTensor(
            out, meta=data.meta, applied_operations=list(data.applied_operations)[:-1]
        )
        result.affine = torch.as_tensor(extra["affine"], dtype=torch.float64)
        return result


class ResizeToModeld(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`ResizeToModel`; ``mode`` per key (bilinear images, nearest
    labels)."""

    backend = ResizeToModel.backend

    def __init__(
        self,
        keys: KeysCollection,
        size: int = 256,
        mode: str | Sequence[str] = "bilinear",
        pad_value: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys):
            raise ValueError(f"{len(modes)} modes given for {len(self.keys)} keys {self.keys}")
        self.transforms = {
            k: ResizeToModel(size, m, pad_value) for k, m in zip(self.keys, modes, strict=True)
        }
        self._fallback = ResizeToModel(size, "nearest", pad_value)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transforms[key](d[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transforms.get(key, self._fallback).inverse(d[key])
        return d

    def get_most_recent_transform(
        self, data: Any, key: Hashable = None, check: bool = True, pop: bool = False
    ) -> Any:
        # The trace is pushed by the per-key array transform; accept it as ours.
        return self.transforms[key].get_most_recent_transform(data, key, check, pop)


# --------------------------------------------------------------------------- pipelines
def canonical_orientation(keys: KeysCollection, axcodes: str = CANONICAL_AXCODES) -> Orientationd:
    """MONAI ``Orientationd`` to the canonical frame (invertible; flips/permutations only)."""
    return Orientationd(keys=keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S")))


def model_pipeline(
    image_key: str = "image",
    label_keys: Sequence[str] = (),
    *,
    modality: str = "CT",
    window: str | WindowPreset | Sequence[float] = "abdomen",
    percentiles: tuple[float, float] = (0.5, 99.5),
    size: int = 256,
    axcodes: str = CANONICAL_AXCODES,
) -> Compose:
    """Pre-processing for the model: canonical orientation, intensity, resize to ``size²``.

    Args:
        image_key: key of the image (channel-first MetaTensor, see :func:`to_metatensor`).
        label_keys: keys of label maps transformed with it (nearest resampling, no intensity).
        modality: ``"CT"`` uses the HU ``window``; anything else ``percentiles`` scaling.
        window: CT window preset or ``(low, high)``.
        percentiles: ``(lo, hi)`` for MR.
        size: model input side.
        axcodes: canonical orientation.

    Returns:
        An invertible ``Compose``: ``pipeline.inverse(out)`` (or ``Invertd``) returns to the source
        grid.
    """
    keys = [image_key, *label_keys]
    intensity: Transform
    if modality.upper() == "CT":
        intensity = WindowIntensityd(image_key, window)
    else:
        intensity = PercentileScaled(image_key, *percentiles)
    return Compose(
        [
            canonical_orientation(keys, axcodes),
            intensity,
            ResizeToModeld(keys, size, ["bilinear"] + ["nearest"] * len(label_keys)),
        ]
    )
