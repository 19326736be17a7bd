"""Training slices for the click-aware adapter (:mod:`samed.train.interactive`).

The image encoder stays frozen, so each training slice's base-model embedding is computed once
(through :class:`samed.engine.Session`, i.e. exactly the engine's preprocessing: intensity
mapping of the whole volume, resize, min-max, padding) and stored on disk as float16 in a
memory map, together with the slice's label map on the model's padded input frame.

A cache folder holds::

    embeddings.npy   (N, C, h, w) float16 memmap (C, h, w = 256, 64, 64 for LiteMedSAM)
    labels.npy       (N, S, S) uint8 memmap: the slice's label map resized into the S x S
                     model frame (nearest neighbour, zero padding bottom/right)
    index.json       per slice: dataset, case, z, structures present, model-frame scale

Which cases are used is decided by :func:`training_cases` (never a case of
``bench/bench_interactive.py``'s held-out list).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "HELD_OUT",
    "TrainCase",
    "SliceCache",
    "training_cases",
    "build_slice_cache",
    "open_slice_cache",
    "concat_slice_caches",
]

#: the cases bench/bench_interactive.py measures on: never trained on (checked at build time)
HELD_OUT = frozenset(
    {
        "chaos_t2_01",
        "chaos_t2_02",
        "chaos_t2_03",
        "hippocampus_001",
        "hippocampus_003",
        "hippocampus_004",
        "hippocampus_006",
        "BraTS2021_01646",
        "brain1",
        "breast1",
    }
)
#: the project's fixed BTCV validation cases
BTCV_VAL = frozenset({"btcv_0034", "btcv_0037", "btcv_0039", "btcv_0040"})


@dataclass(frozen=True)
class TrainCase:
    """One labeled volume to draw training slices from.

    Attributes:
        dataset: dataset folder name (``acdc``, ``btcv``...).
        case: case id (file stem).
        image: image file.
        labels: label-map file on the same grid.
        values: label values used as structures (each one a binary target).
        every: take every ``every``-th slice that holds a structure.
        role: ``"train"`` or ``"val"`` (the held-back slice set that picks the best step).
        offset: skip this many of the structure-holding slices before taking every
            ``every``-th (a second cache of other slices of the same case).
    """

    dataset: str
    case: str
    image: str
    labels: str
    values: tuple[int, ...]
    every: int
    role: str = "train"
    offset: int = 0


def _acdc_held_out(root: Path) -> set[str]:
    """ACDC val patients (the bench uses val[:5]; none of val is trained on)."""
    meta = json.loads((root / "acdc" / "dataset.json").read_text())
    return set(meta["splits"]["val"])


def training_cases(
    data_root: str | os.PathLike, *, acdc_patients: int = 40, val_fraction: float = 0.12
) -> list[TrainCase]:
    """The click-adapter's training (and held-back validation) cases under ``data_root``.

    ACDC train patients (never val; the first ``acdc_patients`` of the train split, both
    frames), BTCV train split (never btcv_0034/37/39/40), CHAOS T2 cases other than 01-03,
    hippocampus cases other than 001/003/004/006 and the dcmqi CT liver. About
    ``val_fraction`` of the cases of each dataset (the last ones) are the held-back validation
    set. Missing datasets are skipped.
    """
    root = Path(data_root)
    out: list[TrainCase] = []

    def split(ds: str, items: list[tuple[str, Path, Path]], values, every) -> None:
        items = [it for it in items if it[0] not in HELD_OUT and it[1].exists() and it[2].exists()]
        n_val = max(1, int(round(len(items) * val_fraction))) if len(items) > 2 else 0
        for i, (case, img, lab) in enumerate(items):
            role = "val" if i >= len(items) - n_val else "train"
            out.append(TrainCase(ds, case, str(img), str(lab), tuple(values), every, role))

    acdc = root / "acdc"
    if (acdc / "dataset.json").exists():
        held = _acdc_held_out(root)
        pats = [
            p
            for p in json.loads((acdc / "dataset.json").read_text())["splits"]["train"]
            if p not in held
        ][:acdc_patients]
        items = [
            (
                f"{p}_{fr}",
                acdc / "imagesTr" / f"{p}_{fr}.nii.gz",
                acdc / "labelsTr" / f"{p}_{fr}.nii.gz",
            )
            for p in pats
            for fr in ("frame01", "frame02")
        ]
        split("acdc", items, (1, 2, 3), 4)
    btcv = sorted((root / "btcv" / "imagesTr").glob("btcv_*.nii.gz"))
    items = [
        (f.name[:-7], f, root / "btcv" / "labelsTr" / f.name)
        for f in btcv
        if f.name[:-7] not in BTCV_VAL
    ]
    split("btcv", items, range(1, 14), 10)
    chaos = sorted((root / "chaos_t2" / "imagesTr").glob("chaos_t2_*.nii.gz"))
    items = [(f.name[:-7], f, root / "chaos_t2" / "labelsTr" / f.name) for f in chaos]
    split("chaos", items, (1, 2, 3, 4), 3)
    hip = sorted((root / "hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))
    items = [(f.name[:-7], f, root / "hippocampus" / "labelsTr" / f.name) for f in hip]
    split("hippocampus", items, (1, 2), 8)
    d = root / "dcmqi"
    if (d / "ct-3slice").is_dir() and (d / "liver_seg.nrrd").exists():
        out.append(
            TrainCase(
                "dcmqi", "ct-3slice", str(d / "ct-3slice"), str(d / "liver_seg.nrrd"), (1,), 1
            )
        )
    bad = [
        c.case for c in out if c.case in HELD_OUT or c.case.split("_frame")[0] in _held_acdc(root)
    ]
    if bad:  # pragma: no cover - a guard on the lists above
        raise ValueError(f"held-out cases {bad} must never be trained on")
    return out


def _held_acdc(root: Path) -> set[str]:
    return _acdc_held_out(root) if (root / "acdc" / "dataset.json").exists() else set()


@dataclass
class SliceCache:
    """An opened slice cache (see the module docstring).

    Attributes:
        folder: the cache folder.
        embeddings: (N, C, h, w) float16 memmap.
        labels: (N, S, S) uint8 memmap (label values on the model frame).
        index: per slice: ``dataset``, ``case``, ``z``, ``role``, ``values`` (structures present
            with >= ``min_area`` px on the model frame), ``scale`` (model px per slice px).
    """

    folder: Path
    embeddings: np.ndarray
    labels: np.ndarray
    index: list[dict]

    def __len__(self) -> int:
        return len(self.index)

    def samples(self, role: str) -> list[tuple[int, int]]:
        """(slice row, label value) pairs of the ``role`` (``"train"``/``"val"``) slices."""
        return [(i, v) for i, e in enumerate(self.index) if e["role"] == role for v in e["values"]]


def _model_frame_labels(lab: np.ndarray, geo) -> np.ndarray:
    """(H, W) label map -> (S, S) uint8 on the padded model frame (nearest neighbour)."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(lab.astype(np.float32))[None, None]
    t = F.interpolate(t, size=geo.resized_hw, mode="nearest")[0, 0].numpy().astype(np.uint8)
    out = np.zeros((geo.image_size, geo.image_size), np.uint8)
    out[: geo.resized_hw[0], : geo.resized_hw[1]] = t
    return out


