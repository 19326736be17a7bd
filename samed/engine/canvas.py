"""Automatic segmentation at the adapter's training spacing, mapped back to the source grid.

An automatic adapter whose metadata records ``preprocessing.spacing`` (in-plane mm) was trained
on slices resampled to that spacing on a model-size canvas centred on the body
(:func:`samed.engine.preprocess.canvas_grid`). :meth:`samed.engine.Session.automatic` then does
the same with each slice of a volume whose spacing it knows: resample (bilinear) onto the
canvas, encode, decode the class logits, resample the logits back to the source slice grid
(bilinear, the exact inverse geometry) and take the argmax there. The output has the source
shape, so it lies on the source affine. When the adapter also records its training orientation
and the volume's differs by a flip of rows and / or columns, the slices are flipped first and
the class scores flipped back (:mod:`samed.engine.orientation`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..precision import encoder_precision
from .orientation import describe_orientation, orientation_flips
from .preprocess import CanvasGrid, body_center, canvas_grid, from_canvas, prepare_slices, to_canvas

if TYPE_CHECKING:
    from .session import Session

__all__ = [
    "session_canvas",
    "canvas_logits",
    "canvas_automatic_iter",
    "plain_automatic_iter",
    "resampling_record",
]


def resampling_record(
    model: object, spacing: tuple[float, float] | None, orientation: str | None = None
) -> dict:
    """What automatic segmentation does with the in-plane resolution and orientation (for
    ``case.json``): ``training_spacing_mm`` (the adapter's, or None), ``resampling`` (a
    sentence), ``orientation`` (the volume's axis codes, e.g. ``"LPS"``, or None),
    ``training_orientation`` (the adapter's) and ``reorientation`` (a sentence)."""
    adapter = getattr(model, "adapter", None)
    target = getattr(adapter, "spacing", None) if adapter is not None else None
    train_or = getattr(adapter, "orientation", None) if adapter is not None else None
    reorient = describe_orientation(orientation, train_or)
    if target is None and train_or is not None:
        reorient = "none: the adapter records no training spacing (native grid, as stored)"
    extra = {
        "orientation": orientation,
        "training_orientation": train_or,
        "reorientation": reorient,
    }
    if target is None:
        how = "none: the adapter records no training spacing (native grid)"
    elif spacing is None:
        how = "none: the volume's pixel spacing is unknown (native grid)"
    else:
        how = (
            f"automatic: slices resampled from {spacing[0]:g} x {spacing[1]:g} mm to the "
            f"adapter's {target[0]:g} x {target[1]:g} mm on a "
            f"{getattr(model, 'image_size', '?')}-pixel canvas centred on the body; class "
            "scores mapped back to the source grid (bilinear), then argmax"
        )
    return {
        "training_spacing_mm": None if target is None else list(target),
        "resampling": how,
        **extra,
    }


def session_canvas(session: Session) -> CanvasGrid | None:
    """The canvas of a session's volume, or None when the plain path applies (the adapter
    records no training spacing, or the session does not know the volume's spacing)."""
    adapter = session.model.adapter
    target = getattr(adapter, "spacing", None) if adapter is not None else None
    if target is None or session.spacing is None:
        return None
    if session._canvas is None:
        session._canvas = canvas_grid(
            session.shape[1:],
            session.spacing,
            target,
            session.model.image_size,
            body_center(_oriented(session, session.image)),
        )
    return session._canvas


def _flips(session: Session) -> tuple[bool, bool]:
    """(flip rows, flip columns) that bring the session's slices to the adapter's training
    orientation ((False, False) when either is unknown or the planes differ)."""
    target = getattr(session.model.adapter, "orientation", None)
    source = getattr(session, "orientation", None)
    if target is None or source is None:
        return False, False
    return orientation_flips(source, target) or (False, False)


def _oriented(session: Session, a: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """``a`` (..., Y, X) flipped to / from the training orientation (flips are their own
    inverse)."""
    fy, fx = _flips(session)
    dims = [d for d, f in ((-2, fy), (-1, fx)) if f]
    if not dims:
        return a
    if isinstance(a, torch.Tensor):
        return torch.flip(a, dims)
    return np.ascontiguousarray(np.flip(a, axis=tuple(dims)))


def _encode_canvas(session: Session, zs: list[int], grid: CanvasGrid, mirror: bool) -> torch.Tensor:
    """(B, ...) embeddings of slices ``zs`` oriented and resampled onto the canvas (columns of the
    canvas mirrored first when ``mirror``), on the model's device, float32."""
    model = session.model
    canvas = to_canvas(_oriented(session, session.image[zs]), grid)
    if mirror:
        canvas = torch.flip(canvas, (-1,))
    x = prepare_slices(canvas, model.image_size).to(model.device)
    prec = encoder_precision(model.device, session.amp)
    ctx = (
        contextlib.nullcontext()
        if prec == "fp32"
        else torch.autocast("cuda", dtype=torch.bfloat16 if prec == "bf16" else torch.float16)
    )
    with ctx:
        return model.encode(x).float()


@torch.inference_mode()
def canvas_logits(
    session: Session, zs: list[int], grid: CanvasGrid, mirror: bool = False
) -> torch.Tensor:
    """(B, C, Y, X) float32 class logits (CPU) of slices ``zs`` on the source grid, through the
    canvas (see the module docstring); the canvas embeddings are kept in the session.

    ``mirror``: predict the left-right mirror of each canvas slice and mirror the logits back
    (the second member of the ``flip`` uncertainty, :mod:`samed.uncertainty`; not cached).
    """
    model = session.model
    size = model.image_size
    if mirror:
        emb = _encode_canvas(session, zs, grid, True)
    else:
        missing = [z for z in zs if z not in session._canvas_cache]
        if missing:
            for z, e in zip(
                missing, _encode_canvas(session, missing, grid, False).cpu(), strict=True
            ):
                session._canvas_cache[z] = e.clone()
        emb = torch.stack([session._canvas_cache[z] for z in zs]).to(model.device)
    logits, _ = model.decode(emb, multimask_output=True)
    logits = logits.float()
    if logits.shape[-1] != size:
        logits = torch.nn.functional.interpolate(
            logits, size=(size, size), mode="bilinear", align_corners=False
        )
    if mirror:
        logits = torch.flip(logits, (-1,))
    return _oriented(session, from_canvas(logits.cpu(), grid))


def canvas_automatic_iter(
    session: Session, zs: list[int], grid: CanvasGrid
) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """Per-slice class maps through the canvas (see the module docstring).

    Yields:
        (z, labels (Y, X) int16 on the source grid, done, total).
    """
    done = 0
    for i in range(0, len(zs), session.batch_size):
        batch = zs[i : i + session.batch_size]
        labels = canvas_logits(session, batch, grid).argmax(1).to(torch.int16).numpy()
        for z, lab in zip(batch, labels, strict=True):
            done += 1
            yield z, lab, done, len(zs)


@torch.inference_mode()
def plain_automatic_iter(
    session: Session, zs: list[int]
) -> Iterator[tuple[int, np.ndarray, int, int]]:
    """Per-slice class maps on the native grid (the adapter records no training spacing, or the
    volume's spacing is unknown): the session's embeddings, decoded and upscaled to the slice.

    Yields:
        (z, labels (Y, X) int16 on the source grid, done, total).
    """

    geo = session.geometry
    done = 0
    for i in range(0, len(zs), session.batch_size):
        batch = zs[i : i + session.batch_size]
        missing = [z for z in batch if not session.is_embedded(z)]
        if missing:
            session._encode(missing)
        emb = torch.cat([session.embedding(z) for z in batch])
        logits, _ = session.model.decode(emb, multimask_output=True)
        full = geo.upscale(logits)
        labels = full.argmax(1).to(torch.int16).cpu().numpy()
        for z, lab in zip(batch, labels, strict=True):
            done += 1
            yield z, lab, done, len(zs)
