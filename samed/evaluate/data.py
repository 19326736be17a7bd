"""The labeled cases of a fine-tuning config as a :class:`~samed.datasets.LabeledDataset`.

``samed evaluate --config configs/NAME.yaml --split val`` scores exactly the cases (and split)
the config trained on / held out, without a hand-made ``dataset.json``: a ``pairs`` config's
``data.cases`` become the cases (their ``split`` fields the splits, ``z_range`` kept), a
dataset-folder config reads its ``data.root``; ``data.labels`` (names and source values) become
the classes scored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..datasets import Case, LabeledDataset, load_dataset

__all__ = ["dataset_from_config"]


def dataset_from_config(config: str | os.PathLike | Any) -> LabeledDataset:
    """The labeled cases of a fine-tuning config.

    Args:
        config: a YAML config path (``configs/*.yaml``) or a loaded
            :class:`samed.train.config.FinetuneConfig`. Relative image / label paths and
            ``data.root`` are resolved against the current directory, as ``samed finetune``
            does.

    Returns:
        A :class:`LabeledDataset` whose ``splits`` are the config's (``pairs``: every distinct
        ``split`` value of ``data.cases``, default ``train``), whose ``labels`` are
        ``data.labels`` names (background 0 added) and whose ``label_sources`` map each class
        to its label-file values.

    Raises:
        ValueError: an invalid config, a ``pairs`` config without ``data.labels`` (the classes
            to score must be declared), or a listed file that does not exist.
    """
    from ..train.config import FinetuneConfig, load_config

    source = str(config) if not isinstance(config, FinetuneConfig) else config.name
    cfg = config if isinstance(config, FinetuneConfig) else load_config(config)
    data = cfg.data
    sources = None
    if data.labels is not None:
        sources = {int(k): tuple(int(s) for s in v["source"]) for k, v in data.labels.items()}
    if data.format != "pairs":
        ds = load_dataset(data.root)
        if data.labels is not None:
            ds.labels = {0: "background", **{k: v["name"] for k, v in data.labels.items()}}
            ds.label_sources = sources
        return ds
    if data.labels is None:
        raise ValueError(
            f"{source}: a 'pairs' config needs data.labels ({{id: {{name, source: [values]}}}}) "
            "to be evaluated: they name the classes that are scored"
        )
    cases, splits = [], {}
    for i, c in enumerate(data.cases):
        img, lab = Path(c["image"]), Path(c["label"])
        for p in (img, lab):
            if not p.exists():
                raise ValueError(f"{source}: data.cases[{i}] file {p} does not exist")
        cid = str(c.get("id", img.name.split(".")[0]))
        zr = c.get("z_range")
        cases.append(Case(cid, img, lab, (int(zr[0]), int(zr[1])) if zr else None))
        splits.setdefault(str(c.get("split", "train")), []).append(cid)
    labels = {0: "background", **{k: v["name"] for k, v in data.labels.items()}}
    return LabeledDataset(
        Path("."),
        cases,
        labels,
        splits,
        cfg.name,
        data.modality,
        labels_declared=True,
        label_sources=sources,
        source=source,
    )
