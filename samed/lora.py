"""LoRA adapters on the image encoder's attention (SAMed-style), saved as safetensors + JSON
(or on the mask decoder only, encoder untouched: :mod:`samed.lora_decoder`).

An adapter is a folder::

    adapter_model.safetensors   LoRA A/B matrices keyed by full module path, plus the prompt
                                encoder and mask decoder weights trained with them
    adapter_config.json         rank, alpha, dropout, targets, mode, base model kind + SHA-256,
                                labels, samed version (sorted, indented)
    metadata.json               intended use, labels, preprocessing, spacing, training data,
                                metrics, licence (MONAI-bundle style)

Loading never unpickles anything, refuses a base-model mismatch, unknown or missing keys and
wrong shapes, and names the file and the offending keys.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lora_config import (
    _PROJECTIONS,
    ADAPTER_CONFIG,
    ADAPTER_METADATA,
    ADAPTER_WEIGHTS,
    AdapterError,
    LoraConfig,
    LoraSettings,
    read_orientation,
    read_spacing,
    remove_adapter_folder,
)
from .lora_decoder import DECODER_FIELDS, apply_decoder_lora, decoder_full_parameters
from .model.adapter import AdapterState
from .model.sam import SamModel
from .paths import swap_in_folder

__all__ = [
    "AdapterError",
    "AdapterState",
    "LoraConfig",
    "LoraSettings",
    "LoRAQKV",
    "apply_lora",
    "make_automatic_decoder",
    "save_adapter",
    "load_adapter",
    "remove_adapter",
    "merge_adapter",
    "unmerge_adapter",
    "trainable_parameters",
    "read_adapter_config",
]


def _qkv_layout(attn: nn.Module, qkv: nn.Linear) -> dict[str, torch.Tensor]:
    """Output-channel indices of q, k and v inside a fused qkv Linear.

    SAM ViT: [q (all heads) | k | v]. TinyViT: per head [q (key_dim) | k (key_dim) | v (d)].
    """
    out = qkv.out_features
    if hasattr(attn, "key_dim") and hasattr(attn, "d"):  # TinyViT Attention
        kd, d, nh = int(attn.key_dim), int(attn.d), int(attn.num_heads)
        per_head = 2 * kd + d
        if per_head * nh != out:
            raise ValueError(f"unexpected TinyViT qkv width {out} for {nh} heads of {per_head}")
        base = torch.arange(nh) * per_head
        parts = {
            "q": (base[:, None] + torch.arange(kd)).reshape(-1),
            "k": (base[:, None] + kd + torch.arange(kd)).reshape(-1),
            "v": (base[:, None] + 2 * kd + torch.arange(d)).reshape(-1),
        }
        return parts
    if out % 3:
        raise ValueError(f"qkv width {out} is not divisible by 3")
    dim = out // 3
    return {p: torch.arange(i * dim, (i + 1) * dim) for i, p in enumerate(_PROJECTIONS)}


class LoRAQKV(nn.Module):
    """A fused qkv Linear with low-rank updates on some of its q/k/v output channels.

    ``y = W x + b + scaling * scatter_p(B_p A_p dropout(x))`` for each projection p.
    The base Linear is frozen; ``lora_A[p]`` (r x in) starts Kaiming-uniform and ``lora_B[p]``
    (|p| x r) starts at zero, so a fresh adapter leaves outputs unchanged.
    """

    def __init__(
        self, base: nn.Linear, layout: dict[str, torch.Tensor], config: LoraConfig
    ) -> None:
        super().__init__()
        self.base = base
        self.scaling = config.scaling
        self.projections = config.projections
        self.merged = False
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        for p in config.projections:
            idx = layout[p]
            self.register_buffer(f"index_{p}", idx.clone().to(base.weight.device), persistent=False)
            a = nn.Linear(base.in_features, config.r, bias=False)
            b = nn.Linear(config.r, len(idx), bias=False)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            self.lora_A[p] = a.to(base.weight.device, base.weight.dtype)
            self.lora_B[p] = b.to(base.weight.device, base.weight.dtype)
        for prm in self.base.parameters():
            prm.requires_grad_(False)

    def delta_weight(self, p: str) -> torch.Tensor:
        """(|p|, in) weight update for projection p."""
        return (self.lora_B[p].weight @ self.lora_A[p].weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        xd = self.dropout(x)
        for p in self.projections:
            delta = self.lora_B[p](self.lora_A[p](xd)) * self.scaling
            out = out.index_add(-1, getattr(self, f"index_{p}"), delta.to(out.dtype))
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (the original is kept for an exact unmerge)."""
        if not self.merged:
            self._unmerged_weight = self.base.weight.detach().clone()
            for p in self.projections:
                self.base.weight.index_add_(0, getattr(self, f"index_{p}"), self.delta_weight(p))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit."""
        if self.merged:
            self.base.weight.copy_(self._unmerged_weight)
            del self._unmerged_weight
            self.merged = False


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def _keep_base_parts(model: SamModel) -> None:
    if model.base_parts is None:
        model.base_parts = {
            "mask_decoder": copy.deepcopy(model.mask_decoder).cpu(),
            "prompt_encoder": copy.deepcopy(model.prompt_encoder).cpu(),
        }


def make_automatic_decoder(decoder: nn.Module, num_classes: int) -> nn.Module:
    """A SAMed-style decoder with ``num_classes`` mask outputs, initialised from ``decoder``.

    The transformer and upscaling are copied; each class token and its hypernetwork MLP start
    from the pretrained single-mask token (plus small noise so classes can separate).
    Call with ``multimask_output=True``: output channel c is class c's logit.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2 (background included)")
    new = copy.deepcopy(decoder)
    n_tokens = num_classes + 1
    dim = decoder.transformer_dim
    new.num_multimask_outputs = num_classes
    new.num_mask_tokens = n_tokens
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tok = nn.Embedding(n_tokens, dim).to(decoder.mask_tokens.weight.device)
        base = decoder.mask_tokens.weight[0]
        noise = torch.randn(n_tokens, dim, generator=gen).to(base.device) * 0.02 * base.std()
        tok.weight.copy_(base[None, :] + noise)
        new.mask_tokens = tok
        new.output_hypernetworks_mlps = nn.ModuleList(
            [copy.deepcopy(decoder.output_hypernetworks_mlps[0]) for _ in range(n_tokens)]
        )
        head = new.iou_prediction_head
        last = head.layers[-1]
        new_last = nn.Linear(last.in_features, n_tokens).to(last.weight.device)
        head.layers[-1] = new_last
    return new


