"""Automatic segmentation at the adapter's training spacing, mapped back to the source grid
(issue #13): samed.engine.preprocess.canvas_grid / to_canvas / from_canvas and
Session.automatic's canvas path (samed.engine.canvas)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samed.engine.preprocess import canvas_grid, from_canvas, inplane_spacing, to_canvas


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.int64)


def test_grid_at_the_training_spacing_is_the_identity():
    g = canvas_grid((256, 256), (1.5, 1.5), 1.5, 256)
    assert g.identity_resample and g.offset == (0, 0)
    x = torch.rand(2, 256, 256)
    assert torch.equal(to_canvas(x, g), x)
    maps = torch.randn(2, 4, 256, 256)
    assert torch.equal(from_canvas(maps, g), maps)


def test_grid_geometry_pads_small_and_crops_large_slices():
    small = canvas_grid((200, 180), (1.0, 1.0), 1.25, 256)
    assert small.resampled_hw == (160, 144) and small.offset == (-48, -56)
    big = canvas_grid((512, 512), (0.977, 0.977), 1.5, 256, center=(300.0, 256.0))
    assert big.resampled_hw == (333, 333)
    # centred on source pixel (300, 256) -> resampled (195.4, 166.8), minus half the canvas
    assert big.offset == (67, 39)
    edge = canvas_grid((512, 512), (0.977, 0.977), 1.5, 256, center=(500.0, 5.0))
    assert edge.offset == (333 - 256, 0)  # clipped to the slice
    with pytest.raises(ValueError, match="target spacing"):
        canvas_grid((10, 10), 1.0, -1.0, 256)


@pytest.mark.parametrize("hw,spacing", [((300, 280), 0.8), ((120, 100), 3.0), ((512, 512), 0.977)])
def test_class_scores_come_back_onto_the_source_grid(hw, spacing):
    lab = _disc(*hw, hw[0] * 0.5, hw[1] * 0.45, min(hw) * 0.25)
    g = canvas_grid(hw, spacing, 1.5, 256)
    onehot = torch.as_tensor(np.stack([1 - lab, lab]), dtype=torch.float32)
    canvas = to_canvas(onehot, g)  # (2, S, S): the classes as images
    back = from_canvas(canvas[None], g)[0].argmax(0).numpy()
    assert back.shape == hw
    dice = 2 * (back & lab).sum() / (back.sum() + lab.sum())
    assert dice > 0.97


def _automatic_model(make_tiny_model, tmp_path, spacing):
    from samed.lora import LoraConfig, apply_lora, load_adapter, remove_adapter, save_adapter

    model = make_tiny_model("tinyvit", seed=3)
    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    torch.manual_seed(1)
    with torch.no_grad():  # a decoder that is not all-background somewhere
        for p in model.mask_decoder.output_hypernetworks_mlps.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    pre = {"intensity": "minmax", "spacing": spacing}
    folder = save_adapter(
        model,
        tmp_path / f"ad{spacing}",
        labels={0: "background", 1: "a", 2: "b"},
        metadata={"preprocessing": pre},
    )
    remove_adapter(model)
    return load_adapter(model, folder)


def _volume(shape, spacing, seed=0):
    from samed.io import Volume

    rng = np.random.default_rng(seed)
    z, h, w = shape
    v = rng.normal(0.3, 0.05, shape).astype(np.float32)
    v[:, h // 4 : h // 2, w // 3 : 2 * w // 3] += 0.5
    affine = np.diag([spacing, spacing, 2.5, 1.0])
    affine[:3, 3] = (-12.0, 40.0, 7.0)
    return Volume(np.clip(v, 0, 1), affine)


def test_a_volume_at_the_training_spacing_is_unchanged_by_the_resampling_path(
    make_tiny_model, tmp_path
):
    from samed.engine import Session

    model = _automatic_model(make_tiny_model, tmp_path, 1.5)
    vol = _volume((3, 256, 256), 1.5)
    assert inplane_spacing(vol.affine) == (1.5, 1.5)
    sess = Session(model, vol)
    assert sess.preprocessing["resampling"].startswith("automatic")
    canvas = sess.automatic(postprocess="none")
    plain = Session(model, vol.array).automatic(postprocess="none")  # no spacing: native path
    assert Session(model, vol.array).preprocessing["resampling"].startswith("none")
    np.testing.assert_array_equal(canvas, plain)
    assert len(np.unique(canvas)) > 1  # the test model does segment something


def test_other_spacings_come_back_on_the_source_grid(make_tiny_model, tmp_path):
    from samed.engine import Session

    model = _automatic_model(make_tiny_model, tmp_path, 1.5)
    for shape, spacing in (((2, 300, 280), 0.8), ((2, 90, 110), 3.0)):
        vol = _volume(shape, spacing)
        out = Session(model, vol).automatic(postprocess="none")
        assert out.shape == shape and out.dtype == np.int16
        # not the native path's answer (which resizes the longest side to 256)
        native = Session(model, vol.array).automatic(postprocess="none")
        assert native.shape == shape and not np.array_equal(out, native)


def test_segment_writes_the_source_grid_and_records_preprocessing(make_tiny_model, tmp_path):
    import nibabel as nib

    from samed.batch import segment_batch
    from samed.io import load_volume, save_nifti

    model = _automatic_model(make_tiny_model, tmp_path, 1.5)
    vol = _volume((2, 200, 220), 0.9)
    src = tmp_path / "in"
    src.mkdir()
    save_nifti(vol.array, vol, src / "case.nii.gz")
    out = tmp_path / "out"
    segment_batch([src], out, model=model, qc=False)
    case = json.loads((out / "case" / "case.json").read_text())
    pre = case["preprocessing"]
    assert pre["training_spacing_mm"] == [1.5, 1.5]
    assert pre["spacing_mm"] == pytest.approx([0.9, 0.9])
    assert pre["intensity_source"] == "adapter" and pre["intensity"] == "minmax"
    lab = nib.load(out / "case" / "labels.nii.gz")
    img = nib.load(src / "case.nii.gz")
    assert lab.shape == img.shape
    np.testing.assert_allclose(lab.affine, img.affine)
    again = load_volume(out / "case" / "labels.nii.gz")
    assert again.shape == vol.shape
