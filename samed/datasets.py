"""Labeled datasets for fine-tuning and evaluation (MSD / nnU-Net style ``dataset.json``).

``dataset.json`` has ``training: [{"image": rel, "label": rel}, ...]``, ``labels: {"0":
"background", ...}`` and optional ``splits: {name: [case-or-patient ids]}``. A split entry
selects every case whose id equals it or starts with ``entry + "_"`` (ACDC lists patients, each
with two frames). A folder without ``dataset.json`` but with ``imagesTr/`` + ``labelsTr/``
pairs files by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .registry import VOLUME_SUFFIXES, strip_volume_suffix

__all__ = ["Case", "LabeledDataset", "load_dataset"]

_SUFFIXES = VOLUME_SUFFIXES


def _case_id(path: Path) -> str:
    name = strip_volume_suffix(path.name)
    return name[:-5] if name.endswith("_0000") else name


@dataclass(frozen=True)
class Case:
    """One labeled case.

    Attributes:
        case_id: file stem of the image (e.g. ``patient002_frame01``).
        image: image file.
        label: integer label map on the image's grid.
        z_range: ``(z0, z1)``: only slices ``z0 <= z < z1`` of the ``(Z, Y, X)`` arrays count
            (a fine-tuning config's ``z_range``); None: the whole volume.
    """

    case_id: str
    image: Path
    label: Path
    z_range: tuple[int, int] | None = None


@dataclass
class LabeledDataset:
    """A labeled dataset: cases, class names and named splits."""

    root: Path
    cases: list[Case]
    labels: dict[int, str]
    splits: dict[str, list[str]] = field(default_factory=dict)
    name: str = ""
    modality: str = ""
    #: whether ``labels`` was declared (``dataset.json`` ``labels``) rather than assumed
    labels_declared: bool = True
    #: class remapping ``{class id: (label-file values,)}`` (a fine-tuning config's
    #: ``data.labels`` sources); None: the label files hold the class ids themselves
    label_sources: dict[int, tuple[int, ...]] | None = None
    #: where the cases were declared (``dataset.json`` by default; a config file)
    source: str = ""

    def split(self, name: str | None) -> list[Case]:
        """Cases of split ``name`` (None or ``"all"``: every case), in dataset order.

        Raises:
            ValueError: unknown split name (lists the known ones).
        """
        if name in (None, "all"):
            return list(self.cases)
        if name not in self.splits:
            raise ValueError(
                f"split {name!r} is not in {self.source or self.root / 'dataset.json'}; "
                "known splits: "
                f"{sorted(self.splits) + ['all']}"
            )
        wanted = self.splits[name]
        out = [
            c
            for c in self.cases
            if any(c.case_id == w or c.case_id.startswith(f"{w}_") for w in wanted)
        ]
        if not out:
            raise ValueError(f"split {name!r} of {self.root} matches no case")
        return out

    def select(self, cases: list[Case], ids: list[str]) -> list[Case]:
        """The cases of ``cases`` whose id is in ``ids``, in dataset order.

        Raises:
            ValueError: an id that names no case of ``cases`` (lists the known ones).
        """
        known = {c.case_id for c in cases}
        missing = [i for i in ids if i not in known]
        if missing:
            raise ValueError(
                f"case ids {missing} are not among the {len(known)} cases selected from "
                f"{self.source or self.root}; known: {sorted(known)}"
            )
        return [c for c in cases if c.case_id in set(ids)]

    def remap_labels(self, label: np.ndarray) -> np.ndarray:
        """A label array in class ids (``label_sources`` applied; values not listed -> 0).

        Args:
            label: integer array of label-file values, any shape.

        Returns:
            int64 array of the same shape.
        """
        label = np.asarray(label).astype(np.int64)
        if self.label_sources is None:
            return label
        out = np.zeros_like(label)
        for k, srcs in self.label_sources.items():
            out[np.isin(label, srcs)] = k
        return out

    @property
    def foreground_labels(self) -> dict[int, str]:
        return {k: v for k, v in self.labels.items() if k != 0}


def load_dataset(root: str | os.PathLike) -> LabeledDataset:
    """Read an MSD-style dataset folder (see module docstring).

    Raises:
        ValueError: missing folder/files, malformed ``dataset.json``, listed files absent.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist")
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
        entries = meta.get("training")
        if not isinstance(entries, list) or not entries:
            raise ValueError(
                f"{meta_path}: 'training' must be a non-empty list of image/label pairs"
            )
        cases = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "image" not in e or "label" not in e:
                raise ValueError(f"{meta_path}: training[{i}] needs 'image' and 'label'")
            img, lab = root / e["image"], root / e["label"]
            for p in (img, lab):
                if not p.exists():
                    raise ValueError(f"{meta_path}: training[{i}] file {p} does not exist")
            cases.append(Case(_case_id(img), img, lab))
        raw_labels = meta.get("labels") or {"0": "background", "1": "foreground"}
        try:
            labels = {int(k): str(v) for k, v in raw_labels.items()}
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{meta_path}: 'labels' must map integer strings to names") from exc
        splits = {str(k): [str(x) for x in v] for k, v in (meta.get("splits") or {}).items()}
        modality = meta.get("modality", {})
        modality = str(modality.get("0", "")) if isinstance(modality, dict) else str(modality)
        return LabeledDataset(
            root,
            cases,
            labels,
            splits,
            str(meta.get("name", root.name)),
            modality,
            labels_declared=bool(meta.get("labels")),
        )
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    if not (img_dir.is_dir() and lab_dir.is_dir()):
        raise ValueError(
            f"{root}: needs dataset.json, or imagesTr/ and labelsTr/ folders of matching files"
        )
    labels_by_id = {_case_id(p): p for p in sorted(lab_dir.iterdir()) if p.name.endswith(_SUFFIXES)}
    cases = []
    for p in sorted(img_dir.iterdir()):
        if p.name.endswith(_SUFFIXES) and _case_id(p) in labels_by_id:
            cases.append(Case(_case_id(p), p, labels_by_id[_case_id(p)]))
    if not cases:
        raise ValueError(f"{root}: no image in imagesTr/ has a label of the same name in labelsTr/")
    return LabeledDataset(
        root, cases, {0: "background", 1: "foreground"}, {}, root.name, labels_declared=False
    )
