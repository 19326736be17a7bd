"""What the two training loops share: :func:`samed.train.loop.finetune` (LoRA, resumable) and
:func:`samed.train.quick.train_quick` (decoder on cached embeddings) draw their batches from
cached features, summarise validation Dice, keep the best validation and export the adapter
with the same functions here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import FinetuneConfig
from .data import SliceSet, sample_rng

__all__ = ["cached_batch", "dice_summary", "record_validation", "save_trained_adapter"]


def cached_batch(
    slices: SliceSet,
    feats: Sequence[Sequence[Any]],
    labels: Sequence[Sequence[np.ndarray]],
    cfg: FinetuneConfig,
    step: int,
) -> dict[str, Any]:
    """Batch ``step`` from cached features: a pure function of (``cfg.train.seed``, step).

    Args:
        slices: the training slices (pools of foreground / empty slices, prompt sampling).
        feats: ``feats[i][c]``: the cached feature tensor of slice ``i``, copy ``c`` (copy 0 as
            annotated, the others augmented), any shape the caller's model continues from.
        labels: ``labels[i][c]``: the (H, W) integer label map of that copy.
        cfg: ``mode``, ``train.seed`` and ``train.batch_size`` are read.
        step: the step number.

    Returns:
        :func:`samed.train.data.collate`'s batch plus ``"features"``: the stacked features as
        float32 (B, ...).
    """
    import torch

    from .data import Sample, collate, prepare_targets

    s, mode = slices, cfg.mode
    out_f, samples = [], []
    for b in range(cfg.train.batch_size):
        rng = sample_rng(cfg.train.seed, step, b)
        if mode == "automatic":
            pool = s.empty if (s.empty and rng.random() < s.empty_fraction) else s.foreground
            i, cls = pool[int(rng.integers(len(pool)))], 0
        else:
            i, cls = s.pairs[int(rng.integers(len(s.pairs)))]
        c = int(rng.integers(len(feats[i])))
        lab = labels[i][c]
        if mode == "prompted" and not (lab == cls).any():
            c, lab = 0, labels[i][0]
        if mode == "automatic":
            tgt = prepare_targets(lab[None], s.image_size, s.low_res)[0]
            samples.append(Sample(torch.empty(0), tgt))
        else:
            mask = lab == cls
            tgt = prepare_targets(mask[None].astype(np.int64), s.image_size, s.low_res)[0]
            box, pts = s._prompt(mask, rng)
            samples.append(Sample(torch.empty(0), tgt, box, pts))
        out_f.append(feats[i][c])
    batch = collate(samples, mode)
    batch["features"] = torch.stack(out_f).float()
    return batch


def dice_summary(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Validation summary of per-volume Dice rows.

    Args:
        rows: ``[{"case", "dice": {name: value}}]``, one per volume (NaN = class absent).
        names: the foreground class names.

    Returns:
        ``{"per_case": rows, "per_class": {name: mean over volumes}, "mean_dice": mean over
        volumes of each volume's class mean}`` (NaN-aware; NaN when there are no rows).
    """
    per_class = {
        n: float(np.nanmean([r["dice"][n] for r in rows])) if rows else float("nan") for n in names
    }
    case_means = [float(np.nanmean(list(r["dice"].values()))) for r in rows]
    return {
        "per_case": rows,
        "per_class": per_class,
        "mean_dice": float(np.nanmean(case_means)) if case_means else float("nan"),
    }


def record_validation(
    state: dict[str, Any],
    res: Mapping[str, Any],
    step: int,
    export: Callable[[int, Any], None],
    **record: Any,
) -> bool:
    """Keep the best validation: append ``{"step", **record, "mean_dice", "per_class"}`` to
    ``state["val"]``; on a higher ``mean_dice`` than ``state["best"]`` set ``best``,
    ``best_step``, ``bad = 0``, ``best_val`` and call ``export(step, res)``, else count
    ``state["bad"]`` up. Returns whether it improved."""
    state["val"].append(
        {"step": step, **record, "mean_dice": res["mean_dice"], "per_class": res["per_class"]}
    )
    improved = res["mean_dice"] > state["best"]
    if improved:
        state.update(best=res["mean_dice"], best_step=step, bad=0, best_val=res)
        export(step, res)
    else:
        state["bad"] += 1
    return improved


def save_trained_adapter(
    model: Any,
    folder: Path,
    cfg: FinetuneConfig,
    labels: dict[int, str],
    summary: dict[str, Any],
    val: dict[str, Any] | None,
    step: int,
    *,
    command: str,
    device: str,
    seconds: float,
    recipe: str | None = None,
    extra: dict[str, Any] | None = None,
    postprocessing: dict[str, Any] | None = None,
) -> None:
    """Write the model's adapter to ``folder`` (replaced) with its metadata.json.

    Args:
        model: the model in training (its adapter and trainable decoder are saved).
        folder: the adapter folder.
        cfg, labels, summary: the run (see :func:`samed.train.report.adapter_metadata`).
        val: the validation that made this the best adapter (None: no validation).
        step: the step reached (``training.iterations_run`` and ``best_step``).
        command, device: recorded.
        seconds: training wall time so far.
        recipe: ``training.recipe`` text (the quick recipe says what it trained).
        extra: merged into the metadata last (e.g. ``{"annotations": ...}``).
        postprocessing: the adapter's recommended clean-up (metadata ``"postprocessing"``,
            :func:`samed.postprocess.choose_largest_component`); None records none.
    """
    from ..lora import save_adapter
    from .report import adapter_metadata

    meta = adapter_metadata(cfg, labels, summary, val, step, command, device, seconds, model)
    meta["training"]["iterations_run"] = step
    if recipe is not None:
        meta["training"]["recipe"] = recipe
    if postprocessing is not None:
        meta["postprocessing"] = postprocessing
    meta.update(extra or {})
    save_adapter(model, folder, labels=labels, metadata=meta, overwrite=True)
