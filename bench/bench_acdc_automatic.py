"""ACDC automatic adapter: 3D Dice with and without the largest-component post-processing.

    python bench/bench_acdc_automatic.py [--split val|heldout|NAME] [--adapter acdc-cardiac-mri]

``heldout`` = the ``train`` patients outside ``labeled_7`` (labeled in the release, never used to
train the shipped adapter nor to choose its post-processing). Each volume is segmented once
(:meth:`samed.engine.Session.automatic` with ``postprocess="none"``) and scored raw and after
:func:`samed.postprocess.keep_largest_component` (MONAI metrics through
:func:`samed.evaluate.metrics.score_case`). Prints a table; writes
``bench/results/acdc_automatic_<split>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAMED_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="val")
    ap.add_argument("--adapter", default="acdc-cardiac-mri")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from samed.datasets import load_dataset
    from samed.engine import Session, tune_cpu_allocator
    from samed.evaluate import score_case
    from samed.io import load_label_map, load_volume
    from samed.model import load_model
    from samed.postprocess import keep_largest_component

    tune_cpu_allocator()
    model = load_model(adapter=args.adapter, merge=True)
    ds = load_dataset(DATA / "acdc")
    if args.split == "heldout":
        lab7 = {c.case_id.split("_")[0] for c in ds.split("labeled_7")}
        cases = [c for c in ds.split("train") if c.case_id.split("_")[0] not in lab7]
    else:
        cases = ds.split(args.split)
    cases = cases[: args.limit or None]
    fg = {k: v for k, v in ds.labels.items() if k != 0}
    rows: dict[str, list[dict[str, float]]] = {"none": [], "largest_component": []}
    t0 = time.perf_counter()
    for i, case in enumerate(cases):
        vol = load_volume(case.image)
        gt = np.asarray(load_label_map(case.label, reference=vol).array).astype(np.int64)
        raw = Session(model, vol, intensity="auto").automatic(postprocess="none")
        for name, pred in (
            ("none", raw),
            ("largest_component", keep_largest_component(raw, sorted(fg))),
        ):
            sc = score_case(pred.astype(np.int64), gt, ds.labels, vol.spacing)
            rows[name].append({"case": case.case_id, **{fg[c]: s["dice"] for c, s in sc.items()}})
        print(f"  {i + 1}/{len(cases)} {case.case_id}", flush=True)
    res: dict[str, dict[str, float]] = {}
    for name, rr in rows.items():
        per = {n: float(np.nanmean([r[n] for r in rr])) for n in fg.values()}
        per["mean"] = float(np.mean(list(per.values())))
        res[name] = per
    print(
        f"\n| post-processing | {' | '.join(fg.values())} | mean |\n|---|" + "---|" * (len(fg) + 1)
    )
    for name, per in res.items():
        print(f"| {name} | " + " | ".join(f"{per[n]:.4f}" for n in [*fg.values(), "mean"]) + " |")
    out = Path(args.out or REPO / "bench" / "results" / f"acdc_automatic_{args.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "adapter": args.adapter,
                "split": args.split,
                "volumes": len(cases),
                "seconds": round(time.perf_counter() - t0, 1),
                "metric": "3D Dice per volume, mean per class",
                "results": res,
                "per_case": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
