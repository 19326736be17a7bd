"""Student training of :mod:`samed.train.semi`: training pools from the cache, BCP-style
mixed batches, the resumable decoder loop, and validation scoring from cached embeddings.

See :mod:`samed.train.semi` for the recipe and the command line.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import FinetuneConfig
from .semi import CHECKPOINT, IGNORE, SemiSection, _kept_slices, _load, _save, split_cases

__all__ = ["Pool", "build_pool", "paste_box", "semi_batch", "train_semi", "score_cached"]


@dataclass
class Pool:
    """Training entries: ``emb[i]`` (C, h, w) fp16, ``target[i]`` (L, L) uint8 with
    :data:`IGNORE` where left out; ``foreground`` / ``empty`` index lists."""

    emb: list[Any]
    target: list[Any]
    foreground: list[int]
    empty: list[int]


def build_pool(
    out: str | Path, kind: str, semi: SemiSection, image_size: int, low_res: int
) -> Pool:
    """The labeled or (filtered) pseudo-labeled training entries from ``out/cache/<kind>``."""
    from .data import prepare_targets

    if kind not in ("labeled", "unlabeled"):
        raise ValueError(f"kind={kind!r} must be 'labeled' or 'unlabeled'")
    paths = sorted((Path(out) / "cache" / kind).glob("*.pt"))
    if not paths:
        raise ValueError(
            f"no cached {kind} volumes under {Path(out) / 'cache' / kind}; run cache first"
        )
    files = [_load(p) for p in paths]
    kept = _kept_slices(files, semi) if kind == "unlabeled" else [None] * len(files)
    pool = Pool([], [], [], [])
    for f, keep in zip(files, kept, strict=True):
        lab = f["label"].numpy().astype(np.int64)
        if kind == "unlabeled":
            lab = np.where(f["unc"].float().numpy() > semi.voxel_threshold, IGNORE, lab)
        tgt = prepare_targets(lab, image_size, low_res).to(__import__("torch").uint8)
        for z in range(lab.shape[0]):
            if keep is not None and not keep[z]:
                continue
            i = len(pool.emb)
            pool.emb.append(f["emb"][z])
            pool.target.append(tgt[z])
            t = tgt[z]
            (pool.foreground if bool(((t > 0) & (t != IGNORE)).any()) else pool.empty).append(i)
        del f
    return pool


def paste_box(
    emb: Any, target: Any, src_emb: Any, src_target: Any, box: tuple[int, int, int, int], scale: int
) -> tuple[Any, Any]:
    """Copy ``box`` = (y0, x0, y1, x1) of the embedding grid from the source into ``emb``
    (C, h, w) and the matching ``scale``-times larger region of ``target`` (L, L); new tensors."""
    y0, x0, y1, x1 = box
    e, t = emb.clone(), target.clone()
    e[:, y0:y1, x0:x1] = src_emb[:, y0:y1, x0:x1]
    t[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = src_target[
        y0 * scale : y1 * scale, x0 * scale : x1 * scale
    ]
    return e, t


def _draw(pool: Pool, rng: np.random.Generator, empty_fraction: float) -> int:
    src = pool.empty if (pool.empty and rng.random() < empty_fraction) else pool.foreground
    src = src or pool.empty
    return src[int(rng.integers(len(src)))]


def semi_batch(
    labeled: Pool, pseudo: Pool, cfg: FinetuneConfig, semi: SemiSection, step: int
) -> dict[str, Any]:
    """Batch ``step`` (a pure function of ``cfg.train.seed`` and ``step``).

    Returns ``{"features": (B, C, h, w) float32, "targets": (B, L, L) int64 (left-out voxels
    set to 0), "valid": (B, L, L) bool, "kinds": ["labeled" | "pseudo", ...]}``."""
    import torch

    from .data import sample_rng

    bsz = cfg.train.batch_size
    n_lab = max(1, int(round(semi.labeled_fraction * bsz))) if pseudo.emb else bsz
    feats, tgts, kinds = [], [], []
    for b in range(bsz):
        rng = sample_rng(cfg.train.seed, step, b)
        own, other = (labeled, pseudo) if b < n_lab else (pseudo, labeled)
        i = _draw(own, rng, cfg.data.empty_slice_fraction)
        e, t = own.emb[i], own.target[i]
        if other.emb and rng.random() < semi.mix_prob:
            j = _draw(other, rng, 0.0)
            h, w = e.shape[-2:]
            side = rng.uniform(*semi.mix_size)
            bh, bw = max(1, int(round(side * h))), max(1, int(round(side * w)))
            y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            e, t = paste_box(
                e, t, other.emb[j], other.target[j], (y0, x0, y0 + bh, x0 + bw), t.shape[-1] // h
            )
        feats.append(e)
        tgts.append(t)
        kinds.append("labeled" if b < n_lab else "pseudo")
    t = torch.stack(tgts).long()
    valid = t != IGNORE
    return {
        "features": torch.stack(feats).float(),
        "targets": torch.where(valid, t, torch.zeros_like(t)),
        "valid": valid,
        "kinds": kinds,
    }


def _student(cfg: FinetuneConfig, semi: SemiSection) -> Any:
    """The teacher (torch, merged LoRA, not fused for inference) with a trainable decoder."""
    import torch

    from ..model import load_model
    from .model import build_base_model

    if cfg.model.kind == "tiny":
        model = load_model(
            build_base_model(cfg, torch.device("cpu")), adapter=semi.teacher, merge=True
        )
    else:
        model = load_model(
            cfg.model.kind,
            checkpoint=cfg.model.checkpoint,
            adapter=semi.teacher,
            device="cpu",
            merge=True,
            optimize=False,
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.mask_decoder.parameters():
        p.requires_grad_(True)
    model.eval()
    model.mask_decoder.train()
    return model


def _to_fp16(folder: Path) -> None:
    """Store the adapter's weights as fp16 (halves the file; samed loads either)."""
    import torch
    from safetensors.torch import load_file, save_file

    from ..lora_config import ADAPTER_WEIGHTS

    p = folder / ADAPTER_WEIGHTS
    state = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(p)).items()}
    tmp = p.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(p)


