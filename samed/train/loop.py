"""Fine-tuning: LoRA on the image encoder + the mask decoder, automatic or prompted, resumable.

``samed finetune --config configs/NAME.yaml [--out DIR] [--resume] [--device auto|cpu|cuda]``
reads a :class:`samed.train.FinetuneConfig`, trains, validates (3D Dice per volume through the
inference path: :meth:`samed.engine.Session.automatic` or box prompts through
:meth:`samed.engine.Session.predict`), and writes to ``DIR``::

    checkpoint.pt      trainable weights + optimiser + loop state (resume is bit-exact on CPU)
    adapter/           the best adapter (safetensors + adapter_config.json + metadata.json)
    metrics.json       loss per step, validation history, best step, timings
    curve.png          training loss and validation Dice

Python::

    from samed.train import finetune, load_config
    result = finetune(load_config("configs/acdc-cardiac-mri.yaml"), out="runs/acdc")
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluate.metrics import dice
from .config import DICE_CLASSES, FinetuneConfig, refuse_quick_only
from .data import SliceSet, VolumeCase, collate, load_cases, sample_rng, thin_slices
from .model import (
    _attach_lora,
    _encoder_prefix,
    _encoder_suffix,
    _set_train_mode,
    _trainable,
    build_base_model,
)
from .report import plot_curve
from .steps import cached_batch, dice_summary, record_validation, save_trained_adapter

__all__ = [
    "finetune",
    "validate",
    "loss_fn",
    "lr_factor",
    "build_base_model",
    "FinetuneResult",
]

CHECKPOINT = "checkpoint.pt"
FEATURE_CACHE = "feature_cache.pt"


# ---------------------------------------------------------------------------------- loss
def loss_fn(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mode: str,
    dice_w: float,
    ce_w: float,
    valid: torch.Tensor | None = None,
    dice_classes: str = "all",
) -> torch.Tensor:
    """Dice + cross-entropy on low-resolution logits.

    Args:
        logits: (B, C, L, L) (automatic, C classes incl. background) or (B, 1, L, L).
        targets: (B, L, L) class indices (automatic) or {0, 1} (prompted).
        mode: ``automatic`` or ``prompted``.
        dice_w: weight of the soft Dice loss (foreground classes, batch-pooled).
        ce_w: weight of the (binary) cross-entropy.
        valid: optional (B, L, L) bool: only these voxels count (cross-entropy averaged over
            them, Dice summed over them); the targets elsewhere must still be valid indices
            and are ignored (e.g. uncertain pseudo-labels, :mod:`samed.train.semi`).
        dice_classes: ``all``: 1 - Dice averaged over every foreground class; ``present``: only
            over those with a target voxel (in ``valid``) in the batch, none -> no Dice term.

    Returns:
        Scalar loss (float32).
    """
    if dice_classes not in DICE_CLASSES:
        raise ValueError(f"dice_classes={dice_classes!r}; allowed: {', '.join(DICE_CLASSES)}")
    logits = logits.float()
    v = None if valid is None else valid.to(logits.device, torch.float32)[:, None]
    if mode == "automatic":
        if v is None:
            ce = F.cross_entropy(logits, targets)
        else:
            ce_map = F.cross_entropy(logits, targets, reduction="none")
            ce = (ce_map * v[:, 0]).sum() / v.sum().clamp(min=1.0)
        prob = logits.softmax(1)[:, 1:]
        onehot = F.one_hot(targets, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    else:
        t = targets.float()[:, None]
        if v is None:
            ce = F.binary_cross_entropy_with_logits(logits, t)
        else:
            ce_map = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
            ce = (ce_map * v).sum() / v.sum().clamp(min=1.0)
        prob, onehot = logits.sigmoid(), t
    if v is not None:
        prob, onehot = prob * v, onehot * v
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    per_class = 1.0 - (2 * inter + 1e-5) / (denom + 1e-5)
    if dice_classes == "present":  # only the classes with a target voxel in the batch
        keep = (onehot.sum((0, 2, 3)) > 0).float()
        dice = (per_class * keep).sum() / keep.sum().clamp(min=1.0)
    else:
        dice = per_class.mean()
    return dice_w * dice + ce_w * ce


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then the schedule."""
    o, n = cfg.optim, cfg.train.iterations
    if o.warmup and step < o.warmup:
        return (step + 1) / o.warmup
    if o.schedule == "constant":
        return 1.0
    frac = (step - o.warmup) / max(1, n - o.warmup)
    frac = min(max(frac, 0.0), 1.0)
    if o.schedule == "poly":
        return (1.0 - frac) ** 0.9
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def validate(
    model: Any,
    cases: list[VolumeCase],
    labels: dict[int, str],
    mode: str,
    *,
    box_margin: float = 0.0,
    limit: int | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    choose_postprocessing: bool = False,
) -> dict[str, Any]:
    """3D Dice per volume and class through the inference path.

    Args:
        model: a model (automatic mode: carrying an automatic adapter; prompted: any, the
            zero-shot base model included).
        cases: volumes already intensity-mapped (the Session is told ``minmax`` = unchanged).
        labels: class id -> name incl. 0 background.
        mode: ``automatic`` (``Session.automatic``) or ``prompted`` (one ground-truth box per
            class and slice, ``Session.predict``; each class scored on its own mask).
        box_margin: prompted: pixels added to each side of the box.
        limit: score at most this many volumes.
        batch_size: encoder batch.
        progress: called with (volumes done, volumes) after each volume.
        choose_postprocessing: automatic mode: also decide the largest-component clean-up on
            these volumes (:func:`samed.postprocess.choose_largest_component` on the raw
            predictions) and return it as ``"postprocessing"``.

    Returns:
        ``{"per_case": [{"case", "dice": {name: v}}], "per_class": {name: mean},
        "mean_dice": float}`` (means ignore classes absent from a volume's ground truth; always
        the raw prediction), plus ``"postprocessing"`` (the metadata record) when chosen.
    """
    from ..engine import Session, mask_bbox
    from ..postprocess import choose_largest_component

    fg = {k: v for k, v in labels.items() if k != 0}
    rows = []
    preds: list[tuple[np.ndarray, np.ndarray]] = []
    todo = cases[:limit] if limit else cases
    for n, case in enumerate(todo):
        sess = Session(model, case.image, intensity="minmax", batch_size=batch_size)
        scores: dict[str, float] = {}
        if mode == "automatic":
            pred = sess.automatic(
                postprocess="none"
            )  # the raw model; adapters record their clean-up
            for k, name in fg.items():
                scores[name] = dice(pred == k, case.label == k)
            if choose_postprocessing:
                small = np.uint8 if max(fg, default=0) < 256 else np.int32
                preds.append((np.asarray(pred).astype(small, copy=False), case.label))
        else:
            for k, name in fg.items():
                gt = case.label == k
                out = np.zeros_like(gt)
                for z in np.nonzero(gt.any((1, 2)))[0]:
                    box = mask_bbox(gt[z], box_margin)
                    out[z] = sess.predict(int(z), box=box)
                scores[name] = dice(out, gt)
        rows.append({"case": case.case_id, "dice": scores})
        if progress is not None:
            progress(n + 1, len(todo))
    res = dice_summary(rows, list(fg.values()))
    if preds:
        res["postprocessing"] = choose_largest_component(preds, fg)
    return res


