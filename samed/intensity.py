"""The one intensity path: how image values become the model's [0, 1] input.

Every front end (the engine's ``Session(intensity=...)``, ``samed segment --window``, the
training config's ``data.intensity``, the plugin's menu) names an intensity mapping in the same
grammar, parsed here by :func:`parse_intensity` into an :class:`IntensitySpec`:

=============================================  ===============================================
form                                           meaning
=============================================  ===============================================
``"auto"``                                     decided per volume (:func:`decide_intensity`):
                                               CT (modality CT, or HU-like values: below -500,
                                               or a window-clipped HU floor) -> the abdomen
                                               window; data already in [0, 1] -> unchanged;
                                               otherwise percentiles 0.5 / 99.5
``"minmax"`` or None                           unchanged (the model min-max normalises each
                                               slice itself)
``"percentile"``                               percentiles 0.5 / 99.5 -> 0 / 1 (MR)
a :data:`samed.registry.CT_WINDOWS` name,      that CT window in HU -> [0, 1]
``"ct:NAME"``
``"window:LOW:HIGH"``, ``"LOW,HIGH"``,         window ``[LOW, HIGH]`` in the image's units
``(low, high)``, ``("window", low, high)``
``"percentile:LO:HI"``,                        percentiles ``LO`` / ``HI`` -> 0 / 1
``("percentile", lo, hi)``
=============================================  ===============================================

(Lists work like tuples, for YAML/JSON configs.) Only numpy and :mod:`samed.registry` are
imported: no torch, no MONAI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .registry import CT_WINDOWS, WindowPreset

__all__ = [
    "IntensitySpec",
    "parse_intensity",
    "apply_window",
    "percentile_scale",
    "resolve_window",
    "INTENSITY_FORMS",
    "decide_intensity",
    "looks_like_ct",
]

#: the allowed forms, as error messages list them
INTENSITY_FORMS = (
    "auto, minmax, percentile, a CT window name ("
    + ", ".join(CT_WINDOWS)
    + "), 'ct:NAME', 'window:LOW:HIGH', 'LOW,HIGH', 'percentile:LO:HI', (low, high), "
    "('window', low, high) or ('percentile', lo, hi)"
)
_KINDS = ("auto", "minmax", "window", "percentile")
_DEFAULT_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class IntensitySpec:
    """A parsed intensity mapping (build it with :func:`parse_intensity`).

    Attributes:
        kind: ``"auto"``, ``"minmax"``, ``"window"`` or ``"percentile"``.
        low: window low bound (image units, e.g. HU) or lower percentile; None for auto/minmax.
        high: window high bound or upper percentile; None for auto/minmax.
        preset: the :data:`samed.registry.CT_WINDOWS` name a window came from, else None.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"intensity kind {self.kind!r} is not one of {_KINDS}")
        if self.kind in ("window", "percentile"):
            lo, hi = self.low, self.high
            if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"intensity {self.kind} needs finite bounds; got ({lo}, {hi})")
            if not hi > lo:
                raise ValueError(
                    f"intensity {self.kind} ({lo:g}, {hi:g}): "
                    "the upper bound must exceed the lower one"
                )
            if self.kind == "percentile" and not (0.0 <= lo < hi <= 100.0):
                raise ValueError(
                    f"intensity percentile ({lo:g}, {hi:g}): "
                    "percentiles must satisfy 0 <= lo < hi <= 100"
                )

    @property
    def name(self) -> str:
        """Short description, part of the engine's embedding cache key: ``"auto"``,
        ``"minmax"``, ``"ct:abdomen"``, ``"window:-100:300"``, ``"percentile:0.5:99.5"``."""
        if self.kind in ("auto", "minmax"):
            return self.kind
        if self.preset is not None:
            return f"ct:{self.preset}"
        return f"{self.kind}:{self.low:g}:{self.high:g}"

    def setting(self) -> str | list[Any]:
        """The JSON value run records store (``samed segment``'s ``case.json``): the kind for
        auto/minmax, the preset name, ``"percentile"`` for the default percentiles, else
        ``[kind, low, high]``."""
        if self.kind in ("auto", "minmax"):
            return self.kind
        if self.preset is not None:
            return self.preset
        if self.kind == "percentile" and (self.low, self.high) == _DEFAULT_PERCENTILES:
            return "percentile"
        return [self.kind, self.low, self.high]

    def resolve(self, array: np.ndarray, modality: str = "") -> IntensitySpec:
        """The concrete spec for a volume: ``auto`` decided on ``array`` (any shape) and the
        DICOM ``modality`` (:func:`decide_intensity`), every other kind returned unchanged."""
        if self.kind != "auto":
            return self
        return decide_intensity(array, modality)[0]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Map ``array`` (any shape, typically (Z, Y, X)) to float32: [0, 1] for windows and
        percentiles, values unchanged for minmax.

        Raises:
            ValueError: for ``auto`` (call :meth:`resolve` first).
        """
        if self.kind == "minmax":
            return np.asarray(array, dtype=np.float32)
        if self.kind == "window":
            return apply_window(array, (float(self.low), float(self.high)))  # type: ignore[arg-type]
        if self.kind == "percentile":
            return percentile_scale(array, float(self.low), float(self.high))  # type: ignore[arg-type]
        raise ValueError("intensity 'auto' depends on the volume: call spec.resolve(array) first")


#: DICOM modalities that are not CT (their values are not Hounsfield units)
_NON_CT = ("MR", "MRI", "PT", "NM", "US", "XA", "CR", "DX", "MG", "OT")


def looks_like_ct(array: np.ndarray) -> tuple[bool, str]:
    """Whether a volume's values look like CT Hounsfield units, and why.

    CT in HU: air reaches about -1000 (values below -500), or, for window-clipped CT (e.g.
    BTCV's [-125, 275]), a negative floor between -1100 and -50 that many voxels sit on (air and
    fat clipped to the window's bottom), a top of at least 150 and most of the remaining voxels
    in the fat / soft-tissue range [-200, 200] HU. MR never has such a floor: raw MR signal
    starts at 0 (CHAOS T2 int16 0..1300), z-scored MR at a few units below 0, rescaled MR in
    [0, 1] (ACDC).

    Args:
        array: image of any shape (typically (Z, Y, X)).

    Returns:
        (is CT, a one-line reason naming the numbers it used).
    """
    values = np.asarray(array)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    if finite.size == 0:
        return False, "no finite voxel"
    if finite.size > 2_000_000:  # a strided sample is enough for the statistics
        finite = finite[:: finite.size // 2_000_000 + 1]
    lo, hi = float(finite.min()), float(finite.max())
    if lo < -500.0:
        return True, f"values reach {lo:g} (< -500: air in Hounsfield units)"
    span = hi - lo
    if not (-1100.0 <= lo <= -50.0 and hi >= 150.0 and span >= 200.0):
        return False, f"value range [{lo:g}, {hi:g}] has no Hounsfield-like negative floor"
    at_floor = float(np.mean(finite <= lo + 0.01 * span))
    inside = finite[finite > lo + 0.01 * span]
    soft = float(np.mean((inside >= -200.0) & (inside <= 200.0))) if inside.size else 0.0
    if at_floor >= 0.05 and soft >= 0.5:
        return True, (
            f"window-clipped CT: floor {lo:g} holds {100 * at_floor:.0f}% of the voxels and "
            f"{100 * soft:.0f}% of the rest lie in [-200, 200] HU (max {hi:g})"
        )
    return False, (
        f"value range [{lo:g}, {hi:g}]: floor holds {100 * at_floor:.0f}% of the voxels, "
        f"{100 * soft:.0f}% of the rest in [-200, 200]: not Hounsfield-like"
    )


def decide_intensity(array: np.ndarray, modality: str = "") -> tuple[IntensitySpec, str]:
    """What ``intensity="auto"`` applies to a volume, and why.

    Order: the DICOM ``modality`` when known (CT -> the abdomen window; MR and the other
    non-CT modalities -> percentiles 0.5 / 99.5, or unchanged for data already in [0, 1]),
    else the value distribution (:func:`looks_like_ct`; values in [0, 1] -> unchanged; else
    percentiles). An adapter's recorded preprocessing is applied before this is ever asked
    (:meth:`samed.engine.Session`).

    Returns:
        (the concrete spec, a one-line reason for ``case.json``).
    """
    mod = str(modality or "").strip().upper()
    values = np.asarray(array)
    if mod == "CT":
        return _preset("abdomen"), "DICOM modality CT: abdomen window"
    unit = False
    if values.size:
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        unit = lo >= 0.0 and hi <= 1.0
    if mod in _NON_CT:
        if unit:
            return IntensitySpec("minmax"), f"modality {mod}, values already in [0, 1]: unchanged"
        return IntensitySpec("percentile", *_DEFAULT_PERCENTILES), (
            f"modality {mod}: percentiles 0.5 / 99.5"
        )
    if unit:
        return IntensitySpec("minmax"), "modality unknown, values in [0, 1]: unchanged"
    ct, why = looks_like_ct(values)
    if ct:
        return _preset("abdomen"), f"modality unknown, CT by its values ({why}): abdomen window"
    return IntensitySpec("percentile", *_DEFAULT_PERCENTILES), (
        f"modality unknown, not CT by its values ({why}): percentiles 0.5 / 99.5"
    )


def _preset(name: str) -> IntensitySpec:
    p = CT_WINDOWS[name]
    return IntensitySpec("window", p.low, p.high, preset=name)


def _numbers(parts: Sequence[Any]) -> tuple[float, float] | None:
    try:
        lo, hi = (float(v) for v in parts)
    except (TypeError, ValueError):
        return None
    return lo, hi


def parse_intensity(spec: object, what: str = "intensity") -> IntensitySpec:
    """Parse any form of the grammar in this module's docstring.

    Args:
        spec: the value (an :class:`IntensitySpec` is returned as it is).
        what: the option's name for error messages (``"window"`` for ``samed segment``).

    Raises:
        ValueError: naming ``what``, the value and the allowed forms; or bounds that are not
            increasing (percentiles outside [0, 100]).
    """
    if isinstance(spec, IntensitySpec):
        return spec
    if spec is None:
        return IntensitySpec("minmax")
    pair: tuple[float, float] | None = None
    kind = "window"
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("auto", "minmax"):
            return IntensitySpec(text)
        if text == "percentile":
            return IntensitySpec("percentile", *_DEFAULT_PERCENTILES)
        name = text[3:] if text.startswith("ct:") else text
        if name in CT_WINDOWS:
            return _preset(name)
        head, _, rest = text.partition(":")
        if head in ("window", "percentile") and rest.count(":") == 1:
            kind, pair = head, _numbers(rest.split(":"))
        elif text.count(",") == 1:
            pair = _numbers(text.split(","))
    elif isinstance(spec, tuple | list):
        if len(spec) == 2 and not any(isinstance(v, str) for v in spec):
            pair = _numbers(spec)
        elif len(spec) == 3 and spec[0] in ("window", "percentile"):
            kind, pair = str(spec[0]), _numbers(spec[1:])
    if pair is None:
        raise ValueError(f"{what} {spec!r} is not one of the allowed forms: {INTENSITY_FORMS}")
    try:
        return IntensitySpec(kind, pair[0], pair[1])
    except ValueError as exc:
        raise ValueError(f"{what} {spec!r}: {exc}") from exc


# --------------------------------------------------------------------------- numpy scaling
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
