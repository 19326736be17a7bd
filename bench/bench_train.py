"""Seconds per training iteration for each fine-tuning option (CPU here, GPU when present).

Options (LiteMedSAM, automatic head with 4 classes, AdamW, Dice + CE on 256x256 logits):

- ``full``: LoRA r=4 on q,v of all 10 encoder qkv layers + decoder, encoder run every step
  (augmentation on the fly).
- ``full-amp``: the same under bf16 autocast (CUDA only; bf16 is slow on this CPU).
- ``cache1`` / ``cache2`` / ``cache3``: TinyViT stages 0..k-1 frozen and their features cached
  per slice (and augmented copy); LoRA only on ``layers.k`` and later + decoder.
- ``decoder``: decoder only on cached embeddings (no LoRA).
- ``data``: building one augmented batch (MONAI, ``prepare_slices``) in one process.

Usage: ``python bench/bench_train.py [--device cpu|cuda] [--batch 1 4] [--steps 3]
[--options full cache2 ...] [--tiny] [--json bench/results/train_cpu.json]``. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from samed.lora import LoraConfig, apply_lora
from samed.model import build_tiny_model, load_model
from samed.train.config import AugmentSection, PromptSection
from samed.train.data import SliceSet, VolumeCase, collate
from samed.train.loop import loss_fn
from samed.train.model import _encoder_prefix, _encoder_suffix

TARGETS = {
    "full": r"image_encoder\..*\.attn\.qkv",
    "full-amp": r"image_encoder\..*\.attn\.qkv",
    "cache1": r"image_encoder\.layers\.[123]\..*\.attn\.qkv",
    "cache2": r"image_encoder\.layers\.[23]\..*\.attn\.qkv",
    "cache3": r"image_encoder\.layers\.3\..*\.attn\.qkv",
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_option(opt: str, batch: int, steps: int, dev: torch.device, tiny: bool) -> float:
    """Median seconds per optimiser step (after one warm-up step)."""
    # training: never optimize_for_inference (it folds BatchNorm irreversibly)
    model = build_tiny_model(device=str(dev)) if tiny else load_model(device=dev, optimize=False)
    if opt == "decoder":
        from samed.lora import make_automatic_decoder

        model.mask_decoder = make_automatic_decoder(model.mask_decoder, 4)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.mask_decoder.parameters():
            p.requires_grad_(True)
        k = None
    else:
        apply_lora(
            model,
            LoraConfig(r=4, alpha=4, target_modules=TARGETS[opt], mode="automatic", num_classes=4),
        )
        k = int(opt[-1]) if opt.startswith("cache") else 0
        model.to(dev)  # apply_lora leaves its index buffers on the CPU
    model.eval()
    model.mask_decoder.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 256, 256, generator=g).to(dev)
    y = torch.randint(0, 4, (batch, model.low_res_size, model.low_res_size), generator=g).to(dev)
    with torch.no_grad():
        if opt == "decoder":
            cached = model.encode(x)
        elif k:
            cached = _encoder_prefix(model, x, k)
    amp = opt == "full-amp"
    times = []
    for i in range(steps + 1):
        _sync(dev)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            if opt == "decoder":
                emb = cached
            elif k:
                emb = _encoder_suffix(model, cached, k)
            else:
                emb = model.encode(x)
            logits, _ = model.decode(emb, multimask_output=True)
        loss = loss_fn(logits, y, "automatic", 0.8, 0.2)
        optim.zero_grad()
        loss.backward()
        optim.step()
        _sync(dev)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_data(batch: int, steps: int) -> float:
    """Seconds to build one augmented automatic batch from 256x216 slices (one process)."""
    rng = np.random.default_rng(0)
    img = rng.random((4, 216, 256), dtype=np.float32)
    lab = np.zeros((4, 216, 256), np.int64)
    lab[:, 80:140, 100:160] = 1
    ss = SliceSet(
        [VolumeCase("x", img, lab, "")], "automatic", AugmentSection(), PromptSection(), 256, 256
    )
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        collate([ss.sample(0, s, b) for b in range(batch)], "automatic")
        if s:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--options", nargs="+", default=["full", "cache1", "cache2", "cache3", "decoder", "data"]
    )
    ap.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        from samed.engine import tune_cpu_allocator

        tune_cpu_allocator()
    rows = []
    for b in args.batch:
        for opt in args.options:
            if opt == "full-amp" and dev.type != "cuda":
                continue
            t = (
                bench_data(b, args.steps)
                if opt == "data"
                else bench_option(opt, b, args.steps, dev, args.tiny)
            )
            rows.append({"option": opt, "batch": b, "seconds_per_iteration": round(t, 4)})
            print(f"{opt:10s} batch {b:3d}  {t:8.3f} s/it", flush=True)
    info = {
        "device": torch.cuda.get_device_name(0)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "steps": args.steps,
        "rows": rows,
    }
    print(f"\n{'option':10s} {'batch':>5s} {'s/it':>8s}   ({info['device']})")
    for r in rows:
        print(f"{r['option']:10s} {r['batch']:5d} {r['seconds_per_iteration']:8.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=2)


if __name__ == "__main__":
    main()