def apply_lora(model: SamModel, config: LoraConfig | None = None) -> SamModel:
    """Inject LoRA into ``model`` in place and set which parameters train.

    Every ``qkv`` Linear whose module path fully matches ``config.target_modules`` is wrapped
    in :class:`LoRAQKV`. All base weights are frozen; LoRA matrices train, and the mask decoder
    / prompt encoder train when the config says so. An automatic config replaces the decoder by
    :func:`make_automatic_decoder`. Returns ``model``.

    Raises:
        ValueError: no module matches, or the model already carries an adapter.
    """
    config = config or LoraConfig()
    if model.adapter is not None:
        raise ValueError("model already carries an adapter; call remove_adapter(model) first")
    _keep_base_parts(model)
    targets = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and re.fullmatch(config.target_modules or "(?!)", name)
    ]
    if not targets and (config.target_modules or not config.decoder_r):  # "": decoder-only
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no Linear layer of {model.kind}"
        )
    for prm in model.parameters():
        prm.requires_grad_(False)
    for name in targets:
        parent, attr = _parent(model, name)
        base = getattr(parent, attr)
        setattr(parent, attr, LoRAQKV(base, _qkv_layout(parent, base), config))
    if config.mode == "automatic":
        model.mask_decoder = make_automatic_decoder(model.mask_decoder, config.num_classes)
    for prm in model.mask_decoder.parameters():
        prm.requires_grad_(config.train_decoder)
    for prm in model.prompt_encoder.parameters():
        prm.requires_grad_(config.train_prompt_encoder)
    if config.decoder_r:  # LoRA on the decoder's Linear layers (samed.lora_decoder)
        apply_decoder_lora(
            model.mask_decoder,
            config.decoder_r,
            config.decoder_alpha,
            config.decoder_target_modules,
        )
    for prm in decoder_full_parameters(model.mask_decoder, config.decoder_full_parameters).values():
        prm.requires_grad_(True)
    model.adapter = AdapterState(name="unsaved", config=config, targets=tuple(targets))
    return model


