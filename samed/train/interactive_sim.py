"""Simulated interactive sessions for the click-aware adapter (:mod:`samed.train.interactive`).

One call of :func:`simulate_batch` runs one session per sample (one structure of one cached slice,
on the model's S x S input frame): a start prompt (a box with random slack, or one positive point
at the centre), then corrective rounds (a click at the centre of the largest error component, or
at a random error pixel; the previous round's low-res logits fed back as the mask prompt).

Every round supervises **all decoder outputs** that :func:`samed.engine.refine.refine_slice`
reads (session 7):

* the single-mask output (what ``Session.predict`` returns): Dice + BCE against the target;
* SAM's three multimask outputs (least removal, ambiguous-box resolution, the smallest region
  around a click): SAM's rule, the loss of the best-fitting output only (min over the three);
  on the start prompt the other two are pulled toward the base model's outputs for the same
  prompt (``multimask_distill_weight``), so the outputs the refinement picks from do not drift
  (the teacher runs on the first round only: it costs a decoder pass);
* the IoU head: MSE to the true IoU of every output;
* box-only distillation (``box_distill_weight``): on a box start's first round, on samples from
  sets other than ``distill_exclude`` (ACDC), every output is also pulled toward the base model's
  output, so the base model's box behaviour on unseen structures is kept.

Losses and clicks are computed on the decoder's low-resolution grid (``model.low_res_size``,
256 for SAM; the target is the area-averaged label), boxes and the start point on the full frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .interactive import InteractiveConfig

__all__ = ["decode_all", "simulate_batch"]


def _centre(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the pixel of ``mask`` farthest from its boundary (largest component)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n > 1:
        mask = lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), mask.shape)
    return int(x), int(y)


def _click(pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator, p_random: float):
    """A corrective click ((x, y), label) for one prediction, or None if it is exact."""
    err = pred ^ gt
    if not err.any():
        return None
    if rng.random() < p_random:
        ys, xs = np.nonzero(err)
        i = int(rng.integers(len(xs)))
        x, y = int(xs[i]), int(ys[i])
    else:
        x, y = _centre(err)
    return (x, y), int(gt[y, x])


def _bbox(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def _widen(pm, boxes, i, pts, labs, s, margin: float = 2.0) -> np.ndarray:
    """Sample i's box for a corrective round: its start box (``boxes``) or, without one, the
    previous mask's box (``pm`` on the full frame), grown to take in every positive click."""
    pos = np.array([p for p, lab in zip(pts, labs, strict=True) if lab] or [pts[0]], np.float32)
    if boxes is not None:
        bb = boxes[i].copy()
    elif pm.any():
        bb = _bbox(pm) + np.array([-margin, -margin, margin, margin], np.float32)
    else:
        bb = np.array([*pos[0], *pos[0]], np.float32)
    bb = np.array(
        [
            min(bb[0], pos[:, 0].min() - margin),
            min(bb[1], pos[:, 1].min() - margin),
            max(bb[2], pos[:, 0].max() + margin),
            max(bb[3], pos[:, 1].max() + margin),
        ],
        np.float32,
    )
    return np.clip(bb, 0, s - 1)


def decode_all(model, emb, boxes=None, points=None, mask_inputs=None, *, base: bool = False):
    """All decoder outputs for one prompt per sample: (logits (B, 1 + K, L, L), iou (B, 1 + K)).

    Output 0 is the single-mask output, 1..K SAM's multimask outputs (``Session.predict_full``'s
    ``mask_output`` k is output k + 1 here). ``base``: the model's unadapted decoder and prompt
    encoder (kept by :func:`samed.lora.apply_lora` in ``model.base_parts``; the teacher).
    Inputs as :meth:`samed.model.SamModel.decode` (model-frame pixels).
    """
    parts = model.base_parts if base and model.base_parts is not None else None
    pe = parts["prompt_encoder"] if parts else model.prompt_encoder
    dec = parts["mask_decoder"] if parts else model.mask_decoder
    sparse, dense = pe(
        points=points,
        boxes=boxes[:, None, :] if boxes is not None and boxes.ndim == 2 else boxes,
        masks=mask_inputs,
    )
    if dense.shape[0] != emb.shape[0]:
        dense = dense.expand(emb.shape[0], -1, -1, -1)
    image_pe = pe.get_dense_pe().to(emb.dtype)
    return dec.predict_masks(
        image_embeddings=emb,
        image_pe=image_pe,
        sparse_prompt_embeddings=sparse.to(emb.dtype),
        dense_prompt_embeddings=dense.to(emb.dtype),
    )


