"""Forgetting guard for the click-aware adapter (issue #17): box-only Dice, base vs adapter, same run.

On structures none of the adapter's training data contains -- the pyradiomics breast tumour and
TotalSegmentator's MR organs (``totalsegmentator/mr_3mm``; MODEL labels) -- every slice that holds
the structure is predicted from its tight ground-truth box (+ ``--margin`` px) alone, no clicks,
no propagation, through :meth:`samed.engine.Session.predict`; Dice is 3D over the structure's
slices. The adapter keeps the base encoder, so both models share one embedding computation.

    python bench/bench_click_adapter.py --adapter adapters/click-aware-litemedsam

Writes bench/results/click-adapter-forgetting.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from bench_interactive import DATA, _cpu_name, dice  # noqa: E402


def _structures(min_voxels: int) -> list[dict]:
    out = []
    r = DATA / "pyradiomics"
    if (r / "breast1_image.nrrd").exists():
        out.append(
            {
                "set": "pyradiomics",
                "image": r / "breast1_image.nrrd",
                "labels": r / "breast1_label.nrrd",
                "names": {1: "breast tumour"},
            }
        )
    t = DATA / "totalsegmentator"
    if (t / "mr_3mm" / "example_mr_sm.nii.gz").exists():
        names = json.loads((t / "class_map_total_mr.json").read_text())
        out.append(
            {
                "set": "totalsegmentator_mr",
                "image": t / "mr_3mm" / "example_mr_sm.nii.gz",
                "labels": t / "mr_3mm" / "example_seg_mr.nii.gz",
                "names": {int(k): v for k, v in names.items()},
                "min_voxels": min_voxels,
            }
        )
    return out


def box_only(session, gt: np.ndarray, margin: float) -> float:
    """3D Dice of per-slice predictions from each slice's tight GT box (+ margin px)."""
    pred = np.zeros_like(gt)
    h, w = gt.shape[1:]
    for z in np.nonzero(gt.any(axis=(1, 2)))[0]:
        ys, xs = np.nonzero(gt[z])
        box = [
            max(xs.min() - margin, 0),
            max(ys.min() - margin, 0),
            min(xs.max() + margin, w - 1),
            min(ys.max() + margin, h - 1),
        ]
        pred[z] = session.predict(int(z), box=box)
    return dice(pred, gt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--min-voxels", type=int, default=50, help="skip smaller MR organs")
    ap.add_argument("--out", default=str(REPO / "bench/results/click-adapter-forgetting.json"))
    args = ap.parse_args(argv)

    import torch

    from samed.engine import Session, optimize_for_inference
    from samed.io import load_label_map, load_volume
    from samed.lora import load_adapter, remove_adapter
    from samed.model import build_model

    model = optimize_for_inference(build_model(device="cpu"))
    rows = []
    t0 = time.time()
    for st in _structures(args.min_voxels):
        vol = load_volume(st["image"])
        lab = load_label_map(st["labels"]).array
        session = Session(model, vol.array, modality=vol.modality)
        session.embed()
        present = [v for v in st["names"] if int((lab == v).sum()) >= st.get("min_voxels", 1)]
        for v in present:
            gt = lab == v
            row = {"set": st["set"], "structure": st["names"][v], "voxels": int(gt.sum())}
            for which in ("base", "adapter"):
                if which == "adapter":
                    load_adapter(model, args.adapter)
                else:
                    remove_adapter(model)
                with torch.inference_mode():
                    row[which] = round(box_only(session, gt, args.margin), 4)
            remove_adapter(model)
            row["delta"] = round(row["adapter"] - row["base"], 4)
            rows.append(row)
            print(
                f"{row['set']:<20} {row['structure']:<28} base {row['base']:.4f} "
                f"adapter {row['adapter']:.4f} ({row['delta']:+.4f})",
                flush=True,
            )
    summary = {}
    for s in sorted({r["set"] for r in rows}):
        sub = [r for r in rows if r["set"] == s]
        summary[s] = {
            k: round(float(np.mean([r[k] for r in sub])), 4) for k in ("base", "adapter", "delta")
        }
        summary[s]["structures"] = len(sub)
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.write_text(
        json.dumps(
            {
                "summary": summary,
                "rows": rows,
                "margin_px": args.margin,
                "adapter": str(args.adapter),
                "cpu": _cpu_name(),
                "seconds": round(time.time() - t0, 1),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
