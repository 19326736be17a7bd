"""Benchmark the napari plugin on the example CT: click -> preview, embedding, propagation.

Runs the real widget in a real viewer (needs a display: ``xvfb-run -a -s "-screen 0 1600x1200x24"``
with ``QT_QPA_PLATFORM=xcb``), with the real LiteMedSAM model on this machine's CPU:

1. open ``example_ct.nii.gz`` with the plugin's reader;
2. embed every slice in the widget's worker (timed; no disk cache unless ``--cache``);
3. box on the liver's middle slice, then N positive-point clicks on that cached slice, each timed
   from adding the point to the preview drawn (event loop processed);
4. propagate through the volume (timed), accept as label 5, Dice against TotalSegmentator's liver;
5. screenshot of the window (``--screenshot docs/images/plugin.png``).

Prints a table and writes JSON (default ``bench/results/plugin.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAMED_SHARED_DATA", REPO.parent / "shared" / "data"))


def _wait(app, cond, timeout: float) -> None:
    end = time.perf_counter() + timeout
    while not cond():
        app.processEvents()
        if time.perf_counter() > end:
            raise TimeoutError("timed out")
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "plugin.json"))
    ap.add_argument("--screenshot", default="")
    ap.add_argument("--cache", default="", help="embedding cache folder (default: none)")
    args = ap.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")

    import napari
    import napari_samed  # noqa: F401 - blocks the triton import before any GL context
    import torch
    from napari_samed._layers import box_vertices
    from napari_samed._session import PluginSession
    from napari_samed._widget import SamedWidget

    from samed.evaluate.metrics import dice as dice_score
    from samed.io import load_label_map

    ct = DATA / "totalsegmentator" / "ct_3mm" / "example_ct.nii.gz"
    gt = load_label_map(DATA / "totalsegmentator/ct_3mm/example_seg_fast_force_split.nii.gz")
    gt = gt.array == 5
    viewer = napari.Viewer(show=True)
    app = napari.qt.get_qapp()
    [image] = viewer.open(str(ct), plugin="samed")
    widget = SamedWidget(viewer, session=PluginSession(cache_dir=args.cache or None))
    viewer.window.add_dock_widget(widget, name="samed")
    viewer.window._qt_window.resize(1400, 900)
    ann = widget.annotator
    zs = np.nonzero(gt.any(axis=(1, 2)))[0]
    z0 = int((zs.min() + zs.max()) // 2)
    viewer.dims.set_current_step(0, z0)

    t0 = time.perf_counter()
    widget.embed()
    _wait(app, lambda: not widget.busy, 3600)
    embed_s = time.perf_counter() - t0

    ys, xs = np.nonzero(gt[z0])
    box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
    viewer.layers["samed boxes"].add_rectangles(box_vertices(z0, box))
    app.processEvents()
    clicks = []
    rng = np.random.default_rng(0)
    inside = np.argwhere(gt[z0])
    for _ in range(args.clicks):
        y, x = inside[rng.integers(len(inside))]
        t = time.perf_counter()
        viewer.layers["samed positive"].add([z0, float(y), float(x)])
        app.processEvents()  # the preview layer redraws
        clicks.append((time.perf_counter() - t) * 1000)
        widget.undo()
        app.processEvents()
    engine = ann.engine
    decode = []
    for _ in range(args.clicks):
        t = time.perf_counter()
        engine.predict(z0, box=list(box))
        decode.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    widget.propagate()
    _wait(app, lambda: not widget.busy, 3600)
    propagate_s = time.perf_counter() - t0
    widget.ui.label_spin.setValue(5)
    widget.accept()
    app.processEvents()
    liver = viewer.layers["example_ct labels"].data == 5
    dice = dice_score(liver, gt)
    if args.screenshot:
        for name in ("samed positive", "samed negative"):
            viewer.layers[name].visible = False
        viewer.dims.set_current_step(0, z0)
        app.processEvents()
        viewer.screenshot(args.screenshot, canvas_only=False)

    result = {
        "benchmark": "plugin",
        "volume": str(ct.relative_to(DATA)),
        "shape_zyx": list(image.data.shape),
        "model": "litemedsam",
        "seed_slice": z0,
        "liver_slices": [int(zs.min()), int(zs.max())],
        "click_to_preview_ms_median": statistics.median(clicks),
        "click_to_preview_ms_all": [round(v, 1) for v in clicks],
        "decoder_predict_ms_median": statistics.median(decode),
        "embed_all_slices_s": embed_s,
        "embed_s_per_slice": embed_s / image.data.shape[0],
        "propagate_s": propagate_s,
        "liver_label_slices": int(liver.any((1, 2)).sum()),
        "liver_dice": dice,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    rows = [
        ("click -> preview (median, ms)", f"{result['click_to_preview_ms_median']:.0f}"),
        ("decoder only (median, ms)", f"{result['decoder_predict_ms_median']:.0f}"),
        ("embed 112 slices (s)", f"{embed_s:.1f} ({result['embed_s_per_slice']:.2f} s/slice)"),
        ("propagate (s)", f"{propagate_s:.1f}"),
        ("liver Dice", f"{dice:.4f}"),
        ("load average (1 min)", f"{result['load_average_1min']:.1f}"),
    ]
    for k, v in rows:
        print(f"{k:<32} {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
