"""The LoRA settings, once: the schema of ``adapter_config.json`` and of a fine-tuning config's
``lora`` section (peft's ``LoraConfig`` plays both roles the same way). Torch-free, so that
reading a config or an adapter's JSON (``samed finetune --help``, ``samed info``) loads no torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "ADAPTER_METADATA",
    "AdapterError",
    "read_orientation",
    "read_spacing",
    "LoraSettings",
    "LoraConfig",
    "config_as_dict",
    "remove_adapter_folder",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_METADATA = "metadata.json"
_PROJECTIONS = ("q", "k", "v")
_MODES = ("prompted", "automatic")


class AdapterError(ValueError):
    """An adapter folder that cannot be used with this model (names the file and the reason)."""


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA hyper-parameters: the fine-tuning config's ``lora:`` section is this class
    (:class:`samed.train.LoraSection`), and :class:`LoraConfig` adds what the run decides.

    Attributes:
        r: rank of the low-rank update (>= 1).
        alpha: scaling numerator; the update is ``(alpha / r) * B @ A``.
        dropout: dropout on the LoRA branch input during training, in [0, 1).
        target_modules: regular expression matched (``re.fullmatch``) against module paths of
            the fused ``qkv`` Linear layers to adapt. LiteMedSAM's are
            ``image_encoder.layers.{1,2,3}.blocks.N.attn.qkv``.
        projections: which of q, k, v get an update (SAMed: q and v).
        train_decoder: train the mask decoder in full (saved with the adapter).

    Raises:
        ValueError: naming the field (``lora.<name>``) and the allowed values.
    """

    r: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: str = r"image_encoder\..*\.attn\.qkv"
    projections: tuple[str, ...] = ("q", "v")
    train_decoder: bool = True

    def __post_init__(self) -> None:
        def number(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool)

        def fail(name: str, value: Any, allowed: str) -> None:
            raise ValueError(f"lora.{name}={value!r} is invalid; allowed: {allowed}")

        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            fail("r", self.r, "a LoRA rank: an integer >= 1")
        if not (number(self.alpha) and 1e-6 <= self.alpha <= 1e6):
            fail("alpha", self.alpha, "a number in [1e-06, 1000000.0]")
        if not (number(self.dropout) and 0.0 <= self.dropout < 1.0):
            fail("dropout", self.dropout, "a number in [0.0, 1.0)")
        if not isinstance(self.target_modules, str):
            fail("target_modules", self.target_modules, "a regular expression string")
        try:
            re.compile(self.target_modules)
        except re.error as exc:
            fail("target_modules", self.target_modules, f"a valid regular expression ({exc})")
        proj = tuple(self.projections)
        if not proj or any(p not in _PROJECTIONS for p in proj):
            fail("projections", self.projections, "a non-empty subset of q, k, v")
        object.__setattr__(self, "projections", proj)
        if not isinstance(self.train_decoder, bool):
            fail("train_decoder", self.train_decoder, "true or false")


@dataclass(frozen=True)
class LoraConfig(LoraSettings):
    """How LoRA is applied: the :class:`LoraSettings` fields (r, alpha, dropout,
    target_modules, projections, train_decoder; validated there) plus:

    Attributes:
        mode: ``prompted`` (box/points -> one binary mask, MedSAM-style) or ``automatic``
            (no prompt, one output per class, SAMed-style).
        num_classes: number of output classes incl. background (automatic mode only, >= 2).
        train_prompt_encoder: train the prompt encoder in full (saved with the adapter).
        decoder_r: rank of LoRA on the mask decoder's Linear layers (0: none; see
            :mod:`samed.lora_decoder`). With ``target_modules=""`` the image encoder is left as
            is (the base model's embeddings and their cache stay valid).
        decoder_alpha: scaling numerator of the decoder LoRA (update ``decoder_alpha /
            decoder_r * B @ A``).
        decoder_target_modules: regular expression (``re.fullmatch``) over the decoder's Linear
            paths relative to the decoder, e.g. ``transformer\\..*_proj``.
        decoder_full_parameters: regular expression over decoder parameter paths trained and
            saved in full besides the LoRA (e.g. ``iou_token\\..*|mask_tokens\\..*``; "" none).
    """

    mode: str = "prompted"
    num_classes: int = 0
    train_prompt_encoder: bool = False
    decoder_r: int = 0
    decoder_alpha: float = 0.0
    decoder_target_modules: str = ""
    decoder_full_parameters: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in _MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {_MODES}")
        if self.mode == "automatic" and self.num_classes < 2:
            raise ValueError(
                f"automatic mode needs num_classes >= 2 (background included); got {self.num_classes}"
            )
        if (
            not isinstance(self.decoder_r, int)
            or isinstance(self.decoder_r, bool)
            or self.decoder_r < 0
        ):
            raise ValueError(
                f"decoder_r={self.decoder_r!r} must be an integer >= 0 (0: no decoder LoRA)"
            )
        if self.decoder_r and not self.decoder_target_modules:
            raise ValueError("decoder_r > 0 needs decoder_target_modules (a regular expression)")
        for name in ("decoder_target_modules", "decoder_full_parameters"):
            try:
                re.compile(getattr(self, name))
            except (re.error, TypeError) as exc:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} must be a regular expression ({exc})"
                ) from None
        if self.decoder_r and self.decoder_alpha <= 0:
            object.__setattr__(self, "decoder_alpha", float(self.decoder_r))

    @property
    def decoder_scaling(self) -> float:
        return float(self.decoder_alpha) / self.decoder_r if self.decoder_r else 0.0

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r


def config_as_dict(config: LoraConfig) -> dict[str, Any]:
    """The config as a JSON-ready dict."""
    d = asdict(config)
    d["projections"] = list(config.projections)
    return d


def remove_adapter_folder(folder: Path) -> None:
    """Remove an adapter folder's own files, then the (then empty) folder; anything else in it
    makes ``rmdir`` fail, so nothing a user put there is ever deleted."""
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_METADATA):
        (folder / name).unlink(missing_ok=True)
    folder.rmdir()


def read_spacing(folder: Path) -> tuple[float, float] | None:
    """An adapter folder's metadata.json's ``preprocessing.spacing`` as (row, column) mm, or None."""
    path = folder / ADAPTER_METADATA
    meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    pre = meta.get("preprocessing") if isinstance(meta, dict) else None
    value = pre.get("spacing") if isinstance(pre, dict) else None
    if value is None:
        return None
    try:
        sp = [float(v) for v in (value if isinstance(value, list) else [value])] * 2
    except (TypeError, ValueError):
        sp = []
    if len(sp) not in (2, 4) or not all(math.isfinite(v) and v > 0 for v in sp):
        raise AdapterError(
            f"{path}: 'preprocessing.spacing' must be one or two positive numbers (mm); "
            f"got {value!r}"
        )
    return (sp[0], sp[1]) if len(sp) == 4 else (sp[0], sp[0])


def read_orientation(folder: Path) -> str | None:
    """An adapter folder's metadata.json's ``preprocessing.orientation`` (axis codes of the
    training volumes' (x, y, z) voxel axes, e.g. ``"LAS"``), or None when not recorded."""
    from .engine.orientation import check_orientation

    path = folder / ADAPTER_METADATA
    meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    pre = meta.get("preprocessing") if isinstance(meta, dict) else None
    value = pre.get("orientation") if isinstance(pre, dict) else None
    if value is None:
        return None
    try:
        return check_orientation(value, f"{path}: 'preprocessing.orientation'")
    except ValueError as exc:
        raise AdapterError(str(exc)) from exc
