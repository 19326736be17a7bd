"""samed: medical image segmentation with Segment Anything and LoRA adapters.

The public API is imported lazily so that ``import samed`` stays cheap (no torch, never napari
or Qt) and ``samed.registry`` facts can be read without loading a model.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "load_model": "samed.model",
    "AdapterState": "samed.model",
    "build_model": "samed.model",
    "build_tiny_model": "samed.model",
    "SamModel": "samed.model",
    "CheckpointError": "samed.model",
    "apply_lora": "samed.lora",
    "LoraConfig": "samed.lora",
    "save_adapter": "samed.lora",
    "load_adapter": "samed.lora",
    "AdapterError": "samed.lora",
    "Session": "samed.engine",
    "PropagationStep": "samed.engine",
    "Volume": "samed.io",
    "load_volume": "samed.io",
    "save_nifti": "samed.io",
    "save_dicom_seg": "samed.io",
    "MODEL_KINDS": "samed.registry",
    "CT_WINDOWS": "samed.registry",
    "find_adapters": "samed.registry",
    "resolve_adapter": "samed.registry",
    "POSTPROCESS_CHOICES": "samed.registry",
    "PRECISIONS": "samed.registry",
    "IntensitySpec": "samed.intensity",
    "parse_intensity": "samed.intensity",
}

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
