"""Score decoder-only ACDC adapters (samed.train.quick) on ACDC val, fast: the base encoder's
embeddings of every val slice are computed once, then each adapter runs only its decoder.

Valid because a decoder-only adapter's LoRA is zero and frozen (the encoder is the base
encoder); :func:`check_against_session` confirms it on one volume against
``Session.automatic`` (identical labels). 3D Dice per volume, mean of RV/MYO/LV, raw argmax and
after the largest-component clean-up.

    python bench/acdc_decoder_eval.py ADAPTER_DIR [ADAPTER_DIR ...] [--limit N] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAMED_SHARED_DATA", REPO.parent / "shared" / "data"))


def val_embeddings(
    split: str = "val",
    limit: int | None = None,
    cache: str | Path | None = None,
    cache_only: bool = False,
    skip: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """[{case, vol, gt, emb (Z, 256, 64, 64) fp16, geo}] of ACDC ``split`` with the base
    LiteMedSAM encoder; ``cache``: a torch file of the embeddings, extended after every volume
    and reused; ``cache_only``: only the volumes already cached; ``skip``: case ids left out."""
    import torch

    from samed.datasets import load_dataset
    from samed.engine import Session
    from samed.engine.preprocess import slice_geometry
    from samed.io import load_label_map, load_volume
    from samed.model import load_model

    saved: list = []
    if cache is not None and Path(cache).is_file():
        saved = torch.load(cache, weights_only=True)  # tuples of str + tensors only
    done = {row[0] for row in saved}
    ds = load_dataset(DATA / "acdc")
    todo = [] if cache_only else [c for c in ds.split(split) if c.case_id not in skip]
    todo = todo[: limit or None]
    base = load_model("litemedsam") if any(c.case_id not in done for c in todo) else None
    for case in todo:
        if case.case_id in done:
            continue
        vol = load_volume(case.image)
        sess = Session(base, vol, intensity="auto")
        sess.embed()
        emb = torch.cat([sess.embedding(z) for z in range(sess.shape[0])]).half()
        saved.append((case.case_id, str(case.image), str(case.label), emb))
        if cache is not None:  # after every volume: a partial cache is usable
            tmp = Path(str(cache) + ".tmp")
            torch.save(saved, tmp)
            tmp.replace(cache)
        print(f"  embedded {case.case_id}", flush=True)
    out = []
    for case_id, image, label, emb in [r for r in saved if r[0] not in skip][: limit or None]:
        vol = load_volume(image)
        gt = np.asarray(load_label_map(label, reference=vol).array).astype(np.int64)
        out.append(
            {
                "case": case_id,
                "vol": vol,
                "gt": gt,
                "emb": emb,
                "geo": slice_geometry(vol.shape[1:], 256),
            }
        )
    return out


def score_adapter(adapter: str | Path, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean 3D Dice (RV/MYO/LV) over ``cases`` from cached embeddings: raw, largest component
    on all three classes, and ``recorded``: the clean-up the adapter's metadata.json records
    (what ``Session.automatic`` applies: largest component on the listed classes only)."""
    import torch

    from samed.evaluate.metrics import dice
    from samed.model import load_model
    from samed.model.sam import upscale_logits
    from samed.postprocess import keep_largest_component

    model = load_model("litemedsam", adapter=str(adapter))
    meta = Path(adapter) / "metadata.json"
    spec = json.loads(meta.read_text()).get("postprocessing") if meta.is_file() else None
    lcc = spec.get("largest_component") if isinstance(spec, dict) else None
    recorded = [1, 2, 3] if lcc is True else sorted(int(k) for k in lcc) if lcc else []
    kinds = ("raw", "largest_component", "recorded")
    res: dict[str, list[float]] = {k: [] for k in kinds}
    per_class: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    names = {1: "RV", 2: "MYO", 3: "LV"}
    with torch.inference_mode():
        for c in cases:
            geo = c["geo"]
            pred = np.zeros(c["gt"].shape, np.int16)
            for z0 in range(0, c["emb"].shape[0], 8):
                lg, _ = model.decode(c["emb"][z0 : z0 + 8].float(), multimask_output=True)
                full = upscale_logits(lg, geo.resized_hw, geo.original_hw, geo.image_size)
                pred[z0 : z0 + 8] = full.argmax(1).numpy()
            for kind, p in (
                ("raw", pred),
                ("largest_component", keep_largest_component(pred, [1, 2, 3])),
                ("recorded", keep_largest_component(pred, recorded) if recorded else pred),
            ):
                d = {n: dice(p == k, c["gt"] == k) for k, n in names.items()}
                res[kind].append(float(np.nanmean(list(d.values()))))
                for n, v in d.items():
                    per_class[kind].setdefault(n, []).append(v)
    return {
        "adapter": str(adapter),
        "mean_dice_raw": float(np.mean(res["raw"])),
        "mean_dice_largest_component": float(np.mean(res["largest_component"])),
        "mean_dice_recorded": float(np.mean(res["recorded"])),
        "recorded_largest_component": [names[k] for k in recorded],
        **{
            f"per_class_{kind}": {n: float(np.nanmean(v)) for n, v in per_class[kind].items()}
            for kind in kinds
        },
        "volumes": len(cases),
    }


def check_against_session(adapter: str | Path, case: dict[str, Any]) -> bool:
    """Whether the cached-embedding prediction equals ``Session.automatic`` on one volume."""
    import torch

    from samed.engine import Session
    from samed.model import load_model
    from samed.model.sam import upscale_logits

    model = load_model("litemedsam", adapter=str(adapter))
    ref = Session(model, case["vol"], intensity="auto").automatic(postprocess="none")
    geo = case["geo"]
    with torch.inference_mode():
        lg, _ = model.decode(case["emb"].float(), multimask_output=True)
        full = upscale_logits(lg, geo.resized_hw, geo.original_hw, geo.image_size)
    mine = full.argmax(1).numpy()
    agree = float((mine == ref).mean())
    print(
        f"  check {Path(adapter).name} on {case['case']}: {agree:.5f} of voxels identical "
        "(fp16 embedding cache vs fresh Session)"
    )
    return agree > 0.999


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapters", nargs="*")
    ap.add_argument("--cache", default=None, help="embeddings file (extended, then reused)")
    ap.add_argument("--cache-only", action="store_true", help="score on the cached volumes only")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cases = val_embeddings(limit=args.limit, cache=args.cache, cache_only=args.cache_only)
    print(f"embedded {len(cases)} val volumes in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for a in args.adapters:
        r = score_adapter(a, cases)
        meta_p = Path(a) / "metadata.json"
        meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
        r["best_step"] = meta.get("training", {}).get("best_step")
        rows.append(r)
        print(
            f"  {a}: Dice raw {r['mean_dice_raw']:.4f}, largest component "
            f"{r['mean_dice_largest_component']:.4f} (best step {r['best_step']})",
            flush=True,
        )
    if not args.adapters:
        return 0
    ok = check_against_session(args.adapters[-1], cases[0])
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    res = {"rows": rows, "session_check": ok, "uptime": up}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
