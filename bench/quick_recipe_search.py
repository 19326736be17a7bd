"""Compare variants of the quick (decoder-only) recipe on ACDC labeled_3, step-limited so that
machine load does not change the result, scored on a held-back selection set and on ACDC val.

    python bench/quick_recipe_search.py PAIRS --candidates s6,aug8 --steps 300 \
        --embedding-cache /tmp/l3_emb.pt --out bench/results/quick_recipe_search.json

``PAIRS``: ACDC ``labeled_3`` exported with ``bench/export_acdc_pairs.py`` (the widget's
export format). Each candidate is :func:`samed.train.quick.train_quick` on
:func:`samed.train.annotations.annotations_config` (the widget's and ``samed finetune
--from-annotations``'s recipe) with the candidate's overrides and ``train.iterations`` =
``--steps`` (no time limit); embeddings are shared through ``--embedding-cache``. The kept
adapter (best on the held-back volume, as the widget keeps it) is scored from cached base
embeddings (``acdc_decoder_eval.score_adapter``) on:

* **selection**: the 4 ``labeled_7`` patients outside ``labeled_3`` (8 volumes): the figure a
  candidate is chosen on (never trained on by these candidates);
* **val**: ACDC ``val`` (20 volumes), reported for every candidate, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

STRONG_AUG = {
    "augment.rotate_deg": 25.0,
    "augment.scale": [0.75, 1.3],
    "augment.shift_frac": 0.08,
    "augment.gamma_prob": 0.5,
    "augment.gamma": [0.6, 1.7],
    "augment.noise_prob": 0.3,
}
CANDIDATES: dict[str, dict] = {
    "s6": {},  # the session-6 defaults: 4 copies, lr 1e-3, wd 0.01
    "s6-lr3e-4": {"optim.lr": 3e-4},
    "s6-wd0.1": {"optim.weight_decay": 0.1},
    "aug4s": {**STRONG_AUG},  # stronger augmentation, the same caching cost as s6
    "aug8": {"train.cache_copies": 8, **STRONG_AUG},
    "aug8-wd0.1": {"train.cache_copies": 8, **STRONG_AUG, "optim.weight_decay": 0.1},
    "aug8-lr5e-4": {"train.cache_copies": 8, **STRONG_AUG, "optim.lr": 5e-4},
    "aug12": {"train.cache_copies": 12, **STRONG_AUG},
    # session 11 (issue 18): the session-7 defaults without / with the decoder weight average
    "base": {"train.ema": 0.0, "validation.keep": "best"},
    "base-last": {"train.ema": 0.0, "validation.keep": "last"},
    "ema": {"train.ema": 0.99, "validation.keep": "best"},
    "ema-last": {"train.ema": 0.99, "validation.keep": "last"},
}


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs")
    ap.add_argument("--candidates", default="s6,aug8")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--embedding-cache", default=None)
    ap.add_argument("--selection-cache", default=None, help="labeled_7 embeddings file")
    ap.add_argument("--val-cache", default=None, help="ACDC val embeddings file")
    ap.add_argument("--runs", default="/tmp/quick_recipe_runs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    from acdc_decoder_eval import score_adapter, val_embeddings

    from samed.datasets import load_dataset
    from samed.train.annotations import annotations_config
    from samed.train.quick import train_quick

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = load_dataset(REPO.parent / "shared" / "data" / "acdc")
    l3 = tuple(c.case_id for c in ds.split("labeled_3"))
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {"rows": []}
    for name in args.candidates.split(","):
        over = {"model.kind": "litemedsam", "train.max_minutes": None}
        over.update({"train.iterations": args.steps, **CANDIDATES[name]})
        cfg = annotations_config(args.pairs, f"search-{name}", minutes=None, overrides=over)
        t0, c0 = time.perf_counter(), time.process_time()
        up0 = _uptime()
        res = train_quick(
            cfg,
            Path(args.runs) / name,
            embedding_cache=args.embedding_cache,
            log=lambda s, n=name: print(f"[{n}] {s}", flush=True),
        )
        sel = val_embeddings("labeled_7", cache=args.selection_cache, skip=l3)
        val = val_embeddings("val", cache=args.val_cache)
        s_sel, s_val = score_adapter(res["adapter"], sel), score_adapter(res["adapter"], val)
        row = {
            "candidate": name,
            "overrides": CANDIDATES[name],
            "steps": res["steps"],
            "best_step": res["best_step"],
            "adapter_step": res.get("adapter_step"),
            "held_back_volume_dice": res["best_mean_dice"],
            "kept_adapter_held_back_dice": res.get("adapter_mean_dice"),
            "selection_dice_raw": s_sel["mean_dice_raw"],
            "selection_dice_largest_component": s_sel["mean_dice_largest_component"],
            "selection_volumes": s_sel["volumes"],
            "val_dice_raw": s_val["mean_dice_raw"],
            "val_dice_largest_component": s_val["mean_dice_largest_component"],
            "val_per_class_raw": s_val["per_class_raw"],
            "val_volumes": s_val["volumes"],
            "postprocessing": json.loads((Path(res["adapter"]) / "metadata.json").read_text())
            .get("postprocessing", {})
            .get("largest_component"),
            "cache_seconds": res["cache_seconds"],
            "cache_encoder": res["cache_encoder"],
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1),
            "threads": torch.get_num_threads(),
            "uptime_start": up0,
            "uptime_end": _uptime(),
            "cpu": platform.processor(),
            "cpu_model": _cpu_model(),
        }
        print(json.dumps(row), flush=True)
        # re-read: another process may have added rows meanwhile
        results = json.loads(out_path.read_text()) if out_path.is_file() else {"rows": []}
        results["rows"] = [r for r in results["rows"] if r["candidate"] != name] + [row]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
