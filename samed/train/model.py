"""The model side of fine-tuning: the base model, LoRA attached as the config says, the frozen
encoder stages split off for caching (:func:`_encoder_prefix` / :func:`_encoder_suffix`), and
which parameters train.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .config import FinetuneConfig

__all__ = ["build_base_model"]


def build_base_model(cfg: FinetuneConfig, device: torch.device) -> Any:
    """The configured base model (``tiny``: the random test model) on ``device``."""
    from ..model import build_tiny_model, load_model

    if cfg.model.kind == "tiny":
        return build_tiny_model("tinyvit", seed=cfg.train.seed, device=str(device))
    # not optimised: inference fusion (Conv-BN folding) would freeze what training updates;
    # decoder-only training (every encoder stage cached) caches the inference path's embeddings
    from ..registry import MODEL_KINDS

    spec = MODEL_KINDS.get(cfg.model.kind)
    frozen = spec is not None and cfg.train.cache_stages >= len(spec.encoder_depths) > 1
    return load_model(cfg.model.kind, cfg.model.checkpoint, device=str(device), optimize=frozen)


def _attach_lora(model: Any, cfg: FinetuneConfig, num_classes: int) -> None:
    from ..lora import LoraConfig, apply_lora

    lc = LoraConfig(
        **{f.name: getattr(cfg.lora, f.name) for f in dataclasses.fields(cfg.lora)},
        mode=cfg.mode,
        num_classes=num_classes if cfg.mode == "automatic" else 0,
    )
    apply_lora(model, lc)
    k = cfg.train.cache_stages
    if k:
        if model.spec.family != "tinyvit":
            raise ValueError("train.cache_stages needs a TinyViT encoder (litemedsam or tiny)")
        if k >= len(model.image_encoder.layers):
            # decoder only: the whole encoder (neck included) is cached, so its LoRA layers
            # never see a gradient; they are frozen at their zero initialisation (B = 0)
            from ..lora import LoRAQKV

            for m in model.modules():
                if isinstance(m, LoRAQKV):
                    for prm in [*m.lora_A.parameters(), *m.lora_B.parameters()]:
                        prm.requires_grad_(False)
            return
        early = [t for t in model.adapter.targets if _stage_of(t) is not None and _stage_of(t) < k]
        if early:
            raise ValueError(
                f"train.cache_stages={k} caches stages 0..{k - 1} but lora.target_modules adapts "
                f"{early[:3]}; restrict the targets to layers.{k} and later"
            )


def _stage_of(name: str) -> int | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _encoder_prefix(model: Any, images: torch.Tensor, k: int) -> torch.Tensor:
    """Frozen TinyViT stages: patch embedding + ``layers[:k]`` of (B, 3, S, S) inputs; with
    ``k >= len(layers)`` the whole encoder and neck: (B, 256, 64, 64) embeddings."""
    enc = model.image_encoder
    if k >= len(enc.layers):
        return model.encode(images)
    x = enc.patch_embed(images)
    for layer in enc.layers[:k]:
        x = layer(x)
    return x


def _encoder_suffix(model: Any, feats: torch.Tensor, k: int) -> torch.Tensor:
    """The remaining TinyViT stages + neck: cached features -> (B, 256, 64, 64) embeddings."""
    enc = model.image_encoder
    if k >= len(enc.layers):
        return feats.float()
    x = feats
    for layer in enc.layers[k:]:
        x = layer(x)
    b, n, c = x.shape
    side = int(round(math.sqrt(n)))
    return enc.neck(x.view(b, side, side, c).permute(0, 3, 1, 2))


def _set_train_mode(model: Any) -> None:
    """Frozen parts stay in eval (BatchNorm statistics fixed); LoRA dropout and the decoder
    train."""
    from ..lora import LoRAQKV

    model.eval()
    model.mask_decoder.train()
    for m in model.modules():
        if isinstance(m, LoRAQKV):
            m.train()


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
