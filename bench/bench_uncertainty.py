"""Which uncertainty map ranks the automatic adapter's errors best (ACDC val).

    python bench/bench_uncertainty.py [--split val] [--adapter acdc-cardiac-mri] [--limit N]

For each volume: the plain automatic pass (:meth:`samed.engine.Session.automatic`, timed), then
:func:`samed.uncertainty.automatic_uncertainty` with ``entropy`` (one pass: entropy and margin
maps) and with ``flip`` (two passes: flip disagreement and entropy of the flip mean), each on a
fresh session (no shared embedding cache), timed. "Wrong" = the post-processed automatic label
(the adapter's recommended largest-component clean-up, as shipped) differs from the ground truth.

Reported per map: voxel AUROC for "voxel is wrong" over (a) every voxel of every volume and
(b) the band = predicted or true foreground dilated 5 px in-plane; the Spearman correlation of
the case score (:func:`samed.uncertainty.case_score`) with the case's mean 3D Dice (RV/MYO/LV;
negative = uncertain cases are the bad ones); cost relative to the plain automatic pass.
Writes ``bench/results/uncertainty_<split>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAMED_SHARED_DATA", REPO.parent / "shared" / "data"))
MAPS = ("entropy", "margin", "flip", "flip_entropy")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="val")
    ap.add_argument("--adapter", default="acdc-cardiac-mri")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--band", type=int, default=5, help="band half-width in pixels")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from scipy.stats import spearmanr

    from samed.datasets import load_dataset
    from samed.engine import Session, tune_cpu_allocator
    from samed.evaluate.metrics import dice
    from samed.io import load_label_map, load_volume
    from samed.model import load_model
    from samed.uncertainty import automatic_uncertainty, case_score, foreground_band, roc_auc

    tune_cpu_allocator()
    model = load_model(adapter=args.adapter, merge=True)
    ds = load_dataset(DATA / "acdc")
    cases = ds.split(args.split)[: args.limit or None]
    fg = {k: v for k, v in ds.labels.items() if k != 0}
    load_start = _uptime()
    scores: dict[str, list[np.ndarray]] = {m: [] for m in MAPS}
    wrong_all: list[np.ndarray] = []
    band_all: list[np.ndarray] = []
    rows = []
    out = Path(args.out or REPO / "bench" / "results" / f"uncertainty_{args.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    t_auto = t_ent = t_flip = 0.0
    for i, case in enumerate(cases):
        vol = load_volume(case.image)
        gt = np.asarray(load_label_map(case.label, reference=vol).array).astype(np.int64)
        t0 = time.perf_counter()
        pred = Session(model, vol, intensity="auto").automatic()
        ta = time.perf_counter() - t0
        r_ent = automatic_uncertainty(
            Session(model, vol, intensity="auto"), "entropy", keep_maps=True
        )
        r_flip = automatic_uncertainty(
            Session(model, vol, intensity="auto"), "flip", keep_maps=True
        )
        if not np.array_equal(r_ent.labels, pred):
            raise SystemExit(f"{case.case_id}: uncertainty labels differ from Session.automatic")
        t_auto, t_ent, t_flip = t_auto + ta, t_ent + r_ent.seconds, t_flip + r_flip.seconds
        wrong = pred.astype(np.int64) != gt
        band = foreground_band(np.maximum(pred > 0, gt > 0).astype(np.int8), args.band)
        maps = {**r_ent.extra["maps"], **r_flip.extra["maps"]}
        for m in MAPS:
            scores[m].append(maps[m].ravel())
        wrong_all.append(wrong.ravel())
        band_all.append(band.ravel())
        d = {fg[k]: dice(pred == k, gt == k) for k in fg}
        row = {
            "case": case.case_id,
            "slices": int(vol.shape[0]),
            "dice": d,
            "mean_dice": float(np.nanmean(list(d.values()))),
            "case_score": {m: case_score(maps[m], pred) for m in MAPS},
            "auroc_volume": {m: roc_auc(maps[m], wrong) for m in MAPS},
            "seconds": {"automatic": ta, "entropy": r_ent.seconds, "flip": r_flip.seconds},
        }
        rows.append(row)
        partial.write_text(json.dumps({"cases": rows, "uptime_start": load_start}, indent=2))
        print(
            f"  {i + 1}/{len(cases)} {case.case_id} dice={row['mean_dice']:.3f} "
            f"entropy score={row['case_score']['entropy']:.4f} auto {ta:.1f}s "
            f"entropy {r_ent.seconds:.1f}s flip {r_flip.seconds:.1f}s",
            flush=True,
        )
    wrong_v = np.concatenate(wrong_all)
    band_v = np.concatenate(band_all)
    dices = [r["mean_dice"] for r in rows]
    cost = {
        "entropy": t_ent / t_auto,
        "margin": t_ent / t_auto,
        "flip": t_flip / t_auto,
        "flip_entropy": t_flip / t_auto,
    }
    table = {}
    for m in MAPS:
        s = np.concatenate(scores[m])
        rho = spearmanr([r["case_score"][m] for r in rows], dices).statistic
        table[m] = {
            "auroc_volume": roc_auc(s, wrong_v),
            "auroc_band": roc_auc(s[band_v], wrong_v[band_v]),
            "spearman_case_score_vs_dice": float(rho),
            "cost_vs_automatic": float(cost[m]),
        }
    # does the case score put the worst cases first? the 5 lowest-Dice cases' ranks by score
    worst = sorted(range(len(rows)), key=lambda j: dices[j])[:5]
    print(
        f"\nACDC {args.split}, adapter {args.adapter}, {len(rows)} volumes, "
        f"{int(wrong_v.sum())} wrong of {wrong_v.size} voxels "
        f"({int(wrong_v[band_v].sum())} wrong of {int(band_v.sum())} in the {args.band}px band)"
    )
    print(
        "| map | AUROC all voxels | AUROC fg band | Spearman(case score, Dice) | cost x automatic |"
    )
    print("|---|---|---|---|---|")
    for m, t in table.items():
        print(
            f"| {m} | {t['auroc_volume']:.4f} | {t['auroc_band']:.4f} | "
            f"{t['spearman_case_score_vs_dice']:+.3f} | {t['cost_vs_automatic']:.2f} |"
        )
    for m in MAPS:
        order = sorted(range(len(rows)), key=lambda j: -rows[j]["case_score"][m])
        print(
            f"  {m}: ranks (1 = most uncertain) of the 5 worst-Dice cases: "
            f"{[order.index(j) + 1 for j in worst]}"
        )
    res = {
        "split": args.split,
        "adapter": args.adapter,
        "band_px": args.band,
        "table": table,
        "cases": rows,
        "seconds": {"automatic": t_auto, "entropy": t_ent, "flip": t_flip},
        "uptime_start": load_start,
        "uptime_end": _uptime(),
        "cpu": platform.processor() or platform.machine(),
    }
    out.write_text(json.dumps(res, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
