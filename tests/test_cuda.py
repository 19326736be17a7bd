"""GPU path: CUDA with fp16 autocast (the default) gives the CPU fp32 result on real slices.

These run only where a CUDA device is present (the lent GPU machine; see docs/BENCHMARKS.md for
the last run). CI machines have no GPU, so the module is skipped there with that reason.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from realdata import shared_path

from samed.engine import Session, mask_bbox
from samed.io import load_label_map, load_volume
from samed.lora import load_adapter, remove_adapter
from samed.model import build_model
from samed.registry import resolve_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"
    ),
]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


@pytest.fixture(scope="module")
def acdc():
    """Val patient 028 (never trained on): volume, labels, three slices with RV, MYO and LV."""
    vol = load_volume(shared_path("acdc/imagesTr/patient028_frame01.nii.gz"))
    gt = np.asarray(
        load_label_map(shared_path("acdc/labelsTr/patient028_frame01.nii.gz"), reference=vol).array
    ).astype(np.int64)
    full = [z for z in range(gt.shape[0]) if all((gt[z] == c).any() for c in (1, 2, 3))]
    return vol, gt, full[len(full) // 2 - 1 : len(full) // 2 + 2]


@pytest.fixture(scope="module")
def models():
    return build_model("litemedsam", device="cpu"), build_model("litemedsam", device="cuda")


def test_amp_box_masks_match_cpu_fp32(models, acdc):
    cpu_model, gpu_model = models
    vol, gt, zs = acdc
    cpu = Session(cpu_model, vol)
    gpu = Session(gpu_model, vol, amp=True)
    gpu.embed(zs)
    assert gpu.embedding(zs[0]).device.type == "cuda"
    agree = []
    for z in zs:
        for c in (1, 3):  # RV and LV: the structures a box prompt segments zero-shot
            box = mask_bbox(gt[z] == c, 5)
            a, b = cpu.predict(z, box=box), gpu.predict(z, box=box)
            assert a.shape == b.shape == gt[z].shape
            agree.append(_dice(a, b))
            assert _dice(b, gt[z] == c) > 0.8
    # fp16 autocast in the encoder moves a few boundary pixels, no more
    assert min(agree) > 0.97, agree


def test_fast_decoder_on_cuda_equals_sam_decoder(models):
    _, gpu_model = models
    torch.manual_seed(0)
    emb = torch.randn(1, 256, 64, 64, device="cuda")
    boxes = torch.tensor([[50.0, 60.0, 150.0, 170.0]], device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # SAM's transposed convs would run in TF32 (1e-2 off)
    try:
        with torch.inference_mode():
            gpu_model.fast_decoder = False
            ref, ref_iou = gpu_model.decode(emb, boxes=boxes)
            gpu_model.fast_decoder = True
            fast, iou = gpu_model.decode(emb, boxes=boxes)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert (fast - ref).abs().max().item() < 1e-3
    assert (iou - ref_iou).abs().max().item() < 1e-4


def test_automatic_adapter_on_cuda_matches_cpu(models, acdc):
    cpu_model, gpu_model = models
    vol, gt, zs = acdc
    labs = []
    for m in (cpu_model, gpu_model):
        load_adapter(m, resolve_adapter("acdc-cardiac-mri"))
        try:
            labs.append(Session(m, vol).automatic(slices=zs, postprocess="none"))
        finally:
            remove_adapter(m)
    cpu_lab, gpu_lab = labs
    for c in (1, 2, 3):
        assert _dice(gpu_lab[zs] == c, cpu_lab[zs] == c) > 0.97
        assert _dice(gpu_lab[zs] == c, gt[zs] == c) > 0.75


def test_finetune_with_amp_on_cuda(tmp_path: Path):
    # the CPU training tests' synthetic data (tests/train/test_train.py; on sys.path here too
    # when this file runs alone)
    sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
    from test_train import _cfg, make_tiny_dataset

    from samed.train import finetune

    (tmp_path / "data").mkdir()
    cfg = _cfg(
        make_tiny_dataset(tmp_path / "data"),
        data={"val_split": "val"},
        train={"device": "cuda", "amp": True, "iterations": 8, "cache_stages": 0},
    )
    res = finetune(cfg, tmp_path / "run", log=lambda s: None)
    losses = [v for _, v in json.loads((tmp_path / "run" / "metrics.json").read_text())["loss"]]
    assert res["steps"] == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert (res["adapter"] / "adapter_model.safetensors").is_file()


def test_fused_model_on_cuda_keeps_its_device_and_embeddings():
    m = build_model("litemedsam", device="cuda")
    x = torch.rand(2, 3, 256, 256, device="cuda")
    with torch.inference_mode():
        a = m.encode(x)
        m.fuse_for_inference()
        assert all(p.device.type == "cuda" for p in m.parameters())
        b = m.encode(x)
        with torch.autocast("cuda", dtype=torch.float16):
            c = m.encode(x).float()
    assert (a - b).abs().max().item() < 1e-2 * a.abs().max().item()
    assert (a - c).abs().max().item() < 5e-2 * a.abs().max().item()


@pytest.mark.parametrize("amp", [False, "fp16", "bf16"])
def test_session_precisions_are_finite_and_cached_apart(models, acdc, amp):
    _, gpu_model = models
    vol, _, zs = acdc
    s = Session(gpu_model, vol, amp=amp)
    emb = s.embedding(zs[0])
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    keys = {Session(gpu_model, vol, amp=a).cache_key for a in (False, "fp16", "bf16")}
    assert len(keys) == 3  # embeddings of different precisions never share a disk cache entry
