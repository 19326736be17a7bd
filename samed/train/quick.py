"""The fast CPU recipe for a handful of annotated volumes: the mask decoder trained on cached
embeddings (``samed finetune --from-annotations``, the napari *Train adapter* panel).

Recipe ``decoder`` (chosen by measurement, docs/TRAINING.md "Training from annotations"): the
image encoder stays frozen, so every training slice's embedding (``train.cache_copies`` copies:
copy 0 as annotated, the others augmented) and every held-back validation slice's embedding are
computed once; a step then costs only the mask decoder (~0.2 s at batch 1 on a laptop CPU, 4x
less than LoRA on the last encoder stage). The adapter carries a zero-initialised, frozen LoRA on
one encoder block (a samed adapter always has one), so it changes only the decoder (and the
automatic head). ``train.max_minutes`` limits the whole run, caching included (training gets
what caching leaves, at least :data:`MIN_TRAIN_SHARE` of it); learning rate: warm-up, then
cosine over that training time (or over ``train.iterations`` without a time limit).
Validation (every ``validation.interval`` steps) is 3D Dice per held-back volume from the
cached embeddings — the inference path minus the encoder, which the adapter does not change;
``validation.keep: best`` keeps the best adapter so far, and a stop (the ``should_stop``
callback, the panel's Stop button) keeps it; ``last`` keeps the final weights (validated once
more at the end). ``train.ema`` > 0 trains as usual but averages the trained weights
(:class:`WeightAverage`, updated after every optimiser step): validation, the kept adapter and
the snapshots use the average. Automatic mode: each validation
also decides the largest-component clean-up on the held-back volumes
(:func:`samed.postprocess.choose_largest_component`), recorded in the exported adapter's
metadata ``"postprocessing"`` (applied by ``Session.automatic``, ``samed segment``, the plugin).

Python::

    from samed.train.quick import train_quick
    res = train_quick(cfg, "runs/mine", callback=print, should_stop=lambda: False)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluate.metrics import dice
from ..lora_config import remove_adapter_folder
from ..postprocess import choose_largest_component
from .config import FinetuneConfig
from .data import SliceSet, load_cases, sample_rng
from .ema import WeightAverage, ema_decay, weights_record
from .loop import loss_fn
from .model import _attach_lora, build_base_model
from .steps import cached_batch, dice_summary, record_validation, save_trained_adapter

__all__ = [
    "train_quick",
    "caching_encoder",
    "ema_decay",
    "WeightAverage",
    "QUICK_LORA_TARGET",
    "RECIPE",
]

RECIPE = "decoder"
#: the least share of ``train.max_minutes`` left to training when caching takes longer
MIN_TRAIN_SHARE = 0.2
#: the one encoder block that carries the (zero, frozen) LoRA of a decoder-only adapter
QUICK_LORA_TARGET = r"image_encoder\.layers\.3\.blocks\.0\.attn\.qkv"

Event = dict[str, Any]


def _embed(model: Any, images: list[np.ndarray], batch: int = 4) -> torch.Tensor:
    """(N, 256, 64, 64) float16 embeddings of (H, W) slices in model intensity units."""
    from ..engine.preprocess import prepare_slices

    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            # one by one: slices of different volumes differ in shape
            x = torch.cat(
                [prepare_slices(im[None], model.image_size) for im in images[i : i + batch]]
            )
            out.append(model.encode(x.to(model.device)).to(torch.float16).cpu())
    return torch.cat(out)


def caching_encoder(
    cfg: FinetuneConfig, device: torch.device, log: Callable[[str], None] = print
) -> tuple[Any, str]:
    """The model whose image encoder computes the recipe's cached embeddings, and its label.

    The encoder is frozen in this recipe, so its embeddings are computed the way the inference
    path computes them: the base model loaded with the inference speed-ups
    (:func:`samed.engine.optimize_for_inference`: Conv-BN folding, fused convolution + GELU,
    channels-last; embeddings equal to the training model's within ~3e-6) and, on the CPU with
    OpenVINO installed, its encoder through OpenVINO fp32 (equal within ~3e-6; the converted
    model is cached on disk by :func:`samed.engine.backends.set_encoder_backend`). Measured
    here (docs/BENCHMARKS.md "Train adapter from the widget, session 7"): 1.32 -> 1.05 (fused)
    -> 0.86 (OpenVINO fp32) CPU-s per slice, 1 thread. ``model.kind: tiny`` (tests): the
    random test model as built.

    Returns:
        (model in eval mode, ``"torch-fp32"`` / ``"torch-fp32-fused"`` / ``"openvino-fp32"``).
    """
    from ..model import load_model
    from .model import build_base_model

    if cfg.model.kind == "tiny":
        return build_base_model(cfg, device).eval(), "torch-fp32"
    model = load_model(cfg.model.kind, cfg.model.checkpoint, device=str(device), optimize=True)
    model.eval()
    label = "torch-fp32-fused"
    if device.type == "cpu":
        from ..engine.backends import openvino_available, set_encoder_backend

        if openvino_available():
            try:
                be = set_encoder_backend(model, "openvino", "fp32")
                if be.name == "openvino-fp32":
                    label = be.name
            except Exception as exc:  # a conversion failure only costs speed
                model.encoder_backend = None
                log(f"OpenVINO encoder unavailable ({type(exc).__name__}: {exc}); torch caches")
    return model, label


class _EmbeddingStore(dict):
    """Cached embeddings kept on disk between runs (``embedding_cache`` of :func:`train_quick`):
    key -> (256, 64, 64) fp16 tensor (a held-back volume: (Z, 256, 64, 64)). The file is used
    only when its header matches: the data section (files, intensity), the model and the
    caching encoder; keys name the slice, the copy and (copies > 0) the augmentation and seed.
    Read with ``torch.load(weights_only=True)`` (tensors and strings only)."""

    def __init__(self, path: str | Path | None, cfg: FinetuneConfig, encoder: str) -> None:
        super().__init__()
        self.path = None if path is None else Path(path)
        self.header = json.dumps(
            [cfg.to_dict()["data"], cfg.to_dict()["model"], encoder], sort_keys=True
        )
        self.dirty = False
        if self.path is not None and self.path.is_file():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            if isinstance(saved, dict) and saved.get("header") == self.header:
                super().update(saved["embeddings"])

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.dirty = True
        super().__setitem__(key, value)

    def save(self) -> None:
        """Write the file (atomically) when something was added."""
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"header": self.header, "embeddings": dict(self)}, tmp)
        tmp.replace(self.path)
        self.dirty = False


def _no_export(step: int, val: Any) -> None:
    """``validation.keep: last``: a better validation does not replace the adapter."""


def train_quick(
    cfg: FinetuneConfig,
    out: str | Path,
    *,
    callback: Callable[[Event], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    snapshot_minutes: tuple[float, ...] = (),
    device: str | None = None,
    command: str = "",
    log: Callable[[str], None] = print,
    extra_metadata: dict[str, Any] | None = None,
    embedding_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Train a decoder-only adapter on cached embeddings; the best one lands in ``out/adapter``.

    Args:
        cfg: the run (``data`` usually ``format: pairs`` with ``split`` train / val; ``lora``
            is replaced by the frozen :data:`QUICK_LORA_TARGET`; ``train.cache_stages`` is
            ignored: the whole encoder is cached).
        out: run folder (created): ``adapter/``, ``metrics.json``, ``finetune.yaml``,
            ``snapshots/min_<M>/`` (the adapter ``validation.keep`` would keep at each of
            ``snapshot_minutes``: the best so far, or the weights of that moment).
        callback: receives events: ``{"event": "cache", "done", "total"}``,
            ``{"event": "step", "step", "loss", "minutes", "fraction"}``,
            ``{"event": "val", "step", "mean_dice", "per_class", "best", "minutes"}``,
            ``{"event": "done", ...result}``.
        should_stop: polled every step (and during caching); True stops and keeps what
            ``validation.keep`` says (the best so far, or the weights at the stop).
        snapshot_minutes: wall-clock minutes (from the start of caching) at which to copy the
            best adapter so far (for Dice-against-time curves).
        device: overrides ``cfg.train.device``.
        command: recorded in the metadata.
        log: progress lines.
        extra_metadata: merged into metadata.json (e.g. ``{"annotations": [...]}``).
        embedding_cache: a file of cached embeddings reused across runs on the same data
            (another learning rate, more copies: only the missing embeddings are computed);
            None: computed every run.

    Returns:
        ``{"out", "adapter" (None if stopped before any step), "steps", "best_step",
        "best_mean_dice", "adapter_step" (the step of the kept adapter's weights),
        "adapter_mean_dice" (its validation; None without), "keep", "ema", "stopped",
        "seconds", "cache_seconds", "cache_encoder" (what computed the embeddings,
        :func:`caching_encoder`), "validation", "snapshots"}``. With ``train.ema`` every
        validation score is the average's.

    Raises:
        ValueError: unreadable data, no foreground.
    """
    import dataclasses

    from ..model import resolve_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emit = callback or (lambda ev: None)
    stop = should_stop or (lambda: False)
    cfg = dataclasses.replace(
        cfg,
        lora=dataclasses.replace(cfg.lora, target_modules=QUICK_LORA_TARGET, train_decoder=True),
        train=dataclasses.replace(cfg.train, cache_stages=0),
    )
    dev = resolve_device(device or cfg.train.device)
    t_start = time.perf_counter()

    cpu0 = time.process_time()

    def minutes() -> float:
        return (time.perf_counter() - t_start) / 60.0

    def cpu_minutes() -> float:  # this process's CPU time: comparable across machine loads
        return (time.process_time() - cpu0) / 60.0

    train_cases, labels, summary = load_cases(cfg.data, "train")
    has_val = (
        cfg.data.val_split
        and any(c.get("split", "train") == cfg.data.val_split for c in cfg.data.cases)
        if cfg.data.format == "pairs"
        else bool(cfg.data.val_split)
    )
    orient = summary.get("orientation")
    val_cases = load_cases(cfg.data, cfg.data.val_split, 256, orient)[0] if has_val else []
    num_classes = max(labels) + 1
    torch.manual_seed(cfg.train.seed)
    model = build_base_model(cfg, dev)
    _attach_lora(model, cfg, num_classes)
    model.to(dev)
    model.adapter.labels = dict(labels)
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(False)  # B = 0: the encoder stays the base encoder
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    log(
        f"{RECIPE} recipe on {dev}: {summary['num_volumes']} volumes ({summary['num_slices']} "
        f"slices), {len(val_cases)} held back; {sum(p.numel() for p in params):,} trainable "
        f"parameters; classes {labels}"
    )
    slices = SliceSet(
        train_cases,
        cfg.mode,
        cfg.augment,
        cfg.prompt,
        model.image_size,
        model.low_res_size,
        cfg.data.empty_slice_fraction,
    )
    # ---- cache: training copies, then validation slices, through the inference-path encoder
    enc_model, enc_label = caching_encoder(cfg, dev, log)
    enc_batch = 1 if enc_label.startswith("openvino") else 4
    copies = cfg.train.cache_copies
    store = _EmbeddingStore(embedding_cache, cfg, enc_label)
    aug_key = json.dumps([cfg.to_dict()["augment"], cfg.train.seed], sort_keys=True)
    ids = [f"{c.case_id}|{z}" for c in train_cases for z in range(c.image.shape[0])]
    # feats[i][c] / labs[i][c]: slice i, copy c (copy 0 as annotated, the others augmented)
    feats: list[list[Any]] = [[None] * copies for _ in slices.slices]
    labs: list[list[Any]] = [[None] * copies for _ in slices.slices]
    todo: list[tuple[int, int, np.ndarray, str]] = []
    for i, (image, label) in enumerate(slices.slices):
        for c in range(copies):
            if c == 0:
                im, lab = image, label
            else:
                im, lab = slices.augment(image, label, sample_rng(cfg.train.seed, 10**9 + c, i))
            labs[i][c] = lab
            key = f"train|{ids[i]}|{c}|{aug_key if c else ''}"
            if key in store:
                feats[i][c] = store[key]
            else:
                todo.append((i, c, im, key))
    n_val = sum(v.image.shape[0] for v in val_cases)
    total = len(todo) + n_val
    val_emb: list[torch.Tensor] = []
    done = 0
    chunk = 4
    stopped = False
    for k in range(0, len(todo), chunk):
        part = todo[k : k + chunk]
        emb = _embed(enc_model, [t[2] for t in part], enc_batch)
        for (i, c, _, key), e in zip(part, emb, strict=True):
            feats[i][c] = store[key] = e
        done += len(part)
        emit({"event": "cache", "done": done, "total": total, "minutes": minutes()})
        if done % max(chunk, (total // 10) // chunk * chunk) == 0:
            log(f"cached {done}/{total} embeddings ({minutes():.1f} min)")
        if stop():
            stopped = True
            break
    for v in val_cases:
        if stopped:
            break
        key = f"val|{v.case_id}"
        if key not in store or store[key].shape[0] != v.image.shape[0]:
            store[key] = _embed(enc_model, list(v.image), enc_batch)
        val_emb.append(store[key])
        done += v.image.shape[0]
        emit({"event": "cache", "done": done, "total": total, "minutes": minutes()})
        stopped = stop()
    store.save()  # (a stop during caching trains nothing: the finished embeddings are kept)
    del enc_model
    cache_s = time.perf_counter() - t_start
    log(
        f"cached {sum(map(len, feats))} training + {n_val} validation embeddings in {cache_s:.1f} s"
        f" ({enc_label})"
    )

    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.optim.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
    )
    mm = cfg.train.max_minutes
    # the time limit is the whole run's (the panel's "Time limit" is the time to the adapter):
    # training gets what caching left, at least MIN_TRAIN_SHARE of the limit
    train_s = max(60 * mm - cache_s, 60 * mm * MIN_TRAIN_SHARE) if mm else None
    state: dict[str, Any] = {"best": -1.0, "best_step": -1, "bad": 0, "val": [], "loss": []}
    keep, ema = cfg.validation.keep, cfg.train.ema
    avg = WeightAverage(params, ema) if ema else None
    # (step, validation) of the adapter on disk; what the average holds, if on
    saved: dict[str, Any] = {"step": -1, "val": None}

    @contextmanager
    def kept_weights() -> Iterator[None]:  # the weights validated and saved: the average, if on
        if avg is None:
            yield
        else:
            with avg.applied():
                yield

    snaps = sorted(float(m) for m in snapshot_minutes)
    snap_done: list[dict[str, Any]] = []
    fg = {k: v for k, v in labels.items() if k != 0}

    def validate_cached() -> dict[str, Any]:
        from ..engine.preprocess import slice_geometry

        model.eval()
        rows, cases = [], []
        with torch.inference_mode():
            for v, emb in zip(val_cases, val_emb, strict=True):
                geo = slice_geometry(v.image.shape[1:], model.image_size)
                pred = np.zeros(v.label.shape, np.int16)
                for z0 in range(0, emb.shape[0], 8):
                    e = emb[z0 : z0 + 8].float().to(dev)
                    lg, _ = model.decode(e, multimask_output=True)
                    full = geo.upscale(lg)
                    pred[z0 : z0 + 8] = full.argmax(1).cpu().numpy()
                scores = {fg[k]: dice(pred == k, v.label == k) for k in fg}
                rows.append({"case": v.case_id, "dice": scores})
                cases.append((pred, v.label))
        model.mask_decoder.train()
        res = dice_summary(rows, list(fg.values()))  # the raw argmax picks the best step
        res["postprocessing"] = choose_largest_component(cases, fg)
        return res

    def validate_prompted() -> dict[str, Any]:
        from .loop import validate

        res = validate(
            model, val_cases, labels, "prompted", box_margin=cfg.validation.box_margin, batch_size=4
        )
        model.mask_decoder.train()
        return res

    def export(step: int, val: dict[str, Any] | None) -> None:
        with kept_weights():
            _save(step, val)
        saved.update(step=step, val=val)

    def _save(step: int, val: dict[str, Any] | None) -> None:
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
            seconds=time.perf_counter() - t_start,
            recipe=(
                f"{RECIPE}: frozen encoder, {copies} cached embeddings per slice (copy 0 as "
                "annotated), mask decoder trained (samed.train.quick)"
            ),
            extra={"weights": weights_record(keep, ema), **(extra_metadata or {})},
            postprocessing=None if val is None else val.get("postprocessing"),
        )

    def validate() -> dict[str, Any]:
        with kept_weights():
            res = validate_cached() if cfg.mode == "automatic" else validate_prompted()
        state["last_res"] = (step, res)
        return res

    def val_of_now() -> dict[str, Any] | None:  # the validation of the current weights, if any
        at, res = state.get("last_res", (-1, None))
        return res if at == step else None

    def snapshot(mark: float) -> None:
        dst = out / "snapshots" / f"min_{mark:g}"
        if keep == "last" and step and saved["step"] != step:
            export(step, val_of_now())  # the weights of now
        if dst.exists():  # only a snapshot's own adapter files; anything else stays (rmdir fails)
            remove_adapter_folder(dst)
        if (out / "adapter").is_dir():
            shutil.copytree(out / "adapter", dst)
            snap_done.append(
                {
                    "minutes": mark,
                    "cpu_minutes": round(cpu_minutes(), 3),
                    "path": str(dst),
                    "best_step": state["best_step"],
                    "val_mean_dice": state["best"],
                    "adapter_step": saved["step"],
                }
            )

    step = 0
    model.mask_decoder.train()
    t_train = time.perf_counter()
    s = slices
    while not stopped and step < cfg.train.iterations:
        frac = (time.perf_counter() - t_train) / train_s if train_s else step / cfg.train.iterations
        if mm and frac >= 1.0:
            break
        warm = min(1.0, (step + 1) / cfg.optim.warmup) if cfg.optim.warmup else 1.0
        lr = (
            cfg.optim.lr
            * warm
            * (1.0 if cfg.optim.schedule == "constant" else 0.5 * (1 + math.cos(math.pi * frac)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        batch = cached_batch(s, feats, labs, cfg, step)
        emb = batch["features"].to(dev)
        if cfg.mode == "automatic":
            logits, _ = model.decode(emb, multimask_output=True)
        else:
            pts = batch.get("points")
            pts = (pts[0].to(dev), pts[1].to(dev)) if pts is not None else None
            logits, _ = model.decode(emb, boxes=batch["boxes"].to(dev), points=pts)
        loss = loss_fn(logits, batch["targets"].to(dev), cfg.mode, **cfg.loss.loss_fn_kwargs())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        step += 1
        if avg is not None:
            avg.update(step)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"loss became {lv} at step {step}; lower optim.lr")
        state["loss"].append([step, round(lv, 5), round(minutes(), 3)])
        emit(
            {
                "event": "step",
                "step": step,
                "loss": lv,
                "minutes": minutes(),
                "cpu_minutes": cpu_minutes(),
                "fraction": min(1.0, frac),
                "lr": lr,
            }
        )
        if step % cfg.train.log_interval == 0:
            log(f"step {step} loss={lv:.4f} lr={lr:.2e} {minutes():.1f} min")
        iv = cfg.validation.interval
        if val_cases and iv and step % iv == 0:
            res = validate()
            improved = record_validation(
                state,
                res,
                step,
                export if keep == "best" else _no_export,
                minutes=round(minutes(), 3),
                cpu_minutes=round(cpu_minutes(), 3),
            )
            log(f"val step {step}: mean_dice={res['mean_dice']:.4f}{' *' if improved else ''}")
            emit(
                {
                    "event": "val",
                    "step": step,
                    "mean_dice": res["mean_dice"],
                    "per_class": res["per_class"],
                    "best": state["best"],
                    "minutes": minutes(),
                }
            )
            p = cfg.validation.patience
            if p and state["bad"] >= p:
                log(f"early stop at step {step}")
                break
        elif not val_cases and step % max(1, cfg.train.checkpoint_interval) == 0:
            export(step, None)
            state["best_step"] = step
        while snaps and minutes() >= snaps[0]:
            snapshot(snaps.pop(0))
        if stop():
            stopped = True
    if step and keep == "last" and val_cases:
        if val_of_now() is None:
            res = validate()  # the kept weights' own score
            record_validation(
                state,
                res,
                step,
                _no_export,
                minutes=round(minutes(), 3),
                cpu_minutes=round(cpu_minutes(), 3),
            )
            log(f"val step {step} (last): mean_dice={res['mean_dice']:.4f}")
        export(step, val_of_now())
    elif step and (not val_cases or state["best_step"] < 0):
        export(step, None)  # no validation (or none ran): the last weights
        state["best_step"] = step
    for mark in snaps:  # the run ended before these marks: the final best stands for them
        snapshot(mark)
    seconds = time.perf_counter() - t_start
    result = {
        "out": str(out),
        "adapter": str(out / "adapter") if (out / "adapter").is_dir() else None,
        "recipe": RECIPE,
        "steps": step,
        "best_step": state["best_step"],
        "best_mean_dice": state["best"] if val_cases else None,
        "adapter_step": saved["step"] if saved["step"] >= 0 else None,
        "adapter_mean_dice": None if saved["val"] is None else saved["val"]["mean_dice"],
        "keep": keep,
        "ema": ema,
        "stopped": stopped,
        "seconds": round(seconds, 1),
        "cache_seconds": round(cache_s, 1),
        "cache_encoder": enc_label,
        "cpu_seconds": round(time.process_time() - cpu0, 1),
        "validation": state["val"],
        "snapshots": snap_done,
    }
    import yaml

    (out / "finetune.yaml").write_text(
        f"# samed.train.quick recipe {RECIPE!r} (frozen encoder, cached embeddings, decoder "
        "trained); lora.target_modules carries a zero, frozen LoRA\n"
        + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    )
    (out / "metrics.json").write_text(
        json.dumps(
            {**result, "loss": state["loss"], "config": cfg.to_dict(), "command": command}, indent=2
        )
        + "\n"
    )
    log(
        f"done: {step} steps in {seconds / 60:.1f} min, best val {state['best']:.4f} at step "
        f"{state['best_step']}{' (stopped)' if stopped else ''}"
    )
    emit({"event": "done", **result})
    return result