# ---------------------------------------------------------------------------------- batches
class _BatchSource(torch.utils.data.Dataset):
    """Batch ``step`` as a pure function of (seed, step): workers cannot change the stream."""

    def __init__(self, slices: SliceSet, seed: int, batch_size: int, mode: str) -> None:
        self.slices, self.seed, self.bs, self.mode = slices, seed, batch_size, mode

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, step: int) -> dict[str, Any]:
        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)
        return collate([self.slices.sample(self.seed, step, b) for b in range(self.bs)], self.mode)


class _CachedBatches:
    """CPU option: frozen early-stage features of ``copies`` augmented versions of each slice,
    computed once; a step samples (slice, copy) pairs."""

    def __init__(
        self,
        model: Any,
        slices: SliceSet,
        cfg: FinetuneConfig,
        device: torch.device,
        log: Callable[[str], None],
        store: Path | None = None,
    ) -> None:
        self.slices, self.cfg, self.mode = slices, cfg, cfg.mode
        k, copies = cfg.train.cache_stages, cfg.train.cache_copies
        self.feats: list[list[torch.Tensor]] = []
        self.labels: list[list[np.ndarray]] = []
        t0 = time.perf_counter()
        # the features depend on the data, augmentation, seed and cache settings only: a run
        # restarted in the same folder (resume, or new optimiser settings) reads them back
        key = json.dumps(
            [
                cfg.to_dict()["data"],
                cfg.to_dict()["augment"],
                [cfg.train.seed, k, copies, model.checkpoint_sha256, len(slices)],
            ],
            sort_keys=True,
        )
        if store is not None and store.is_file():
            saved = torch.load(store, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                self.feats = [list(f.unbind(0)) for f in saved["feats"]]
                self.labels = [[np.asarray(x) for x in lab.unbind(0)] for lab in saved["labels"]]
                log(f"read cached features of {len(self.feats)} slices from {store}")
                return
        with torch.inference_mode():
            for i, (image, label) in enumerate(slices.slices):
                fs, ls = [], []
                for c in range(copies):
                    if c == 0:
                        im, lab = image, label
                    else:
                        im, lab = slices.augment(
                            image, label, sample_rng(cfg.train.seed, 10**9 + c, i)
                        )
                    x = _prepare(im, model.image_size).to(device)
                    f = _encoder_prefix(model, x, k)[0].cpu()
                    fs.append(f.half() if k >= len(model.image_encoder.layers) else f)
                    ls.append(lab)
                self.feats.append(fs)
                self.labels.append(ls)
        log(
            f"cached stages 0..{k - 1} for {len(slices)} slices x {copies} copies "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        if store is not None:
            _atomic_torch_save(
                {
                    "key": key,
                    "feats": [torch.stack(f) for f in self.feats],
                    "labels": [torch.as_tensor(np.stack(lab)) for lab in self.labels],
                },
                store,
            )

    def batch(self, step: int) -> dict[str, Any]:
        return cached_batch(self.slices, self.feats, self.labels, self.cfg, step)


def _prepare(image: np.ndarray, size: int) -> torch.Tensor:
    from ..engine.preprocess import prepare_slices

    return prepare_slices(image[None], size)


# ---------------------------------------------------------------------------------- loop
class FinetuneResult(dict):
    """``finetune`` result: out folder, adapter folder, best step and metrics (a dict)."""


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def finetune(
    cfg: FinetuneConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    device: str | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> FinetuneResult:
    """Train an adapter as ``cfg`` says and export the best one to ``out/adapter``.

    Args:
        cfg: the run's configuration.
        out: output folder (created).
        resume: continue from ``out/checkpoint.pt`` (same config required).
        device: overrides ``cfg.train.device``.
        command: the command line recorded in the metadata.
        log: where progress lines go.
        stop_after: stop (with a checkpoint) after this step count, as if interrupted (tests).

    Returns:
        A :class:`FinetuneResult` with ``out``, ``adapter``, ``best_step``, ``best_mean_dice``,
        ``steps``, ``validation``.

    Raises:
        ValueError: invalid data, a checkpoint from another config, or a quick-only key.
    """
    refuse_quick_only(cfg)
    from ..model import resolve_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device or cfg.train.device)
    if dev.type == "cpu":
        from ..engine import tune_cpu_allocator

        tune_cpu_allocator()
    from ..registry import MODEL_KINDS

    size = MODEL_KINDS[cfg.model.kind].image_size if cfg.model.kind in MODEL_KINDS else 256
    train_cases, labels, summary = load_cases(cfg.data, cfg.data.train_split, size)
    if cfg.data.slice_step > 1:
        train_cases = [thin_slices(c, cfg.data.slice_step) for c in train_cases]
        summary["num_slices"] = int(sum(c.image.shape[0] for c in train_cases))
        summary["slice_step"] = cfg.data.slice_step
    val_cases: list[VolumeCase] = []
    if cfg.data.val_split:
        val_cases = load_cases(cfg.data, cfg.data.val_split, size, summary["orientation"])[0]
    num_classes = max(labels) + 1
    log(
        f"train: {summary['num_volumes']} volumes, {summary['num_slices']} slices "
        f"({cfg.data.train_split}); val: {len(val_cases)} volumes; classes {labels}"
    )

    torch.manual_seed(cfg.train.seed)
    model = build_base_model(cfg, dev)
    _attach_lora(model, cfg, num_classes)
    model.to(dev)  # apply_lora creates its q/k/v index buffers on the CPU
    model.adapter.labels = dict(labels)
    params = _trainable(model)
    groups = [
        {
            "params": [p for n, p in params.items() if p.ndim > 1],
            "weight_decay": cfg.optim.weight_decay,
        },
        {"params": [p for n, p in params.items() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if cfg.optim.name == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=0.9)
    log(
        f"model {model.kind} on {dev}: trainable {sum(p.numel() for p in params.values()):,} "
        f"parameters in {len(model.adapter.targets)} LoRA layers + decoder={cfg.lora.train_decoder}"
    )

    state = {
        "step": 0,
        "best": -1.0,
        "best_step": -1,
        "bad": 0,
        "history": [],
        "val": [],
        "seconds": 0.0,
        "best_val": None,
    }
    ckpt_path = out / CHECKPOINT
    if resume:
        if not ckpt_path.is_file():
            raise ValueError(f"--resume: {ckpt_path} does not exist")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved_cfg = json.loads(ck["config"])
        now_cfg = json.loads(json.dumps(cfg.to_dict()))  # as stored: e.g. integer label ids -> str
        if saved_cfg != now_cfg:
            diff = sorted(
                k for k in set(saved_cfg) | set(now_cfg) if saved_cfg.get(k) != now_cfg.get(k)
            )
            raise ValueError(f"{ckpt_path} was written with another config (sections {diff})")
        with torch.no_grad():
            for n, t in ck["trainable"].items():
                params[n].copy_(t)
        opt.load_state_dict(ck["optimizer"])
        state = json.loads(ck["state"])
        log(f"resumed at step {state['step']} from {ckpt_path}")

    slices = SliceSet(
        train_cases,
        cfg.mode,
        cfg.augment,
        cfg.prompt,
        model.image_size,
        model.low_res_size,
        cfg.data.empty_slice_fraction,
    )
    cached = None
    k = cfg.train.cache_stages
    if k:
        cached = _CachedBatches(model, slices, cfg, dev, log, out / FEATURE_CACHE)
        batches: Any = (cached.batch(s) for s in range(state["step"], cfg.train.iterations))
    else:
        src = _BatchSource(slices, cfg.train.seed, cfg.train.batch_size, cfg.mode)
        w = cfg.train.workers
        if w:
            loader = torch.utils.data.DataLoader(
                src,
                batch_size=None,
                sampler=range(state["step"], cfg.train.iterations),
                num_workers=w,
                prefetch_factor=4,
                persistent_workers=False,
            )
            batches = iter(loader)
        else:
            batches = (src[s] for s in range(state["step"], cfg.train.iterations))

    amp = cfg.train.amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    val_iv = cfg.validation.interval

    def run_validation(step: int) -> bool:
        """Validate, export on improvement; returns True when early stopping triggers."""
        model.eval()
        t0 = time.perf_counter()
        res = validate(
            model,
            val_cases,
            labels,
            cfg.mode,
            box_margin=cfg.validation.box_margin,
            limit=cfg.validation.limit,
            batch_size=32 if dev.type == "cuda" else 4,
            choose_postprocessing=cfg.mode == "automatic",
        )
        seconds = time.perf_counter() - t0
        improved = record_validation(state, res, step, export)
        cls = " ".join(f"{n}={v:.4f}" for n, v in res["per_class"].items())
        log(
            f"val step {step}: mean_dice={res['mean_dice']:.4f} ({cls}) "
            f"{seconds:.1f}s{' *' if improved else ''}"
        )
        _set_train_mode(model)
        p = cfg.validation.patience
        return bool(p and state["bad"] >= p)

    def export(step: int, val: dict[str, Any] | None) -> None:
        seconds = state["seconds"] + time.perf_counter() - t_run
        save_trained_adapter(
            model,
            out / "adapter",
            cfg,
            labels,
            summary,
            val,
            step,
            command=command,
            device=str(dev),
            seconds=seconds,
            postprocessing=None if val is None else val.get("postprocessing"),
        )

    def checkpoint(step: int) -> None:
        state["step"] = step
        state["seconds"] += time.perf_counter() - t_run
        _atomic_torch_save(
            {
                "trainable": {n: p.detach().cpu().clone() for n, p in params.items()},
                "optimizer": opt.state_dict(),
                "state": json.dumps(state),
                "config": json.dumps(cfg.to_dict()),
            },
            ckpt_path,
        )
        state["seconds"] -= time.perf_counter() - t_run

    _set_train_mode(model)
    t_run = time.perf_counter()
    t_log, n_log = time.perf_counter(), 0
    step = state["step"]
    stopped_early = False
    while step < cfg.train.iterations:
        if stop_after is not None and step >= stop_after:
            checkpoint(step)
            return FinetuneResult(out=out, steps=step, interrupted=True)
        batch = next(batches)
        for g in opt.param_groups:
            g["lr"] = cfg.optim.lr * lr_factor(step, cfg)
        with (
            torch.autocast("cuda", dtype=amp_dtype) if amp else torch.autocast("cpu", enabled=False)
        ):
            if cached is not None:
                emb = _encoder_suffix(model, batch["features"].to(dev), k)
            else:
                emb = model.encode(batch["images"].to(dev, non_blocking=True))
            if cfg.mode == "automatic":
                logits, _ = model.decode(emb, multimask_output=True)
            else:
                pts = batch.get("points")
                if pts is not None:
                    pts = (pts[0].to(dev), pts[1].to(dev))
                logits, _ = model.decode(emb, boxes=batch["boxes"].to(dev), points=pts)
        loss = loss_fn(logits, batch["targets"].to(dev), cfg.mode, **cfg.loss.loss_fn_kwargs())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.optim.grad_clip)
        opt.step()
        step += 1
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss became {lv} at step {step}; lower optim.lr")
        state["history"].append([step, round(lv, 6)])
        n_log += 1
        if step % cfg.train.log_interval == 0 or step == cfg.train.iterations:
            dt = (time.perf_counter() - t_log) / max(n_log, 1)
            log(
                f"step {step}/{cfg.train.iterations} loss={lv:.4f} "
                f"lr={opt.param_groups[0]['lr']:.2e} {dt:.3f} s/it"
            )
            t_log, n_log = time.perf_counter(), 0
        last = step == cfg.train.iterations
        mm = cfg.train.max_minutes
        if mm is not None and time.perf_counter() - t_run > 60 * mm and not last:
            log(f"train.max_minutes={mm:g} reached at step {step}: stopping")
            last = stopped_early = True
        if val_cases and ((val_iv and step % val_iv == 0) or last):
            if run_validation(step) and not stopped_early:
                log(
                    f"early stop at step {step}: no improvement in "
                    f"{cfg.validation.patience} validations"
                )
                stopped_early = True
                last = True
        if step % cfg.train.checkpoint_interval == 0 or last:
            checkpoint(step)
        if stopped_early:
            break
    if not val_cases:
        export(step, None)
        state["best_step"] = step
    state["seconds"] += time.perf_counter() - t_run
    metrics = {
        "name": cfg.name,
        "mode": cfg.mode,
        "device": str(dev),
        "steps": step,
        "stopped_early": stopped_early,
        "best_step": state["best_step"],
        "best_mean_dice": state["best"] if val_cases else None,
        "best_validation": state["best_val"],
        "validation": state["val"],
        "loss": state["history"],
        "train_seconds": round(state["seconds"], 1),
        "seconds_per_iteration": round(state["seconds"] / max(1, len(state["history"])), 4),
        "train_data": summary,
        "command": command,
        "config": cfg.to_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    try:
        plot_curve(metrics, out / "curve.png")
    except ImportError:
        log("matplotlib missing: no curve.png")
    log(
        f"done: {step} steps, best mean_dice={state['best']:.4f} at step {state['best_step']}; "
        f"adapter in {out / 'adapter'}"
    )
    return FinetuneResult(
        out=out,
        adapter=out / "adapter",
        steps=step,
        best_step=state["best_step"],
        best_mean_dice=state["best"],
        validation=state["best_val"],
    )
