"""Which uncertainty map ranks the errors of propagated (box-prompted) objects best (ACDC val).

    python bench/bench_uncertainty_propagated.py [--start 5] [--limit N] [--out JSON]

For each volume of ACDC ``val[start:]`` (``val[:5]`` are bench_interactive's held-out cases and
are left alone) and each structure (RV, MYO, LV): the ground-truth box (tight) on the slice
where the structure is largest, :meth:`samed.engine.Session.predict` there, then
:meth:`samed.engine.Session.propagate` through the volume with the napari widget's settings
(box margin 2 px, min area 10, max step 2 px), base LiteMedSAM. Then
:func:`samed.uncertainty.propagated_uncertainty` with ``entropy`` (decoder only; entropy and
margin maps) and ``flip`` (a second encoder pass per object slice), timed on the warm session.
"Wrong" = the propagated object differs from the structure's ground truth.

Reported per map: voxel AUROC for "voxel is wrong" over (a) every voxel of every structure's
volume and (b) the band = object or ground truth dilated 5 px in-plane; the Spearman
correlation of the object's case score with its 3D Dice; seconds against the propagation
(embedding of the volume included). Writes ``bench/results/uncertainty_propagated.json``.
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
MAPS = ("entropy", "margin", "flip")
PROPAGATE = {"box_margin": 2.0, "min_area": 10, "max_step_px": 2}  # the widget's options


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=int, default=5, help="first val volume (val[:5] held out)")
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--band", type=int, default=5)
    ap.add_argument(
        "--out", default=str(REPO / "bench" / "results" / "uncertainty_propagated.json")
    )
    args = ap.parse_args()
    if args.start < 5:
        raise SystemExit(
            "--start must be >= 5: ACDC val[:5] are bench_interactive's held-out cases"
        )

    from scipy.stats import spearmanr

    from samed.datasets import load_dataset
    from samed.engine import Session, mask_bbox, tune_cpu_allocator
    from samed.evaluate.metrics import dice
    from samed.io import load_label_map, load_volume
    from samed.model import load_model
    from samed.uncertainty import case_score, foreground_band, propagated_uncertainty, roc_auc

    tune_cpu_allocator()
    model = load_model("litemedsam")
    ds = load_dataset(DATA / "acdc")
    cases = ds.split("val")[args.start : args.start + args.limit]
    fg = {k: v for k, v in ds.labels.items() if k != 0}
    up0 = _uptime()
    scores: dict[str, list[np.ndarray]] = {m: [] for m in MAPS}
    wrong_all, band_all, rows = [], [], []
    secs = {"embed": 0.0, "propagate": 0.0, "entropy": 0.0, "flip": 0.0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in cases:
        vol = load_volume(case.image)
        gt_all = np.asarray(load_label_map(case.label, reference=vol).array).astype(np.int64)
        sess = Session(model, vol, intensity="auto")
        t0 = time.perf_counter()
        sess.embed()
        secs["embed"] += time.perf_counter() - t0
        for k, name in fg.items():
            gt = gt_all == k
            if not gt.any():
                continue
            z = int(np.argmax(gt.sum((1, 2))))
            box = mask_bbox(gt[z])
            t0 = time.perf_counter()
            seed = sess.predict(z, box=box)
            obj = sess.propagate_volume(z, seed, **PROPAGATE)
            tp = time.perf_counter() - t0
            kw = {"prompts": {z: {"box": box}}, "keep_maps": True, **PROPAGATE}
            del kw["min_area"]
            r_ent = propagated_uncertainty(sess, obj, z, "entropy", **kw)
            r_flip = propagated_uncertainty(sess, obj, z, "flip", **kw)
            maps = {**r_ent.extra["maps"], "flip": r_flip.uncertainty}
            wrong = obj != gt
            band = foreground_band((obj | gt).astype(np.int8), args.band)
            for m in MAPS:
                scores[m].append(maps[m].ravel())
            wrong_all.append(wrong.ravel())
            band_all.append(band.ravel())
            secs["propagate"] += tp
            secs["entropy"] += r_ent.seconds
            secs["flip"] += r_flip.seconds
            row = {
                "case": case.case_id,
                "structure": name,
                "seed_slice": z,
                "object_slices": int(obj.any((1, 2)).sum()),
                "gt_slices": int(gt.any((1, 2)).sum()),
                "dice": dice(obj, gt),
                "case_score": {m: case_score(maps[m], obj) for m in MAPS},
                "auroc_volume": {m: roc_auc(maps[m], wrong) for m in MAPS},
                "seconds": {"propagate": tp, "entropy": r_ent.seconds, "flip": r_flip.seconds},
            }
            rows.append(row)
            print(
                f"  {case.case_id} {name}: dice={row['dice']:.3f} slices "
                f"{row['object_slices']}/{row['gt_slices']} propagate {tp:.1f}s entropy "
                f"{r_ent.seconds:.1f}s flip {r_flip.seconds:.1f}s auroc "
                + " ".join(f"{m}={row['auroc_volume'][m]:.3f}" for m in MAPS),
                flush=True,
            )
    wrong_v, band_v = np.concatenate(wrong_all), np.concatenate(band_all)
    dices = [r["dice"] for r in rows]
    base = secs["embed"] + secs["propagate"]
    table = {}
    for m in MAPS:
        s = np.concatenate(scores[m])
        table[m] = {
            "auroc_volume": roc_auc(s, wrong_v),
            "auroc_band": roc_auc(s[band_v], wrong_v[band_v]),
            "spearman_case_score_vs_dice": float(
                spearmanr([r["case_score"][m] for r in rows], dices).statistic
            ),
            "cost_vs_embed_and_propagate": secs["flip" if m == "flip" else "entropy"] / base,
        }
    print(
        f"\nACDC val[{args.start}:{args.start + len(cases)}], base litemedsam, {len(rows)} "
        f"propagated structures, mean Dice {np.mean(dices):.3f}; {int(wrong_v.sum())} wrong of "
        f"{wrong_v.size} voxels ({int(wrong_v[band_v].sum())} of {int(band_v.sum())} in the band)"
    )
    print(
        "| map | AUROC all voxels | AUROC band | Spearman(score, Dice) | cost x (embed+propagate) |"
    )
    print("|---|---|---|---|---|")
    for m, t in table.items():
        print(
            f"| {m} | {t['auroc_volume']:.4f} | {t['auroc_band']:.4f} | "
            f"{t['spearman_case_score_vs_dice']:+.3f} | {t['cost_vs_embed_and_propagate']:.2f} |"
        )
    res = {
        "cases": f"ACDC val[{args.start}:{args.start + len(cases)}]",
        "propagate": PROPAGATE,
        "band_px": args.band,
        "table": table,
        "rows": rows,
        "seconds": secs,
        "uptime_start": up0,
        "uptime_end": _uptime(),
        "cpu": platform.processor() or platform.machine(),
    }
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
