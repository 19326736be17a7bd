"""Training data for :mod:`samed.train`: volumes -> 2D slices -> augmented model inputs.

Every sample is a function of ``(seed, step, position in batch)`` only, so a run resumed from a
checkpoint draws exactly the samples it would have drawn without stopping.

Shapes: a slice is (H, W); a model input is (3, S, S) in [0, 1] made by
:func:`samed.engine.preprocess.prepare_slices` (the inference path); a target is (L, L) class
indices on the low-resolution logit grid (labels resized the same way: longest side to S,
zero-padded, then nearest to L).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.preprocess import (
    body_center,
    canvas_grid,
    inplane_spacing,
    prepare_slices,
    resolve_intensity,
    slice_geometry,
    to_canvas,
)
from .config import AugmentSection, DataSection, PromptSection

__all__ = [
    "VolumeCase",
    "load_cases",
    "SliceSet",
    "Augmenter",
    "prepare_targets",
    "sample_rng",
]


@dataclass
class VolumeCase:
    """One labeled volume in model intensity units.

    Attributes:
        case_id: name of the case.
        image: (Z, Y, X) float32 after the intensity mapping.
        label: (Z, Y, X) int64 class indices (after remapping).
        source: image file or folder.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    source: str


def _read_pair(
    image_path: Path, label_path: Path
) -> tuple[np.ndarray, str, np.ndarray, tuple[float, float], str]:
    """(Z, Y, X) image, its modality, the (Z, Y, X) label map, the in-plane (row, column)
    spacing in mm and the axis codes of the voxel axes (``"LAS"``...) through samed.io (NIfTI, NRRD,
    MHA, npz, DICOM, SEG). The label map must lie on the image's grid: same shape and affine
    (:func:`samed.io.volume.check_same_grid`, the rule ``samed evaluate`` applies), so a label
    with a flipped axis is refused instead of trained on."""
    from ..io.readers import load_label_map, load_volume

    vol = load_volume(image_path)
    labels = load_label_map(label_path, reference=vol)
    return (
        np.asarray(vol.array, dtype=np.float32),
        str(vol.modality or ""),
        np.asarray(labels.array),
        inplane_spacing(vol.affine),
        vol.orientation,
    )


