"""Semi-supervised automatic adapter: teacher pseudo-labels filtered by uncertainty, and a
student decoder trained on labeled + pseudo-labeled slices (cached embeddings, CPU-sized).

Recipe (``configs/semi/acdc-cardiac-mri.yaml``, docs/TRAINING.md "Semi-supervised ACDC"):

1. **Teacher** = an automatic adapter trained on the labeled split only (``semi.teacher``),
   its encoder LoRA merged. It segments every volume of ``semi.unlabeled_split`` that is in
   neither the labeled nor the validation split — **images only: their label files are never
   opened here** — through :func:`samed.uncertainty.automatic_uncertainty` (the adapter's
   post-processing applied; ``semi.uncertainty`` = ``entropy`` is free, ``flip`` costs a
   second encoder pass per slice).
2. **Cache** (``OUT/cache/{labeled,unlabeled,val}/<case>.pt``, resumable volume by volume):
   the teacher encoder's fp16 embeddings of the labeled slices (``semi.labeled_copies``
   copies: copy 0 as stored, the others augmented by :class:`samed.train.data.Augmenter`), of
   the unlabeled slices with their pseudo-labels and uncertainty maps, and of the validation
   slices (for :func:`score_cached`, reporting only).
3. **Filter**: voxels whose uncertainty exceeds ``semi.voxel_threshold`` are left out of the
   loss (``loss_fn(valid=...)``); the ``semi.slice_drop_fraction`` of pseudo-labeled slices
   with the highest uncertainty per predicted-foreground voxel are dropped.
4. **Student** = the teacher (same merged, frozen encoder LoRA; the encoder is unchanged, so
   the cached embeddings are exactly its own), mask decoder trained. Each batch holds
   ``round(labeled_fraction * batch_size)`` labeled samples and the rest pseudo-labeled;
   with probability ``semi.mix_prob`` a sample gets a box of the other kind pasted in at the
   same place (BCP-style bidirectional copy-paste, here on the 64 x 64 embedding grid and
   the matching label / valid region). Batches are a pure function of (seed, step), so a run
   stopped by ``--max-minutes`` resumes exactly (``OUT/checkpoint.pt``). No validation picks
   anything: the weights after ``train.iterations`` steps are the result.

Command line::

    python -m samed.train.semi cache  --config configs/semi/acdc-cardiac-mri.yaml --out runs/semi
    python -m samed.train.semi report --config ... --out runs/semi   # pseudo-label Dice (report)
    python -m samed.train.semi train  --config ... --out runs/semi [--max-minutes 20]
    python -m samed.train.semi score  --config ... --out runs/semi   # val Dice (report)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import FinetuneConfig, config_from_dict

__all__ = [
    "SemiSection",
    "load_semi_config",
    "split_cases",
    "cache_embeddings",
    "pseudo_label_report",
    "main",
]

KINDS = ("labeled", "unlabeled", "val")
#: label value marking a voxel left out of the loss before resizing to the logit grid
IGNORE = 255
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class SemiSection:
    """The ``semi:`` section of a semi-supervised config.

    Attributes:
        teacher: adapter name or folder trained on ``data.train_split`` only.
        unlabeled_split: split whose cases outside ``data.train_split`` / ``data.val_split``
            are used without labels.
        uncertainty: :data:`samed.uncertainty.METHODS` member.
        voxel_threshold: pseudo-labeled voxels with uncertainty above this (in [0, 1]) are
            left out of the loss.
        slice_drop_fraction: share of pseudo-labeled slices (highest uncertainty per
            predicted-foreground voxel) dropped, in [0, 1).
        labeled_copies: cached copies per labeled slice (copy 0 un-augmented), >= 1.
        labeled_fraction: share of each batch drawn from the labeled slices, in (0, 1].
        mix_prob: probability of pasting a box of the other kind into a sample, in [0, 1].
        mix_size: (min, max) side of the pasted box as a fraction of the embedding grid.
        backend: encoder backend for caching (:func:`samed.model.load_model`).
    """

    teacher: str = "acdc-cardiac-mri"
    unlabeled_split: str = "train"
    uncertainty: str = "entropy"
    voxel_threshold: float = 0.5
    slice_drop_fraction: float = 0.1
    labeled_copies: int = 3
    labeled_fraction: float = 0.5
    mix_prob: float = 0.5
    mix_size: tuple[float, float] = (0.3, 0.6)
    backend: str = "torch"

    def __post_init__(self) -> None:
        from ..uncertainty import METHODS

        if self.uncertainty not in METHODS:
            raise ValueError(f"semi.uncertainty={self.uncertainty!r} must be one of {METHODS}")
        checks = (
            ("voxel_threshold", self.voxel_threshold, 0.0, 1.0),
            ("slice_drop_fraction", self.slice_drop_fraction, 0.0, 0.99),
            ("labeled_fraction", self.labeled_fraction, 1e-6, 1.0),
            ("mix_prob", self.mix_prob, 0.0, 1.0),
        )
        for name, v, lo, hi in checks:
            if not isinstance(v, int | float) or not lo <= float(v) <= hi:
                raise ValueError(f"semi.{name}={v!r} must be a number in [{lo}, {hi}]")
        if not isinstance(self.labeled_copies, int) or self.labeled_copies < 1:
            raise ValueError(f"semi.labeled_copies={self.labeled_copies!r} must be an int >= 1")
        lo, hi = (float(x) for x in self.mix_size)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"semi.mix_size={self.mix_size!r} must be (min, max), 0 < min <= max <= 1"
            )
        if self.backend not in ("torch", "openvino", "auto"):
            raise ValueError(f"semi.backend={self.backend!r} must be torch, openvino or auto")


def load_semi_config(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[FinetuneConfig, SemiSection]:
    """Read a YAML config: the :class:`FinetuneConfig` keys plus a ``semi:`` section.

    ``overrides``: dotted keys -> values (``{"semi.mix_prob": 0.0, "train.iterations": 4}``).
    Raises ValueError (naming the file) for an unreadable or invalid config.
    """
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    semi_raw = dict(raw.pop("semi", None) or {})
    try:
        names = {f.name for f in dataclasses.fields(SemiSection)}
        unknown = sorted(set(semi_raw) - names)
        if unknown:
            raise ValueError(f"section 'semi': unknown keys {unknown}; allowed: {sorted(names)}")
        if "mix_size" in semi_raw:
            semi_raw["mix_size"] = tuple(semi_raw["mix_size"])
        semi = SemiSection(**semi_raw)
        cfg = config_from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if cfg.mode != "automatic":
        raise ValueError(f"{path}: mode={cfg.mode!r}; semi-supervised training is automatic only")
    if cfg.data.format == "pairs":
        raise ValueError(f"{path}: data.format 'pairs' is not supported; use a dataset folder")
    return cfg, semi


def split_cases(cfg: FinetuneConfig, semi: SemiSection) -> dict[str, list[Any]]:
    """``{"labeled", "unlabeled", "val"}`` -> dataset cases (:class:`samed.datasets.Case`).

    ``unlabeled`` = ``semi.unlabeled_split`` minus the labeled and validation cases.
    Raises ValueError when the labeled and validation splits overlap."""
    from ..datasets import load_dataset

    ds = load_dataset(cfg.data.root)
    lab = ds.split(cfg.data.train_split)
    val = ds.split(cfg.data.val_split) if cfg.data.val_split else []
    lab_ids, val_ids = {c.case_id for c in lab}, {c.case_id for c in val}
    if lab_ids & val_ids:
        raise ValueError(f"labeled and val splits share cases {sorted(lab_ids & val_ids)[:5]}")
    unl = [c for c in ds.split(semi.unlabeled_split) if c.case_id not in lab_ids | val_ids]
    return {"labeled": lab, "unlabeled": unl, "val": val}


def _teacher(cfg: FinetuneConfig, semi: SemiSection, backend: str | None = None) -> Any:
    """The teacher model with its LoRA merged (CPU)."""
    from ..model import load_model
    from .model import build_base_model

    if cfg.model.kind == "tiny":
        import torch

        base = build_base_model(cfg, torch.device("cpu"))
        return load_model(base, adapter=semi.teacher, merge=True)
    return load_model(
        cfg.model.kind,
        checkpoint=cfg.model.checkpoint,
        adapter=semi.teacher,
        device="cpu",
        merge=True,
        backend=backend or semi.backend,
    )


def _save(obj: dict[str, Any], path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two caching processes never share one
    torch.save(obj, tmp)
    tmp.replace(path)


def _load(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, weights_only=True)  # tensors, numbers and strings only


def cache_embeddings(
    cfg: FinetuneConfig,
    semi: SemiSection,
    out: str | Path,
    *,
    kinds: Sequence[str] = KINDS,
    max_minutes: float | None = None,
    shard: tuple[int, int] = (0, 1),
    reverse: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Fill ``out/cache/<kind>/<case>.pt`` (volumes already there are skipped).

    Files: ``labeled``: ``emb`` (N, C, h, w) fp16 (slices x copies), ``label`` (N, H, W)
    int16 ground truth; ``unlabeled``: ``emb`` (Z, C, h, w), ``label`` (Z, H, W) the
    teacher's post-processed pseudo-label, ``unc`` (Z, H, W) fp16 uncertainty, ``score``;
    ``val``: ``emb`` only. Stops (resumably) after ``max_minutes``. ``shard`` = (i, n): only
    every n-th unlabeled volume from the i-th; ``reverse``: last first (two processes can
    fill one cache from both ends).

    Returns: volumes cached now per kind.
    """
    import torch

    from ..engine import Session
    from ..engine.preprocess import prepare_slices
    from ..io import load_volume
    from ..uncertainty import automatic_uncertainty
    from .data import Augmenter, load_cases, sample_rng

    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kinds {bad} must be among {KINDS}")
    out = Path(out)
    root = out / "cache"
    t0 = time.perf_counter()
    teacher = _teacher(cfg, semi)
    split = split_cases(cfg, semi)
    i_sh, n_sh = shard
    if not 0 <= i_sh < n_sh:
        raise ValueError(f"shard={shard!r} must be (i, n) with 0 <= i < n")
    split["unlabeled"] = split["unlabeled"][i_sh::n_sh][:: -1 if reverse else 1]
    done = {k: 0 for k in kinds}

    def late() -> bool:
        return max_minutes is not None and (time.perf_counter() - t0) / 60 >= max_minutes

    def encode(images: Sequence[np.ndarray]) -> torch.Tensor:
        embs = []
        with torch.inference_mode():
            for i in range(0, len(images), 4):
                x = torch.cat(
                    [prepare_slices(im[None], teacher.image_size) for im in images[i : i + 4]]
                )
                embs.append(teacher.encode(x).to(torch.float16).cpu())
        return torch.cat(embs)

    if "labeled" in kinds:
        cases, labels, summary = load_cases(cfg.data, cfg.data.train_split)
        (root).mkdir(parents=True, exist_ok=True)
        (root / "labeled.json").write_text(
            json.dumps({"labels": {str(k): v for k, v in labels.items()}, "summary": summary})
        )
        aug = Augmenter(cfg.augment)
        for ci, c in enumerate(cases):
            path = root / "labeled" / f"{c.case_id}.pt"
            if path.is_file():
                continue
            if late():
                break
            ims, labs = [], []
            for z in range(c.image.shape[0]):
                for k in range(semi.labeled_copies):
                    im, lab = c.image[z], c.label[z]
                    if k:
                        im, lab = aug(im, lab, sample_rng(cfg.train.seed, 10**9 + k, ci * 1000 + z))
                    ims.append(np.asarray(im, np.float32))
                    labs.append(np.asarray(lab, np.int16))
            _save({"emb": encode(ims), "label": torch.as_tensor(np.stack(labs))}, path)
            done["labeled"] += 1
            log(
                f"labeled {c.case_id}: {len(ims)} embeddings ({(time.perf_counter() - t0) / 60:.1f} min)"
            )
    for kind in ("unlabeled", "val"):
        if kind not in kinds:
            continue
        for c in split[kind]:
            path = root / kind / f"{c.case_id}.pt"
            if path.is_file():
                continue
            if late():
                break
            vol = load_volume(c.image)  # the image only: an unlabeled case's label is never read
            sess = Session(
                teacher, vol, intensity=cfg.data.intensity, modality=cfg.data.modality or ""
            )
            if kind == "unlabeled":
                res = automatic_uncertainty(sess, semi.uncertainty, postprocess="adapter")
                emb = torch.cat([sess.embedding(z) for z in range(sess.shape[0])]).half()
                obj = {
                    "emb": emb,
                    "label": torch.as_tensor(res.labels.astype(np.int16)),
                    "unc": torch.as_tensor(res.uncertainty.astype(np.float16)),
                    "score": float(res.score),
                }
            else:
                sess.embed()
                obj = {"emb": torch.cat([sess.embedding(z) for z in range(sess.shape[0])]).half()}
            _save(obj, path)
            done[kind] += 1
            log(f"{kind} {c.case_id} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return done


def _slice_scores(label: np.ndarray, unc: np.ndarray) -> np.ndarray:
    """(Z,) summed uncertainty / predicted-foreground voxels per slice (cf. case_score)."""
    u = unc.reshape(unc.shape[0], -1).astype(np.float64).sum(1)
    fg = (label.reshape(label.shape[0], -1) > 0).sum(1)
    return u / np.maximum(fg, 1)


def _kept_slices(files: Sequence[dict[str, Any]], semi: SemiSection) -> list[np.ndarray]:
    """Per unlabeled volume: bool (Z,) slices kept after ``semi.slice_drop_fraction``."""
    scores = [_slice_scores(f["label"].numpy(), f["unc"].float().numpy()) for f in files]
    allv = np.concatenate(scores) if scores else np.zeros(0)
    if not len(allv) or semi.slice_drop_fraction <= 0:
        return [np.ones(len(s), bool) for s in scores]
    cut = np.quantile(allv, 1.0 - semi.slice_drop_fraction)
    return [s <= cut for s in scores]


def pseudo_label_report(cfg: FinetuneConfig, semi: SemiSection, out: str | Path) -> dict[str, Any]:
    """Pseudo-label quality against the unlabeled cases' hidden labels — **report only**
    (written to ``out/pseudo_quality.json``; nothing in training reads it).

    Per class: 3D Dice of the teacher's pseudo-label per volume (mean over volumes), the share
    of voxels the filter leaves out, and voxel accuracy on the kept voxels vs the left-out
    ones (does the filter remove errors?)."""
    from ..datasets import load_dataset
    from ..evaluate.metrics import dice
    from ..io import load_label_map, load_volume

    out = Path(out)
    ds = load_dataset(cfg.data.root)
    names = {k: v for k, v in ds.labels.items() if k != 0}
    cases = [
        c
        for c in split_cases(cfg, semi)["unlabeled"]
        if (out / "cache" / "unlabeled" / f"{c.case_id}.pt").is_file()
    ]
    files = [_load(out / "cache" / "unlabeled" / f"{c.case_id}.pt") for c in cases]
    kept = _kept_slices(files, semi)
    per: dict[str, list[float]] = {n: [] for n in names.values()}
    acc_kept = acc_drop = n_kept = n_drop = 0.0
    for c, f, keep in zip(cases, files, kept, strict=True):
        vol = load_volume(c.image)
        gt = np.asarray(load_label_map(c.label, reference=vol).array).astype(np.int64)
        pl = f["label"].numpy().astype(np.int64)
        for k, n in names.items():
            per[n].append(dice(pl == k, gt == k))
        ok = pl == gt
        valid = (f["unc"].float().numpy() <= semi.voxel_threshold) & keep[:, None, None]
        band = (pl > 0) | (gt > 0)  # accuracy where either has foreground
        acc_kept += float((ok & valid & band).sum())
        n_kept += float((valid & band).sum())
        acc_drop += float((ok & ~valid & band).sum())
        n_drop += float((~valid & band).sum())
    pc = {n: float(np.nanmean(v)) if v else float("nan") for n, v in per.items()}
    rep = {
        "note": "hidden labels used for this report only; never for training or choosing",
        "volumes": len(cases),
        "dice_per_class": pc,
        "mean_dice": float(np.mean(list(pc.values()))) if cases else float("nan"),
        "foreground_voxels_left_out": n_drop / max(1.0, n_kept + n_drop),
        "accuracy_kept_foreground": acc_kept / max(1.0, n_kept),
        "accuracy_left_out_foreground": acc_drop / max(1.0, n_drop),
        "slices_kept": int(sum(k.sum() for k in kept)),
        "slices": int(sum(len(k) for k in kept)),
        "voxel_threshold": semi.voxel_threshold,
        "slice_drop_fraction": semi.slice_drop_fraction,
        "uncertainty": semi.uncertainty,
    }
    (out / "pseudo_quality.json").write_text(json.dumps(rep, indent=2) + "\n")
    return rep


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m samed.train.semi {cache,report,train,score} --config YAML --out DIR``."""
    import shlex
    import sys

    import yaml

    ap = argparse.ArgumentParser(
        prog="python -m samed.train.semi", description=__doc__.splitlines()[0]
    )
    ap.add_argument("stage", choices=("cache", "report", "train", "score"))
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop (resumably) after this long"
    )
    ap.add_argument(
        "--kinds", default=",".join(KINDS), help="cache: which of labeled,unlabeled,val"
    )
    ap.add_argument("--shard", default="0/1", help="cache: I/N, every N-th unlabeled volume")
    ap.add_argument("--reverse", action="store_true", help="cache: unlabeled volumes last first")
    ap.add_argument("--adapter", default=None, help="score: another adapter (default OUT/adapter)")
    args = ap.parse_args(argv)
    over = {}
    for it in args.set:
        if "=" not in it:
            raise SystemExit(f"--set {it!r} must be KEY=VALUE")
        k, v = it.split("=", 1)
        over[k] = yaml.safe_load(v)
    cfg, semi = load_semi_config(args.config, over)
    import torch

    from .semi_train import score_cached, train_semi

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.stage == "cache":
        r: Any = cache_embeddings(
            cfg,
            semi,
            args.out,
            kinds=args.kinds.split(","),
            max_minutes=args.max_minutes,
            shard=tuple(int(x) for x in args.shard.split("/")),
            reverse=args.reverse,
        )
    elif args.stage == "report":
        r = pseudo_label_report(cfg, semi, args.out)
    elif args.stage == "train":
        cmd = "python -m samed.train.semi " + " ".join(
            shlex.quote(a) for a in (argv or sys.argv[1:])
        )
        r = train_semi(cfg, semi, args.out, max_minutes=args.max_minutes, command=cmd)
    else:
        r = score_cached(cfg, semi, args.out, args.adapter)
        r = {k: v for k, v in r.items() if k != "per_case"}
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
