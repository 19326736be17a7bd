"""A folder of annotated volumes (image + label NIfTI pairs) and the fine-tuning config built
from it: what the napari *Train adapter* panel exports and ``samed finetune --from-annotations``
reads. Torch-free.

Layout written by :func:`export_pair`::

    DIR/samed-annotations.json      {"format": "samed-annotations", "version": 1,
                                     "labels": {"1": "RV", ...}, "modality": "MR",
                                     "pairs": [{"name", "image", "label", "source"}, ...]}
    DIR/<name>_image.nii.gz         the volume on its source grid
    DIR/<name>_label.nii.gz         its (Z, Y, X) integer label map on the same grid

:func:`read_annotations` also reads a folder without a manifest: ``*_image.nii.gz`` +
``*_label.nii.gz`` files side by side, or ``imagesTr/`` + ``labelsTr/`` with equal names.
Manifest paths are file names inside ``DIR`` (checked with :func:`samed.paths.safe_name`): a
manifest cannot point elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..paths import safe_name

__all__ = [
    "MANIFEST",
    "AnnotationPair",
    "export_pair",
    "read_annotations",
    "split_pairs",
    "QUICK_DEFAULTS",
    "annotations_config",
    "train_from_annotations",
]

MANIFEST = "samed-annotations.json"
FORMAT = "samed-annotations"
_NII = (".nii.gz", ".nii")


@dataclass(frozen=True)
class AnnotationPair:
    """One annotated volume: ``image`` and ``label`` files on one grid; ``source`` = where the
    image was read from when it was exported (informational)."""

    name: str
    image: Path
    label: Path
    source: str = ""


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path}: 'format' must be {FORMAT!r}")
    if not isinstance(raw.get("pairs", []), list):
        raise ValueError(f"{path}: 'pairs' must be a list")
    return raw


def _labels_of(raw: Any, where: str) -> dict[int, str]:
    try:
        labels = {int(k): str(v) for k, v in dict(raw or {}).items()}
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'labels' must map integer values to names") from None
    labels.pop(0, None)
    return labels


def export_pair(
    folder: str | os.PathLike,
    name: str,
    image: Any,
    labels: np.ndarray,
    label_names: dict[int, str] | None = None,
    *,
    source: str = "",
    overwrite: bool = True,
) -> AnnotationPair:
    """Write one image + label pair and record it in the folder's manifest.

    Args:
        folder: the annotations folder (created).
        name: the pair's name (a safe file-name stem; e.g. the image layer's name).
        image: the :class:`samed.io.Volume` the labels were drawn on (written on its own grid).
        labels: (Z, Y, X) integer label map with ``image.array``'s shape (0 = background).
        label_names: label value -> name (merged into the manifest's ``labels``).
        source: the image's original file (recorded).
        overwrite: replace a pair of the same name (else ValueError).

    Returns:
        The :class:`AnnotationPair` written.

    Raises:
        ValueError: unsafe name, shape mismatch, empty labels or an existing pair.
    """
    from ..io import save_nifti

    safe_name(name, "annotation name")
    lab = np.asarray(labels)
    arr = np.asarray(image.array)
    if lab.shape != arr.shape:
        raise ValueError(f"labels shape {lab.shape} differs from the image's {arr.shape}")
    if not np.issubdtype(lab.dtype, np.integer) and not np.issubdtype(lab.dtype, np.bool_):
        raise ValueError(f"labels dtype {lab.dtype} must be integer")
    if not lab.any():
        raise ValueError(f"labels of {name!r} are empty: nothing to learn from")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = (
        _read_manifest(folder)
        if (folder / MANIFEST).is_file()
        else {"format": FORMAT, "version": 1, "labels": {}, "modality": "", "pairs": []}
    )
    pairs = [p for p in manifest["pairs"] if isinstance(p, dict)]
    if any(p.get("name") == name for p in pairs) and not overwrite:
        raise ValueError(f"{folder} already holds an annotation named {name!r}")
    pairs = [p for p in pairs if p.get("name") != name]
    img_path = save_nifti(
        arr.astype(np.float32, copy=False), image, folder / f"{name}_image.nii.gz"
    )
    lab_path = save_nifti(lab.astype(np.int16), image, folder / f"{name}_label.nii.gz")
    pairs.append(
        {"name": name, "image": img_path.name, "label": lab_path.name, "source": str(source)}
    )
    merged = _labels_of(manifest.get("labels"), str(folder / MANIFEST))
    for v in np.unique(lab):
        if v:
            merged.setdefault(int(v), (label_names or {}).get(int(v), f"label {int(v)}"))
    for k, v in (label_names or {}).items():
        if int(k) in merged:
            merged[int(k)] = str(v)
    manifest["labels"] = {str(k): v for k, v in sorted(merged.items())}
    manifest["modality"] = manifest.get("modality") or str(getattr(image, "modality", "") or "")
    manifest["pairs"] = pairs
    tmp = folder / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
    return AnnotationPair(name, img_path, lab_path, str(source))


def _stem(name: str) -> str:
    for suf in _NII:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def read_annotations(
    folder: str | os.PathLike,
) -> tuple[list[AnnotationPair], dict[int, str], str]:
    """The pairs of an annotations folder.

    Args:
        folder: a folder written by :func:`export_pair` (manifest), or one holding
            ``NAME_image.nii.gz`` + ``NAME_label.nii.gz`` files, or ``imagesTr/`` + ``labelsTr/``.

    Returns:
        (pairs sorted by name, label names {value: name} without background (may be empty when
        no manifest names them), modality ``""`` when unknown).

    Raises:
        ValueError: no folder, no pairs, a manifest entry outside the folder or a missing file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"annotations folder {folder} does not exist")
    pairs: list[AnnotationPair] = []
    labels: dict[int, str] = {}
    modality = ""
    if (folder / MANIFEST).is_file():
        raw = _read_manifest(folder)
        labels = _labels_of(raw.get("labels"), str(folder / MANIFEST))
        modality = str(raw.get("modality") or "")
        for i, p in enumerate(raw["pairs"]):
            if not isinstance(p, dict) or not {"name", "image", "label"} <= set(p):
                raise ValueError(f"{folder / MANIFEST}: pairs[{i}] needs name, image and label")
            img = folder / safe_name(p["image"], f"pairs[{i}].image (a file in {folder})")
            lab = folder / safe_name(p["label"], f"pairs[{i}].label (a file in {folder})")
            pairs.append(AnnotationPair(str(p["name"]), img, lab, str(p.get("source", ""))))
    elif (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        for img in sorted((folder / "imagesTr").iterdir()):
            lab = folder / "labelsTr" / img.name
            if img.name.endswith(_NII) and lab.is_file():
                pairs.append(AnnotationPair(_stem(img.name), img, lab))
    else:
        for img in sorted(folder.iterdir()):
            stem = _stem(img.name)
            if img.name.endswith(_NII) and stem.endswith("_image"):
                base = stem[: -len("_image")]
                for suf in _NII:
                    lab = folder / f"{base}_label{suf}"
                    if lab.is_file():
                        pairs.append(AnnotationPair(base, img, lab))
                        break
    if not pairs:
        raise ValueError(
            f"{folder} holds no annotation pairs ({MANIFEST}, NAME_image.nii.gz + "
            "NAME_label.nii.gz, or imagesTr/ + labelsTr/)"
        )
    for p in pairs:
        for f in (p.image, p.label):
            if not f.is_file():
                raise ValueError(f"annotation {p.name!r}: {f} is missing")
    return sorted(pairs, key=lambda p: p.name), labels, modality


def split_pairs(
    pairs: list[AnnotationPair], val_volumes: int | None = None
) -> tuple[list[AnnotationPair], list[AnnotationPair]]:
    """(train, held-back validation) pairs: the last ``val_volumes`` pairs by name validate.

    Args:
        pairs: the folder's pairs.
        val_volumes: held-back volumes; None: 1 when there are 4 or more pairs, else 0 (then
            training keeps the last adapter, with no early stopping).
    """
    n = len(pairs)
    if val_volumes is None:
        val_volumes = 1 if n >= 4 else 0
    if not isinstance(val_volumes, int) or not 0 <= val_volumes < n:
        raise ValueError(f"val_volumes={val_volumes!r} must be an integer in [0, {n - 1}]")
    if val_volumes == 0:
        return list(pairs), []
    return list(pairs[:-val_volumes]), list(pairs[-val_volumes:])


#: the from-annotations recipe's defaults (samed.train.quick; measured in docs/TRAINING.md).
#: Session 7: the stronger augmentation of the cached copies (rotation 25 deg, scale 0.75-1.3,
#: shift 8 %, gamma on half the copies over 0.6-1.7, noise on 30 %) was chosen on the held-back
#: ACDC labeled_7 patients outside labeled_3 (docs/BENCHMARKS.md, "Train adapter from the
#: widget, session 7"); it costs no more caching than the session-6 augmentation.
#: Session 11: the adapter holds an exponential moving average of the decoder weights
#: (``train.ema: 0.99``), and the best held-back validation is kept (``validation.keep: best``,
#: what the panel's Stop button promises); docs/BENCHMARKS.md "Session 11".
QUICK_DEFAULTS: dict[str, Any] = {
    "augment": {
        "flip_prob": 0.0,
        "affine_prob": 0.8,
        "rotate_deg": 25.0,
        "scale": [0.75, 1.3],
        "shift_frac": 0.08,
        "gamma_prob": 0.5,
        "gamma": [0.6, 1.7],
        "noise_prob": 0.3,
        "noise_std": 0.02,
    },
    "loss": {"dice_weight": 0.8, "ce_weight": 0.2},
    "optim": {
        "name": "adamw",
        "lr": 0.001,
        "weight_decay": 0.01,
        "warmup": 20,
        "schedule": "cosine",
        "grad_clip": 1.0,
    },
    "train": {
        "iterations": 100000,
        "batch_size": 4,
        "seed": 0,
        "cache_copies": 4,
        "log_interval": 20,
        "device": "auto",
        "max_minutes": 15.0,
        "ema": 0.99,
    },
    "validation": {"interval": 25, "patience": 0, "keep": "best"},
}


def annotations_config(
    folder: str | os.PathLike,
    name: str,
    *,
    mode: str = "automatic",
    minutes: float | None = 15.0,
    val_volumes: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """The :class:`samed.train.FinetuneConfig` that trains on an annotations folder.

    Args:
        folder: see :func:`read_annotations`.
        name: the adapter's name (:func:`samed.paths.safe_name`).
        mode: ``automatic`` (one output per label value) or ``prompted``.
        minutes: training time limit (``train.max_minutes``; None = ``train.iterations``).
        val_volumes: held-back volumes (:func:`split_pairs`).
        overrides: dotted keys -> values (``{"train.batch_size": 8}``), applied last.
    """
    from .config import config_from_dict

    safe_name(name, "adapter name")
    pairs, label_names, modality = read_annotations(folder)
    train, val = split_pairs(pairs, val_volumes)
    cases = [
        {"image": str(p.image), "label": str(p.label), "split": "train", "id": p.name}
        for p in train
    ] + [{"image": str(p.image), "label": str(p.label), "split": "val", "id": p.name} for p in val]
    raw: dict[str, Any] = json.loads(json.dumps(QUICK_DEFAULTS))
    raw.update(
        name=name,
        mode=mode,
        description=f"trained from {len(pairs)} annotated volumes in {Path(folder).resolve()}",
        intended_use="Research use on images like the annotated ones; not for clinical use.",
        model={"kind": "litemedsam"},
        data={
            "root": str(folder),
            "format": "pairs",
            "train_split": "train",
            "val_split": "val" if val else None,
            "cases": cases,
            "labels": (
                {k: {"name": v, "source": [k]} for k, v in sorted(label_names.items())}
                if label_names and sorted(label_names) == list(range(1, len(label_names) + 1))
                else None
            ),
            "intensity": "auto",
            "modality": modality,
            "label_source": "expert",
            "licence": "the annotator's own data (not redistributed with the adapter)",
        },
    )
    raw["train"]["max_minutes"] = minutes
    for key, value in (overrides or {}).items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(raw)


def train_from_annotations(
    folder: str | os.PathLike,
    name: str,
    *,
    mode: str = "automatic",
    minutes: float | None = 15.0,
    val_volumes: int | None = None,
    adapters_dir: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    callback: Any = None,
    should_stop: Any = None,
    snapshot_minutes: tuple[float, ...] = (),
    command: str = "",
    log: Any = print,
) -> dict[str, Any]:
    """Train an adapter on an annotations folder and install it where samed finds adapters.

    Runs :func:`samed.train.quick.train_quick` on :func:`annotations_config`, then copies the
    best adapter to ``adapters_dir/name`` (default :func:`samed.registry.user_adapter_dir`,
    listed by ``samed adapters list``, the napari adapter menu and ``samed segment --adapter``)
    and writes the config used as ``adapters_dir/name.yaml`` beside it.

    Args:
        folder, name, mode, minutes, val_volumes, overrides: see :func:`annotations_config`.
        adapters_dir: where the adapter is installed.
        run_dir: the training run's folder (default ``adapters_dir/../runs/name``).
        callback, should_stop, snapshot_minutes, command, log: see ``train_quick``.

    Returns:
        ``train_quick``'s result plus ``installed`` (the adapter folder) and ``yaml``.

    Raises:
        ValueError: bad folder or name, or an installed folder of that name that is not a
            replaceable adapter (checked before training).
    """
    import yaml

    from ..registry import user_adapter_dir
    from .export import check_export, export_adapter
    from .quick import train_quick

    cfg = annotations_config(
        folder, name, mode=mode, minutes=minutes, val_volumes=val_volumes, overrides=overrides
    )
    dest = Path(adapters_dir) if adapters_dir is not None else user_adapter_dir()
    check_export(dest, name)
    run = Path(run_dir) if run_dir is not None else dest.parent / "runs" / name
    pairs, _, _ = read_annotations(folder)
    extra = {
        "annotations": {
            "folder": str(Path(folder).resolve()),
            "images": [{"name": p.name, "image": str(p.image), "source": p.source} for p in pairs],
            "held_back_for_validation": [c["id"] for c in cfg.data.cases if c["split"] == "val"],
        }
    }
    res = train_quick(
        cfg,
        run,
        callback=callback,
        should_stop=should_stop,
        snapshot_minutes=snapshot_minutes,
        command=command,
        log=log,
        extra_metadata=extra,
    )
    res["installed"] = None
    if res.get("adapter"):
        res["installed"] = str(export_adapter(res["adapter"], dest, name))
        y = dest / f"{name}.yaml"
        y.write_text(
            f"# config of adapter {name!r}: samed.train.quick recipe {res['recipe']!r}\n"
            f"# rerun: samed finetune --from-annotations {Path(folder).resolve()} --name {name}\n"
            + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        )
        res["yaml"] = str(y)
    return res