def _to_orientation(
    image: np.ndarray, label: np.ndarray, codes: str, target: str, where: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Flip a (Z, Y, X) image and label map in-plane from ``codes`` to ``target`` orientation
    (as :mod:`samed.engine.orientation` does at inference).

    Raises:
        ValueError: the volume's in-plane axes are not the target's (another plane)."""
    from ..engine.orientation import orientation_flips

    flips = orientation_flips(codes, target)
    if flips is None:
        raise ValueError(
            f"{where} is {codes}: its slices are not in the plane of the first training "
            f"volume ({target}); train on volumes sliced alike"
        )
    axes = tuple(a for a, f in zip((1, 2), flips, strict=True) if f)
    if not axes:
        return image, label
    return np.ascontiguousarray(np.flip(image, axes)), np.ascontiguousarray(np.flip(label, axes))


def check_label_values(
    label: np.ndarray, path: Path, declared: dict[int, str] | None, where: str
) -> None:
    """Refuse label values that the declared label map does not list.

    Args:
        label: (Z, Y, X) integer label map.
        path: its file (named in the error).
        declared: label value -> name that ``where`` declares; None when nothing is declared
            (then only negative values are refused).
        where: what declares the map (e.g. ``dataset.json``), for the message.

    Raises:
        ValueError: naming the file, the values found and the declared ones.
    """
    found = np.unique(label)
    bad = [int(v) for v in found if v < 0 or (declared is not None and int(v) not in declared)]
    if bad:
        allowed = sorted(declared) if declared is not None else "integers >= 0"
        raise ValueError(
            f"{path}: label values {bad[:10]} are not declared in {where} (values found: "
            f"{[int(v) for v in found[:20]]}; declared: {allowed}); fix the label file or "
            "declare the values"
        )


def _remap(label: np.ndarray, mapping: dict[int, dict[str, Any]] | None) -> np.ndarray:
    if mapping is None:
        return label.astype(np.int64)
    out = np.zeros(label.shape, dtype=np.int64)
    for new, spec in mapping.items():
        out[np.isin(label, spec["source"])] = new
    return out


def to_training_canvas(
    image: np.ndarray,
    label: np.ndarray,
    spacing: tuple[float, float],
    target: tuple[float, float],
    canvas: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample an intensity-mapped (Z, Y, X) volume (bilinear) and its label map (nearest) to
    the ``target`` in-plane spacing (mm) on a ``canvas`` x ``canvas`` grid centred on the body,
    exactly as :meth:`samed.engine.Session.automatic` does at inference.

    Returns:
        (image (Z, canvas, canvas) float32, label (Z, canvas, canvas) int64).
    """
    grid = canvas_grid(image.shape[1:], spacing, target, canvas, body_center(image))
    img = to_canvas(image, grid).numpy()
    lab = to_canvas(label.astype(np.float32), grid, mode="nearest").numpy()
    return img.astype(np.float32), np.rint(lab).astype(np.int64)


def thin_slices(case: VolumeCase, step: int) -> VolumeCase:
    """Every ``step``-th slice with foreground and every ``4 * step``-th without (training)."""
    if step <= 1:
        return case
    fg = case.label.reshape(case.label.shape[0], -1).any(1)
    keep = [z for z in range(len(fg)) if (fg[z] and z % step == 0) or z % (4 * step) == 0]
    return VolumeCase(case.case_id, case.image[keep], case.label[keep], case.source)


def load_cases(
    data: DataSection, split: str | None, canvas_size: int = 256, orientation: str | None = None
) -> tuple[list[VolumeCase], dict[int, str], dict[str, Any]]:
    """Read the volumes of one split.

    Args:
        data: the config's data section.
        split: split name (``all`` or None: every case).
        canvas_size: the model input side (used when ``data.spacing`` is set).
        orientation: with ``data.spacing``: flip every volume in-plane to these axis codes
            (e.g. the training split's, ``summary["orientation"]``, for the validation split);
            None: to the first volume's. Recorded as the adapter's training orientation.

    Returns:
        (cases, labels {class id: name} incl. 0 background, summary for the metadata).

    Raises:
        ValueError: unknown split, unreadable files, a label map not on its image's grid (shape
            or affine), label values not declared (dataset.json ``labels`` or ``data.labels``
            sources) or negative.
    """
    from ..datasets import load_dataset

    entries: list[tuple[str, Path, Path, tuple[int, int] | None]] = []
    labels: dict[int, str]
    dataset_name = ""
    declared_by_dataset = False
    declared: dict[int, str] | None = None  # label values a label file may hold
    if data.format == "pairs":
        for c in data.cases:
            if split not in (None, "all") and c.get("split", "train") != split:
                continue
            img = Path(c["image"])
            zr = c.get("z_range")
            cid = str(c.get("id", img.name.split(".")[0]))
            entries.append((cid, img, Path(c["label"]), tuple(zr) if zr else None))
        if not entries:
            raise ValueError(f"data.cases has no case in split {split!r}")
        labels = {0: "background"}
        dataset_name = "pairs"
    else:
        ds = load_dataset(data.root)
        dataset_name = ds.name
        labels = dict(ds.labels)
        declared_by_dataset = ds.labels_declared
        declared = dict(ds.labels) if ds.labels_declared else None
        for c in ds.split(split):
            entries.append((c.case_id, c.image, c.label, None))
    if data.labels is not None:
        labels = {0: "background", **{k: v["name"] for k, v in data.labels.items()}}
    # declared: dataset.json's labels; else data.labels' sources (and background 0); else
    # nothing (then the values must be 0..K without gaps, below)
    where = f"{Path(data.root) / 'dataset.json'} 'labels'"
    if not declared_by_dataset and data.labels is not None:
        declared = {0: "background"}
        declared.update(
            {int(s): spec["name"] for spec in data.labels.values() for s in spec["source"]}
        )
        where = "the config's data.labels sources"
    cases = []
    modality_seen = data.modality
    for cid, img_path, lab_path, zr in entries:
        image, modality, label, spacing, codes = _read_pair(img_path, lab_path)
        if data.spacing is not None:  # the canvas path: one in-plane orientation
            orientation = orientation or codes
            image, label = _to_orientation(image, label, codes, orientation, img_path)
        check_label_values(label, lab_path, declared, where)
        if zr is not None:
            image, label = image[zr[0] : zr[1]], label[zr[0] : zr[1]]
        modality_seen = data.modality or modality
        _, fn = resolve_intensity(data.intensity, image, modality_seen)
        image = np.nan_to_num(np.asarray(fn(image), dtype=np.float32))
        label = _remap(label, data.labels)
        if data.spacing is not None:
            image, label = to_training_canvas(image, label, spacing, data.spacing, canvas_size)
        cases.append(VolumeCase(cid, image, label, str(img_path)))
    if data.labels is None and cases:
        present = sorted({int(v) for c in cases for v in np.unique(c.label)} | {0})
        if not declared_by_dataset and present != list(range(len(present))):
            raise ValueError(
                f"the label files of {data.root} hold the values {present[:20]}, which are not "
                "0..K without gaps; declare them in data.labels ({new_id: {name, source: "
                "[values]}}) so that no class is made up"
            )
        for k in range(max(present) + 1):
            labels.setdefault(k, f"class{k}")
    summary = {
        "dataset": dataset_name,
        "root": str(data.root),
        "split": split,
        "cases": [c.case_id for c in cases],
        "num_volumes": len(cases),
        "num_slices": int(sum(c.image.shape[0] for c in cases)),
        "modality": modality_seen,
        "intensity": data.intensity if isinstance(data.intensity, str) else list(data.intensity),
        "spacing": None if data.spacing is None else list(data.spacing),
        "orientation": orientation if data.spacing is not None else None,
    }
    return cases, labels, summary


class Augmenter:
    """MONAI dictionary transforms on one (1, H, W) image + label slice.

    Flips, a random affine (rotation, zoom, shift; bilinear for the image, nearest for the
    label, zero padding), random gamma and Gaussian noise. Re-seeded per sample.
    """

    def __init__(self, cfg: AugmentSection) -> None:
        self.cfg = cfg
        self._tf = None

    def _build(self) -> Any:
        from monai.transforms import (
            Compose,
            RandAdjustContrastd,
            RandAffined,
            RandFlipd,
            RandGaussianNoised,
        )

        c = self.cfg
        rot = float(np.deg2rad(c.rotate_deg))
        zoom = (c.scale[0] - 1.0, c.scale[1] - 1.0)
        tfs: list[Any] = []
        if c.flip_prob > 0:
            tfs += [
                RandFlipd(keys=("image", "label"), prob=c.flip_prob, spatial_axis=0),
                RandFlipd(keys=("image", "label"), prob=c.flip_prob, spatial_axis=1),
            ]
        if c.affine_prob > 0:
            tfs.append(
                RandAffined(
                    keys=("image", "label"),
                    prob=c.affine_prob,
                    rotate_range=(rot,),
                    scale_range=(zoom, zoom),
                    translate_range=None,
                    mode=("bilinear", "nearest"),
                    padding_mode="zeros",
                )
            )
        if c.gamma_prob > 0:
            tfs.append(RandAdjustContrastd(keys="image", prob=c.gamma_prob, gamma=c.gamma))
        if c.noise_prob > 0:
            tfs.append(RandGaussianNoised(keys="image", prob=c.noise_prob, std=c.noise_std))
        return Compose(tfs)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment one slice.

        Args:
            image: (H, W) float32.
            label: (H, W) int class indices.
            rng: the sample's generator (everything random is drawn from it).

        Returns:
            (image (H, W) float32, label (H, W) int64).
        """
        if not self.cfg.enabled:
            return image, label
        if self._tf is None:
            self._tf = self._build()
        h, w = image.shape
        img = image
        lo, hi = float(img.min()), float(img.max())
        if self.cfg.shift_frac > 0 and self.cfg.affine_prob > 0:
            # integer roll-free shift by cropping/padding keeps the grid exact
            dy, dx = (rng.uniform(-1, 1, 2) * self.cfg.shift_frac * np.array([h, w])).astype(int)
            img = _shift(img, dy, dx)
            label = _shift(label, dy, dx)
        self._tf.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
        out = self._tf(
            {"image": img[None].astype(np.float32), "label": label[None].astype(np.float32)}
        )
        im = np.asarray(out["image"], dtype=np.float32)[0]
        lab = np.rint(np.asarray(out["label"], dtype=np.float32)[0]).astype(np.int64)
        if hi > lo:  # gamma works on the [lo, hi] range; keep the slice inside it
            im = np.clip(im, lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        return im, lab


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(a)
    h, w = a.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


def prepare_targets(
    labels: np.ndarray | torch.Tensor, image_size: int, low_res: int
) -> torch.Tensor:
    """Class-index maps on the low-resolution logit grid, resized like the model input.

    Args:
        labels: (B, H, W) integer class indices on the slice grid.
        image_size: S (model input side).
        low_res: L (low-resolution logit side).

    Returns:
        (B, L, L) int64: nearest resize of the longest side to S, zero padding to S x S, then
        nearest to L (the inverse of the crop + bilinear upscaling used at inference).
    """
    x = torch.as_tensor(np.asarray(labels)).long()
    geo = slice_geometry(tuple(x.shape[1:]), image_size)
    y = x[:, None].float()
    if geo.resized_hw != geo.original_hw:
        y = F.interpolate(y, size=geo.resized_hw, mode="nearest-exact")
    out = y.new_zeros((y.shape[0], 1, image_size, image_size))
    out[:, :, : geo.resized_hw[0], : geo.resized_hw[1]] = y
    if low_res != image_size:
        out = F.interpolate(out, size=(low_res, low_res), mode="nearest-exact")
    return out[:, 0].long()


def sample_rng(seed: int, step: int, index: int = 0) -> np.random.Generator:
    """The generator of sample ``index`` of step ``step`` (independent of any global state)."""
    return np.random.default_rng([int(seed), int(step), int(index)])


@dataclass
class Sample:
    """One training sample before batching.

    Attributes:
        image: (3, S, S) float32 model input.
        target: (L, L) int64 class indices (automatic) or {0, 1} (prompted).
        box: (4,) XYXY model-input pixels (prompted) or None.
        points: (N, 2) XY model-input pixels of positive points, or None.
    """

    image: torch.Tensor
    target: torch.Tensor
    box: np.ndarray | None = None
    points: np.ndarray | None = None


class SliceSet:
    """All 2D slices of some volumes plus the recipe to turn one into a training sample.

    Args:
        cases: training volumes.
        mode: ``automatic`` or ``prompted``.
        augment: augmentation settings.
        prompt: prompt sampling settings (prompted mode).
        image_size: S.
        low_res: L.
        empty_fraction: share of automatic samples drawn from slices without foreground.
    """

    def __init__(
        self,
        cases: list[VolumeCase],
        mode: str,
        augment: AugmentSection,
        prompt: PromptSection,
        image_size: int,
        low_res: int,
        empty_fraction: float = 0.05,
    ) -> None:
        self.mode = mode
        self.image_size = image_size
        self.low_res = low_res
        self.prompt = prompt
        self.empty_fraction = empty_fraction
        self.augment = Augmenter(augment)
        self.slices: list[tuple[np.ndarray, np.ndarray]] = []
        for c in cases:
            for z in range(c.image.shape[0]):
                self.slices.append((c.image[z], c.label[z]))
        fg = [i for i, (_, lab) in enumerate(self.slices) if lab.any()]
        self.foreground = fg
        self.empty = [i for i, (_, lab) in enumerate(self.slices) if not lab.any()]
        # prompted: every (slice, class) pair with the class present
        self.pairs = [(i, int(k)) for i in fg for k in np.unique(self.slices[i][1]) if k != 0]
        if mode == "automatic" and not fg:
            raise ValueError("training data has no labeled foreground voxel")
        if mode == "prompted" and not self.pairs:
            raise ValueError("training data has no labeled object to prompt")

    def __len__(self) -> int:
        return len(self.slices)

    def sample(self, seed: int, step: int, index: int, augment: bool = True) -> Sample:
        """Sample ``index`` of the batch of step ``step`` (deterministic)."""
        rng = sample_rng(seed, step, index)
        if self.mode == "automatic":
            if self.empty and rng.random() < self.empty_fraction:
                i = self.empty[int(rng.integers(len(self.empty)))]
            else:
                i = self.foreground[int(rng.integers(len(self.foreground)))]
            cls = 0
        else:
            i, cls = self.pairs[int(rng.integers(len(self.pairs)))]
        image, label = self.slices[i]
        if augment:
            image, label = self.augment(image, label, rng)
        x = prepare_slices(image[None], self.image_size)[0]
        if self.mode == "automatic":
            return Sample(x, prepare_targets(label[None], self.image_size, self.low_res)[0])
        mask = label == cls
        if not mask.any():  # the object left the field of view: fall back to the raw slice
            image, label = self.slices[i]
            x = prepare_slices(image[None], self.image_size)[0]
            mask = label == cls
        tgt = prepare_targets(mask[None].astype(np.int64), self.image_size, self.low_res)[0]
        box, pts = self._prompt(mask, rng)
        return Sample(x, tgt, box, pts)

    def _prompt(
        self, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Jittered box (and optional points) in model-input pixels from a (H, W) mask."""
        geo = slice_geometry(mask.shape, self.image_size)
        ys, xs = np.nonzero(mask)
        s = geo.scale
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64) * s
        lo, hi = self.prompt.box_margin
        margin = rng.uniform(lo, hi, 4) * np.array([-1, -1, 1, 1])
        shift = rng.uniform(-self.prompt.box_shift, self.prompt.box_shift, 4)
        box = box + margin + shift
        rh, rw = geo.resized_hw
        box = np.clip(box, 0, [rw - 1, rh - 1, rw - 1, rh - 1])
        box[2], box[3] = max(box[2], box[0] + 1), max(box[3], box[1] + 1)
        pts = None
        if self.prompt.point_prob > 0 and rng.random() < self.prompt.point_prob:
            n = int(rng.integers(1, self.prompt.max_points + 1))
            idx = rng.integers(len(ys), size=n)
            pts = np.stack([xs[idx], ys[idx]], 1).astype(np.float64) * s
        return box.astype(np.float32), pts


def collate(samples: list[Sample], mode: str) -> dict[str, Any]:
    """Stack samples: images (B, 3, S, S), targets (B, L, L), boxes (B, 4), points ((B, N, 2),
    (B, N)) padded with label -1 (SAM's "not a point")."""
    out: dict[str, Any] = {
        "images": torch.stack([s.image for s in samples]),
        "targets": torch.stack([s.target for s in samples]),
    }
    if mode == "prompted":
        out["boxes"] = torch.as_tensor(np.stack([s.box for s in samples]))
        n = max((len(s.points) for s in samples if s.points is not None), default=0)
        if n:
            pts = torch.zeros(len(samples), n, 2)
            lab = -torch.ones(len(samples), n, dtype=torch.long)
            for b, s in enumerate(samples):
                if s.points is not None:
                    pts[b, : len(s.points)] = torch.as_tensor(s.points)
                    lab[b, : len(s.points)] = 1
            out["points"] = (pts, lab)
    return out


def default_workers() -> int:
    """Data workers worth starting here (0 on a 2-core machine)."""
    n = os.cpu_count() or 1
    return 0 if n <= 4 else min(8, n - 2)