def _load_case(case: TrainCase):
    from ..io import load_label_map, load_volume

    vol = load_volume(case.image)
    lab = load_label_map(case.labels).array
    if lab.shape != vol.array.shape:
        return None, None
    return vol, np.asarray(lab)


def build_slice_cache(
    model,
    cases: Iterable[TrainCase],
    folder: str | os.PathLike,
    *,
    max_slices: int = 1200,
    min_area: int = 20,
    log: Callable[[str], None] = print,
) -> SliceCache:
    """Embed the chosen slices of ``cases`` with ``model`` (base encoder) into ``folder``.

    Per case, every ``case.every``-th slice holding one of ``case.values`` (>= ``min_area``
    px on the model frame) is taken, up to ``max_slices`` in all (cases are interleaved so a
    cap keeps every dataset). An existing complete cache in ``folder`` is reused as is.

    Returns:
        The opened :class:`SliceCache`.
    """
    from ..engine import Session

    folder = Path(folder)
    if (folder / "index.json").is_file():
        return open_slice_cache(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[TrainCase, list[int]]] = []
    for case in cases:
        vol, lab = _load_case(case)
        if vol is None:
            log(f"skip {case.case}: label grid differs from the image")
            continue
        fg = np.isin(lab, case.values).any(axis=(1, 2))
        zs = [int(z) for z in np.nonzero(fg)[0]][int(case.offset) :: max(int(case.every), 1)]
        plan.append((case, zs))
    # interleave: the cap keeps the first slices of every case
    total = sum(len(z) for _, z in plan)
    keep = min(total, int(max_slices))
    frac = keep / max(total, 1)
    chosen = [(c, zs[: max(1, int(round(len(zs) * frac)))]) for c, zs in plan if zs]
    n = sum(len(z) for _, z in chosen)
    c_, hw = model.prompt_encoder.embed_dim, model.embedding_size
    emb = np.lib.format.open_memmap(
        folder / "embeddings.npy", mode="w+", dtype=np.float16, shape=(n, c_, *hw)
    )
    labs = np.lib.format.open_memmap(
        folder / "labels.npy",
        mode="w+",
        dtype=np.uint8,
        shape=(n, model.image_size, model.image_size),
    )
    index: list[dict] = []
    row = 0
    for case, zs in chosen:
        vol, lab = _load_case(case)
        session = Session(model, vol.array, modality=vol.modality)
        session.embed(zs)
        for z in zs:
            frame = _model_frame_labels(lab[z], session.geometry)
            values = [int(v) for v in case.values if int((frame == v).sum()) >= min_area]
            emb[row] = session.embedding(z)[0].cpu().numpy().astype(np.float16)
            labs[row] = frame
            index.append(
                {
                    "dataset": case.dataset,
                    "case": case.case,
                    "z": int(z),
                    "role": case.role,
                    "values": values,
                    "scale": float(session.geometry.scale),
                    "modality": vol.modality,
                }
            )
            row += 1
        log(f"cached {case.dataset}/{case.case}: {len(zs)} slices ({row}/{n})")
    emb.flush()
    labs.flush()
    (folder / "index.json").write_text(json.dumps(index, indent=0) + "\n")
    return open_slice_cache(folder)


