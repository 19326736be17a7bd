"""Cases per hour of ``samed segment`` here versus on a local Ray cluster, in one run.

The same cases (``--cases`` NIfTI crops of ``--slices`` slices from the TotalSegmentator 3 mm CT)
go through three batches, each into a fresh output folder:

* ``local``: :func:`samed.batch.segment_batch` in this process;
* ``ray-1``: one Ray worker (same torch thread count): its extra seconds per case over the local
  run are Ray's own cost per case (shipping the job, returning the files, the driver's writes);
* ``ray-N``: ``--workers`` Ray workers (default: one per CPU of the cluster).

Automatic mode with an automatic adapter that has random LoRA/decoder weights on the real base
model (the cost is a trained adapter's; the labels mean nothing). The Ray cluster is started
once (its start is reported apart) and every Ray batch also pays for its workers loading the
model, reported as the batch's fixed cost (wall time minus the cases' own seconds). The label
maps of every Ray batch are compared with the local run's voxel for voxel.

Writes ``bench/results/ray_<device>.json``. Run from the repository root::

    python bench/bench_ray.py [--model litemedsam|tiny] [--cases 4] [--slices 4] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _cases(data: Path, folder: Path, n: int, slices: int) -> list[Path]:
    import nibabel as nib
    import numpy as np

    ct = nib.load(data / "totalsegmentator" / "ct_3mm" / "example_ct.nii.gz")
    arr = np.asarray(ct.dataobj)
    step = max(1, (arr.shape[2] - slices) // max(1, n))
    out = []
    for k in range(n):
        z0 = min(k * step, arr.shape[2] - slices)
        affine = ct.affine.copy()
        affine[:3, 3] = (ct.affine @ [0, 0, z0, 1])[:3]
        p = folder / f"case_{k:03d}.nii.gz"
        nib.save(nib.Nifti1Image(arr[:, :, z0 : z0 + slices], affine), p)
        out.append(p)
    return out


def _adapter(model: str, folder: Path) -> tuple[Path, object]:
    from samed.lora import LoraConfig, apply_lora, save_adapter
    from samed.model import build_tiny_model, load_model

    net = (
        build_tiny_model("tinyvit", seed=2) if model == "tiny" else load_model(model, device="cpu")
    )
    apply_lora(net, LoraConfig(mode="automatic", num_classes=3))
    path = save_adapter(net, folder / "auto", labels={0: "background", 1: "a", 2: "b"})
    base = build_tiny_model("tinyvit", seed=2) if model == "tiny" else model
    return path, base


def _labels(folder: Path) -> dict[str, object]:
    import nibabel as nib
    import numpy as np

    return {p.parent.name: np.asarray(nib.load(p).dataobj) for p in folder.glob("*/labels.nii.gz")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--model", default="litemedsam", help="litemedsam (real) or tiny (random)")
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/ray_cpu.json)")
    args = ap.parse_args()

    import numpy as np
    import ray
    import torch

    from samed.batch import segment_batch
    from samed.engine import tune_cpu_allocator

    tune_cpu_allocator()
    tmp = Path(tempfile.mkdtemp(prefix="samed-bench-ray-"))
    inputs = _cases(Path(args.data), tmp, args.cases, args.slices)
    adapter, base = _adapter(args.model, tmp)
    t = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    cluster_start = time.perf_counter() - t
    cpus = int(ray.cluster_resources().get("CPU", 1))
    runs = [("local", None), ("ray-1", 1), (f"ray-{args.workers or cpus}", args.workers or cpus)]
    results = {}
    for name, workers in runs:
        import copy

        model = copy.deepcopy(base) if not isinstance(base, str) else base
        out = tmp / name
        t = time.perf_counter()
        summary = segment_batch(
            inputs,
            out,
            adapter=adapter,
            model=model,
            device="cpu",
            qc=False,
            formats="nifti",
            ray=None if workers is None else "local",
            ray_workers=workers,
        )
        wall = time.perf_counter() - t
        assert summary.count("ok") == len(inputs), [r.error for r in summary.results]
        per_case = [r.seconds for r in summary.results]
        results[name] = {
            "workers": workers or 0,
            "wall_s": round(wall, 2),
            "case_seconds_mean": round(float(np.mean(per_case)), 3),
            # wall time not spent in the cases (model loads, Ray workers starting): serial runs only
            "fixed_s": round(wall - sum(per_case), 2) if workers in (None, 1) else None,
            "cases_per_hour": round(3600 * len(inputs) / wall, 1),
        }
        print(name, results[name], flush=True)
    want = _labels(tmp / "local")
    for name, _ in runs[1:]:
        got = _labels(tmp / name)
        results[name]["identical_to_local"] = sorted(got) == sorted(want) and all(
            np.array_equal(got[k], want[k]) for k in want
        )
    local, one = results["local"], results["ray-1"]
    overhead = one["case_seconds_mean"] - local["case_seconds_mean"]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next(
        (ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if "Model name" in ln), "?"
    )
    report = {
        "model": args.model,
        "cases": len(inputs),
        "slices_per_case": args.slices,
        "torch_threads": torch.get_num_threads(),
        "cluster_cpus": cpus,
        "ray_cluster_start_s": round(cluster_start, 2),
        "ray_overhead_per_case_s": round(overhead, 3),
        "runs": results,
        "cpu": model_name,
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "ray": ray.__version__,
    }
    ray.shutdown()
    print(json.dumps(report, indent=2))
    path = Path(args.out) if args.out else REPO / "bench" / "results" / "ray_cpu.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
