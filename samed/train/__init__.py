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

from .._lazy import lazy_exports

# imported on first use: `samed finetune --help` / `samed evaluate --help` stay torch-free
_LAZY = {
    "AugmentSection": ".config",
    "Augmenter": ".data",
    "DataSection": ".config",
    "FinetuneConfig": ".config",
    "FinetuneResult": ".loop",
    "LoraSection": ".config",
    "LossSection": ".config",
    "ModelSection": ".config",
    "OptimSection": ".config",
    "PromptSection": ".config",
    "SliceSet": ".data",
    "TrainSection": ".config",
    "ValidationSection": ".config",
    "VolumeCase": ".data",
    "adapter_metadata": ".report",
    "build_base_model": ".model",
    "config_from_dict": ".config",
    "finetune": ".loop",
    "load_cases": ".data",
    "load_config": ".config",
    "loss_fn": ".loop",
    "lr_factor": ".loop",
    "plot_curve": ".report",
    "prepare_targets": ".data",
    "sample_rng": ".data",
    "validate": ".loop",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