def open_slice_cache(folder: str | os.PathLike) -> SliceCache:
    """Open a cache written by :func:`build_slice_cache` (read-only memory maps)."""
    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    emb = np.load(folder / "embeddings.npy", mmap_mode="r")
    labs = np.load(folder / "labels.npy", mmap_mode="r")
    if emb.shape[0] != len(index) or labs.shape[0] != len(index):
        raise ValueError(
            f"{folder}: {emb.shape[0]} embeddings and {labs.shape[0]} label maps for "
            f"{len(index)} index entries; rebuild the cache"
        )
    return SliceCache(folder, emb, labs, index)


class _Rows:
    """Row-indexed view of several memory maps stacked along axis 0 (no copy)."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [a.shape[0] for a in arrays])
        self.shape = (int(self.offsets[-1]), *arrays[0].shape[1:])
        self.dtype = arrays[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        one = np.isscalar(rows)
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"rows {rows.tolist()} outside 0..{self.shape[0] - 1}")
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.stack(
            [self.arrays[k][r - self.offsets[k]] for k, r in zip(part, rows, strict=True)]
        )
        return out[0] if one else out


def concat_slice_caches(caches: list[SliceCache]) -> SliceCache:
    """One :class:`SliceCache` over several (rows of the first, then the next...; no copy).

    The caches must have embeddings and label maps of the same shapes; a slice (dataset, case,
    z) that two caches hold is refused.
    """
    if not caches:
        raise ValueError("caches must hold at least one SliceCache; got none")
    if len(caches) == 1:
        return caches[0]
    shapes = {(c.embeddings.shape[1:], c.labels.shape[1:]) for c in caches}
    if len(shapes) != 1:
        raise ValueError(f"slice caches of different shapes {sorted(shapes)}; allowed: one shape")
    keys = [(e["dataset"], e["case"], e["z"]) for c in caches for e in c.index]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"slices {dup} are in more than one cache; each slice must be in one")
    return SliceCache(
        caches[0].folder,
        _Rows([c.embeddings for c in caches]),  # type: ignore[arg-type]
        _Rows([c.labels for c in caches]),  # type: ignore[arg-type]
        [e for c in caches for e in c.index],
    )
