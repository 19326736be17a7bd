"""Calibration cases of ``auto``'s accuracy check (:mod:`samed.engine.backend_auto`), and the
automatic check's slices prepared exactly as :meth:`samed.engine.Session.automatic` prepares
them for the model's adapter.

The automatic check (an automatic adapter is scored on its argmax class maps) runs a real
:class:`~samed.engine.Session` over each calibration volume (its affine gives the spacing and
orientation, the dataset its modality) and calls :meth:`~samed.engine.Session.automatic_iter`
on a few of its slices: the adapter's recorded intensity mapping (e.g. abdomen-ct's HU window
[-125, 275]), its training spacing and body-centred canvas and its training orientation
(:mod:`samed.engine.canvas`) are applied by the Session itself, not by a second preprocessing
path. The volumes are training cases of the adapter's modality (``preprocessing.modality`` of
its metadata.json: BTCV for CT; ACDC and CHAOS T2 for MR; all three when it records none), by
the project's fixed splits (never a validation or benchmark case).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ..datasets import Case
    from ..io import Volume
    from ..model import SamModel
    from .backends import EncoderBackend

__all__ = [
    "AUTOMATIC_CHECK_VERSION",
    "CALIBRATION_DATASETS",
    "AutomaticCase",
    "adapter_modality",
    "automatic_cases",
    "automatic_outputs",
    "covering_slices",
    "training_cases",
]

#: (dataset folder, modality) of the calibration data, in the order they are taken
CALIBRATION_DATASETS = (("btcv", "CT"), ("acdc", "MR"), ("chaos_t2", "MR"))
#: part of ``auto``'s choices.json key for automatic adapters: 2 = slices prepared by a Session
#: with the adapter's own preprocessing, of the adapter's modality (1, unversioned: generic
#: ``intensity="auto"`` slices of CT and MRI on their own pixel grid); 3 = the same slices, each
#: class held to ``backend_auto.MIN_CLASS_DICE_AUTOMATIC``; 4 = slices chosen so that every
#: class of the calibration volumes is shown (:func:`covering_slices`; 3 spread them evenly, and
#: abdomen-ct's adrenals were too small there to be scored)
AUTOMATIC_CHECK_VERSION = 4
#: a class counts as shown on a calibration slice from this many pixels (as the check's
#: ``backend_auto.MIN_CLASS_PIXELS`` scores a class)
MIN_PIXELS = 50


def training_cases(root: Path, name: str) -> list[Case]:
    """The training cases of calibration dataset ``name`` under ``root``: its dataset.json
    ``train`` split, else every case outside the project's fixed validation / benchmark cases
    (BTCV 0034/0037/0039/0040, CHAOS T2 01-03 and the other held-out cases), in file order."""
    from ..datasets import load_dataset

    ds = load_dataset(root / name)
    if "train" in ds.splits:
        return list(ds.split("train"))
    from ..train.interactive_data import BTCV_VAL, HELD_OUT

    return [c for c in ds.cases if c.case_id not in BTCV_VAL | HELD_OUT]


def adapter_modality(model: SamModel) -> str | None:
    """``"CT"`` or ``"MR"``: the ``preprocessing.modality`` (else ``training_data.modality``)
    recorded in the metadata.json of ``model``'s adapter; None when there is no adapter folder
    or it records neither (an MR variant such as ``"MRI"`` counts as ``"MR"``)."""
    adapter = getattr(model, "adapter", None)
    path = getattr(adapter, "path", None) if adapter is not None else None
    if path is None:
        return None
    try:
        meta = json.loads((Path(path) / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    for part in ("preprocessing", "training_data"):
        sub = meta.get(part)
        value = sub.get("modality") if isinstance(sub, dict) else None
        if isinstance(value, str) and value.strip():
            mod = value.strip().upper()
            return "CT" if mod.startswith("CT") else "MR" if mod.startswith("MR") else None
    return None


@dataclass
class AutomaticCase:
    """One calibration volume of the automatic check.

    Attributes:
        case_id: the dataset's case id (e.g. ``"btcv_0005"``).
        dataset: the calibration dataset's folder name (``"btcv"``, ``"acdc"``, ``"chaos_t2"``).
        modality: ``"CT"`` or ``"MR"`` (passed to the Session).
        volume: the loaded :class:`samed.io.Volume` (its affine gives spacing and orientation).
        slices: the z indices (axis 0 of the (Z, Y, X) array) checked: labelled slices that
            together show every class (:func:`covering_slices`).
    """

    case_id: str
    dataset: str
    modality: str
    volume: Volume
    slices: list[int]


def _spread(zs: list[int], k: int) -> list[int]:
    """``k`` of the sorted ``zs``, evenly spread over them and away from both ends."""
    if k <= 0 or not zs:
        return []
    pos = np.linspace(0, len(zs) - 1, k + 2)[1:-1].round().astype(int)
    return sorted({zs[i] for i in pos})


def automatic_cases(
    model: SamModel, n: int, root: Path | None, cases_per_dataset: int = 2
) -> list[AutomaticCase]:
    """The volumes and slices of the automatic check for ``model``'s adapter: ``n`` labelled
    slices in all, over the first training cases (:func:`training_cases`) of the calibration
    datasets of its modality (:func:`adapter_modality`; all of them when unknown), taken
    round-robin over those datasets, ``max(2, number of datasets)`` cases, the slices shared out
    evenly and chosen so that together they show every labelled class
    (:func:`covering_slices`). ``[]`` when ``root`` is None or holds none of those datasets."""
    if root is None or n < 1:
        return []
    from ..io import load_label_map, load_volume

    modality = adapter_modality(model)
    names = [(d, m) for d, m in CALIBRATION_DATASETS if modality is None or m == modality]
    per: list[list[tuple[str, str, Any]]] = []
    for name, mod in names:
        if (root / name / "dataset.json").is_file():
            per.append([(name, mod, c) for c in training_cases(root, name)[:cases_per_dataset]])
    picked: list[tuple[str, str, Any]] = []
    for i in range(cases_per_dataset):
        picked += [p[i] for p in per if i < len(p)]
    picked = picked[: max(2, len(per))]
    out: list[AutomaticCase] = []
    for j, (name, mod, case) in enumerate(picked):
        k = n // len(picked) + (1 if j < n % len(picked) else 0)
        vol = load_volume(case.image)
        lab = np.asarray(load_label_map(case.label, reference=vol).array)
        zs = covering_slices(lab, k)  # each volume shows all its classes: more pixels of each
        if zs:
            out.append(AutomaticCase(case.case_id, name, mod, vol, zs))
    return out


def covering_slices(
    lab: np.ndarray, k: int, seen: set[int] | None = None, min_pixels: int = MIN_PIXELS
) -> list[int]:
    """``k`` labelled slices of the (Z, Y, X) label map ``lab`` that together show every class.

    Greedy: while a class with at least ``min_pixels`` pixels on some slice is not yet shown
    (not in ``seen``), take the slice that shows the most such classes, ties broken by the
    largest pixel count of the least-shown of them (so a small organ such as an adrenal is
    checked where it is largest); the remaining picks are spread evenly over the labelled
    slices (:func:`_spread`). ``seen`` (class values already shown by earlier volumes) is
    updated in place. Returns sorted z indices (axis 0), at most ``k``.
    """
    if seen is None:
        seen = set()
    labelled = [z for z in range(lab.shape[0]) if lab[z].any()]
    if k <= 0 or not labelled:
        return []
    counts = {}
    for z in labelled:
        vals, cnt = np.unique(lab[z], return_counts=True)
        counts[z] = {
            int(v): int(c) for v, c in zip(vals, cnt, strict=True) if v and c >= min_pixels
        }
    picked: list[int] = []
    while len(picked) < k:
        gains = {z: set(c) - seen for z, c in counts.items() if z not in picked}
        best = max(
            (z for z in gains if gains[z]),
            key=lambda z: (len(gains[z]), min(counts[z][c] for c in gains[z]), -z),
            default=None,
        )
        if best is None:
            break
        picked.append(best)
        seen |= gains[best]
    rest = [z for z in labelled if z not in picked]
    picked += [z for z in _spread(rest, k - len(picked)) if z not in picked]
    return sorted(picked)


@torch.inference_mode()
def automatic_outputs(
    model: SamModel, cases: list[AutomaticCase], backend: EncoderBackend | None = None
) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
    """Run :meth:`samed.engine.Session.automatic_iter` over ``cases`` with the model's encoder
    running as ``backend`` (None or a backend without ``run``: torch fp32, the model's own
    encoder); ``model.encoder_backend`` is restored afterwards.

    Each volume gets a fresh Session (``intensity="auto"``: the adapter's recorded mapping;
    spacing and orientation from the volume's affine; no disk cache), so the encoder sees
    exactly what ``Session.automatic`` feeds it for that adapter.

    Returns:
        ``(labels, inputs, embeddings)``: the raw per-slice argmax class maps, each (Y, X) on the
        source slice grid, in the order of the cases and their slices; the (N, 3, S, S) float32
        encoder inputs (after the model's normalisation, as ``backend.run`` receives them) and
        the (N, C, h, w) float32 embeddings, in the order they were encoded (N = the slices).
    """
    from .session import Session

    saved = model.encoder_backend
    inputs: list[torch.Tensor] = []
    embs: list[torch.Tensor] = []
    handles = []
    if backend is None or backend.run is None:
        enc = model.image_encoder

        def pre(_mod: torch.nn.Module, args: tuple) -> None:
            inputs.append(args[0].detach().float().clone())

        def post(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            embs.append(out.detach().float().clone())

        handles = [enc.register_forward_pre_hook(pre), enc.register_forward_hook(post)]
        model.encoder_backend = None
    else:
        run = backend.run

        def recorded(x: torch.Tensor) -> torch.Tensor:
            inputs.append(x.detach().float().clone())
            e = run(x)
            embs.append(e.detach().float().clone())
            return e

        # a copy bound to this model: Session's model.encode runs it (and only it)
        model.encoder_backend = dataclasses.replace(backend, run=recorded).bind(model)
    labels: list[np.ndarray] = []
    try:
        for case in cases:
            session = Session(model, case.volume, modality=case.modality, cache_dir=None)
            for _z, lab, _done, _total in session.automatic_iter(case.slices):
                labels.append(np.asarray(lab))
    finally:
        for h in handles:
            h.remove()
        model.encoder_backend = saved
    if not inputs:
        raise ValueError("automatic_outputs: no slice was encoded (cases list no slices)")
    return labels, torch.cat(inputs), torch.cat(embs)
