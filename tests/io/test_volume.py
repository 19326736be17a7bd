"""Volume, geometry helpers, atomic writes and the NIfTI writer on synthetic data."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from samed.io import (
    GeometryError,
    Volume,
    VolumeReadError,
    align_to,
    atomic_write,
    check_same_grid,
    load_label_map,
    load_volume,
    reorient,
    save_nifti,
)


def _affine(spacing=(0.8, 0.9, 2.5), origin=(10.0, -20.0, 30.0), flips=(1, 1, 1)) -> np.ndarray:
    a = np.diag([*(s * f for s, f in zip(spacing, flips, strict=True)), 1.0])
    a[:3, 3] = origin
    return a


def _volume(shape=(4, 5, 6), dtype=np.float32, **kw) -> Volume:
    rng = np.random.default_rng(0)
    return Volume(rng.normal(size=shape).astype(dtype), _affine(**kw))


def test_volume_properties_follow_zyx_convention():
    vol = _volume(flips=(-1, -1, 1))
    assert vol.shape == (4, 5, 6)
    assert vol.spacing == pytest.approx((2.5, 0.9, 0.8))  # (sz, sy, sx)
    assert vol.orientation == "LPS"
    img = vol.to_nifti()
    assert img.shape == (6, 5, 4)  # nibabel (x, y, z) = array.T
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol.array.T)


@pytest.mark.parametrize(
    ("array", "affine"),
    [
        (np.zeros((3, 4)), np.eye(4)),
        (np.zeros((2, 3, 4)), np.eye(3)),
        (np.zeros((2, 3, 4)), np.zeros((4, 4))),
    ],
)
def test_volume_rejects_bad_array_or_affine(array, affine):
    with pytest.raises(ValueError):
        Volume(array, affine)


def test_with_array_keeps_geometry_and_checks_shape():
    vol = _volume()
    vol.meta["x"] = 1
    new = vol.with_array(np.ones(vol.shape, dtype=np.uint8))
    np.testing.assert_array_equal(new.affine, vol.affine)
    assert new.meta == {"x": 1} and new.array.dtype == np.uint8
    with pytest.raises(GeometryError, match=r"\(4, 5, 6\)"):
        vol.with_array(np.ones((4, 5, 7)))


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "SPL", "IRA"])
def test_reorient_keeps_every_voxel_at_its_world_position(codes):
    vol = _volume(flips=(-1, 1, 1))
    out = reorient(vol, codes)
    assert out.orientation == codes
    # Each voxel's value sits at the same world position before and after.
    for z, y, x in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        world = vol.affine @ [x, y, z, 1]
        i, j, k = np.round(np.linalg.inv(out.affine) @ world)[:3].astype(int)
        assert out.array[k, j, i] == vol.array[z, y, x]
    back = reorient(out, vol.orientation)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-9)


def test_reorient_rejects_invalid_codes():
    with pytest.raises(ValueError, match="axcodes"):
        reorient(_volume(), "RRS")


def test_check_same_grid_and_align_to():
    vol = _volume()
    check_same_grid(vol.with_array(vol.array * 0), vol)
    shifted = Volume(vol.array, vol.affine + np.pad(np.full((3, 1), 1e-3), ((0, 1), (3, 0))))
    with pytest.raises(GeometryError, match="largest affine difference"):
        check_same_grid(shifted, vol)
    flipped = reorient(vol, "LPS")
    aligned = align_to(flipped, vol)
    np.testing.assert_array_equal(aligned.array, vol.array)
    with pytest.raises(GeometryError):
        align_to(shifted, vol)


def test_atomic_write_renames_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "out.nii.gz"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith("out.nii.gz") and tmp != target
        tmp.write_text("ok")
    assert target.read_text() == "ok"
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "missing" / "x.nii"):
            pass


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_save_nifti_round_trip_on_reference_grid(tmp_path, suffix):
    ref = _volume(flips=(-1, -1, 1))
    labels = (np.arange(np.prod(ref.shape)).reshape(ref.shape) % 7).astype(np.int64)
    path = save_nifti(labels, ref, tmp_path / f"lab{suffix}")
    back = load_label_map(path, reference=ref)
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.dtype == np.uint8
    assert np.abs(back.affine - ref.affine).max() <= 1e-4
    img = nib.load(path)
    assert img.header["sform_code"] == 1 and img.get_data_dtype() == np.uint8


def test_save_nifti_rejects_wrong_shape_or_suffix_and_writes_nothing(tmp_path):
    ref = _volume()
    with pytest.raises(GeometryError, match=r"\(4, 5, 6\)"):
        save_nifti(np.zeros((4, 5, 5)), ref, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match=r"\.nii"):
        save_nifti(np.zeros(ref.shape), ref, tmp_path / "x.nrrd")
    assert list(tmp_path.iterdir()) == []


def _write_nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_nifti_with_nan_or_inf_is_rejected_or_zeroed(tmp_path):
    data = np.ones((4, 5, 6), dtype=np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    path = _write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(VolumeReadError, match=r"1 NaN and 1 infinite"):
        load_volume(path)
    vol = load_volume(path, nonfinite="zero")
    assert np.isfinite(vol.array).all() and vol.array[0, 0, 0] == 0
    with pytest.raises(ValueError, match="nonfinite"):
        load_volume(path, nonfinite="ignore")


def test_4d_nifti_is_an_error_but_singleton_4th_axis_loads(tmp_path):
    with pytest.raises(VolumeReadError, match="4D"):
        load_volume(_write_nifti(tmp_path / "4d.nii.gz", np.zeros((4, 5, 6, 2), np.float32)))
    vol = load_volume(_write_nifti(tmp_path / "t1.nii.gz", np.zeros((4, 5, 6, 1), np.float32)))
    assert vol.shape == (6, 5, 4)


def test_single_slice_nifti_loads_as_z1(tmp_path):
    vol = load_volume(_write_nifti(tmp_path / "2d.nii.gz", np.zeros((4, 5, 1), np.int16)))
    assert vol.shape == (1, 5, 4) and vol.array.dtype == np.float32


def test_nifti_axis_order_and_affine_match_nibabel(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 100, size=(7, 6, 5)).astype(np.int16)  # (x, y, z)
    affine = _affine(flips=(-1, 1, 1))
    vol = load_volume(_write_nifti(tmp_path / "a.nii.gz", data, affine))
    np.testing.assert_array_equal(vol.array, data.T)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    # NIfTI is read by nibabel itself (issue #12: MONAI's NibabelReader rewrote some sforms).
    assert vol.meta["reader"] == "nibabel" and vol.meta["affine_source"] == "sform"


def test_label_map_must_be_integer_and_on_the_reference_grid(tmp_path):
    path = _write_nifti(tmp_path / "f.nii.gz", np.full((4, 5, 6), 1.5, np.float32))
    with pytest.raises(VolumeReadError, match="integers"):
        load_label_map(path)
    good = _write_nifti(tmp_path / "g.nii.gz", np.ones((4, 5, 6), np.uint8))
    other = Volume(np.zeros((6, 5, 4), np.float32), _affine())
    with pytest.raises(GeometryError, match=r"shape \(6, 5, 4\) vs \(6, 5, 4\).*affine"):
        load_label_map(good, reference=other)


def test_medsam_npz_synthetic(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "case.npz"
    np.savez(
        path,
        imgs=imgs,
        gts=(imgs > 10).astype(np.uint8),
        spacing=np.array([0.5, 0.6, 3.0]),
        origin=np.array([1.0, 2.0, 3.0]),
        direction=np.eye(3).ravel(),
    )
    vol = load_volume(path)
    np.testing.assert_array_equal(vol.array, imgs)
    assert vol.spacing == pytest.approx((3.0, 0.6, 0.5))
    assert vol.orientation == "LPS"  # identity direction in SimpleITK's LPS world
    np.testing.assert_allclose(vol.affine[:3, 3], [-1.0, -2.0, 3.0])
    labels = load_label_map(path, reference=vol)
    assert labels.array.dtype == np.uint8 and labels.array.sum() == (imgs > 10).sum()
    np.savez(tmp_path / "bad.npz", gts=imgs)
    with pytest.raises(VolumeReadError, match="'imgs'"):
        load_volume(tmp_path / "bad.npz")


def test_unsupported_or_missing_inputs(tmp_path):
    with pytest.raises(VolumeReadError, match="does not exist"):
        load_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeReadError, match="unsupported format"):
        load_volume(tmp_path / "notes.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(VolumeReadError, match="broken.nii.gz"):
        load_volume(tmp_path / "broken.nii.gz")
