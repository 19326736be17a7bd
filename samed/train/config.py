"""Fine-tuning configuration: frozen dataclasses read from YAML (``configs/*.yaml``).

Every section validates itself in ``__post_init__`` and raises :class:`ValueError` naming the
field and the allowed values, so a bad YAML fails before any model is built. Unknown keys are
refused (a typo must not silently fall back to a default).

Example (``configs/acdc-cardiac-mri.yaml``)::

    name: acdc-cardiac-mri
    mode: automatic
    data: {root: ../shared/data/acdc, train_split: labeled_7, val_split: val}
    lora: {r: 4, alpha: 4}
    train: {iterations: 2000, batch_size: 16}
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..lora_config import LoraSettings

__all__ = [
    "refuse_quick_only",
    "ModelSection",
    "DataSection",
    "LoraSection",
    "AugmentSection",
    "PromptSection",
    "LossSection",
    "OptimSection",
    "TrainSection",
    "ValidationSection",
    "FinetuneConfig",
    "load_config",
    "config_from_dict",
]

MODES = ("automatic", "prompted")
DATA_FORMATS = ("auto", "msd", "folders", "pairs")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "poly", "constant")
DICE_CLASSES = ("all", "present")
DEVICES = ("auto", "cpu", "cuda")
KEEP = ("best", "last")


def _fail(section: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"config {section}.{name}={value!r} is invalid; allowed: {allowed}")


def _range(
    section: str, name: str, value: Any, lo: float, hi: float, closed_hi: bool = True
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and lo <= value and (value <= hi if closed_hi else value < hi)
    if not ok:
        _fail(section, name, value, f"a number in [{lo}, {hi}{']' if closed_hi else ')'}")


def _int_min(section: str, name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        _fail(section, name, value, f"an integer >= {lo}")


@dataclass(frozen=True)
class ModelSection:
    """Base model.

    Attributes:
        kind: a key of :data:`samed.registry.MODEL_KINDS` (``litemedsam`` default) or ``tiny``
            (the random test model of :func:`samed.model.build_tiny_model`).
        checkpoint: checkpoint path for kinds that need one.
    """

    kind: str = "litemedsam"
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        from ..registry import MODEL_KINDS

        allowed = sorted(MODEL_KINDS) + ["tiny"]
        if self.kind not in allowed:
            _fail("model", "kind", self.kind, ", ".join(allowed))


@dataclass(frozen=True)
class DataSection:
    """Where the labeled data is and how it is split.

    Attributes:
        root: dataset folder (``dataset.json`` MSD-style, or ``imagesTr/`` + ``labelsTr/``);
            relative paths are resolved against the current directory.
        format: ``auto`` (msd if dataset.json exists, else folders), ``msd``, ``folders`` or
            ``pairs`` (explicit ``cases`` below; DICOM series folders and DICOM SEG files work).
        train_split: split name that trains (``all`` for every case).
        val_split: split name that validates (None: no validation).
        cases: for ``pairs``: list of ``{image, label, split, z_range: [z0, z1)}`` entries
            (z_range optional, slice indices of the (Z, Y, X) array).
        labels: class remapping ``{new_id: {name: str, source: [old ids]}}``; None keeps the
            dataset's own labels.
        intensity: intensity mapping (see :func:`samed.engine.preprocess.resolve_intensity`):
            ``auto``, ``minmax``, a CT window name, ``[window, lo, hi]`` or
            ``[percentile, lo, hi]``.
        modality: ``CT``, ``MR`` or ``""`` (used by ``intensity: auto``).
        empty_slice_fraction: share of training samples drawn from slices without foreground
            (automatic mode; teaches the head to output background).
        licence: licence / provenance line written into the adapter metadata.
        label_source: ``expert`` or ``model`` (labels made by an algorithm), recorded.
        spacing: in-plane training spacing in mm (one number, or [row, column]): every slice is
            resampled to it and centred / cropped on a model-size canvas
            (:func:`samed.engine.preprocess.canvas_grid`), and ``Session.automatic`` does the
            same at inference (recorded in the adapter's metadata). None: native grids.
        slice_step: train on every ``slice_step``-th slice with foreground (and every
            ``4 * slice_step``-th slice without) of each training volume; 1 = all slices.
    """

    root: str = ""
    format: str = "auto"
    train_split: str = "train"
    val_split: str | None = "val"
    cases: tuple[dict[str, Any], ...] = ()
    labels: dict[int, dict[str, Any]] | None = None
    intensity: Any = "auto"
    modality: str = ""
    empty_slice_fraction: float = 0.05
    licence: str = ""
    label_source: str = "expert"
    spacing: Any = None
    slice_step: int = 1

    def __post_init__(self) -> None:
        if self.spacing is not None:
            from ..engine.preprocess import _pair

            try:
                object.__setattr__(self, "spacing", _pair(self.spacing, "data.spacing"))
            except ValueError:
                _fail("data", "spacing", self.spacing, "one or two positive numbers (mm) or null")
        _int_min("data", "slice_step", self.slice_step, 1)
        if not isinstance(self.root, str):
            _fail("data", "root", self.root, "a folder path string")
        if self.format not in DATA_FORMATS:
            _fail("data", "format", self.format, ", ".join(DATA_FORMATS))
        if self.format == "pairs":
            if not self.cases:
                _fail("data", "cases", self.cases, "a non-empty list when format is 'pairs'")
            for i, c in enumerate(self.cases):
                if not isinstance(c, dict) or "image" not in c or "label" not in c:
                    _fail("data", f"cases[{i}]", c, "a mapping with image, label (and split)")
                zr = c.get("z_range")
                if zr is not None and (len(zr) != 2 or int(zr[0]) >= int(zr[1])):
                    _fail("data", f"cases[{i}].z_range", zr, "[z0, z1) with z0 < z1")
        elif not self.root:
            _fail("data", "root", self.root, "a dataset folder")
        object.__setattr__(self, "cases", tuple(dict(c) for c in self.cases))
        if self.labels is not None:
            fixed: dict[int, dict[str, Any]] = {}
            for k, v in self.labels.items():
                if not isinstance(v, dict) or "name" not in v or "source" not in v:
                    _fail("data", f"labels[{k}]", v, "{name: str, source: [label ids]}")
                try:
                    key = int(k)
                    src = [int(s) for s in v["source"]]
                except (TypeError, ValueError):
                    _fail("data", f"labels[{k}]", v, "integer ids and source lists")
                if key < 1:
                    _fail("data", f"labels[{k}]", k, "ids >= 1 (0 is background)")
                fixed[key] = {"name": str(v["name"]), "source": src}
            if sorted(fixed) != list(range(1, len(fixed) + 1)):
                _fail("data", "labels", sorted(fixed), "consecutive ids 1..N")
            object.__setattr__(self, "labels", fixed)
        if isinstance(self.intensity, list):
            object.__setattr__(self, "intensity", tuple(self.intensity))
        _range("data", "empty_slice_fraction", self.empty_slice_fraction, 0.0, 1.0, False)
        if self.label_source not in ("expert", "model", "semi"):
            _fail("data", "label_source", self.label_source, "expert, model, semi")


#: LoRA on the image encoder: the very dataclass whose fields (and validation) LoRA adapters
#: use, :class:`samed.lora.LoraSettings` (r, alpha, dropout, target_modules, projections,
#: train_decoder); :class:`samed.lora.LoraConfig` adds the mode and class count of the run.
LoraSection = LoraSettings


@dataclass(frozen=True)
class AugmentSection:
    """MONAI 2D augmentation applied to each training slice (image and label together).

    Attributes:
        enabled: master switch.
        flip_prob: probability of a flip along each in-plane axis.
        affine_prob: probability of the random affine (rotation + scale + shift).
        rotate_deg: rotation range +- degrees.
        scale: (min, max) zoom factor.
        shift_frac: translation range as a fraction of the slice size.
        gamma_prob: probability of a random gamma (contrast) change.
        gamma: (min, max) gamma.
        noise_prob: probability of additive Gaussian noise.
        noise_std: noise standard deviation (intensity units after the intensity mapping).
    """

    enabled: bool = True
    flip_prob: float = 0.0
    affine_prob: float = 0.8
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.15)
    shift_frac: float = 0.05
    gamma_prob: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.2
    noise_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("flip_prob", "affine_prob", "gamma_prob", "noise_prob"):
            _range("augment", name, getattr(self, name), 0.0, 1.0)
        _range("augment", "rotate_deg", self.rotate_deg, 0.0, 180.0)
        _range("augment", "shift_frac", self.shift_frac, 0.0, 0.5)
        _range("augment", "noise_std", self.noise_std, 0.0, 10.0)
        for name, lo, hi in (("scale", 0.1, 10.0), ("gamma", 0.05, 20.0)):
            v = tuple(getattr(self, name))
            if len(v) != 2 or not (lo <= v[0] <= v[1] <= hi):
                _fail("augment", name, v, f"[min, max] with {lo} <= min <= max <= {hi}")
            object.__setattr__(self, name, (float(v[0]), float(v[1])))


@dataclass(frozen=True)
class PromptSection:
    """Prompt sampling for ``prompted`` mode (MedSAM-style).

    Attributes:
        box_margin: (min, max) pixels (model input) added to each side of the label's box.
        box_shift: maximum random shift of each box edge in model-input pixels.
        point_prob: probability that positive points are added to the box.
        max_points: at most this many positive points (drawn inside the object).
    """

    box_margin: tuple[float, float] = (0.0, 5.0)
    box_shift: float = 3.0
    point_prob: float = 0.0
    max_points: int = 1

    def __post_init__(self) -> None:
        m = tuple(self.box_margin)
        if len(m) != 2 or not (0 <= m[0] <= m[1] <= 100):
            _fail("prompt", "box_margin", m, "[min, max] pixels with 0 <= min <= max <= 100")
        object.__setattr__(self, "box_margin", (float(m[0]), float(m[1])))
        _range("prompt", "box_shift", self.box_shift, 0.0, 100.0)
        _range("prompt", "point_prob", self.point_prob, 0.0, 1.0)
        _int_min("prompt", "max_points", self.max_points, 1)


@dataclass(frozen=True)
class LossSection:
    """Dice + cross-entropy on the low-resolution logits (SAMed: 0.8 Dice + 0.2 CE).

    Attributes:
        dice_weight: weight of the soft Dice loss (foreground classes).
        ce_weight: weight of cross-entropy (automatic) / binary CE (prompted).
        dice_classes: which foreground classes the batch-pooled soft Dice is averaged over:
            ``all`` (default, every class: a class absent from the batch is pushed towards never
            being predicted, which starves rare classes such as the adrenal glands) or
            ``present`` (only the classes with at least one target voxel in the batch; a batch
            with none gets cross-entropy only).
    """

    dice_weight: float = 0.8
    ce_weight: float = 0.2
    dice_classes: str = "all"

    def __post_init__(self) -> None:
        _range("loss", "dice_weight", self.dice_weight, 0.0, 100.0)
        _range("loss", "ce_weight", self.ce_weight, 0.0, 100.0)
        if self.dice_weight + self.ce_weight <= 0:
            _fail("loss", "dice_weight+ce_weight", 0, "a positive sum")
        if self.dice_classes not in DICE_CLASSES:
            _fail("loss", "dice_classes", self.dice_classes, ", ".join(DICE_CLASSES))

    def loss_fn_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`samed.train.loop.loss_fn` for this section."""
        return {
            "dice_w": self.dice_weight,
            "ce_w": self.ce_weight,
            "dice_classes": self.dice_classes,
        }


@dataclass(frozen=True)
class OptimSection:
    """Optimiser and learning-rate schedule.

    Attributes:
        name: ``adamw`` or ``sgd`` (momentum 0.9).
        lr: peak learning rate.
        weight_decay: decoupled weight decay (adamw) / L2 (sgd).
        warmup: linear warm-up iterations.
        schedule: ``cosine`` (to 0), ``poly`` (power 0.9, SAMed) or ``constant`` after warm-up.
        grad_clip: clip the global gradient norm (0 disables).
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    schedule: str = "cosine"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            _fail("optim", "name", self.name, ", ".join(OPTIMIZERS))
        if self.schedule not in SCHEDULES:
            _fail("optim", "schedule", self.schedule, ", ".join(SCHEDULES))
        _range("optim", "lr", self.lr, 1e-9, 10.0)
        _range("optim", "weight_decay", self.weight_decay, 0.0, 10.0)
        _int_min("optim", "warmup", self.warmup, 0)
        _range("optim", "grad_clip", self.grad_clip, 0.0, 1e6)


@dataclass(frozen=True)
class TrainSection:
    """The loop.

    Attributes:
        iterations: optimiser steps.
        batch_size: slices (automatic) or prompts (prompted) per step.
        seed: seeds sampling, augmentation and initialisation; a run is reproducible from it.
        amp: bf16/fp16 autocast on CUDA (ignored on CPU, where bf16 is slow).
        cache_stages: CPU speed option: run the first N TinyViT stages (patch embedding +
            ``layers[:N]``) once per slice and augmented copy, cache their features, and train
            only the later stages' LoRA + the decoder. 0 = no cache (augmentation on the fly).
        cache_copies: augmented copies per slice when caching (copy 0 is un-augmented).
        workers: data-loading worker processes (0 = in the main process).
        checkpoint_interval: write ``checkpoint.pt`` every this many steps (and at the end).
        log_interval: print a line every this many steps.
        device: ``auto``, ``cpu`` or ``cuda``.
        max_minutes: stop (validate, checkpoint, export) once training has run this long;
            None = no limit.
        ema: decay of an exponential moving average of the trained weights, updated after
            every optimiser step with decay ``min(ema, (1 + t) / (10 + t))`` (``t``: steps
            done); validation and the saved adapter then use the averaged weights. A number in
            [0, 1); 0 = off. Read by the quick recipe (:mod:`samed.train.quick`) only;
            :func:`samed.train.loop.finetune` refuses a non-zero value.
    """

    iterations: int = 2000
    batch_size: int = 8
    seed: int = 0
    amp: bool = True
    cache_stages: int = 0
    cache_copies: int = 4
    workers: int = 0
    checkpoint_interval: int = 100
    log_interval: int = 20
    device: str = "auto"
    max_minutes: float | None = None
    ema: float = 0.0

    def __post_init__(self) -> None:
        _int_min("train", "iterations", self.iterations, 1)
        _int_min("train", "batch_size", self.batch_size, 1)
        _int_min("train", "seed", self.seed, 0)
        _int_min("train", "cache_stages", self.cache_stages, 0)
        _int_min("train", "cache_copies", self.cache_copies, 1)
        _int_min("train", "workers", self.workers, 0)
        _int_min("train", "checkpoint_interval", self.checkpoint_interval, 1)
        _int_min("train", "log_interval", self.log_interval, 1)
        if self.device not in DEVICES:
            _fail("train", "device", self.device, ", ".join(DEVICES))
        if self.max_minutes is not None:
            _range("train", "max_minutes", self.max_minutes, 0.0, 1e6)
        _range("train", "ema", self.ema, 0.0, 1.0, closed_hi=False)


@dataclass(frozen=True)
class ValidationSection:
    """Validation during training (3D Dice per volume, mean over classes and volumes).

    Attributes:
        interval: validate every this many steps (and at the end); 0 = only at the end.
        patience: stop after this many validations without improvement (0 = never).
        limit: validate on at most this many volumes (None = all).
        box_margin: prompted mode: pixels added to each side of the ground-truth box
            (slice pixels).
        keep: which weights become the adapter: ``best`` (the best validation score so far;
            what a stop keeps) or ``last`` (the final weights, validated once more at the end).
            Read by the quick recipe (:mod:`samed.train.quick`) only;
            :func:`samed.train.loop.finetune` always keeps the best and refuses ``last``.
    """

    interval: int = 200
    patience: int = 0
    limit: int | None = None
    box_margin: float = 0.0
    keep: str = "best"

    def __post_init__(self) -> None:
        _int_min("validation", "interval", self.interval, 0)
        _int_min("validation", "patience", self.patience, 0)
        if self.limit is not None:
            _int_min("validation", "limit", self.limit, 1)
        _range("validation", "box_margin", self.box_margin, 0.0, 100.0)
        if self.keep not in KEEP:
            _fail("validation", "keep", self.keep, ", ".join(KEEP))


@dataclass(frozen=True)
class FinetuneConfig:
    """A complete fine-tuning run (one YAML file).

    Attributes:
        name: adapter name (the exported folder's name).
        description: one line for ``samed adapters list`` and metadata.json.
        intended_use: metadata.json ``intended_use``.
        mode: ``automatic`` (one output per class, no prompt) or ``prompted`` (box -> mask).
    """

    name: str
    mode: str = "automatic"
    description: str = ""
    intended_use: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=lambda: DataSection(root="."))
    lora: LoraSection = field(default_factory=LoraSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    prompt: PromptSection = field(default_factory=PromptSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def __post_init__(self) -> None:
        from ..paths import safe_name

        try:
            safe_name(self.name, "name (the adapter's folder name)")
        except ValueError as exc:
            raise ValueError(f"config {exc}") from None
        if self.mode not in MODES:
            _fail("", "mode", self.mode, ", ".join(MODES))

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready dict (tuples as lists) that :func:`config_from_dict` reads back."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        return plain(dataclasses.asdict(self))


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "lora": LoraSection,
    "augment": AugmentSection,
    "prompt": PromptSection,
    "loss": LossSection,
    "optim": OptimSection,
    "train": TrainSection,
    "validation": ValidationSection,
}


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config section {where!r} must be a mapping; got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(
            f"config section {where!r}: unknown keys {unknown}; allowed: {sorted(names)}"
        )
    kwargs = dict(raw)
    for k in ("cases", "projections", "scale", "gamma", "box_margin"):
        if k in kwargs and isinstance(kwargs[k], list):
            kwargs[k] = tuple(kwargs[k])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"config section {where!r}: {exc}") from exc


def config_from_dict(raw: dict[str, Any]) -> FinetuneConfig:
    """Build and validate a :class:`FinetuneConfig` from a plain dict (parsed YAML).

    Raises:
        ValueError: unknown sections or keys, wrong types or values (names the field).
    """
    if not isinstance(raw, dict):
        raise ValueError(f"a fine-tuning config must be a mapping; got {type(raw).__name__}")
    top = {"name", "mode", "description", "intended_use", *_SECTIONS}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}; allowed: {sorted(top)}")
    if "name" not in raw:
        raise ValueError("config: 'name' (the adapter name) is required")
    kwargs: dict[str, Any] = {
        k: raw[k] for k in ("name", "mode", "description", "intended_use") if k in raw
    }
    for key, cls in _SECTIONS.items():
        kwargs[key] = _build(cls, raw.get(key), key)
    return FinetuneConfig(**kwargs)


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """Read a YAML fine-tuning config.

    Args:
        path: the YAML file.
        overrides: dotted keys -> values applied after reading (e.g. ``{"train.iterations": 10}``).

    Raises:
        ValueError: unreadable YAML or an invalid config (the message names the file).
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from exc
    raw = raw or {}
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    try:
        return config_from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def refuse_quick_only(cfg: FinetuneConfig) -> None:
    """Raise ValueError when a :class:`FinetuneConfig` sets a key only the
    quick recipe reads (``train.ema`` != 0, ``validation.keep`` != ``best``)."""
    if cfg.train.ema:
        raise ValueError(
            f"config train.ema={cfg.train.ema!r} is read only by the quick recipe "
            "(samed.train.quick); allowed here: 0"
        )
    if cfg.validation.keep != "best":
        raise ValueError(
            f"config validation.keep={cfg.validation.keep!r} is read only by the quick recipe "
            "(samed.train.quick); allowed here: best"
        )