def train_semi(
    cfg: FinetuneConfig,
    semi: SemiSection,
    out: str | Path,
    *,
    max_minutes: float | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the student decoder (resuming from ``out/checkpoint.pt``) for at most
    ``max_minutes`` this call, up to ``cfg.train.iterations`` steps in all; then (every call)
    export the current student to ``out/adapter`` (fp16) with its metadata.

    Returns ``{"step", "iterations", "finished", "seconds", "loss_last"}``."""
    import math

    import torch

    from ..lora import read_adapter_config
    from ..registry import resolve_adapter
    from .loop import loss_fn, lr_factor
    from .steps import save_trained_adapter

    out = Path(out)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model = _student(cfg, semi)
    lab = build_pool(out, "labeled", semi, model.image_size, model.low_res_size)
    pse = build_pool(out, "unlabeled", semi, model.image_size, model.low_res_size)
    log(f"pools: {len(lab.emb)} labeled entries, {len(pse.emb)} pseudo-labeled slices kept")
    params = [p for p in model.mask_decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.optim.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
    )
    step, losses, seconds0 = 0, [], 0.0
    ck = out / CHECKPOINT
    if ck.is_file():
        st = torch.load(ck, weights_only=True)
        model.mask_decoder.load_state_dict(st["decoder"])
        opt.load_state_dict(st["optim"])
        step, losses, seconds0 = (
            int(st["step"]),
            [list(x) for x in st["loss"].tolist()],
            float(st["seconds"]),
        )
        log(f"resumed at step {step}")

    def save_ck() -> None:
        _save(
            {
                "decoder": model.mask_decoder.state_dict(),
                "optim": opt.state_dict(),
                "step": step,
                "loss": torch.tensor(losses if losses else np.zeros((0, 2)), dtype=torch.float64),
                "seconds": seconds0 + time.perf_counter() - t0,
            },
            ck,
        )

    n = cfg.train.iterations
    while step < n:
        if max_minutes is not None and (time.perf_counter() - t0) / 60 >= max_minutes:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.optim.lr * lr_factor(step, cfg)
        batch = semi_batch(lab, pse, cfg, semi, step)
        logits, _ = model.decode(batch["features"], multimask_output=True)
        loss = loss_fn(
            logits, batch["targets"], "automatic", valid=batch["valid"], **cfg.loss.loss_fn_kwargs()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss became {lv} at step {step}; lower optim.lr")
        losses.append([step, lv])
        if step % cfg.train.log_interval == 0:
            log(f"step {step}/{n} loss={lv:.4f} ({(time.perf_counter() - t0) / 60:.1f} min)")
        if step % cfg.train.checkpoint_interval == 0:
            save_ck()
    save_ck()
    teacher_dir = resolve_adapter(semi.teacher)
    tmeta = json.loads((Path(teacher_dir) / "metadata.json").read_text())
    info = json.loads((out / "cache" / "labeled.json").read_text())
    labels = {int(k): v for k, v in info["labels"].items()}
    seconds = seconds0 + time.perf_counter() - t0
    extra = {
        "semi_supervised": {
            "teacher": str(semi.teacher),
            "teacher_config": read_adapter_config(teacher_dir).get("target_modules"),
            "unlabeled_cases": sorted(p.stem for p in (out / "cache" / "unlabeled").glob("*.pt")),
            "pseudo_slices_kept": len(pse.emb),
            "settings": dataclasses.asdict(semi),
            "note": "unlabeled cases used as images only (teacher pseudo-labels); their labels "
            "were never used for training or choosing",
        }
    }
    pp = tmeta.get("postprocessing")
    save_trained_adapter(
        model,
        out / "adapter",
        cfg,
        labels,
        info["summary"],
        None,
        step,
        command=command,
        device="cpu",
        seconds=seconds,
        recipe="semi: teacher encoder LoRA merged and frozen; decoder trained on cached "
        "embeddings of labeled slices + uncertainty-filtered pseudo-labels, BCP-style "
        "copy-paste on the embedding grid (samed.train.semi)",
        extra=extra,
        postprocessing=None
        if not pp
        else {
            **{k: v for k, v in pp.items() if k not in ("measured", "note")},
            "note": "inherited from the teacher adapter "
            f"{semi.teacher!r} (chosen there; see its metadata), not re-chosen for this student",
        },
    )
    _to_fp16(out / "adapter")
    (out / "metrics.json").write_text(
        json.dumps({"step": step, "iterations": n, "seconds": seconds, "loss": losses}) + "\n"
    )
    log(f"step {step}/{n}; adapter in {out / 'adapter'} ({seconds / 60:.1f} min in all)")
    return {
        "step": step,
        "iterations": n,
        "finished": step >= n,
        "seconds": round(seconds, 1),
        "loss_last": losses[-1][1] if losses else None,
    }


def score_cached(
    cfg: FinetuneConfig, semi: SemiSection, out: str | Path, adapter: str | Path | None = None
) -> dict[str, Any]:
    """3D Dice per validation volume of ``adapter`` (default ``out/adapter``) from the cached
    teacher-encoder embeddings (valid for a student: its encoder is the teacher's), raw and
    after the largest-component clean-up; mean over volumes per class, mean of classes.
    Report only (writes ``out/val_scores.json``)."""
    import torch

    from ..engine.preprocess import slice_geometry
    from ..evaluate.metrics import dice
    from ..io import load_label_map, load_volume
    from ..model import load_model
    from ..postprocess import keep_largest_component
    from .model import build_base_model

    out = Path(out)
    adapter = adapter or out / "adapter"
    if cfg.model.kind == "tiny":
        model = load_model(build_base_model(cfg, torch.device("cpu")), adapter=str(adapter))
    else:
        model = load_model(
            cfg.model.kind,
            checkpoint=cfg.model.checkpoint,
            adapter=str(adapter),
            device="cpu",
            optimize=False,
        )
    from ..datasets import load_dataset

    names = {k: v for k, v in load_dataset(cfg.data.root).labels.items() if k != 0}
    rows: dict[str, list[dict[str, float]]] = {"none": [], "largest_component": []}
    cases = [
        c
        for c in split_cases(cfg, semi)["val"]
        if (out / "cache" / "val" / f"{c.case_id}.pt").is_file()
    ]
    with torch.inference_mode():
        for c in cases:
            emb = _load(out / "cache" / "val" / f"{c.case_id}.pt")["emb"]
            vol = load_volume(c.image)
            gt = np.asarray(load_label_map(c.label, reference=vol).array).astype(np.int64)
            geo = slice_geometry(vol.shape[1:], model.image_size)
            pred = np.zeros(gt.shape, np.int16)
            for z0 in range(0, emb.shape[0], 8):
                lg, _ = model.decode(emb[z0 : z0 + 8].float(), multimask_output=True)
                full = geo.upscale(lg)
                pred[z0 : z0 + 8] = full.argmax(1).numpy()
            for kind, p in (
                ("none", pred),
                ("largest_component", keep_largest_component(pred, sorted(names))),
            ):
                rows[kind].append(
                    {"case": c.case_id, **{n: dice(p == k, gt == k) for k, n in names.items()}}
                )
    res: dict[str, Any] = {"adapter": str(adapter), "volumes": len(cases), "per_case": rows}
    for kind, rr in rows.items():
        per = {n: float(np.nanmean([r[n] for r in rr])) for n in names.values()} if rr else {}
        per["mean"] = float(np.mean(list(per.values()))) if per else float("nan")
        res[kind] = per
    (out / "val_scores.json").write_text(json.dumps(res, indent=2) + "\n")
    return res
