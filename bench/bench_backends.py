"""CPU encoder candidates (samed.engine.backends) beside today's path, for
``python bench/bench_engine.py --candidates [--slices 8 --reps 5]``: one process, same slices,
b1 / batch seconds per slice, click, peak RSS (a child process per candidate), the embedding
error and what ``auto`` picks. Writes bench/results/engine-backends-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_engine import REPO, _acdc_slices, _time


def candidate_child(name: str, n: int) -> None:
    """Runs in a subprocess: peak RSS of one encoder candidate (load, build, b1 and batch n)."""
    from samed.engine import prepare_slices
    from samed.model import load_model

    b, p = name.split("-")
    model = load_model(device="cpu", backend=b, precision=p)
    xb = prepare_slices(_acdc_slices(n), 256)
    with torch.inference_mode():
        model.encode(xb[:1])
        model.encode(xb)
    # VmHWM, not ru_maxrss: Linux carries the parent's maxrss over fork + exec into the child
    hwm = [
        ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM")
    ]
    rss = int(hwm[0].split()[1]) / 1024 if hwm else None
    be = model.encoder_backend
    print(json.dumps({"name": be.name if be is not None else "torch-fp32", "peak_rss_mb": rss}))


def candidates(n: int, reps: int) -> dict:
    """Every CPU encoder candidate beside today's path (optimize_for_inference, torch fp32), in
    one process on the same slices: b1 and batch-n seconds per slice (timed passes round-robin
    over the candidates, so a load change on a shared machine hits all alike), click latency,
    the embedding error against torch fp32, and what ``auto``'s rule picks from a fresh
    :func:`samed.engine.backend_auto.measure` (its accuracy bar on the calibration slices)."""
    from samed.engine import Session, prepare_slices
    from samed.engine.backend_auto import calibration_inputs, measure, pick
    from samed.engine.backends import (
        CANDIDATES,
        EncoderBackend,
        backend_cache_dir,
        build_candidate,
        unsupported_reason,
    )
    from samed.model import load_model

    base = load_model(device="cpu")  # today's optimize_for_inference fp32
    slices = _acdc_slices(n)
    xb = prepare_slices(slices, 256)
    x1 = xb[:1]
    out: dict = {}
    backends = {"torch-fp32": EncoderBackend()}
    for name in CANDIDATES[1:]:
        why = unsupported_reason(*name.split("-"))
        if why:
            out[name] = {"skipped": why}
            continue
        t = time.perf_counter()
        try:
            backends[name] = build_candidate(
                base,
                name,
                calibration=lambda: calibration_inputs(base),
                cache=backend_cache_dir(),
            )
        except Exception as exc:  # report and go on
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[name] = {"build_s": time.perf_counter() - t}
    out.setdefault("torch-fp32", {})["build_s"] = 0.0

    def run(name: str, x: torch.Tensor) -> torch.Tensor:
        base.encoder_backend = backends[name].bind(base)
        return base.encode(x)

    b1: dict[str, list[float]] = {k: [] for k in backends}
    bn: dict[str, list[float]] = {k: [] for k in backends}
    with torch.inference_mode():
        ref = run("torch-fp32", xb)
        for k in backends:
            e = run(k, xb)
            out[k]["embedding_rel_err_acdc"] = float((e - ref).norm() / ref.norm())
        for _ in range(reps):
            for k in backends:
                b1[k] += _time(lambda k=k: run(k, x1), 1, torch.device("cpu"))
        for _ in range(2):
            for k in backends:
                bn[k] += _time(lambda k=k: run(k, xb), 1, torch.device("cpu"))
    for k in backends:
        base.encoder_backend = backends[k].bind(base)
        s = Session(base, slices, intensity="minmax")
        z = len(slices) // 2
        s.embed([z])
        s.predict(z, box=[60, 60, 150, 140])
        clicks = _time(
            lambda s=s, z=z: s.predict(z, box=[60, 60, 150, 140]), 15, torch.device("cpu")
        )
        out[k].update(
            embed_s_per_slice_b1=statistics.median(b1[k]),
            embed_s_per_slice_batch=statistics.median(bn[k]) / n,
            batch=n,
            click_box_ms_median=1000 * statistics.median(clicks),
        )
    t0 = out["torch-fp32"]
    for k in backends:
        out[k]["speedup_b1_vs_optimize_for_inference"] = (
            t0["embed_s_per_slice_b1"] / out[k]["embed_s_per_slice_b1"]
        )
        out[k]["speedup_batch_vs_optimize_for_inference"] = (
            t0["embed_s_per_slice_batch"] / out[k]["embed_s_per_slice_batch"]
        )
    base.encoder_backend = None
    # peak RSS per candidate, each in its own process
    for k in backends:
        child = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).with_name("bench_engine.py")),
                "--candidate-child",
                k,
                "--slices",
                str(n),
            ],
            capture_output=True,
            text=True,
        )
        try:
            out[k]["peak_rss_mb"] = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        except (ValueError, IndexError, KeyError):
            out[k]["peak_rss_mb"] = None
    t = time.perf_counter()
    auto = measure(base, list(backends), cache=backend_cache_dir(), built=backends)
    return {
        "candidates": out,
        "auto_measurement": auto,
        "auto_pick": pick(auto),
        "auto_measure_s": time.perf_counter() - t,
    }


def _machine() -> dict:
    from samed.engine.backends import cpu_features

    return {
        "cpu": cpu_features(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": os.getloadavg(),
    }


def run_candidates(args: argparse.Namespace) -> int:
    machine = _machine()
    print(f"machine: {machine}", flush=True)
    res = candidates(args.slices, args.reps)
    machine["load_average_after"] = os.getloadavg()
    c = res["candidates"]
    print(
        f"\n| candidate | s/slice b1 | s/slice batch {args.slices} | vs today b1 / batch | "
        "click ms | peak RSS MB | emb. rel. err | auto bar (mean box Dice) |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for k, v in c.items():
        if "embed_s_per_slice_b1" not in v:
            print(f"| {k} | {v.get('skipped') or v.get('error')} |")
            continue
        a = res["auto_measurement"].get(k, {})
        rss = v.get("peak_rss_mb")
        print(
            f"| {k} | {v['embed_s_per_slice_b1']:.3f} | {v['embed_s_per_slice_batch']:.3f} | "
            f"{v['speedup_b1_vs_optimize_for_inference']:.2f}x / "
            f"{v['speedup_batch_vs_optimize_for_inference']:.2f}x | "
            f"{v['click_box_ms_median']:.1f} | {rss if rss is None else round(rss)} | "
            f"{v['embedding_rel_err_acdc']:.4f} | "
            f"{a.get('mean_dice', float('nan')):.4f}{' ok' if a.get('ok') else ' no'} |"
        )
    print(f"auto picks: {res['auto_pick']} (measure took {res['auto_measure_s']:.0f} s)")
    out = Path(args.out or REPO / "bench" / "results" / "engine-backends-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, **res}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
