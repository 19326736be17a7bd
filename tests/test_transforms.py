"""Intensity functions and the invertible model-input transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Invertd

from samed.io import Volume
from samed.registry import CT_WINDOWS, WindowPreset
from samed.transforms import (
    PercentileScaled,
    ResizeToModel,
    ResizeToModeld,
    WindowIntensity,
    WindowIntensityd,
    apply_window,
    from_metatensor,
    model_pipeline,
    percentile_scale,
    to_metatensor,
)


@pytest.mark.parametrize("name", sorted(CT_WINDOWS))
def test_apply_window_presets_map_the_window_to_0_1(name):
    p = CT_WINDOWS[name]
    hu = np.array([p.low - 100, p.low, p.center, p.high, p.high + 100], dtype=np.int16)
    out = apply_window(hu, name)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)


def test_apply_window_accepts_preset_objects_and_pairs_and_rejects_bad_ones():
    hu = np.linspace(-1000, 1000, 11)
    np.testing.assert_allclose(apply_window(hu, (-1000, 1000)), np.linspace(0, 1, 11), atol=1e-6)
    np.testing.assert_allclose(
        apply_window(hu, WindowPreset("x", 0, 2000)), np.linspace(0, 1, 11), atol=1e-6
    )
    with pytest.raises(ValueError, match="allowed"):
        apply_window(hu, "spleen")
    with pytest.raises(ValueError, match="below high"):
        apply_window(hu, (10, 10))


def test_percentile_scale():
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 100.0, size=(4, 32, 32)).astype(np.float32)
    out = percentile_scale(mr)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    lo, hi = np.percentile(mr, [0.5, 99.5])
    np.testing.assert_allclose(
        out[1, 2, 3], np.clip((mr[1, 2, 3] - lo) / (hi - lo), 0, 1), rtol=1e-5
    )
    assert not percentile_scale(np.full((2, 3, 3), 7.0)).any()
    mr[0, 0, 0] = np.nan
    assert np.isfinite(percentile_scale(mr)).all()
    with pytest.raises(ValueError, match="percentiles"):
        percentile_scale(mr, 60, 40)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_intensity_transforms_match_the_functions(as_tensor):
    hu = np.linspace(-500, 500, 60, dtype=np.float32).reshape(1, 3, 4, 5)
    img = torch.as_tensor(hu) if as_tensor else hu
    out = WindowIntensity("abdomen")(img)
    assert isinstance(out, torch.Tensor) == as_tensor
    np.testing.assert_allclose(np.asarray(out), apply_window(hu, "abdomen"))
    d = PercentileScaled("mr", 1, 99)(WindowIntensityd("ct", "lung")({"ct": img, "mr": img}))
    np.testing.assert_allclose(np.asarray(d["ct"]), apply_window(hu, "lung"))
    np.testing.assert_allclose(np.asarray(d["mr"]), percentile_scale(hu, 1, 99))


def _labels(shape_xyz=(90, 70, 3), n=5):
    rng = np.random.default_rng(1)
    return rng.integers(0, n, size=(1, *shape_xyz)).astype(np.uint8)


def _meta(array, affine=None):
    vol = Volume(array[0].T, np.diag([-0.8, -0.7, 2.5, 1.0]) if affine is None else affine)
    return to_metatensor(vol), vol


def test_resize_to_model_shape_affine_and_exact_inverse_when_upsampling():
    t, vol = _meta(_labels())
    fwd = ResizeToModel(256, "nearest")
    out = fwd(t)
    assert tuple(out.shape) == (1, 256, 256, 3) and out.dtype == torch.uint8
    nx, ny = 256, round(70 * 256 / 90)
    assert not out[0, :, ny:].any()  # padding at the high end of y
    # The resized grid's voxel centre maps to the same world point as the source voxel it samples.
    aff = np.asarray(out.affine)
    src_idx = (np.array([10, 20]) + 0.5) * np.array([90 / nx, 70 / ny]) - 0.5
    np.testing.assert_allclose(
        (aff @ [10, 20, 1, 1])[:3], (vol.affine @ [*src_idx, 1, 1])[:3], atol=1e-9
    )
    back = fwd.inverse(out)
    arr, affine = from_metatensor(back)
    np.testing.assert_array_equal(arr, vol.array)
    np.testing.assert_allclose(affine, vol.affine)
    assert [op["class"] for op in out.applied_operations] == ["ResizeToModel"]  # not mutated


def test_resize_to_model_inverse_restores_shape_and_labels_when_downsampling():
    lab = np.zeros((1, 512, 300, 2), np.uint8)
    lab[0, 100:300, 50:200] = 3
    lab[0, 320:420, 100:250] = 7
    t, vol = _meta(lab)
    fwd = ResizeToModel(256, "nearest")
    back, _ = from_metatensor(fwd.inverse(fwd(t)))
    assert back.shape == vol.shape and set(np.unique(back)) == {0, 3, 7}
    assert (back == vol.array).mean() > 0.99


def test_resize_dict_modes_and_validation():
    t, _ = _meta(_labels())
    image = t.float()
    d = ResizeToModeld(["image", "label"], 128, ["bilinear", "nearest"])(
        {"image": image, "label": t}
    )
    assert d["image"].shape == d["label"].shape == (1, 128, 128, 3)
    assert set(np.unique(d["label"].numpy())) <= set(range(5))
    with pytest.raises(ValueError, match="modes"):
        ResizeToModeld(["a", "b"], 128, ["nearest"])
    with pytest.raises(ValueError, match="mode"):
        ResizeToModel(128, "cubic")


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_model_pipeline_inverse_returns_to_the_source_grid(modality):
    rng = np.random.default_rng(2)
    affine = np.array(
        [[0.0, 0.0, 3.0, -10.0], [0.9, 0.0, 0.0, 5.0], [0.0, -0.9, 0.0, 7.0], [0, 0, 0, 1]]
    )
    lab = _labels((40, 30, 6))
    img = (rng.normal(size=lab.shape) * 300).astype(np.float32)
    image, img_vol = _meta(img, affine)
    label, lab_vol = _meta(lab, affine)
    pipe = model_pipeline("image", ["label"], modality=modality, size=64)
    out = pipe({"image": image, "label": label})
    assert out["image"].shape == (1, 64, 64, out["image"].shape[-1])
    assert "".join(__import__("nibabel").aff2axcodes(np.asarray(out["image"].affine))) == "LPS"
    assert 0 <= float(out["image"].min()) and float(out["image"].max()) <= 1
    inv = pipe.inverse(out)
    arr, aff = from_metatensor(inv["label"])
    np.testing.assert_array_equal(arr, lab_vol.array)
    np.testing.assert_allclose(aff, lab_vol.affine, atol=1e-9)
    # A model output carried back with MONAI's Invertd (nearest) lands exactly on the source grid.
    out["pred"] = out["label"].clone()
    pred, paff = from_metatensor(
        Invertd("pred", pipe, orig_keys="image", nearest_interp=True)(out)["pred"]
    )
    np.testing.assert_array_equal(pred, lab_vol.array)
    np.testing.assert_allclose(paff, img_vol.affine, atol=1e-9)
