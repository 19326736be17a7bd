"""Interactive 3D benchmark (issue #17): one box, propagate, then N simulated corrective clicks.

Protocol, per structure, driven only through the public :class:`samed.annotation.Annotator` calls
a script or the napari widget uses:

1. ``add_box(z0, box)`` on the slice ``z0`` where the ground-truth structure is largest, with the
   tight ground-truth box grown by ``--box-slack`` px on each side; ``propagate(z0, **options)``
   (the widget's propagation options).
2. ``--clicks`` times (default 5): the largest 3D connected component of ``prediction XOR truth``
   (6-connectivity); on that component's largest slice, the point farthest from the component's
   boundary (scipy's Euclidean distance transform of the component's 2D cross-section); a
   positive click if it is a miss (truth there), negative if a leak; ``add_point(z, xy, positive)``
   then ``propagate(z, **options)``.

Dice (3D, over the cropped volume) is recorded after every interaction. The area under the curve
("AUC") is the **mean** Dice over the 1 + N interactions (box, click 1..N), i.e. the trapezoid-free
mean, so it lies in [0, 1]. Seconds per interaction time only the interaction (``add_*`` +
``propagate``): all embeddings are computed (or read from the on-disk cache) before.

Volumes are cropped along z to the union of the case's structures' z-ranges +- ``--z-margin``
slices (the embedding costs ~0.5 s per slice on a 2-core CPU); embeddings are cached under
``--cache-dir`` so reruns are cheap.

Usage::

    python bench/bench_interactive.py --limit 4 --datasets acdc,chaos
    python bench/bench_interactive.py   # all structures (>= 30 from 6 datasets)
    python bench/bench_interactive.py --oracle-boxes --tag=-oracle  # box-prompting ceiling
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("/work/shared/data")

# the napari widget's propagation options (plugins/napari_samed/_widget.py)
WIDGET_OPTIONS = {"box_margin": 2.0, "min_area": 10, "max_step_px": 2}


def _cases(datasets: set[str]) -> list[dict]:
    """(dataset, case, image, label file, {label value: structure name}) of held-out data."""
    out: list[dict] = []

    def add(ds, case, img, lab, names):
        if ds in datasets and Path(img).exists() and Path(lab).exists():
            out.append(
                {"dataset": ds, "case": case, "image": str(img), "labels": str(lab), "names": names}
            )

    acdc = DATA / "acdc"
    if (acdc / "dataset.json").exists():
        val = json.loads((acdc / "dataset.json").read_text())["splits"]["val"]
        for p in val[:5]:
            f = f"{p}_frame01.nii.gz"
            add(
                "acdc",
                p,
                acdc / "imagesTr" / f,
                acdc / "labelsTr" / f,
                {1: "RV", 2: "MYO", 3: "LV"},
            )
    for i in (1, 2, 3):
        f = f"chaos_t2_{i:02d}.nii.gz"
        add(
            "chaos",
            f"chaos_{i:02d}",
            DATA / "chaos_t2/imagesTr" / f,
            DATA / "chaos_t2/labelsTr" / f,
            {1: "liver", 2: "kidney_R", 3: "kidney_L", 4: "spleen"},
        )
    for i in (1, 3, 4, 6):
        f = f"hippocampus_{i:03d}.nii.gz"
        add(
            "hippocampus",
            f"hippo_{i:03d}",
            DATA / "hippocampus/imagesTr" / f,
            DATA / "hippocampus/labelsTr" / f,
            {1: "anterior", 2: "posterior"},
        )
    for f in sorted((DATA / "medsam2_deeplesion").glob("*.npz")):
        add("deeplesion", f.stem[:17], f, f, {1: "lesion"})
    b = DATA / "sammed3d_brats"
    add(
        "brats",
        "BraTS2021_01646",
        b / "BraTS2021_01646_flair.nii.gz",
        b / "BraTS2021_01646_edema_label.nii.gz",
        {1: "edema"},
    )
    r = DATA / "pyradiomics"
    add("pyradiomics", "brain1", r / "brain1_image.nrrd", r / "brain1_label.nrrd", {1: "tumour"})
    add("pyradiomics", "breast1", r / "breast1_image.nrrd", r / "breast1_label.nrrd", {1: "tumour"})
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[int, tuple[float, float], bool] | None:
    """(z, (x, y), positive) at the centre of the largest 3D error component, or None
    (:func:`samed.engine.interactive.simulated_click`, which ``samed demo`` uses too)."""
    from samed.engine.interactive import simulated_click

    return simulated_click(pred, gt)


def run_structure(session, gt: np.ndarray, n_clicks: int, slack: float, options: dict) -> dict:
    from samed.annotation import Annotator

    ann = Annotator(session, np.zeros(gt.shape, dtype=np.uint8))
    z0 = int(np.argmax(gt.sum(axis=(1, 2))))
    ys, xs = np.nonzero(gt[z0])
    h, w = gt.shape[1:]
    box = [
        max(xs.min() - slack, 0),
        max(ys.min() - slack, 0),
        min(xs.max() + slack, w - 1),
        min(ys.max() + slack, h - 1),
    ]
    t = time.perf_counter()
    ann.add_box(z0, box)
    ann.propagate(z0, **options)
    secs = [time.perf_counter() - t]
    dices = [dice(ann.object_mask(), gt)]
    clicks = []
    for _ in range(n_clicks):
        c = next_click(ann.object_mask(), gt)
        if c is None:  # perfect: the curve stays at 1
            dices.append(dices[-1])
            continue
        z, xy, pos = c
        t = time.perf_counter()
        ann.add_point(z, xy, positive=pos)
        ann.propagate(z, **options)
        secs.append(time.perf_counter() - t)
        dices.append(dice(ann.object_mask(), gt))
        clicks.append({"z": z, "xy": [round(xy[0], 1), round(xy[1], 1)], "positive": pos})
    return {
        "dice": [round(d, 4) for d in dices],
        "seconds": [round(s, 4) for s in secs],
        "clicks": clicks,
        "box_slice": z0,
        "auc": round(float(np.mean(dices)), 4),
    }


def oracle_boxes(session, gt: np.ndarray, slack: float) -> dict:
    """The ceiling of box prompting: a tight ground-truth box (+ ``slack`` px) on *every* slice
    of the structure, no propagation and no clicks (what a perfect box-drawing user gets from the
    model alone); 3D Dice of the stacked slice masks."""
    pred = np.zeros_like(gt)
    h, w = gt.shape[1:]
    t = time.perf_counter()
    for z in np.nonzero(gt.any(axis=(1, 2)))[0]:
        ys, xs = np.nonzero(gt[z])
        box = [
            max(xs.min() - slack, 0),
            max(ys.min() - slack, 0),
            min(xs.max() + slack, w - 1),
            min(ys.max() + slack, h - 1),
        ]
        pred[z] = session.predict_full(int(z), box=box).mask
    d = round(dice(pred, gt), 4)
    secs = [round(time.perf_counter() - t, 4)]
    return {"dice": [d], "seconds": secs, "clicks": [], "box_slice": -1, "auc": d}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="acdc,chaos,hippocampus,deeplesion,brats,pyradiomics")
    ap.add_argument("--limit", type=int, default=0, help="at most this many structures (0: all)")
    ap.add_argument("--cases", default="", help="only these case ids (comma-separated; shards)")
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--box-slack", type=float, default=0.0, help="px added to the tight GT box")
    ap.add_argument("--z-margin", type=int, default=3, help="slices kept beyond the structures")
    ap.add_argument("--model", default="base", help="label for the results file")
    ap.add_argument("--adapter", default=None, help="adapter to load (default: the base model)")
    ap.add_argument("--cache-dir", default="/tmp/samed-bench-interactive-cache")
    ap.add_argument(
        "--out", default=None, help="JSON path (default bench/results/interactive-<model>.json)"
    )
    ap.add_argument("--tag", default="", help="suffix for the results file name")
    ap.add_argument(
        "--oracle-boxes",
        action="store_true",
        help="the ceiling of box prompting instead: a tight GT box on every slice (no clicks)",
    )
    args = ap.parse_args(argv)

    from samed.engine import Session, optimize_for_inference
    from samed.io import load_label_map, load_volume
    from samed.model import build_model

    model = build_model(device="cpu")
    if args.adapter:
        from samed.lora import load_adapter

        load_adapter(model, args.adapter)
    model = optimize_for_inference(model)
    rows: list[dict] = []
    cases = _cases(set(args.datasets.split(",")))
    if args.cases:
        cases = [c for c in cases if c["case"] in set(args.cases.split(","))]
    for case in cases:
        if args.limit and len(rows) >= args.limit:
            break
        vol = load_volume(case["image"])
        lab = load_label_map(case["labels"]).array
        if lab.shape != vol.shape:
            print(
                f"skip {case['case']}: label shape {lab.shape} != image {vol.shape}",
                file=sys.stderr,
            )
            continue
        present = [v for v in case["names"] if (lab == v).any()]
        zs = np.nonzero(np.isin(lab, present).any(axis=(1, 2)))[0]
        z0, z1 = (
            max(int(zs.min()) - args.z_margin, 0),
            min(int(zs.max()) + args.z_margin + 1, lab.shape[0]),
        )
        arr, lab = vol.array[z0:z1], lab[z0:z1]
        session = Session(model, arr, modality=vol.modality, cache_dir=args.cache_dir)
        session.embed()
        for v in present:
            if args.limit and len(rows) >= args.limit:
                break
            gt = lab == v
            r = (
                oracle_boxes(session, gt, args.box_slack)
                if args.oracle_boxes
                else run_structure(session, gt, args.clicks, args.box_slack, WIDGET_OPTIONS)
            )
            r.update(
                dataset=case["dataset"],
                case=case["case"],
                structure=case["names"][v],
                slices=int(gt.shape[0]),
                object_slices=int(gt.any(axis=(1, 2)).sum()),
            )
            rows.append(r)
            print(
                f"{r['dataset']:<12} {r['case']:<17} {r['structure']:<10} "
                + " ".join(f"{d:.3f}" for d in r["dice"])
                + f"  auc {r['auc']:.3f}  s/click {np.median(r['seconds'][1:]) if len(r['seconds']) > 1 else 0:.2f}",
                flush=True,
            )
    if not rows:
        print("no structures found", file=sys.stderr)
        return 1
    n = 1 if args.oracle_boxes else args.clicks + 1
    curve = [float(np.mean([r["dice"][i] for r in rows])) for i in range(n)]
    steps = [r["dice"][i + 1] - r["dice"][i] for r in rows for i in range(n - 1)]
    click_secs = [s for r in rows for s in r["seconds"][1:]]
    summary = {
        "structures": len(rows),
        "datasets": sorted({r["dataset"] for r in rows}),
        "mean_dice_curve": [round(c, 4) for c in curve],
        "mean_auc": round(float(np.mean([r["auc"] for r in rows])), 4),
        "mean_final_dice": round(curve[-1], 4),
        "monotone_mean_curve": all(b >= a for a, b in zip(curve[:-1], curve[1:], strict=True)),
        "clicks_losing_over_0.01": int(sum(d < -0.01 for d in steps)),
        "clicks": len(steps),
        "fraction_clicks_not_losing": (
            round(sum(d >= -0.01 for d in steps) / len(steps), 4) if steps else None
        ),
        "median_seconds_per_click": round(statistics.median(click_secs), 4) if click_secs else None,
        "median_seconds_box": round(statistics.median(r["seconds"][0] for r in rows), 4),
        "per_dataset_curve": {
            ds: [
                round(float(np.mean([r["dice"][i] for r in rows if r["dataset"] == ds])), 4)
                for i in range(n)
            ]
            for ds in sorted({r["dataset"] for r in rows})
        },
        "protocol": {
            "oracle_boxes": bool(args.oracle_boxes),
            "clicks": 0 if args.oracle_boxes else args.clicks,
            "box_slack_px": args.box_slack,
            "z_margin": args.z_margin,
            "propagate_options": WIDGET_OPTIONS,
            "auc": "mean Dice over the 1 + N interactions",
        },
        "cpu": _cpu_name(),
    }
    print("\nmean Dice after box, click 1..N: " + " ".join(f"{c:.3f}" for c in curve))
    for ds, c in summary["per_dataset_curve"].items():
        print(f"  {ds:<12} " + " ".join(f"{v:.3f}" for v in c))
    for k in (
        "structures",
        "mean_auc",
        "mean_final_dice",
        "monotone_mean_curve",
        "fraction_clicks_not_losing",
        "median_seconds_per_click",
        "median_seconds_box",
    ):
        print(f"{k}: {summary[k]}")
    out = (
        Path(args.out)
        if args.out
        else REPO / "bench" / "results" / f"interactive-{args.model}{args.tag}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "cases": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
