"""Fine-tuning: LoRA adapters trained on labeled volumes (``samed finetune``).

Modules: :mod:`~samed.train.config` (the YAML config as frozen dataclasses),
:mod:`~samed.train.data` (volumes -> slices -> augmented batches), :mod:`~samed.train.loop`
(:func:`finetune`, :func:`validate`), :mod:`~samed.train.report` (adapter metadata, training
curve) and :mod:`~samed.train.cli` (``samed finetune``, ``python -m samed.train``; it imports
the loop, never the other way round).

Python::

    from samed.train import finetune, load_config
    result = finetune(load_config("configs/acdc-cardiac-mri.yaml"), out="runs/acdc")
"""

from __future__ import annotations

from .config import (
    AugmentSection,
    DataSection,
    FinetuneConfig,
    LoraSection,
    LossSection,
    ModelSection,
    OptimSection,
    PromptSection,
    TrainSection,
    ValidationSection,
    config_from_dict,
    load_config,
)
from .data import Augmenter, SliceSet, VolumeCase, load_cases, prepare_targets, sample_rng
from .loop import FinetuneResult, build_base_model, finetune, loss_fn, lr_factor, validate
from .report import adapter_metadata, plot_curve

__all__ = [
    "AugmentSection",
    "Augmenter",
    "DataSection",
    "FinetuneConfig",
    "FinetuneResult",
    "LoraSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "PromptSection",
    "SliceSet",
    "TrainSection",
    "ValidationSection",
    "VolumeCase",
    "adapter_metadata",
    "build_base_model",
    "config_from_dict",
    "finetune",
    "load_cases",
    "load_config",
    "loss_fn",
    "lr_factor",
    "plot_curve",
    "prepare_targets",
    "sample_rng",
    "validate",
]
