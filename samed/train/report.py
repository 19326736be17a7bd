"""What a fine-tuning run reports: the adapter's metadata.json content and the training curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import FinetuneConfig

__all__ = ["adapter_metadata", "plot_curve"]


def adapter_metadata(
    cfg: FinetuneConfig,
    labels: dict[int, str],
    summary: dict[str, Any],
    val: dict[str, Any] | None,
    best_step: int,
    command: str,
    device: str,
    seconds: float,
    model: Any,
) -> dict[str, Any]:
    """metadata.json content of an adapter exported by :func:`samed.train.finetune`."""
    from .. import __version__
    from ..lora import trainable_parameters

    prompt = (
        "none: one output per class (argmax)"
        if cfg.mode == "automatic"
        else ("a box (x0, y0, x1, y1) around one object per call; returns one binary mask")
    )
    return {
        "name": cfg.name,
        "description": cfg.description,
        "intended_use": cfg.intended_use,
        "mode": cfg.mode,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "base_model": model.kind,
        "base_model_sha256": model.checkpoint_sha256,
        "input": {
            "axes": "2D axial slices (Y, X) of a (Z, Y, X) volume",
            "prompt": prompt,
        },
        "preprocessing": {
            "intensity": summary.get("intensity"),
            "modality": summary.get("modality"),
            "spacing": None if cfg.data.spacing is None else list(cfg.data.spacing),
            # axis codes of the training volumes (flipped to one in-plane orientation)
            "orientation": summary.get("orientation"),
            "slice": (
                f"resize longest side to {model.image_size} (bilinear, antialiased), per-slice "
                f"min-max to [0, 1], zero-pad bottom/right, 3 channels "
                "(samed.engine.preprocess.prepare_slices)"
            ),
        },
        "spacing": (
            "2D, in-plane; trained on the dataset's native grids (no resampling)"
            if cfg.data.spacing is None
            else (
                f"2D, in-plane: every slice resampled to {cfg.data.spacing[0]:g} x "
                f"{cfg.data.spacing[1]:g} mm on a {model.image_size}-pixel canvas centred on "
                "the body; Session.automatic does the same and maps class scores back to the "
                "source grid (bilinear, then argmax)"
            )
        ),
        "training_data": {
            **summary,
            "labels_source": cfg.data.label_source,
            "licence": cfg.data.licence,
        },
        "validation": None
        if val is None
        else {
            "split": cfg.data.val_split,
            "metric": "3D Dice per volume, mean over classes then volumes"
            + (
                f"; ground-truth boxes, margin {cfg.validation.box_margin:g} px"
                if cfg.mode == "prompted"
                else ""
            ),
            "step": best_step,
            "mean_dice": val["mean_dice"],
            "per_class": val["per_class"],
            "per_case": val["per_case"],
        },
        "training": {
            "config": cfg.to_dict(),
            "iterations_run": None,
            "best_step": best_step,
            "device": device,
            "seconds": round(seconds, 1),
            "trainable_parameters": trainable_parameters(model),
        },
        "command": command,
        "samed_version": __version__,
        "licence": "Apache-2.0 (adapter weights); base model LiteMedSAM Apache-2.0",
    }


def plot_curve(metrics: dict[str, Any], path: Path) -> None:
    """Training loss (left axis, smoothed) and validation mean Dice (right axis) -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    h = np.asarray(metrics["loss"], dtype=float).reshape(-1, 2)
    if len(h):
        w = max(1, len(h) // 50)
        smooth = np.convolve(h[:, 1], np.ones(w) / w, mode="valid")
        ax.plot(h[:, 0], h[:, 1], color="0.8", lw=0.5)
        ax.plot(h[w - 1 :, 0], smooth, color="C0", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (Dice + CE)")
    if metrics["validation"]:
        ax2 = ax.twinx()
        v = metrics["validation"]
        ax2.plot(
            [r["step"] for r in v],
            [r["mean_dice"] for r in v],
            "o-",
            color="C1",
            label="val mean Dice",
        )
        ax2.set_ylabel("validation mean Dice")
        ax2.set_ylim(0, 1)
    ax.set_title(f"{metrics['name']} ({metrics['mode']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