def _mask_loss(logits, target, cfg: InteractiveConfig):
    """(B, K) Dice + BCE of every output (logits (B, K, L, L)) against (B, L, L) soft targets."""
    import torch
    import torch.nn.functional as F

    t = target[:, None].expand_as(logits)
    prob = torch.sigmoid(logits)
    inter = (prob * t).sum((-1, -2))
    dice = 1 - (2 * inter + 1) / (prob.sum((-1, -2)) + t.sum((-1, -2)) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((-1, -2))
    return cfg.dice_weight * dice + cfg.bce_weight * bce


def _distill(logits, teacher):
    """(B, K) BCE of the student's logits against the teacher's probabilities."""
    import torch
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(
        logits, torch.sigmoid(teacher), reduction="none"
    ).mean((-1, -2))


def _round_loss(logits, iou_pred, target, tgt_bin, teacher, box_kd, cfg: InteractiveConfig):
    """One round's loss (see the module docstring); ``box_kd``: (B,) bool samples that take the
    box-only distillation this round; ``teacher``: the base model's logits or None."""
    import torch

    per = _mask_loss(logits, target, cfg)  # (B, 1 + K)
    loss = per[:, 0]
    if logits.shape[1] > 1 and cfg.multimask_weight > 0:
        mm = per[:, 1:]
        best = mm.argmin(dim=1)
        loss = loss + cfg.multimask_weight * mm.gather(1, best[:, None])[:, 0]
        if teacher is not None and cfg.multimask_distill_weight > 0 and mm.shape[1] > 1:
            kd = _distill(logits[:, 1:], teacher[:, 1:])
            keep = torch.ones_like(kd).scatter_(1, best[:, None], 0.0)
            loss = loss + cfg.multimask_distill_weight * (kd * keep).sum(1) / keep.sum(1)
    if teacher is not None and cfg.box_distill_weight > 0 and box_kd.any():
        kd = _distill(logits, teacher).mean(1)
        loss = loss + cfg.box_distill_weight * kd * torch.as_tensor(box_kd, dtype=kd.dtype)
    with torch.no_grad():
        hard = (logits > 0).float()
        tb = tgt_bin[:, None].float()
        inter = (hard * tb).sum((-1, -2))
        union = (hard + tb).clamp(max=1).sum((-1, -2)).clamp(min=1)
        true_iou = inter / union
    loss = loss + cfg.iou_weight * ((iou_pred - true_iou) ** 2).mean(1)
    return loss.mean()


def simulate_batch(
    model,
    emb,
    gt,
    scale: np.ndarray,
    cfg: InteractiveConfig,
    rng: np.random.Generator,
    *,
    train: bool = True,
    start: str | None = None,
    rounds: int | None = None,
    slack: float | None = None,
    datasets: list[str] | None = None,
) -> tuple[Any, np.ndarray]:
    """Run one simulated session per sample; return (mean loss over rounds, Dice (R+1, B)).

    Args:
        model: a :class:`samed.model.SamModel` (the trainable parts set by ``apply_lora``).
        emb: (B, C, h, w) float32 embeddings; gt: (B, S, S) float32 {0, 1} targets on the model
            frame; scale: (B,) model px per slice px (box slack is given in slice px).
        cfg: the :class:`~samed.train.interactive.InteractiveConfig` (loss weights, ranges).
        start: ``"box"`` / ``"point"`` (None: drawn with ``point_start_prob``); rounds,
            slack: fixed values (None: drawn from the config's ranges).
        train: build the graph, score and click on the decoder's low-res grid, with the teacher
            terms. False: no gradients, deterministic clicks, everything on the full S x S
            frame with the single-mask output (the held-back validation).
        datasets: (B,) dataset names (for the box-only distillation; None: none take it).

    Returns:
        (loss tensor, per-round Dice of the single-mask output, shape (R+1, B)).
    """
    import torch
    import torch.nn.functional as F

    b, s = gt.shape[0], gt.shape[-1]
    gtn = gt.numpy().astype(bool)
    size = int(getattr(model, "low_res_size", s)) if train else s
    f = s // size if size < s and s % size == 0 else 1
    target = F.avg_pool2d(gt[:, None], f)[:, 0] if f > 1 else gt
    tgt_bin = target >= 0.5
    empty = ~tgt_bin.flatten(1).any(1)
    if bool(empty.any()):  # a structure thinner than the loss grid: any coverage counts
        tgt_bin[empty] = target[empty] > 0
    tgn = tgt_bin.numpy()
    if start is None:
        start = "point" if rng.random() < cfg.point_start_prob else "box"
    n_rounds = int(rng.integers(cfg.rounds[0], cfg.rounds[1] + 1)) if rounds is None else rounds
    pts: list[list[tuple[float, float]]] = [[] for _ in range(b)]
    labs: list[list[int]] = [[] for _ in range(b)]
    boxes = None
    if start == "box":
        boxes = np.zeros((b, 4), np.float32)
        for i in range(b):
            sl = rng.uniform(*cfg.box_slack, size=4) if slack is None else np.full(4, slack)
            bb = _bbox(gtn[i]) + np.array([-1, -1, 1, 1]) * sl * float(scale[i])
            boxes[i] = np.clip(bb, 0, s - 1)
    else:
        for i in range(b):
            pts[i].append(_centre(gtn[i]))
            labs[i].append(1)
    use_teacher = (
        train
        and model.base_parts is not None
        and (cfg.multimask_distill_weight > 0 or cfg.box_distill_weight > 0)
    )
    kd_rows = np.array(
        [d not in cfg.distill_exclude for d in datasets] if datasets else [False] * b
    )
    total = torch.zeros(())
    dices = []
    mask_in = None
    prev_full = np.zeros_like(gtn)
    for r in range(n_rounds + 1):
        if r:  # the box refine_slice uses: a point start's previous mask box, widened to clicks
            base = boxes if start == "box" else None
            boxes = np.stack([_widen(prev_full[i], base, i, pts[i], labs[i], s) for i in range(b)])
        bt = None if boxes is None else torch.as_tensor(boxes)
        pt = None
        if pts[0]:
            p = torch.as_tensor(np.array(pts, np.float32))
            lab = torch.as_tensor(np.array(labs, np.int64))
            if bt is None:  # SAM pads point-only prompts with a "not a point" entry
                p = torch.cat([p, torch.zeros(b, 1, 2)], 1)
                lab = torch.cat([lab, -torch.ones(b, 1, dtype=torch.int64)], 1)
            pt = (p, lab)
        mi = mask_in
        if train and mi is not None and rng.random() < cfg.no_mask_prob:
            mi = None  # refine_slice also asks the decoder without the mask prompt
        if train:
            logits, iou = decode_all(model, emb, boxes=bt, points=pt, mask_inputs=mi)
            teacher = None
            if use_teacher and r == 0:  # the teacher on the start prompt only (CPU cost)
                with torch.no_grad():
                    teacher, _ = decode_all(model, emb, bt, pt, mi, base=True)
            box_kd = kd_rows & (start == "box" and r == 0)
            total = total + _round_loss(logits, iou, target, tgt_bin, teacher, box_kd, cfg)
            lg = logits[:, 0].detach()
        else:
            with torch.no_grad():
                logits, _ = model.decode(emb, boxes=bt, points=pt, mask_inputs=mi)
            lg = logits[:, 0]
            if lg.shape[-1] != s:
                lg = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)[:, 0]
        prev = (lg > 0).numpy()
        inter = (prev & tgn).sum((1, 2))
        dices.append(2 * inter / np.maximum(prev.sum((1, 2)) + tgn.sum((1, 2)), 1))
        if f > 1:  # the full-frame mask for the next round's box
            prev_full = np.repeat(np.repeat(prev, f, axis=1), f, axis=2)
        else:
            prev_full = prev
        if r == n_rounds:
            break
        mask_in = logits[:, :1].detach()
        for i in range(b):
            c = _click(prev[i], tgn[i], rng, cfg.random_click_prob if train else 0.0)
            if c is None:  # exact already: repeat a positive click at the centre
                pts[i].append(_centre(gtn[i]))
                labs[i].append(1)
                continue
            (x, y), lab_ = c
            pts[i].append((x * f + (f - 1) / 2.0, y * f + (f - 1) / 2.0))
            labs[i].append(lab_)
    return total / (n_rounds + 1), np.array(dices)