def _lora_modules(model: nn.Module) -> dict[str, LoRAQKV]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAQKV)}


def remove_adapter(model: SamModel) -> SamModel:
    """Restore the base model: unwrap LoRA layers, bring back the original decoder and
    prompt encoder. A no-op on a model without adapter. Returns ``model``."""
    for name, mod in _lora_modules(model).items():
        mod.unmerge()
        parent, attr = _parent(model, name)
        setattr(parent, attr, mod.base)
    parts = model.base_parts
    if parts is not None and model.adapter is not None:
        dev = model.device
        model.mask_decoder = copy.deepcopy(parts["mask_decoder"]).to(dev)
        model.prompt_encoder = copy.deepcopy(parts["prompt_encoder"]).to(dev)
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.adapter = None
    return model


def merge_adapter(model: SamModel) -> None:
    """Fold LoRA updates into the base qkv weights (faster inference; outputs equal within
    float rounding). Reversible with :func:`unmerge_adapter`. Sets ``model.adapter.merged``."""
    for mod in _lora_modules(model).values():
        mod.merge()
    if model.adapter is not None:
        model.adapter.merged = True


def unmerge_adapter(model: SamModel) -> None:
    """Undo :func:`merge_adapter`."""
    for mod in _lora_modules(model).values():
        mod.unmerge()
    if model.adapter is not None:
        model.adapter.merged = False


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Counts of trainable parameters: ``lora``, ``mask_decoder``, ``prompt_encoder``, ``total``."""
    counts = {"lora": 0, "mask_decoder": 0, "prompt_encoder": 0, "other": 0}
    for name, prm in model.named_parameters():
        if not prm.requires_grad:
            continue
        if ".lora_A." in name or ".lora_B." in name:
            counts["lora"] += prm.numel()
        elif name.startswith("mask_decoder."):
            counts["mask_decoder"] += prm.numel()
        elif name.startswith("prompt_encoder."):
            counts["prompt_encoder"] += prm.numel()
        else:
            counts["other"] += prm.numel()
    counts["total"] = sum(counts.values())
    return counts


def _adapter_state(model: SamModel) -> dict[str, torch.Tensor]:
    if model.adapter is None:
        raise ValueError("model has no adapter; call apply_lora first")
    config: LoraConfig = model.adapter.config
    state = {}
    for name, prm in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            state[name] = prm
    if config.train_decoder or config.mode == "automatic":
        state.update({f"mask_decoder.{k}": v for k, v in model.mask_decoder.state_dict().items()})
    if config.train_prompt_encoder:
        state.update(
            {f"prompt_encoder.{k}": v for k, v in model.prompt_encoder.state_dict().items()}
        )
    full = decoder_full_parameters(model.mask_decoder, config.decoder_full_parameters)
    state.update({f"mask_decoder.{k}": v for k, v in full.items()})
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_adapter(
    model: SamModel,
    folder: str | os.PathLike,
    *,
    labels: dict[int, str] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model's adapter to ``folder`` atomically (temporary folder, then rename).

    Args:
        model: a model after :func:`apply_lora` (and training). Merged LoRA is saved unmerged.
        folder: destination folder (its name becomes the adapter's name).
        labels: class index -> name (automatic: 0 must be background; prompted: the structures
            the adapter was tuned for, informational).
        metadata: free-form metadata.json content (description, intended use, preprocessing,
            spacing, training data, metrics, licence...).
        overwrite: replace an existing adapter folder (one holding only adapter files; any
            other folder is refused with FileExistsError).

    Returns:
        The folder path.
    """
    from safetensors.torch import save_file

    from . import __version__

    if model.adapter is None:
        raise ValueError("model has no adapter to save; call apply_lora first")
    config: LoraConfig = model.adapter.config
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"adapter folder {folder} exists; pass overwrite=True to replace it")
    files = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_METADATA)
    if folder.exists() or folder.is_symlink():  # replace only an adapter, never other files
        extra = [] if folder.is_dir() and not folder.is_symlink() else [folder.name]
        extra = extra or sorted(q.name for q in folder.iterdir() if q.name not in files)
        if extra:
            raise FileExistsError(
                f"{folder} is not replaced: it is not an adapter folder (holds {extra[:5]})"
            )
    labels = {int(k): str(v) for k, v in (labels or model.adapter.labels or {}).items()}
    if config.mode == "automatic" and len(labels) not in (0, config.num_classes):
        raise ValueError(
            f"labels has {len(labels)} entries but the automatic adapter has {config.num_classes} classes"
        )
    merged = [m for m in _lora_modules(model).values() if m.merged]
    for m in merged:
        m.unmerge()
    try:
        state = _adapter_state(model)
    finally:
        for m in merged:
            m.merge()
    cfg = {
        "format": "samed-lora",
        "format_version": 1,
        "samed_version": __version__,
        "base_model": model.kind,
        "base_model_sha256": model.checkpoint_sha256,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "targets": list(model.adapter.targets),
        "projections": list(config.projections),
        "mode": config.mode,
        "num_classes": config.num_classes,
        "train_decoder": config.train_decoder,
        "train_prompt_encoder": config.train_prompt_encoder,
        "labels": {str(k): v for k, v in sorted(labels.items())},
    }
    if config.decoder_r or config.decoder_full_parameters:  # decoder-side adapter fields
        cfg.update({k: getattr(config, k) for k in DECODER_FIELDS})
    meta = dict(metadata or {})
    meta.setdefault("labels", cfg["labels"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(
            state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "samed": __version__}
        )
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / ADAPTER_METADATA).write_text(
            json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
        )
        swap_in_folder(tmp, folder, remove_adapter_folder, f".{folder.name}.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``adapter_config.json`` (no weights). Raises :class:`AdapterError`."""
    folder = Path(folder)
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise AdapterError(f"{folder}: not an adapter folder ({ADAPTER_CONFIG} is missing)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: must hold a JSON object; got {type(cfg).__name__}")
    if cfg.get("format") != "samed-lora":
        raise AdapterError(f"{cfg_path}: 'format' must be 'samed-lora'")
    required = ("base_model", "r", "lora_alpha", "target_modules", "projections", "mode")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise AdapterError(f"{cfg_path}: missing fields {missing}")
    return cfg


def _config_labels(cfg: dict[str, Any], where: Path) -> dict[int, str]:
    """``labels`` of an adapter config as {int value: name}; refuses non-integer keys and
    duplicate names (the summary keys volumes by name)."""
    raw = cfg.get("labels") or {}
    if not isinstance(raw, dict):
        raise AdapterError(f'{where}: \'labels\' must be an object {{"1": "liver"}}; got {raw!r}')
    try:
        labels = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise AdapterError(
            f"{where}: 'labels' keys must be integers; got {sorted(raw)[:8]}"
        ) from None
    names = [n for k, n in labels.items() if k != 0]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AdapterError(f"{where}: label names {dup} are given to more than one value")
    return labels


def _read_metadata(folder: Path) -> tuple[dict[str, Any], Any]:
    """The ``postprocessing`` recommendation of an adapter's metadata.json (``{}`` if none) and
    its ``preprocessing.intensity`` (None if absent; recorded, never applied by itself)."""
    path = folder / ADAPTER_METADATA
    if not path.is_file():
        return {}, None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from exc
    pre = meta.get("preprocessing") if isinstance(meta, dict) else None
    intensity = pre.get("intensity") if isinstance(pre, dict) else None
    spec = meta.get("postprocessing") if isinstance(meta, dict) else None
    if spec is None:
        return {}, intensity
    lcc = spec.get("largest_component") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not (
        lcc is None
        or isinstance(lcc, bool)
        or (isinstance(lcc, list) and all(isinstance(c, int) for c in lcc))
    ):
        raise AdapterError(
            f"{path}: 'postprocessing' must be an object like {{\"largest_component\": [1, 2]}}; got {spec!r}"
        )
    return dict(spec), intensity


def load_adapter(
    model: SamModel, folder: str | os.PathLike, *, merge: bool = False, check_base: bool = True
) -> SamModel:
    """Attach the adapter in ``folder`` to ``model`` (replacing any adapter it carries).

    The base model is not reloaded: LoRA layers are swapped and the decoder / prompt encoder
    restored or replaced. Only safetensors is read (no pickle).

    Args:
        model: a base model from :func:`samed.build_model` (or one carrying another adapter).
        folder: adapter folder (see module docstring).
        merge: fold the LoRA update into the weights for speed (see :func:`merge_adapter`).
        check_base: refuse an adapter trained on another base model kind or checkpoint SHA-256.

    Raises:
        AdapterError: base-model mismatch, missing/unknown keys, wrong shapes, NaN/inf weights
            (naming the file and tensor), not safetensors, bad ``labels``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_adapter_config(folder)
    labels = _config_labels(cfg, folder / ADAPTER_CONFIG)
    post, intensity = _read_metadata(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS} is missing (only safetensors is accepted)")
    if check_base:
        if cfg["base_model"] != model.kind:
            raise AdapterError(
                f"{folder}: adapter was trained on base model {cfg['base_model']!r}, "
                f"this model is {model.kind!r}"
            )
        want = cfg.get("base_model_sha256", "")
        if want and model.checkpoint_sha256 and want != model.checkpoint_sha256:
            raise AdapterError(
                f"{folder}: adapter base checkpoint SHA-256 {want[:16]}... differs from this "
                f"model's {model.checkpoint_sha256[:16]}..."
            )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights}: not a valid safetensors file ({exc})") from exc
    for key, tensor in state.items():  # a NaN/inf weight gives empty masks, never an error
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(
                f"{weights}: tensor {key!r} holds {bad} NaN or infinite values of "
                f"{tensor.numel()}; the adapter is damaged"
            )
    try:
        config = LoraConfig(
            r=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"]),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=str(cfg["target_modules"]),
            projections=tuple(cfg["projections"]),
            mode=str(cfg["mode"]),
            num_classes=int(cfg.get("num_classes", 0)),
            train_decoder=bool(cfg.get("train_decoder", True)),
            train_prompt_encoder=bool(cfg.get("train_prompt_encoder", False)),
            decoder_r=int(cfg.get("decoder_r", 0)),
            decoder_alpha=float(cfg.get("decoder_alpha", 0.0)),
            decoder_target_modules=str(cfg.get("decoder_target_modules", "")),
            decoder_full_parameters=str(cfg.get("decoder_full_parameters", "")),
        )
    except ValueError as exc:
        raise AdapterError(f"{folder / ADAPTER_CONFIG}: {exc}") from exc
    remove_adapter(model)
    try:
        apply_lora(model, config)
        expected = _adapter_state(model)
        missing = sorted(set(expected) - set(state))
        unknown = sorted(set(state) - set(expected))
        shapes = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(state) & set(expected))
            if state[k].shape != expected[k].shape
        ]
        if missing or unknown or shapes:
            raise AdapterError(
                f"{weights}: does not fit {model.kind}: missing keys {missing[:8]}, "
                f"unknown keys {unknown[:8]}, shape mismatches {shapes[:4]}"
            )
        dev = model.device
        own = dict(model.named_parameters())
        own.update(dict(model.named_buffers()))
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(dev, own[k].dtype))
    except BaseException:
        remove_adapter(model)
        raise
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.eval()
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    model.adapter = AdapterState(
        name=folder.name,
        config=config,
        targets=model.adapter.targets if model.adapter is not None else (),
        path=folder.resolve(),
        digest=digest.hexdigest(),
        labels=labels,
        postprocessing=post,
        intensity=intensity,
        spacing=read_spacing(folder),
        orientation=read_orientation(folder),
    )
    if merge:
        merge_adapter(model)
    return model
