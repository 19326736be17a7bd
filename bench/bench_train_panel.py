"""Train an adapter from the napari widget as a user would, then score it on ACDC val.

    xvfb-run -a -s "-screen 0 1600x1200x24" python bench/bench_train_panel.py \
        [--minutes 15] [--split labeled_3] [--out bench/results/train_panel.json]

Opens napari, the samed widget through the Plugins menu entry (``add_plugin_dock_widget``),
each image of ACDC ``labeled_3`` (3 patients, 6 volumes) and its label file with samed's reader
(the labels stand for annotations the user accepted), checks the 6 Labels layers in the
*Train adapter* panel, types a name, clicks *Train adapter*, takes a screenshot of the panel
while it trains, waits for the end (the time limit) and checks that the new adapter is in the
widget's adapter menu. Snapshots of the best adapter so far are kept at fixed minutes; each is
scored on ACDC val (3D Dice per volume, mean RV/MYO/LV) by ``bench/acdc_decoder_eval.py``.
The adapter goes to ``$SAMED_ADAPTER_DIR`` (set it to keep benchmark adapters out of ~).
Scores: raw argmax, largest component on all three classes, and with the clean-up the adapter
records (what it applies). ``--score-only`` rescores the snapshots of an existing ``--out`` file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAMED_SHARED_DATA", REPO.parent / "shared" / "data"))
SNAPSHOTS = (1, 2, 3, 5, 7.5, 10, 12.5, 15, 20, 30, 45, 60)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--split", default="labeled_3")
    ap.add_argument("--name", default="acdc-l3-widget")
    ap.add_argument("--screenshot-at", type=float, default=4.0, help="minutes into the run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_panel.json"))
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument(
        "--cache-copies", type=int, default=None, help="train.cache_copies (default: the recipe's)"
    )
    ap.add_argument("--eval-cache", default=None, help="val embeddings file (acdc_decoder_eval)")
    ap.add_argument(
        "--score-only",
        action="store_true",
        help="no training: score the snapshots of the results file --out (e.g. to rescore)",
    )
    args = ap.parse_args()
    if args.score_only:
        return score(json.loads(Path(args.out).read_text()), args)
    import napari
    from qtpy.QtWidgets import QApplication

    from samed.datasets import load_dataset

    ds = load_dataset(DATA / "acdc")
    cases = ds.split(args.split)
    viewer = napari.Viewer(show=True)
    _dock, widget = viewer.window.add_plugin_dock_widget("samed", "samed segmentation")
    labels_names = []
    for c in cases:
        viewer.open(str(c.image), plugin="samed")
        [lab] = viewer.open(str(c.label), plugin="samed")
        lab.name = f"{c.case_id} annotation"
        labels_names.append(lab.name)
    app = QApplication.instance()
    app.processEvents()
    panel = widget.train_panel
    marks = tuple(m for m in SNAPSHOTS if m <= args.minutes + 5)
    panel.train_options = {"snapshot_minutes": marks}
    if args.cache_copies:
        panel.train_options["overrides"] = {"train.cache_copies": args.cache_copies}
    panel.refresh_layers()
    panel.set_checked(labels_names)
    panel.name_edit.setText(args.name)
    panel.minutes_spin.setValue(args.minutes)
    res_dir = Path(args.out).parent
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.out).stem  # screenshots named after the results file (no overwriting)
    shot = res_dir / f"{stem}_window.png"
    up_start = _uptime()
    t0 = time.perf_counter()
    panel.train_btn.click()
    shot_taken = False
    while panel.running or panel.result is None and not panel.error:
        app.processEvents()
        time.sleep(0.05)
        m = (time.perf_counter() - t0) / 60
        if not shot_taken and m >= args.screenshot_at:
            viewer.window._qt_window.grab().save(str(shot))  # the whole window, panel docked
            panel.grab().save(str(shot.with_name(f"{stem}_panel.png")))
            shot_taken = True
            print(f"screenshot at {m:.1f} min: {panel.status.text()!r}", flush=True)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if panel.error:
        print(f"training failed: {panel.error}")
        return 1
    res = panel.result
    combo = widget.ui.adapter_combo
    in_menu = args.name in [combo.itemData(i) for i in range(combo.count())]
    print(
        f"trained {res['steps']} steps in {wall / 60:.1f} min (cache {res['cache_seconds']} s);"
        f" best held-back Dice {res['best_mean_dice']}; in adapter menu: {in_menu}"
    )
    out = {
        "split": args.split,
        "minutes_limit": args.minutes,
        "wall_seconds": round(wall, 1),
        "result": res,
        "in_adapter_menu": in_menu,
        "events": [e for e in panel.events if e.get("event") in ("val",)],
        "uptime_start": up_start,
        "uptime_end": _uptime(),
        "cpu": platform.processor(),
        "screenshot": str(shot) if shot_taken else None,
        "screenshot_panel": str(shot.with_name(f"{stem}_panel.png")) if shot_taken else None,
    }
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    viewer.close()
    if args.no_eval:
        return 0
    return score(out, args)


def score(out: dict, args: argparse.Namespace) -> int:
    """Score every snapshot and the installed adapter of ``out`` (a results dict of this bench)
    on ACDC val; writes ``out`` to ``args.out`` with ``acdc_val`` added."""
    sys.path.insert(0, str(REPO / "bench"))
    from acdc_decoder_eval import check_against_session, score_adapter, val_embeddings

    res = out["result"]
    val = val_embeddings(limit=args.eval_limit, cache=args.eval_cache)
    curve = []
    for snap in res["snapshots"]:
        r = score_adapter(snap["path"], val)
        curve.append(
            {
                "minutes": snap["minutes"],
                "cpu_minutes": snap.get("cpu_minutes"),
                "best_step": snap["best_step"],
                "held_back_dice": snap.get("val_mean_dice"),
                "val_dice_raw": r["mean_dice_raw"],
                "val_dice_largest_component": r["mean_dice_largest_component"],
                "val_dice_recorded": r["mean_dice_recorded"],
                "recorded_largest_component": r["recorded_largest_component"],
                "per_class_raw": r["per_class_raw"],
                "per_class_recorded": r["per_class_recorded"],
            }
        )
        print(
            f"  {snap['minutes']:>5g} min (best step {snap['best_step']}): ACDC val Dice "
            f"{r['mean_dice_raw']:.4f} raw, {r['mean_dice_largest_component']:.4f} largest "
            f"component, {r['mean_dice_recorded']:.4f} recorded clean-up "
            f"{r['recorded_largest_component']}",
            flush=True,
        )
    final = score_adapter(res["installed"], val)
    out["acdc_val"] = {
        "final": final,
        "curve": curve,
        "session_check": check_against_session(res["installed"], val[0]),
    }
    out["uptime_eval_end"] = _uptime()
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(
        f"final adapter: ACDC val Dice {final['mean_dice_raw']:.4f} raw, "
        f"{final['mean_dice_largest_component']:.4f} largest component, "
        f"{final['mean_dice_recorded']:.4f} with the recorded clean-up; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
